//! Secure by default, on the real msld: a cluster key is required (or an
//! explicit `insecure_no_auth`, repeated at every start and in the status);
//! key and metadata files others may read are refused; a missing volume or
//! metadata file is an error unless the start creates it explicitly; a
//! node whose disk failed never persists `clean`; SIGHUP reloads the
//! run-time settings and keeps the old ones when the file is broken.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::*;

fn msld(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_msld"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// `--check` (and a start) refuse: no key, a key or metadata file others
/// may read, a missing volume or metadata file; each error names the path
/// and what to do. With --create the files are made owner-only.
#[test]
fn test_check_refuses_open_secrets_and_missing_files() {
    // `--check` looks the interfaces up: it runs where they are, in node
    // 1's namespace; a real start runs here, where the MSL interface is
    // missing, so it stops before it would serve.
    require_root();
    let topo = topology();
    let check = |args: &[&str]| {
        let out = command_in(topo.server_ns(1), env!("CARGO_BIN_EXE_msld"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let dir = keyed_dir("ab");
    let d = dir.path();
    let cfg = config(d, 1);
    let c = cfg.to_str().unwrap();

    // No key at all.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let keyless = d.join("keyless.toml");
    let no_key: String = text
        .lines()
        .filter(|l| !l.starts_with("key_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&keyless, &no_key).unwrap();
    let (ok, out) = check(&["--config", keyless.to_str().unwrap(), "--check"]);
    assert!(
        !ok && out.contains("`key_file`") && out.contains("insecure_no_auth"),
        "{out}"
    );

    // Missing volume, then missing metadata: named, creation explained.
    let (ok, out) = check(&["--config", c, "--check"]);
    assert!(
        !ok && out.contains("n1.img") && out.contains("create-md"),
        "{out}"
    );
    let (ok, out) = check(&["--config", c, "--check", "--create"]);
    assert!(ok, "{out}");
    // A start without --create refuses before creating anything.
    let (ok, out) = msld(&["--config", c]);
    assert!(
        !ok && out.contains("volume.path") && out.contains("n1.img"),
        "{out}"
    );
    assert!(!d.join("n1.img").exists() && !d.join("n1.meta").exists());

    // The first start (--create) makes both owner-only; it stops later at
    // the MSL interface this namespace lacks.
    let (ok, out) = msld(&["--config", c, "--create"]);
    assert!(!ok && out.contains("msl.interface"), "{out}");
    assert_eq!(mode(&d.join("n1.img")), 0o600);
    assert_eq!(mode(&d.join("n1.meta")), 0o600);
    let (ok, out) = check(&["--config", c, "--check"]);
    assert!(ok, "{out}");

    // The metadata file gone (an unmounted filesystem): an error, not a
    // fresh empty copy.
    std::fs::rename(d.join("n1.meta"), d.join("n1.meta.away")).unwrap();
    let (ok, out) = msld(&["--config", c]);
    assert!(
        !ok && out.contains("volume.metadata") && out.contains("n1.meta"),
        "{out}"
    );
    assert!(!d.join("n1.meta").exists(), "recreated: {out}");
    std::fs::rename(d.join("n1.meta.away"), d.join("n1.meta")).unwrap();

    // Key or metadata readable or writable by group or others.
    for (f, key) in [("cluster.key", "key_file"), ("n1.meta", "volume.metadata")] {
        for m in [0o640, 0o604, 0o620] {
            chmod(&d.join(f), m);
            let (ok, out) = check(&["--config", c, "--check"]);
            assert!(
                !ok && out.contains(key) && out.contains(f) && out.contains("chmod 600"),
                "{f} {m:o}: {out}"
            );
            let (ok, out) = msld(&["--config", c]);
            assert!(!ok && out.contains("chmod 600"), "{out}");
        }
        chmod(&d.join(f), 0o600);
    }
    let (ok, out) = check(&["--config", c, "--check"]);
    assert!(ok, "{out}");
}

fn single(extra: &str) -> (tempfile::TempDir, Topology, Daemon) {
    require_root();
    let dir = keyed_dir("cd");
    let topo = topology();
    let d = start_daemon_opts(
        dir.path(),
        &topo.veth.ns_a,
        1,
        true,
        &Opts {
            extra: extra.into(),
            ..Opts::default()
        },
    );
    wait("node 1 answers", 20, || status(dir.path(), 1).is_some());
    (dir, topo, d)
}

fn console(d: &Path) -> String {
    std::fs::read_to_string(d.join("n1.console")).unwrap_or_default()
}

/// `insecure_no_auth = true` (no key) runs, and says so at every start
/// (console and log file) and in every status.
#[test]
fn test_insecure_no_auth_repeated_at_start_and_in_status() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let topo = topology();
    let o = Opts {
        key_file: "none".into(),
        ..Opts::default()
    };
    let cfg = config_opts(dir.path(), 1, &o);
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("key_file = \"{}/none\"", dir.path().display()),
        "insecure_no_auth = true",
    );
    std::fs::write(&cfg, text).unwrap();
    for start in 1..=2 {
        let mut cmd = command_in(&topo.veth.ns_a, env!("CARGO_BIN_EXE_msld"));
        cmd.arg("--config").arg(&cfg).arg("--initial-primary");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path().join("n1.console"))
            .unwrap();
        let d = Daemon(
            cmd.stdout(std::process::Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        wait("node 1 answers", 20, || status(dir.path(), 1).is_some());
        let s = status(dir.path(), 1).unwrap();
        assert_eq!(s["insecure_no_auth"], true, "{s}");
        wait("the warning reaches the log", 5, || {
            std::fs::read_to_string(dir.path().join("n1.log"))
                .unwrap_or_default()
                .matches("event=insecure_no_auth")
                .count()
                == start
        });
        let c = console(dir.path());
        assert!(
            c.matches("NOT authenticated").count() >= 2 * start,
            "warning and event on the console at every start:\n{c}"
        );
        drop(d);
    }
}

/// A node whose disk failed stops without persisting `clean` (the next
/// start counts as a crash); a healthy node's clean stop persists it.
#[test]
fn test_clean_stop_after_disk_failure_never_marks_clean() {
    require_root();
    let dir = keyed_dir("ef");
    let topo = topology();
    let d = dir.path();
    let stop = |daemon: &Daemon| {
        let _ = Command::new("kill")
            .args(["-TERM", &daemon.0.id().to_string()])
            .status();
    };
    let exited = |daemon: &mut Daemon| {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if daemon.0.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    };
    // Healthy: clean.
    let mut d1 = start_daemon(d, &topo.veth.ns_a, 1, true);
    wait("node 1 answers", 20, || status(d, 1).is_some());
    stop(&d1);
    assert!(exited(&mut d1));
    let (_, m) = open_meta(&d.join("n1.meta"));
    assert!(m.clean, "a healthy clean stop persists clean");
    // The disk marked failed in the metadata (what an I/O error latches).
    let (mut store, mut m) = open_meta(&d.join("n1.meta"));
    m.disk = msl_wire::DiskState::Failed;
    store.persist(&m).unwrap();
    drop(store);
    // The daemon must find the lock free: wait out any sibling test's spawn.
    drop(open_meta(&d.join("n1.meta")));
    let mut d1 = start_daemon(d, &topo.veth.ns_a, 1, false);
    wait("node 1 answers", 20, || status(d, 1).is_some());
    let s = status(d, 1).unwrap();
    assert_eq!(s["disk"], "failed", "{s}");
    stop(&d1);
    assert!(exited(&mut d1), "{}", console(d));
    let (_, m) = open_meta(&d.join("n1.meta"));
    assert!(!m.clean, "a failed disk was marked clean on stop");
    assert_eq!(m.disk, msl_wire::DiskState::Failed);
}

/// SIGHUP reloads the resync limits and the notification command; the node
/// stays up in its role. A broken file keeps the old values and says why.
#[test]
fn test_sighup_reloads_rates_and_notify_command_keeps_old_on_error() {
    let (dir, _topo, mut daemon) = single("resync_min_mib_s = 20\nresync_max_mib_s = 100");
    let d = dir.path();
    let s = status(d, 1).unwrap();
    assert_eq!(
        (
            s["resync"]["min_mib_s"].as_u64(),
            s["resync"]["max_mib_s"].as_u64()
        ),
        (Some(20), Some(100)),
        "{s}"
    );
    let role = s["role"].clone();
    let script = d.join("notify.sh");
    let out = d.join("notify.out");
    std::fs::write(
        &script,
        format!("#!/bin/sh\necho \"$MSL_EVENT\" >> {}\n", out.display()),
    )
    .unwrap();
    chmod(&script, 0o755);
    let cfg = d.join("n1.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();
    let reloaded = good.replace(
        "resync_min_mib_s = 20\nresync_max_mib_s = 100",
        &format!(
            "resync_min_mib_s = 5\nresync_max_mib_s = 40\nnotify_command = \"{}\"\n\
             notify_events = [\"config_reloaded\", \"config_reload_failed\"]\nheartbeat_port = 7790",
            script.display()
        ),
    );
    assert_ne!(reloaded, good);
    std::fs::write(&cfg, &reloaded).unwrap();
    let pid = daemon.0.id().to_string();
    let hup = || {
        assert!(Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success())
    };
    hup();
    wait("the new rates in the status", 10, || {
        status(d, 1)
            .is_some_and(|s| s["resync"]["max_mib_s"] == 40 && s["resync"]["min_mib_s"] == 5)
    });
    wait("the new notify command ran", 10, || {
        std::fs::read_to_string(&out).is_ok_and(|t| t.contains("config_reloaded"))
    });
    let log = std::fs::read_to_string(d.join("n1.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("event=config_reloaded"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains("heartbeat_port") && line.contains("next start"),
        "a key that needs a restart is named: {line}"
    );
    // A broken file: the node keeps running with the old values.
    std::fs::write(
        &cfg,
        reloaded.replace("resync_max_mib_s = 40", "resync_max_mib_s = \"fast\""),
    )
    .unwrap();
    hup();
    wait("the failed reload logged", 10, || {
        std::fs::read_to_string(d.join("n1.log"))
            .is_ok_and(|t| t.contains("event=config_reload_failed"))
    });
    let log = std::fs::read_to_string(d.join("n1.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("event=config_reload_failed"))
        .unwrap();
    assert!(
        line.contains("resync_max_mib_s") && line.contains("unchanged"),
        "{line}"
    );
    wait("the failure reached the notify command", 10, || {
        std::fs::read_to_string(&out).is_ok_and(|t| t.contains("config_reload_failed"))
    });
    assert!(
        daemon.0.try_wait().unwrap().is_none(),
        "msld stopped: {}",
        console(d)
    );
    let s = status(d, 1).unwrap();
    assert_eq!(s["resync"]["max_mib_s"], 40, "{s}");
    assert_eq!(s["resync"]["min_mib_s"], 5, "{s}");
    assert_eq!(s["role"], role, "{s}");
}

/// `[volume] preallocate = false`: the first start makes a thin (sparse)
/// volume file of the configured size.
#[test]
fn test_thin_volume_created_sparse() {
    use std::os::unix::fs::MetadataExt;
    let dir = keyed_dir("12");
    let d = dir.path();
    let cfg = config(d, 1);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        text.trim_end().ends_with(".meta\""),
        "[volume] is the last table"
    );
    text.push_str("preallocate = false\n");
    std::fs::write(&cfg, text).unwrap();
    // Stops at the MSL interface this namespace lacks, after creating.
    let (ok, out) = msld(&["--config", cfg.to_str().unwrap(), "--create"]);
    assert!(!ok && out.contains("msl.interface"), "{out}");
    let m = std::fs::metadata(d.join("n1.img")).unwrap();
    assert_eq!(m.len(), 64 << 20);
    assert!(
        m.blocks() * 512 < 1 << 20,
        "thin volume has {} bytes allocated",
        m.blocks() * 512
    );
    assert_eq!(m.mode() & 0o777, 0o600);
}
