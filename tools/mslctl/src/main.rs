//! `mslctl`: show and change the state of an msl node.
//!
//! Talks to msld over its root-only control socket (`control_socket` in the
//! node's config, default /run/msl/msld.sock).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use msl_daemon::config::DaemonConfig;
use msl_daemon::control::{follow_events, request};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "mslctl", about = "Show and change the state of an msl node")]
struct Args {
    /// msld's control socket.
    #[arg(long, default_value = "/run/msl/msld.sock")]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Role, peer, links, generation, dirty data, resync progress, counters.
    Status {
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Follow the event stream (one line per event) until interrupted.
    Events {
        #[arg(long)]
        json: bool,
    },
    /// Make this node primary (refused if the peer is a live primary or the
    /// local data is not up to date, unless --force).
    Promote {
        #[arg(long)]
        force: bool,
    },
    /// Stop serving clients; stay secondary.
    Demote,
    /// Planned handover to the in-sync peer, losing no acknowledged write.
    Switchover,
    /// Drop the MSL session and stop reconnecting.
    Disconnect,
    /// Reconnect after `disconnect`.
    Connect,
    /// Discard this node's data: full resync from the peer.
    Invalidate,
    /// Online verify (on the primary, while in sync): compare both copies
    /// block by block without pausing clients. Shows progress; exits 0
    /// when identical, 2 when blocks differ, 1 on error.
    Verify {
        /// First block to compare.
        #[arg(long, default_value_t = 0)]
        start_block: u64,
        /// Blocks to compare (default: to the end of the volume).
        #[arg(long)]
        count: Option<u64>,
        /// Print the final status.verify document as JSON.
        #[arg(long)]
        json: bool,
        /// Mark differing blocks out of sync and resend them from the
        /// primary (the MSL session restarts once).
        #[arg(long)]
        resync: bool,
    },
    /// Create (initialise) this node's metadata from its msld config:
    /// cluster id, node id, volume geometry, a fresh generation. Refuses
    /// to overwrite an existing metadata file unless --force. (msld also
    /// creates it on its first start.)
    CreateMd {
        /// The node's msld configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Declare this node's volume the authoritative data of the pair
        /// (give it on exactly one node); otherwise it waits for a full sync.
        #[arg(long)]
        initial_primary: bool,
        /// Overwrite existing metadata (its generations and dirty map are
        /// lost: the node needs a full resync).
        #[arg(long)]
        force: bool,
    },
}

/// One request; the answer if the daemon said ok, its error otherwise.
fn call(socket: &Path, req: &Value) -> Result<Value, String> {
    let v = request(socket, req)?;
    if v["ok"] == true {
        Ok(v)
    } else {
        Err(v["error"].as_str().unwrap_or("failed").to_string())
    }
}

/// Start a verify and follow it to the end.
fn run_verify(
    socket: &Path,
    start: u64,
    count: Option<u64>,
    json: bool,
    resync: bool,
) -> Result<ExitCode, String> {
    let mut req = json!({"cmd": "verify", "start_block": start, "resync": resync});
    if let Some(c) = count {
        req["count"] = c.into();
    }
    let runs_before = call(socket, &req)?["runs_before"].as_u64().unwrap_or(0);
    let t0 = Instant::now();
    let mut last_print = t0;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let v = call(socket, &json!({"cmd": "status"}))?["status"]["verify"].clone();
        let (checked, total) = (
            v["checked_blocks"].as_u64().unwrap_or(0),
            v["total_blocks"].as_u64().unwrap_or(0),
        );
        if let Some(why) = v["aborted"].as_str() {
            return Err(format!(
                "verify aborted after {checked} of {total} blocks: {why}"
            ));
        }
        let done = v["active"] == false && v["runs"].as_u64().unwrap_or(0) > runs_before;
        if !done {
            if last_print.elapsed() >= Duration::from_secs(1) && !json {
                last_print = Instant::now();
                eprintln!(
                    "verify: {checked} of {total} blocks ({:.1} %), {} differ so far",
                    100.0 * checked as f64 / total.max(1) as f64,
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
                "verify: {checked} blocks compared in {:.1} s: {differing} differ{}",
                t0.elapsed().as_secs_f64(),
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
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        });
    }
}

/// `create-md`: initialise a node's metadata from its config.
fn create_md(config: &Path, initial_primary: bool, force: bool) -> Result<ExitCode, String> {
    let cfg = DaemonConfig::load(config).map_err(|e| e.to_string())?;
    let (_, meta) = msl_daemon::md::create(&cfg, initial_primary, force)?;
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
    Ok(ExitCode::SUCCESS)
}

fn yes_no(v: &Value, yes: &'static str, no: &'static str) -> &'static str {
    if v == true {
        yes
    } else {
        no
    }
}

fn print_status(s: &Value) {
    let r = &s["resync"];
    let g = &s["generations"];
    println!(
        "node {}: {} (disk {}{}), write mode {}",
        s["node"],
        s["role"].as_str().unwrap_or("?"),
        s["disk"].as_str().unwrap_or("?"),
        yes_no(&s["failed"], ", FAILED: fail-closed", ""),
        s["write_mode"].as_str().unwrap_or("?"),
    );
    println!(
        "peer: node {} ({}) | connected {} | in sync {}",
        s["peer"],
        s["peer_role"].as_str().unwrap_or("unknown"),
        s["connected"],
        s["in_sync"]
    );
    let m = &s["msl"];
    println!(
        "MSL {}: link {}, peer {}",
        m["interface"].as_str().unwrap_or("?"),
        yes_no(&m["link_up"], "up", "DOWN"),
        yes_no(&m["peer_heard"], "heard", "NOT HEARD"),
    );
    for a in s["lan"].as_array().into_iter().flatten() {
        println!(
            "LAN adapter {} {}: link {}, carrier {}, peer heartbeats {}",
            a["index"],
            a["name"].as_str().unwrap_or("?"),
            yes_no(&a["link_up"], "up", "DOWN"),
            yes_no(&a["carrier"], "yes", "NO"),
            yes_no(&a["peer_reachable"], "arriving", "MISSING"),
        );
    }
    println!(
        "generations: current {} bitmap {} history {}",
        g["current"].as_str().unwrap_or("?"),
        g["bitmap"].as_str().unwrap_or("?"),
        g["history"]
    );
    println!(
        "dirty: {} blocks ({:.1} MiB)",
        s["dirty_blocks"],
        s["dirty_bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0
    );
    if r["active"] == true {
        let total = r["total_blocks"].as_u64().unwrap_or(0);
        let left = r["remaining_blocks"].as_u64().unwrap_or(0);
        let pct = if total == 0 {
            100.0
        } else {
            100.0 * (total - left.min(total)) as f64 / total as f64
        };
        let eta = r["eta_s"]
            .as_u64()
            .map_or("unknown".to_string(), |e| format!("{e} s"));
        println!(
            "resync ({}): {pct:.1} % done, {left} of {total} blocks remaining, {:.1} MiB/s, ETA {eta}",
            yes_no(&r["source"], "source", "target"),
            r["rate_mib_s"].as_f64().unwrap_or(0.0),
        );
    }
    if let Some(e) = s["last_session_end"].as_str() {
        println!("last session ended: {e}");
    }
    println!(
        "pending writes {}, flushes {}",
        s["pending_writes"], s["pending_flushes"]
    );
    for (title, key) in [("counters", "counters"), ("NBD", "nbd")] {
        if let Some(c) = s[key].as_object() {
            let line: Vec<String> = c.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("{title}: {}", line.join(" "));
        }
    }
}

fn run(args: Args) -> Result<ExitCode, String> {
    let socket = args.socket.as_path();
    let req = match args.cmd {
        Cmd::Status { json } => {
            let v = call(socket, &json!({"cmd": "status"}))?;
            if json {
                println!("{}", v["status"]);
            } else {
                print_status(&v["status"]);
            }
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Events { json } => {
            follow_events(socket, |v| {
                if json {
                    println!("{v}");
                } else {
                    println!(
                        "node {} {}: {}",
                        v["node"],
                        v["event"].as_str().unwrap_or("?"),
                        v["message"].as_str().unwrap_or("")
                    );
                }
            })?;
            return Ok(ExitCode::SUCCESS);
        }
        Cmd::Verify {
            start_block,
            count,
            json,
            resync,
        } => return run_verify(socket, start_block, count, json, resync),
        Cmd::CreateMd {
            config,
            initial_primary,
            force,
        } => return create_md(&config, initial_primary, force),
        Cmd::Promote { force } => json!({"cmd": "promote", "force": force}),
        Cmd::Demote => json!({"cmd": "demote"}),
        Cmd::Switchover => json!({"cmd": "switchover"}),
        Cmd::Disconnect => json!({"cmd": "disconnect"}),
        Cmd::Connect => json!({"cmd": "connect"}),
        Cmd::Invalidate => json!({"cmd": "invalidate"}),
    };
    let v = call(socket, &req)?;
    println!(
        "{}: requested; {}",
        req["cmd"].as_str().unwrap_or(""),
        v["note"].as_str().unwrap_or("")
    );
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mslctl: {e}");
            ExitCode::FAILURE
        }
    }
}
