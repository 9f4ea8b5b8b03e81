//! The control socket `mslctl` talks to: a Unix stream socket, mode 0600
//! (root only), one JSON request per line, one JSON answer per line.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"events"}` (then a stream of event
//! lines until the client hangs up), and the admin commands
//! `promote` (with `"force":true|false`), `demote`, `switchover`,
//! `disconnect`, `connect`, `invalidate`. Answers carry `"ok"`; failures say
//! why in `"error"`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use msl_core::AdminCmd;
use serde_json::{json, Value};

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
        if line.len() > 4096 {
            let _ = writeln!(out, "{}", json!({"ok": false, "error": "request too long"}));
            return;
        }
        let answer = match serde_json::from_str::<Value>(&line) {
            Err(e) => json!({"ok": false, "error": format!("not JSON: {e}")}),
            Ok(req) => match req.get("cmd").and_then(Value::as_str) {
                Some("status") => match core_status(inputs) {
                    Some(s) => json!({"ok": true, "status": status_json(&s, tel)}),
                    None => json!({"ok": false, "error": "the daemon's core did not answer"}),
                },
                Some("events") => {
                    let rx = hub.subscribe();
                    if writeln!(out, "{}", json!({"ok": true, "streaming": true})).is_err() {
                        return;
                    }
                    while let Ok(ev) = rx.recv() {
                        if writeln!(out, "{ev}").is_err() {
                            return;
                        }
                    }
                    return;
                }
                Some("verify") => verify(inputs, &req),
                Some(cmd) => match admin(cmd, &req) {
                    Some(a) => match inputs.send(Input::Admin(a)) {
                        Ok(()) => {
                            json!({"ok": true, "cmd": cmd, "note": "watch `mslctl events` for the outcome"})
                        }
                        Err(_) => json!({"ok": false, "error": "the daemon is shutting down"}),
                    },
                    None => json!({"ok": false, "error": format!("unknown command `{cmd}`")}),
                },
                None => json!({"ok": false, "error": "missing \"cmd\""}),
            },
        };
        if writeln!(out, "{answer}").is_err() {
            return;
        }
    }
}

/// Start an online verify: refused at once (with the reason) unless this
/// node is an in-sync primary with no verify running; progress and result
/// are then in `status.verify`.
fn verify(inputs: &Inbox, req: &Value) -> Value {
    let Some(s) = core_status(inputs) else {
        return json!({"ok": false, "error": "the daemon's core did not answer"});
    };
    let why = if s.role != msl_wire::Role::Primary {
        Some("verify runs on the primary: ask the other node")
    } else if !s.in_sync {
        Some("the pair is not connected and in sync")
    } else if s.verify.active {
        Some("a verify is already running")
    } else {
        None
    };
    if let Some(why) = why {
        return json!({"ok": false, "error": format!("verify refused: {why}")});
    }
    let cmd = AdminCmd::Verify {
        start_block: req.get("start_block").and_then(Value::as_u64).unwrap_or(0),
        count: req.get("count").and_then(Value::as_u64).unwrap_or(u64::MAX),
        resync: req.get("resync").and_then(Value::as_bool).unwrap_or(false),
    };
    match inputs.send(Input::Admin(cmd)) {
        Ok(()) => json!({"ok": true, "cmd": "verify", "runs_before": s.verify.runs}),
        Err(_) => json!({"ok": false, "error": "the daemon is shutting down"}),
    }
}

fn admin(cmd: &str, req: &Value) -> Option<AdminCmd> {
    Some(match cmd {
        "promote" => AdminCmd::Promote {
            force: req.get("force").and_then(Value::as_bool).unwrap_or(false),
        },
        "demote" => AdminCmd::Demote,
        "switchover" => AdminCmd::Switchover,
        "disconnect" => AdminCmd::Disconnect,
        "connect" => AdminCmd::Connect,
        "invalidate" => AdminCmd::Invalidate,
        _ => return None,
    })
}

/// Client side (used by `mslctl`): send one request, read one answer.
pub fn request(socket: &Path, req: &Value) -> Result<Value, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot connect to {}: {e} (is msld running? are you root?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    writeln!(s, "{req}").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("no answer from msld: {e}"))?;
    serde_json::from_str(&line).map_err(|e| format!("bad answer from msld: {e}"))
}

/// Client side: stream events to `f` until the daemon goes away.
pub fn follow_events(socket: &Path, mut f: impl FnMut(&Value)) -> Result<(), String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    writeln!(s, "{}", json!({"cmd": "events"})).map_err(|e| e.to_string())?;
    for line in BufReader::new(s).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            if v.get("streaming").is_none() {
                f(&v);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::EventRecord;
    use std::sync::Mutex;

    #[test]
    fn test_control_socket_status_admin_and_bad_requests() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl.sock");
        let (tx, rx) = crate::inbox::inbox(16);
        let rx = rx.into_receiver();
        let hub = EventHub::default();
        let server = ControlServer::start(&sock, tx, hub.clone(), Arc::default()).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "control socket must be root-only");
        // A fake core answering status and recording admin commands.
        let core = std::thread::spawn(move || {
            let mut admins = Vec::new();
            while let Ok(i) = rx.recv_timeout(Duration::from_secs(3)) {
                match i {
                    Input::Status(r) => {
                        let mut cfg = msl_core::Config::new(1, 2, 7, 64, 4096);
                        cfg.window = 8;
                        let meta = msl_core::meta::Meta::create(7, 1, 64, 4096, Some(3));
                        let n: msl_core::Node<Vec<u8>> = msl_core::Node::new(cfg, meta, 1, 0);
                        let _ = r.send(n.status());
                    }
                    Input::Admin(a) => admins.push(a),
                    _ => {}
                }
                if admins.len() == 2 {
                    break;
                }
            }
            admins
        });
        let st = request(&sock, &json!({"cmd": "status"})).unwrap();
        assert_eq!(st["ok"], true);
        assert_eq!(st["status"]["role"], "secondary");
        assert_eq!(st["status"]["disk"], "uptodate");
        assert_eq!(
            request(&sock, &json!({"cmd": "promote", "force": true})).unwrap()["ok"],
            true
        );
        assert_eq!(
            request(&sock, &json!({"cmd": "switchover"})).unwrap()["ok"],
            true
        );
        let bad = request(&sock, &json!({"cmd": "reboot-the-world"})).unwrap();
        assert_eq!(bad["ok"], false);
        assert!(bad["error"].as_str().unwrap().contains("unknown command"));
        assert_eq!(
            core.join().unwrap(),
            vec![AdminCmd::Promote { force: true }, AdminCmd::Switchover]
        );
        // Events reach a subscriber.
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let s2 = sock.clone();
        std::thread::spawn(move || {
            let _ = follow_events(&s2, |v| g.lock().unwrap().push(v.clone()));
        });
        let rec = EventRecord {
            unix_ms: 1,
            node_id: 1,
            kind: "takeover",
            message: "x".into(),
        };
        for _ in 0..100 {
            hub.publish(&rec);
            if !got.lock().unwrap().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(got.lock().unwrap()[0]["event"], "takeover");
        drop(server);
        assert!(!sock.exists(), "socket removed on shutdown");
    }
}
