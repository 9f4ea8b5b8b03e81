//! A fake msld for mslctl's tests: a test aid that speaks the control
//! protocol on a Unix socket (status, the event stream, admin commands) and
//! answers each command as the test scripts it (carry it out after a delay
//! with an event, refuse it with the core's `warning`, refuse it in the
//! answer, or ignore it). The real daemon's outcomes are exercised by
//! engine/daemon's end-to-end tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// What the fake does with an admin command.
#[derive(Clone)]
pub enum Act {
    /// After 200 ms: set these status keys, then publish this event.
    Apply(Value, &'static str),
    /// Answer ok, then publish the core's `"<cmd> refused: <why>"` warning.
    RefuseByWarning(&'static str),
    /// Answer `{"ok":false,"refused":true,"error":...}`.
    RefuseInAnswer(&'static str),
    /// Answer ok:false, not a refusal (a daemon shutting down).
    Fail(&'static str),
    /// After 200 ms publish this event; change nothing.
    Event(&'static str, &'static str),
    /// Answer ok, then nothing happens.
    Nothing,
}

pub struct Fake {
    pub status: Mutex<Value>,
    acts: HashMap<&'static str, Act>,
    subs: Mutex<Vec<UnixStream>>,
    stop: AtomicBool,
}

impl Fake {
    pub fn publish(&self, kind: &str, message: &str) {
        let line = json!({"ts_ms": 1, "node": 1, "event": kind, "message": message}).to_string();
        self.subs
            .lock()
            .unwrap()
            .retain_mut(|s| writeln!(s, "{line}").is_ok());
    }

    fn serve(self: &Arc<Self>, conn: UnixStream) {
        let mut out = conn.try_clone().unwrap();
        for line in BufReader::new(conn).lines() {
            let Ok(line) = line else { return };
            let req: Value = serde_json::from_str(&line).unwrap();
            let cmd = req["cmd"].as_str().unwrap().to_string();
            let answer = match cmd.as_str() {
                "status" => json!({"ok": true, "status": *self.status.lock().unwrap()}),
                "events" => {
                    let mut subs = self.subs.lock().unwrap();
                    writeln!(out, "{}", json!({"ok": true, "streaming": true})).unwrap();
                    subs.push(out.try_clone().unwrap());
                    continue;
                }
                _ => match self.acts.get(cmd.as_str()).cloned().unwrap_or(Act::Nothing) {
                    Act::RefuseInAnswer(why) => {
                        json!({"ok": false, "refused": true, "error": format!("{cmd} refused: {why}")})
                    }
                    Act::Fail(why) => json!({"ok": false, "error": why}),
                    act => {
                        let me = self.clone();
                        let c = cmd.clone();
                        std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_millis(200));
                            match act {
                                Act::Apply(set, event) => {
                                    let mut s = me.status.lock().unwrap();
                                    for (k, v) in set.as_object().unwrap() {
                                        s[k] = v.clone();
                                    }
                                    drop(s);
                                    me.publish(event, "it happened");
                                }
                                Act::RefuseByWarning(why) => {
                                    me.publish("warning", &format!("{c} refused: {why}"))
                                }
                                Act::Event(kind, msg) => me.publish(kind, msg),
                                _ => {}
                            }
                        });
                        json!({"ok": true, "cmd": cmd, "note": "watch `mslctl events` for the outcome"})
                    }
                },
            };
            if writeln!(out, "{answer}").is_err() {
                return;
            }
        }
    }
}

pub struct Server {
    pub fake: Arc<Fake>,
    _dir: tempfile::TempDir,
    pub sock: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.fake.stop.store(true, Ordering::Relaxed);
    }
}

pub fn base_status() -> Value {
    json!({
        "node": 1, "peer": 2, "role": "secondary", "disk": "uptodate", "failed": false,
        "generation": "00000000000000aa", "write_mode": "sync",
        "connected": true, "in_sync": true, "msl_alive": true, "lan_alive": true,
        "peer_role": "primary", "switching": false,
        "msl": {"interface": "msl0", "link_up": true, "peer_heard": true},
        "lan": [{"index": 0, "name": "eth0", "link_up": true, "carrier": true,
                 "working": true, "peer_reachable": true}],
        "resync": {"active": false, "source": false, "remaining_blocks": 0, "total_blocks": 0},
        "verify": {"active": false},
    })
}

pub fn fake(status: Value, acts: &[(&'static str, Act)]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("msld.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    let fake = Arc::new(Fake {
        status: Mutex::new(status),
        acts: acts.iter().cloned().collect(),
        subs: Mutex::default(),
        stop: AtomicBool::new(false),
    });
    let f = fake.clone();
    std::thread::spawn(move || {
        while !f.stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((c, _)) => {
                    c.set_nonblocking(false).unwrap();
                    let f = f.clone();
                    std::thread::spawn(move || f.serve(c));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Server {
        fake,
        _dir: dir,
        sock,
    }
}

/// Run mslctl against `sock`: (exit code, stdout, stderr, seconds taken).
pub fn mslctl(sock: &Path, args: &[&str]) -> (i32, String, String, f64) {
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_mslctl"))
        .arg("--socket")
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        t0.elapsed().as_secs_f64(),
    )
}

/// `mslctl create-md --blank --config <config>` (`--initial-primary` for
/// node 1); panics unless it succeeds. Returns its output.
pub fn create_md_blank(config: &Path, id: u16) -> String {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mslctl"));
    c.args(["create-md", "--blank", "--config"]).arg(config);
    if id == 1 {
        c.arg("--initial-primary");
    }
    let out = c.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "create-md --blank on node {id}: {text}"
    );
    text
}
