//! msld under systemd's `Type=notify` protocol: a fake service manager (a
//! Unix datagram socket in the test directory, given as NOTIFY_SOCKET)
//! receives READY=1 with a STATUS= line once the node is up, WATCHDOG=1
//! again and again while the core runs, and STOPPING=1 on SIGTERM. SIGHUP
//! does not kill msld. One msld in a network namespace. Needs root.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::*;

/// Every datagram that arrives within `secs`, until `done` holds.
fn collect(
    sock: &UnixDatagram,
    got: &mut Vec<String>,
    secs: u64,
    done: impl Fn(&[String]) -> bool,
) {
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    while t.elapsed() < Duration::from_secs(secs) && !done(got) {
        if let Ok(n) = sock.recv(&mut buf) {
            got.extend(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .map(str::to_owned),
            );
        }
    }
}

fn count(got: &[String], line: &str) -> usize {
    got.iter().filter(|l| *l == line).count()
}

#[test]
fn test_msld_notifies_ready_status_watchdog_and_stopping() {
    require_root();
    let dir = keyed_dir("4e");
    let topo = topology();
    let notify = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let cfg = config(dir.path(), 1);
    let log = std::fs::File::create(dir.path().join("n1.console")).unwrap();
    let mut cmd = command_in(&topo.veth.ns_a, env!("CARGO_BIN_EXE_msld"));
    cmd.arg("--config")
        .arg(&cfg)
        .arg("--initial-primary")
        .env("NOTIFY_SOCKET", &notify)
        // 1 s: fed every 0.5 s.
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(log);
    let d = Daemon(cmd.spawn().unwrap());
    let console = || std::fs::read_to_string(dir.path().join("n1.console")).unwrap_or_default();

    let mut got = Vec::new();
    collect(&sock, &mut got, 20, |g| count(g, "WATCHDOG=1") >= 3);
    assert_eq!(count(&got, "READY=1"), 1, "{got:?}\n{}", console());
    let first_status = got
        .iter()
        .find(|l| l.starts_with("STATUS="))
        .unwrap_or_else(|| panic!("no STATUS= line: {got:?}"));
    assert!(
        first_status.starts_with("STATUS=secondary") || first_status.starts_with("STATUS=primary"),
        "{first_status}"
    );
    assert!(
        first_status.contains("node 2 not connected"),
        "the peer is not running: {first_status}"
    );
    assert!(
        count(&got, "WATCHDOG=1") >= 3,
        "the watchdog is fed repeatedly: {got:?}"
    );
    // READY=1 came after the control socket was bound: it answers.
    assert!(status(dir.path(), 1).is_some(), "{}", console());

    // SIGHUP (ExecReload) is logged, not fatal.
    let pid = d.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    // The reload is announced to systemd (RELOADING=1, then READY=1).
    got.clear();
    collect(&sock, &mut got, 5, |g| count(g, "READY=1") >= 1);
    assert_eq!(count(&got, "RELOADING=1"), 1, "{got:?}\n{}", console());
    assert!(
        status(dir.path(), 1).is_some(),
        "msld died of SIGHUP: {}",
        console()
    );
    assert!(console().contains("SIGHUP"), "{}", console());

    // SIGTERM: STOPPING=1.
    got.clear();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    collect(&sock, &mut got, 10, |g| count(g, "STOPPING=1") >= 1);
    assert!(count(&got, "STOPPING=1") >= 1, "{got:?}\n{}", console());
}
