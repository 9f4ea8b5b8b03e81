//! The control socket `mslctl` talks to: a Unix stream socket, mode 0600
//! (root only), one JSON request per line, one JSON answer per line.
//!
//! The JSON is `msl_control`'s: a [`Request`] per line, an [`Answer`] per
//! line; `events` streams `msl_control::Event` lines (text and structured
//! fields) until the client hangs up. State-changing commands are judged
//! against the core's state before they are passed on, so the answer is the
//! verdict: `"refused":true` with the reason in `"error"`, or `"ok":true`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use msl_control::proto::MAX_REQUEST_BYTES;
use msl_control::{Answer, Request};
use msl_core::node::Status;
use msl_core::AdminCmd;
use msl_wire::{DiskState, Role};

use crate::inbox::Inbox;
use crate::input::Input;
pub use crate::notify::{event_json, EventHub};
pub use crate::status::status_json;
use crate::status::{core_status, Telemetry};

/// The listening side, owned by `msld`.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Bind `path` (replacing a stale socket), mode 0600, and serve.
    pub fn start(
        path: &Path,
        inputs: Inbox,
        hub: EventHub,
        telemetry: Arc<Telemetry>,
    ) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if path.exists() {
            // A live daemon answers; a stale socket from a crash does not.
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!(
                        "control socket {} is in use: is another msld running?",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("msl-control".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let (i, h, t) = (inputs.clone(), hub.clone(), telemetry.clone());
                            let _ = std::thread::Builder::new()
                                .name("msl-control-conn".into())
                                .spawn(move || serve_conn(conn, &i, &h, &t));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            })?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve_conn(conn: UnixStream, inputs: &Inbox, hub: &EventHub, tel: &Telemetry) {
    let _ = conn.set_nonblocking(false);
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let reader = BufReader::new(conn);
    for line in reader.lines() {
        let Ok(line) = line else {
            return;
        };
        let too_long = line.len() > MAX_REQUEST_BYTES;
        let answer = match Request::parse_line(&line) {
            Err(e) => Answer::error(e),
            Ok(Request::Status) => match core_status(inputs) {
                Some(s) => Answer {
                    status: Some(status_json(&s, tel)),
                    ..Answer::ok()
                },
                None => Answer::error(NO_CORE),
            },
            Ok(Request::Events) => {
                let rx = hub.subscribe();
                let confirm = Answer {
                    streaming: Some(true),
                    ..Answer::ok()
                };
                if writeln!(out, "{}", to_line(&confirm)).is_err() {
                    return;
                }
                while let Ok(ev) = rx.recv() {
                    if writeln!(out, "{ev}").is_err() {
                        return;
                    }
                }
                return;
            }
            Ok(req) => command(inputs, &req),
        };
        if writeln!(out, "{}", to_line(&answer)).is_err() || too_long {
            return;
        }
    }
}

const NO_CORE: &str = "the daemon's core did not answer";

fn to_line(a: &Answer) -> String {
    serde_json::to_string(a)
        .unwrap_or_else(|_| r#"{"ok":false,"error":"unencodable answer"}"#.into())
}

/// A state-changing command (or verify): ask the core for its state, judge
/// the command as the core will (same guards as the core's admin handling,
/// plus a failed node), and pass it on only if it is accepted, so that the
/// answer is the verdict: `refused` with the reason, or ok (with a note
/// when there is nothing to do).
fn command(inputs: &Inbox, req: &Request) -> Answer {
    let Some(s) = core_status(inputs) else {
        return Answer::error(NO_CORE);
    };
    let (cmd, note) = match verdict(req, &s) {
        Verdict::Refused(why) => {
            return Answer {
                cmd: Some(req.name().into()),
                ..Answer::refused(why)
            }
        }
        Verdict::Nothing(note) => (None, Some(note)),
        Verdict::Run(cmd) => (Some(cmd), None),
    };
    if let Some(cmd) = cmd {
        if inputs.send(Input::Admin(cmd)).is_err() {
            return Answer::error("the daemon is shutting down");
        }
    }
    Answer {
        cmd: Some(req.name().into()),
        note: Some(
            note.unwrap_or("watch `mslctl events` for the outcome")
                .into(),
        ),
        runs_before: matches!(req, Request::Verify { .. }).then_some(s.verify.runs),
        ..Answer::ok()
    }
}

/// What a command does in the node's state.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Pass it to the core.
    Run(AdminCmd),
    /// Already done: nothing to pass on.
    Nothing(&'static str),
    /// Refused, with the reason (`"<cmd> refused..."`, the core's words
    /// where the core has them).
    Refused(&'static str),
}

fn verdict(req: &Request, s: &Status) -> Verdict {
    let primary = s.role == Role::Primary;
    let run = Verdict::Run;
    match *req {
        Request::Promote { force } => {
            if s.failed {
                Verdict::Refused("promote refused: this node's disk or metadata failed")
            } else if primary {
                Verdict::Nothing("already primary")
            } else if s.peer_role == Some(Role::Primary) && (s.msl_alive || s.lan_alive) && !force {
                Verdict::Refused("promote refused: the peer is primary and alive")
            } else if s.disk != DiskState::UpToDate && !force {
                Verdict::Refused("promote refused: local data is not up to date (use force)")
            } else {
                run(AdminCmd::Promote { force })
            }
        }
        Request::Demote if !primary && !s.switching => Verdict::Nothing("already secondary"),
        Request::Demote => run(AdminCmd::Demote),
        Request::Switchover => {
            if primary && s.in_sync && !s.switching {
                run(AdminCmd::Switchover)
            } else {
                Verdict::Refused("switchover refused: this node is not an in-sync primary")
            }
        }
        Request::Disconnect => run(AdminCmd::Disconnect),
        Request::Connect => {
            if s.failed {
                Verdict::Refused("connect refused: this node's disk or metadata failed")
            } else {
                run(AdminCmd::Connect)
            }
        }
        Request::Invalidate => {
            if primary {
                Verdict::Refused("invalidate refused on the primary")
            } else {
                run(AdminCmd::Invalidate)
            }
        }
        Request::Verify {
            start_block,
            count,
            resync,
        } => {
            if !primary {
                Verdict::Refused("verify refused: verify runs on the primary: ask the other node")
            } else if !s.in_sync {
                Verdict::Refused("verify refused: the pair is not connected and in sync")
            } else if s.verify.active {
                Verdict::Refused("verify refused: a verify is already running")
            } else {
                run(AdminCmd::Verify {
                    start_block,
                    count: count.unwrap_or(u64::MAX),
                    resync,
                })
            }
        }
        // Answered in `serve_conn`.
        Request::Status | Request::Events => Verdict::Nothing("nothing to do"),
    }
}

/// One request given as JSON, its answer as JSON (kept for callers that
/// build requests by hand; `mslctl` uses [`msl_control::request`]).
pub use msl_control::request_value as request;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::EventRecord;
    use msl_control::{Event, EventStream};
    use msl_core::Notice;
    use serde_json::json;
    use std::time::Instant;

    fn status(role: Role) -> Status {
        let mut cfg = msl_core::Config::new(1, 2, 7, 64, 4096);
        cfg.window = 8;
        let meta = msl_core::meta::Meta::create(7, 1, 64, 4096, Some(3));
        let n: msl_core::Node<Vec<u8>> = msl_core::Node::new(cfg, meta, 1, 0);
        let mut s = n.status();
        s.role = role;
        s
    }

    #[test]
    fn test_verdicts_follow_the_node_state() {
        let sec = status(Role::Secondary);
        let pri = status(Role::Primary);
        let promote = Request::Promote { force: false };
        assert_eq!(
            verdict(&promote, &sec),
            Verdict::Run(AdminCmd::Promote { force: false })
        );
        assert_eq!(verdict(&promote, &pri), Verdict::Nothing("already primary"));
        let mut failed = status(Role::Secondary);
        failed.failed = true;
        assert!(matches!(verdict(&promote, &failed), Verdict::Refused(_)));
        assert!(matches!(
            verdict(&Request::Promote { force: true }, &failed),
            Verdict::Refused(_)
        ));
        let mut peer_primary = status(Role::Secondary);
        peer_primary.peer_role = Some(Role::Primary);
        peer_primary.lan_alive = true;
        assert_eq!(
            verdict(&promote, &peer_primary),
            Verdict::Refused("promote refused: the peer is primary and alive")
        );
        assert_eq!(
            verdict(&Request::Promote { force: true }, &peer_primary),
            Verdict::Run(AdminCmd::Promote { force: true })
        );
        let mut outdated = status(Role::Secondary);
        outdated.disk = DiskState::Outdated;
        assert!(
            matches!(verdict(&promote, &outdated), Verdict::Refused(m) if m.contains("up to date"))
        );
        assert!(matches!(
            verdict(&Request::Switchover, &sec),
            Verdict::Refused(_)
        ));
        let mut in_sync = status(Role::Primary);
        in_sync.in_sync = true;
        assert_eq!(
            verdict(&Request::Switchover, &in_sync),
            Verdict::Run(AdminCmd::Switchover)
        );
        assert!(matches!(
            verdict(&Request::Invalidate, &pri),
            Verdict::Refused(_)
        ));
        assert_eq!(
            verdict(&Request::Invalidate, &sec),
            Verdict::Run(AdminCmd::Invalidate)
        );
        assert_eq!(
            verdict(&Request::Demote, &sec),
            Verdict::Nothing("already secondary")
        );
        assert_eq!(
            verdict(&Request::Demote, &pri),
            Verdict::Run(AdminCmd::Demote)
        );
        assert!(matches!(
            verdict(&Request::Connect, &failed),
            Verdict::Refused(_)
        ));
    }

    #[test]
    fn test_control_socket_answers_verdicts_and_streams_structured_events() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl.sock");
        let (tx, rx) = crate::inbox::inbox(16);
        let rx = rx.into_receiver();
        let hub = EventHub::default();
        let stop = tx.clone();
        let server = ControlServer::start(&sock, tx, hub.clone(), Arc::default()).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "control socket must be root-only");
        // A fake core: a secondary that answers status and records admin
        // commands until told to stop.
        let core = std::thread::spawn(move || {
            let mut admins = Vec::new();
            while let Ok(i) = rx.recv_timeout(Duration::from_secs(3)) {
                match i {
                    Input::Status(r) => {
                        let _ = r.send(status(Role::Secondary));
                    }
                    Input::Admin(a) => admins.push(a),
                    Input::Stop => break,
                    _ => {}
                }
            }
            admins
        });
        let st = request(&sock, &json!({"cmd": "status"})).unwrap();
        assert_eq!(st["ok"], true);
        assert_eq!(st["status"]["role"], "secondary");
        assert_eq!(st["status"]["disk"], "uptodate");
        let p = request(&sock, &json!({"cmd": "promote", "force": true})).unwrap();
        assert_eq!(p["ok"], true, "{p}");
        assert_eq!(p["cmd"], "promote");
        let refused = request(&sock, &json!({"cmd": "switchover"})).unwrap();
        assert_eq!(refused["ok"], false, "{refused}");
        assert_eq!(refused["refused"], true, "{refused}");
        assert_eq!(
            refused["error"],
            "switchover refused: this node is not an in-sync primary"
        );
        let nothing = request(&sock, &json!({"cmd": "demote"})).unwrap();
        assert_eq!(nothing["ok"], true);
        assert_eq!(nothing["note"], "already secondary");
        let bad = request(&sock, &json!({"cmd": "reboot-the-world"})).unwrap();
        assert_eq!(bad["ok"], false);
        assert!(bad.get("refused").is_none(), "a bad request is no refusal");
        assert!(bad["error"].as_str().unwrap().contains("unknown command"));
        // Events reach a subscriber, with their structured fields.
        let mut events = EventStream::open(&sock).unwrap();
        let rec = EventRecord::new(
            1,
            &Notice::Takeover {
                generation: 0xab,
                reason: "primary silent",
            },
        )
        .with_peer(2);
        hub.publish(&rec);
        let e: Event = events
            .next_before(Instant::now() + Duration::from_secs(3))
            .unwrap()
            .expect("an event");
        assert_eq!(e.event, "takeover");
        assert_eq!(e.fields["role"], "primary");
        assert_eq!(e.fields["generation"], "00000000000000ab");
        assert_eq!(e.fields["reason"], "primary silent");
        assert_eq!(e.fields["peer"], 2);
        drop(server);
        let _ = stop.send(Input::Stop);
        assert!(!sock.exists(), "socket removed on shutdown");
        // Only the accepted command reached the core.
        assert_eq!(
            core.join().unwrap(),
            vec![AdminCmd::Promote { force: true }]
        );
    }
}
