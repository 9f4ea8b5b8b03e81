//! Shared test helpers: an in-process server on 127.0.0.1, bounded child
//! processes, tool checks.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use msl_nbd::{Backend, Counters, Server, ServerConfig};

pub const EXPORT: &str = "msl";

/// A running server; stopped and joined on drop.
pub struct TestServer {
    pub port: u16,
    pub counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start(backend: Arc<dyn Backend>, cfg: ServerConfig) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let stop = Arc::new(AtomicBool::new(false));
        let server = Server::new(l, EXPORT.to_string(), backend, cfg, stop.clone());
        let port = server.local_addr().unwrap().port();
        let counters = server.counters();
        let thread = std::thread::spawn(move || server.run().expect("server run"));
        Self {
            port,
            counters,
            stop,
            thread: Some(thread),
        }
    }

    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, EXPORT)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Panic (test failure) naming the Debian package if `tool` is missing.
pub fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` not found: install the Debian package `{package}` \
         (scripts/setup.sh installs it: apt-get install -y {package})"
    );
}

/// Run a command with a deadline; kill it if it overruns. Panics on
/// timeout or failure, printing its output.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let out = run_status(cmd, timeout);
    assert!(
        out.status.success(),
        "{:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        cmd,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Like [`run`] but returns whatever status the command ended with.
pub fn run_status(cmd: &mut Command, timeout: Duration) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap())
        .spawn()
        .unwrap_or_else(|err| panic!("spawn {cmd:?}: {err}"));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} timed out after {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                std::fs::read_to_string(&o).unwrap_or_default(),
                std::fs::read_to_string(&e).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: std::fs::read(&o).unwrap_or_default(),
        stderr: std::fs::read(&e).unwrap_or_default(),
    }
}

/// sha256 of a file, via coreutils `sha256sum`.
pub fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path), Duration::from_secs(60));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}
