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

fn print_status(s: &Value) {
    let r = &s["resync"];
    println!(
        "node {}: {} (disk {}), generation {}",
        s["node"],
        s["role"].as_str().unwrap_or("?"),
        s["disk"].as_str().unwrap_or("?"),
        s["generation"].as_str().unwrap_or("?")
    );
    println!(
        "peer: {} | MSL {} | LAN {} | connected {} | in sync {}",
        s["peer_role"].as_str().unwrap_or("unknown"),
        if s["msl_alive"] == true { "up" } else { "DOWN" },
        if s["lan_alive"] == true { "up" } else { "DOWN" },
        s["connected"],
        s["in_sync"]
    );
    println!("dirty blocks: {}", s["dirty_blocks"]);
    if r["active"] == true {
        let total = r["total_blocks"].as_u64().unwrap_or(0);
        let left = r["remaining_blocks"].as_u64().unwrap_or(0);
        let pct = if total == 0 {
            100.0
        } else {
            100.0 * (total - left.min(total)) as f64 / total as f64
        };
        println!(
            "resync ({}): {:.1} % done, {left} of {total} blocks remaining",
            if r["source"] == true {
                "source"
            } else {
                "target"
            },
            pct
        );
    }
    println!(
        "pending writes {}, flushes {}",
        s["pending_writes"], s["pending_flushes"]
    );
    println!("counters: {}", s["counters"]);
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
