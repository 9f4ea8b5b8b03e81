//! `mslctl`: show and change the state of an msl node.
//!
//! Talks to msld over its root-only control socket through `msl-control`
//! (the protocol crate: this tool does not link the daemon, except for
//! `create-md`, which uses msld's own config checks and metadata code).
//! The command line is in [`cli`] (also read by the man page and
//! completion generator), waiting for outcomes in [`wait`].

pub mod cli;
pub mod show;
pub mod wait;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use msl_control::{follow_events, request, Answer, Request};

use crate::cli::{
    Args, Cmd, WaitOpts, EXIT_ERROR, EXIT_OK, EXIT_REFUSED, EXIT_TIMEOUT, EXIT_USAGE_OR_DIFFER,
};
use crate::wait::{Goal, WaitError};

/// A command that did not succeed: its exit status and what to tell.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    fn error(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_ERROR,
            message: message.into(),
        }
    }
}

impl From<WaitError> for Failure {
    fn from(e: WaitError) -> Self {
        match e {
            WaitError::Error(m) => Failure::error(m),
            WaitError::Refused(m) => Failure {
                code: EXIT_REFUSED,
                message: m,
            },
            WaitError::Timeout(m) => Failure {
                code: EXIT_TIMEOUT,
                message: m,
            },
        }
    }
}

/// One request; the answer if the daemon said ok, its error otherwise.
fn call(socket: &Path, req: &Request) -> Result<Answer, Failure> {
    let a = request(socket, req).map_err(|e| Failure::error(e.to_string()))?;
    if a.ok {
        Ok(a)
    } else {
        Err(Failure {
            code: if a.refused { EXIT_REFUSED } else { EXIT_ERROR },
            message: a.error.unwrap_or_else(|| format!("{} failed", req.name())),
        })
    }
}

fn timeout(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

/// A state change: sent, then (unless --no-wait) followed to its outcome.
fn state_change(socket: &Path, req: Request, w: WaitOpts) -> Result<u8, Failure> {
    if w.no_wait {
        let a = call(socket, &req)?;
        println!(
            "{}: requested; {}",
            req.name(),
            a.note.as_deref().unwrap_or("")
        );
        return Ok(EXIT_OK);
    }
    let done = wait::command(socket, &req, timeout(w.timeout))?;
    println!("{}: done: {done}", req.name());
    Ok(EXIT_OK)
}

/// Start a verify and follow it to the end.
fn run_verify(
    socket: &Path,
    start_block: u64,
    count: Option<u64>,
    json: bool,
    resync: bool,
) -> Result<u8, Failure> {
    let req = Request::Verify {
        start_block,
        count,
        resync,
    };
    let runs_before = call(socket, &req)?.runs_before.unwrap_or(0);
    let t0 = Instant::now();
    let mut last_print = t0;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let v = call(socket, &Request::Status)?
            .status
            .unwrap_or_default()
            .get("verify")
            .cloned()
            .unwrap_or_default();
        let (checked, total) = (
            v["checked_blocks"].as_u64().unwrap_or(0),
            v["total_blocks"].as_u64().unwrap_or(0),
        );
        if let Some(why) = v["aborted"].as_str() {
            return Err(Failure::error(format!(
                "verify aborted after {checked} of {total} blocks: {why}"
            )));
        }
        let done = v["active"] == false && v["runs"].as_u64().unwrap_or(0) > runs_before;
        if !done {
            if last_print.elapsed() >= Duration::from_secs(1) && !json {
                last_print = Instant::now();
                eprintln!(
                    "verify: {checked} of {total} blocks ({:.1} %, {} holes on both sides), {} differ so far",
                    100.0 * checked as f64 / total.max(1) as f64,
                    v["hole_blocks"].as_u64().unwrap_or(0),
                    v["differing_blocks"]
                );
            }
            continue;
        }
        let differing = v["differing_blocks"].as_u64().unwrap_or(0);
        if json {
            println!("{v}");
        } else {
            println!(
                "verify: {checked} blocks compared in {:.1} s ({} holes on both sides): {differing} differ{}",
                t0.elapsed().as_secs_f64(),
                v["hole_blocks"].as_u64().unwrap_or(0),
                match (differing > 0, resync) {
                    (false, _) => String::new(),
                    (true, false) => format!(" (first: {})", v["first_differing"]),
                    (true, true) => format!(
                        " (first: {}); marked out of sync, resync from the primary started",
                        v["first_differing"]
                    ),
                }
            );
        }
        return Ok(if differing == 0 {
            EXIT_OK
        } else {
            EXIT_USAGE_OR_DIFFER
        });
    }
}

/// `create-md`: initialise a node's metadata from its config.
fn create_md(
    config: &Path,
    initial_primary: bool,
    force: bool,
    blank: bool,
) -> Result<u8, Failure> {
    use msl_daemon::config::DaemonConfig;
    use msl_daemon::md::Blank;
    let cfg = DaemonConfig::load(config).map_err(|e| Failure::error(e.to_string()))?;
    if blank {
        let existed = cfg.file.volume.path.exists();
        let (_, meta, how) =
            msl_daemon::md::create_blank(&cfg, initial_primary, force).map_err(Failure::error)?;
        println!(
            "created metadata {}: cluster {:016x}, node {}, {} blocks of {} bytes, blank volume {} ({}): \
             {}; a peer created with --blank pairs without a full sync",
            cfg.file.volume.metadata.display(),
            meta.cluster_id,
            meta.node_id,
            meta.volume_blocks,
            meta.block_size,
            cfg.file.volume.path.display(),
            match (how, existed) {
                (Blank::Zeroed, _) => "block device zeroed",
                (Blank::NoData, false) => "created",
                (Blank::NoData, true) => "holds no data",
            },
            if initial_primary {
                "this node serves first"
            } else {
                "this node waits for its peer"
            }
        );
        return Ok(EXIT_OK);
    }
    let (_, meta) = msl_daemon::md::create(&cfg, initial_primary, force).map_err(Failure::error)?;
    // The volume too, when it is a file that does not exist yet (owner-only,
    // allocated as `[volume] preallocate` says): msld never creates it.
    let vol = &cfg.file.volume.path;
    if !vol.exists() {
        drop(msl_daemon::assemble::open_volume(&cfg, true).map_err(Failure::error)?);
        println!(
            "created volume {} ({} bytes{})",
            vol.display(),
            cfg.file.volume.size_bytes,
            if cfg.file.volume.preallocate {
                ""
            } else {
                ", thin"
            }
        );
    }
    println!(
        "created metadata {}: cluster {:016x}, node {}, {} blocks of {} bytes, generation {:016x} ({})",
        cfg.file.volume.metadata.display(),
        meta.cluster_id,
        meta.node_id,
        meta.volume_blocks,
        meta.block_size,
        meta.gens.current,
        if initial_primary {
            "this node's data is authoritative"
        } else {
            "waiting for a full sync from the peer"
        }
    );
    Ok(EXIT_OK)
}

/// `convert-md`: convert a node's format-1 metadata in place.
fn convert_md(config: &Path) -> Result<u8, Failure> {
    use msl_daemon::config::DaemonConfig;
    let cfg = DaemonConfig::load(config).map_err(|e| Failure::error(e.to_string()))?;
    let meta = msl_daemon::md::convert(&cfg).map_err(Failure::error)?;
    println!(
        "converted metadata {} to the current format: node {}, generation {:016x}, {} blocks out of sync (the format-1 file is kept as {}.v1)",
        cfg.file.volume.metadata.display(),
        meta.node_id,
        meta.gens.current,
        meta.dirty.count(),
        cfg.file.volume.metadata.display(),
    );
    Ok(EXIT_OK)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Run one command line against the control socket; `socket_dir` is
/// where sockets are looked for when neither --socket nor --config is
/// given (/run/msl outside tests). The exit status, or why it failed.
pub fn run(args: Args, socket_dir: &Path) -> Result<u8, Failure> {
    if let Cmd::CreateMd {
        initial_primary,
        force,
        blank,
    } = args.cmd
    {
        let Some(config) = &args.config else {
            return Err(Failure {
                code: EXIT_USAGE_OR_DIFFER,
                message: "create-md needs the node's config: --config FILE".into(),
            });
        };
        return create_md(config, initial_primary, force, blank);
    }
    if let Cmd::ConvertMd = args.cmd {
        let Some(config) = &args.config else {
            return Err(Failure {
                code: EXIT_USAGE_OR_DIFFER,
                message: "convert-md needs the node's config: --config FILE".into(),
            });
        };
        return convert_md(config);
    }
    let socket: PathBuf =
        msl_control::find_socket(args.socket.as_deref(), args.config.as_deref(), socket_dir)
            .map_err(Failure::error)?;
    let socket = socket.as_path();
    match args.cmd {
        Cmd::Status { json } => {
            let s = call(socket, &Request::Status)?.status.unwrap_or_default();
            if json {
                println!("{s}");
            } else {
                show::print_status(&s);
            }
            Ok(EXIT_OK)
        }
        Cmd::Events { json, now } => {
            let print = |e: &msl_control::Event| {
                if json {
                    println!(
                        "{}",
                        serde_json::to_string(e).unwrap_or_else(|_| unreachable!())
                    );
                } else {
                    println!("{}", show::event_line(e));
                }
            };
            if now {
                let s = call(socket, &Request::Status)?.status.unwrap_or_default();
                show::state_events(&s, unix_ms()).iter().for_each(print);
                return Ok(EXIT_OK);
            }
            follow_events(socket, print).map_err(|e| Failure::error(e.to_string()))?;
            Ok(EXIT_OK)
        }
        Cmd::Verify {
            start_block,
            count,
            json,
            resync,
        } => run_verify(socket, start_block, count, json, resync),
        Cmd::WaitSync { timeout: t } => {
            println!("{}", wait::until(socket, Goal::Sync, timeout(t))?);
            Ok(EXIT_OK)
        }
        Cmd::WaitConnect { timeout: t } => {
            println!("{}", wait::until(socket, Goal::Connect, timeout(t))?);
            Ok(EXIT_OK)
        }
        Cmd::Promote { force, wait } => state_change(socket, Request::Promote { force }, wait),
        Cmd::Demote { wait } => state_change(socket, Request::Demote, wait),
        Cmd::Switchover { wait } => state_change(socket, Request::Switchover, wait),
        Cmd::Disconnect { wait } => state_change(socket, Request::Disconnect, wait),
        Cmd::Connect { wait } => state_change(socket, Request::Connect, wait),
        Cmd::Invalidate { wait } => state_change(socket, Request::Invalidate, wait),
        Cmd::CreateMd { .. } | Cmd::ConvertMd => unreachable!("handled above"),
    }
}
