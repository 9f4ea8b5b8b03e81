//! `mslctl`: show and change the state of an msl node.
//!
//! Talks to msld over its root-only control socket (`control_socket` in the
//! node's config, default /run/msl/msld.sock).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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

fn main() -> ExitCode {
    let args = Args::parse();
    let req = match &args.cmd {
        Cmd::Status { json } => {
            return match request(&args.socket, &json!({"cmd": "status"})) {
                Ok(v) if v["ok"] == true => {
                    if *json {
                        println!("{}", v["status"]);
                    } else {
                        print_status(&v["status"]);
                    }
                    ExitCode::SUCCESS
                }
                Ok(v) => {
                    eprintln!("mslctl: {}", v["error"].as_str().unwrap_or("failed"));
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("mslctl: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Cmd::Events { json } => {
            let json = *json;
            return match follow_events(&args.socket, |v| {
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
            }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mslctl: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Cmd::Promote { force } => json!({"cmd": "promote", "force": force}),
        Cmd::Demote => json!({"cmd": "demote"}),
        Cmd::Switchover => json!({"cmd": "switchover"}),
        Cmd::Disconnect => json!({"cmd": "disconnect"}),
        Cmd::Connect => json!({"cmd": "connect"}),
        Cmd::Invalidate => json!({"cmd": "invalidate"}),
    };
    match request(&args.socket, &req) {
        Ok(v) if v["ok"] == true => {
            println!(
                "{}: requested; {}",
                req["cmd"].as_str().unwrap_or(""),
                v["note"].as_str().unwrap_or("")
            );
            ExitCode::SUCCESS
        }
        Ok(v) => {
            eprintln!("mslctl: {}", v["error"].as_str().unwrap_or("failed"));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("mslctl: {e}");
            ExitCode::FAILURE
        }
    }
}
