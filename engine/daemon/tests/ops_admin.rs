//! What administrators see of a real node: `msld --check` against the
//! network namespace it runs in, and levelled log lines on stderr (no
//! journal) with the event log file optional and the level reloadable.
//! msld processes in the two-namespace test topology; needs root.

use std::path::Path;
use std::process::{Command, Stdio};

mod common;
use common::*;

/// `msld --config CFG --check --create` inside `ns`: (exit code, stdout,
/// stderr), with no journal in the environment.
fn check_in(ns: &str, cfg: &Path) -> (i32, String, String) {
    let out = command_in(ns, env!("CARGO_BIN_EXE_msld"))
        .arg("--config")
        .arg(cfg)
        .args(["--check", "--create"])
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The check passes where the interfaces are, and elsewhere names every
/// missing interface, a second LAN adapter that does not exist and a
/// service address prefix that does not match its network.
#[test]
fn test_check_names_what_this_namespace_lacks() {
    require_root();
    let topo = topology();
    let dir = keyed_dir("ab");
    let cfg = config(dir.path(), 1);
    let (code, out, err) = check_in(&topo.veth.ns_a, &cfg);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("is valid"), "{out}");

    // Node 1's configuration in node 2's namespace: nothing is there.
    let (code, _, err) = check_in(&topo.veth.ns_b, &cfg);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!(
            "msl.interface = \"{IF_A}\": no such interface here"
        )),
        "{err}"
    );
    assert!(
        err.contains("lan[0].interface = \"a-lan\": no such interface here"),
        "{err}"
    );
    assert!(err.contains("2 problems"), "{err}");
    assert!(
        err.lines()
            .filter(|l| l.contains("no such interface"))
            .all(|l| l.contains("ERROR")),
        "problems are logged as errors: {err}"
    );

    let text = std::fs::read_to_string(&cfg).unwrap();
    let bad = text.replacen("10.77.1.100/24", "10.77.1.100/16", 1)
        + "[[lan]]\ninterface = \"eth9\"\naddress = \"10.77.9.1\"\npeer_address = \"10.77.9.2\"\n";
    let bad_cfg = dir.path().join("bad.toml");
    std::fs::write(&bad_cfg, bad).unwrap();
    let (code, _, err) = check_in(&topo.veth.ns_a, &bad_cfg);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("lan[1].interface = \"eth9\": no such interface here"),
        "{err}"
    );
    assert!(
        err.contains("service_address = 10.77.1.100/16: a-lan has 10.77.1.1/24"),
        "{err}"
    );
    assert!(err.contains("2 problems"), "{err}");
}

/// Console lines after byte `from` of node `id`'s console.
fn console_since(dir: &Path, id: u16, from: usize) -> String {
    let all = std::fs::read(dir.join(format!("n{id}.console"))).unwrap_or_default();
    String::from_utf8_lossy(&all[from.min(all.len())..]).to_string()
}

/// Node 1 runs without an event log file and without a journal: its
/// events are levelled lines on stderr (info for `connected`, warning for
/// the peer's loss). A reload to `log_level = "warn"` (which also starts
/// the log file) silences the info lines at once, while the log file
/// gets every event.
#[test]
fn test_levelled_stderr_without_journal_or_log_file() {
    require_root();
    let topo = topology();
    let dir = keyed_dir("cd");
    let d = dir.path();
    // Node 1: common config minus its log file, started by hand.
    let cfg1 = config(d, 1);
    let text = std::fs::read_to_string(&cfg1).unwrap();
    let log_line = format!("log_file = \"{}/n1.log\"\n", d.display());
    assert!(text.contains(&log_line));
    std::fs::write(&cfg1, text.replacen(&log_line, "", 1)).unwrap();
    let console = std::fs::File::create(d.join("n1.console")).unwrap();
    let _d1 = Daemon(
        command_in(&topo.veth.ns_a, env!("CARGO_BIN_EXE_msld"))
            .arg("--config")
            .arg(&cfg1)
            .arg("--initial-primary")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(console)
            .spawn()
            .unwrap(),
    );
    let mut d2 = start_daemon(d, &topo.veth.ns_b, 2, false);
    wait("both nodes in sync", 60, || {
        status(d, 1).is_some_and(|s| s["in_sync"] == true && s["role"] == "primary")
    });
    wait("node 1 logs `connected`", 10, || {
        console_since(d, 1, 0).contains("msld[node 1] connected:")
    });
    let c = console_since(d, 1, 0);
    let connected = c
        .lines()
        .find(|l| l.contains("msld[node 1] connected:"))
        .unwrap();
    assert!(
        connected.contains(" INFO ") && connected.contains("event=\"connected\""),
        "{connected}"
    );
    assert!(!d.join("n1.log").exists(), "no log_file, no file");

    // Reload: warnings and errors only, and an event log file from now on.
    let mark = std::fs::metadata(d.join("n1.console")).unwrap().len() as usize;
    let text = std::fs::read_to_string(&cfg1).unwrap();
    std::fs::write(
        &cfg1,
        text.replacen(
            "node_id = 1\n",
            &format!("node_id = 1\nlog_level = \"warn\"\n{log_line}"),
            1,
        ),
    )
    .unwrap();
    let pid = _d1.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let log1 = || std::fs::read_to_string(d.join("n1.log")).unwrap_or_default();
    wait("the reload reaches the new log file", 10, || {
        log1().contains("event=config_reloaded")
    });

    // The secondary dies: node 1 warns.
    d2.0.kill().unwrap();
    let _ = d2.0.wait();
    wait("node 1 reports the peer lost", 15, || {
        log1().contains("event=peer_lost")
    });
    wait("node 1 warns on stderr", 5, || {
        console_since(d, 1, mark).contains("msld[node 1] peer lost:")
    });
    let after = console_since(d, 1, mark);
    let down = after
        .lines()
        .find(|l| l.contains("msld[node 1] peer lost:"))
        .unwrap();
    assert!(down.contains(" WARN "), "{down}");
    assert!(
        !after.contains(" INFO "),
        "info lines after log_level = warn:\n{after}"
    );
    assert!(!after.contains("config reloaded"), "{after}");
}
