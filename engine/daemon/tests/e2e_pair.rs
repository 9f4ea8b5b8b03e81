//! Two real msld processes in two network namespaces (MSL veth pair, LAN
//! veth pair, service address), a real NBD client (qemu-io) writing through
//! the service address, status read over the control socket, and the two
//! backing files compared. Needs root (CI runs as root); fails loudly
//! otherwise.

use std::process::{Command, Stdio};
use std::time::Instant;

mod common;
use common::*;

#[test]
fn test_pair_in_namespaces_qemu_io_writes_mirrored_byte_identical() {
    assert!(
        is_root(),
        "this test needs root (network namespaces); CI runs it as root"
    );
    assert!(
        Command::new("qemu-io")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "qemu-io missing: apt-get install qemu-utils (scripts/setup.sh)"
    );
    let dir = keyed_dir("11");
    let topo = topology();
    let start = |ns: &str, id: u16, primary: bool| start_daemon(dir.path(), ns, id, primary);
    let _d1 = start(&topo.veth.ns_a, 1, true);
    let _d2 = start(&topo.veth.ns_b, 2, false);
    wait("both nodes in sync", 30, || {
        status(dir.path(), 1).is_some_and(|s| s["in_sync"] == true && s["role"] == "primary")
            && status(dir.path(), 2)
                .is_some_and(|s| s["in_sync"] == true && s["disk"] == "uptodate")
    });
    // A real NBD client through the service address, from the LAN.
    let out = command_in(&topo.veth.ns_b, "qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 4M",
            "-c",
            "write -P 0xcd 8M 1M",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 0 4M",
        ])
        .arg("nbd://10.77.1.100:10809")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let console = std::fs::read_to_string(dir.path().join("n1.console")).unwrap_or_default();
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io: {text}\nnode 1 console:\n{console}"
    );
    wait("still in sync after the writes", 10, || {
        status(dir.path(), 1).is_some_and(|s| s["in_sync"] == true)
            && status(dir.path(), 2).is_some_and(|s| s["in_sync"] == true)
    });
    let s1 = status(dir.path(), 1).unwrap();
    assert!(
        s1["counters"]["client_writes"].as_u64().unwrap() > 0,
        "{s1}"
    );
    // Stop both cleanly (SIGTERM) so caches are flushed, then compare.
    let (a, b) = stop_and_read_images(dir.path(), &[&_d1, &_d2]);
    assert!(
        a[..4 << 20].iter().all(|&x| x == 0xab),
        "node 1 volume lacks the client's data"
    );
    assert!(a == b, "backing files differ");
    let log1 = std::fs::read_to_string(dir.path().join("n1.log")).unwrap();
    assert!(log1.contains("event=connected"), "{log1}");
}

#[test]
fn test_primary_killed_secondary_takes_over_old_primary_rejoins_resynced() {
    assert!(
        is_root(),
        "this test needs root (network namespaces); CI runs it as root"
    );
    let dir = keyed_dir("22");
    let topo = topology();
    let start = |ns: &str, id: u16, primary: bool| start_daemon(dir.path(), ns, id, primary);
    let mut d1 = start(&topo.veth.ns_a, 1, true);
    let d2 = start(&topo.veth.ns_b, 2, false);
    wait("both nodes in sync", 30, || {
        status(dir.path(), 1).is_some_and(|s| s["in_sync"] == true && s["role"] == "primary")
            && status(dir.path(), 2).is_some_and(|s| s["in_sync"] == true)
    });
    qemu_io(
        &topo.veth.ns_b,
        &["write -P 0x11 0 2M", "write -P 0x22 4M 1M"],
    );
    // kill -9 the primary.
    let t = Instant::now();
    let _ = d1.0.kill();
    let _ = d1.0.wait();
    wait("node 2 takes over", 10, || {
        status(dir.path(), 2).is_some_and(|s| s["role"] == "primary")
    });
    let takeover = t.elapsed();
    // Every acknowledged write is on the survivor; the client goes on
    // through the same address.
    qemu_io(
        &topo.veth.ns_b,
        &[
            "read -P 0x11 0 2M",
            "read -P 0x22 4M 1M",
            "write -P 0x33 1M 1M",
            "flush",
        ],
    );
    // The old primary restarts: secondary, resynced.
    d1 = start(&topo.veth.ns_a, 1, false);
    wait("old primary rejoins as an in-sync secondary", 30, || {
        status(dir.path(), 1).is_some_and(|s| s["in_sync"] == true && s["role"] == "secondary")
            && status(dir.path(), 2).is_some_and(|s| s["in_sync"] == true)
    });
    let (a, b) = stop_and_read_images(dir.path(), &[&d1, &d2]);
    assert!(a == b, "backing files differ after resync");
    assert!(
        a[..1 << 20].iter().all(|&x| x == 0x11) && a[1 << 20..2 << 20].iter().all(|&x| x == 0x33)
    );
    let log2 = std::fs::read_to_string(dir.path().join("n2.log")).unwrap();
    assert!(log2.contains("event=takeover"), "{log2}");
    let log1 = std::fs::read_to_string(dir.path().join("n1.log")).unwrap();
    assert!(log1.contains("event=resync_finished"), "{log1}");
    eprintln!("takeover observed after {takeover:?} (includes status polling)");
}

fn msld_check(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_msld"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn test_bad_start_inputs_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(config(dir.path(), 1)).unwrap();
    // Malformed config: the key is named.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, good.replace("peer_id = 2", "peer_id = 1")).unwrap();
    let (ok, err) = msld_check(&["--config", bad.to_str().unwrap(), "--check"]);
    assert!(!ok && err.contains("`peer_id`"), "{err}");
    // Missing interface (this namespace has no a-msl).
    write_key(&dir.path().join("cluster.key"), &"33".repeat(32));
    let cfg = dir.path().join("n1.toml");
    let (ok, err) = msld_check(&["--config", cfg.to_str().unwrap(), "--create"]);
    assert!(
        !ok && err.contains("msl.interface") && err.contains(IF_A),
        "{err}"
    );
    // Corrupt metadata: named, with what to do.
    std::fs::write(dir.path().join("n1.meta"), vec![0x5a; 20_000]).unwrap();
    let (ok, err) = msld_check(&["--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("n1.meta"), "{err}");
    // Wrong key file format.
    write_key(&dir.path().join("cluster.key"), "short");
    std::fs::remove_file(dir.path().join("n1.meta")).unwrap();
    let (ok, err) = msld_check(&["--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("key_file"), "{err}");
}
