//! Two real msld processes in two network namespaces (MSL veth pair, LAN
//! veth pair, service address), a real NBD client (qemu-io) writing through
//! the service address, status read over the control socket, and the two
//! backing files compared. Needs root (CI runs as root); fails loudly
//! otherwise.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use msl_daemon::control::request;
use msl_transport::netns::{is_root, VethPair, IF_A, IF_B};
use serde_json::{json, Value};

/// The pair's two hosts: namespaces and the MSL veth pair come from the
/// transport's `VethPair` (unique names, removed on drop, on signals, and
/// swept after a SIGKILL); the LAN veth pair is added here.
struct Topology {
    veth: VethPair,
}

fn ip(args: &[&str]) {
    let st = Command::new("ip")
        .args(args)
        .status()
        .expect("run ip (apt-get install iproute2)");
    assert!(st.success(), "ip {} failed", args.join(" "));
}

impl Topology {
    fn new() -> Topology {
        let veth = VethPair::create(9000).expect("create the namespaces and the MSL veth pair");
        let (a, b) = (veth.ns_a.clone(), veth.ns_b.clone());
        ip(&[
            "link", "add", "a-lan", "netns", &a, "type", "veth", "peer", "name", "b-lan", "netns",
            &b,
        ]);
        ip(&["-n", &a, "addr", "add", "10.77.1.1/24", "dev", "a-lan"]);
        ip(&["-n", &b, "addr", "add", "10.77.1.2/24", "dev", "b-lan"]);
        ip(&["-n", &a, "link", "set", "a-lan", "up"]);
        ip(&["-n", &b, "link", "set", "b-lan", "up"]);
        Topology { veth }
    }
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config(dir: &Path, id: u16) -> PathBuf {
    let (me, peer, side) = if id == 1 {
        ("10.77.1.1", "10.77.1.2", "a")
    } else {
        ("10.77.1.2", "10.77.1.1", "b")
    };
    let text = format!(
        r#"node_id = {id}
peer_id = {peer_id}
cluster_id = 0x6d736c6532650001
key_file = "{dir}/cluster.key"
service_address = "10.77.1.100/24"
service_interface = "{side}-lan"
log_file = "{dir}/n{id}.log"
control_socket = "{dir}/n{id}.sock"
[msl]
interface = "{msl_if}"
backend = "afpacket"
[[lan]]
interface = "{side}-lan"
address = "{me}"
peer_address = "{peer}"
[volume]
path = "{dir}/n{id}.img"
size_bytes = 67108864
metadata = "{dir}/n{id}.meta"
"#,
        peer_id = 3 - id,
        msl_if = if id == 1 { IF_A } else { IF_B },
        dir = dir.display()
    );
    let p = dir.join(format!("n{id}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn status(dir: &Path, id: u16) -> Option<Value> {
    let v = request(&dir.join(format!("n{id}.sock")), &json!({"cmd": "status"})).ok()?;
    (v["ok"] == true).then(|| v["status"].clone())
}

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {secs} s waiting for: {what}");
}

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
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cluster.key"), "11".repeat(32)).unwrap();
    let topo = Topology::new();
    let start = |ns: &str, id: u16, primary: bool| start_daemon(dir.path(), ns, id, primary);
    let _d1 = start(&topo.veth.ns_a, 1, true);
    let _d2 = start(&topo.veth.ns_b, 2, false);
    wait("both nodes in sync", 30, || {
        status(dir.path(), 1).is_some_and(|s| s["in_sync"] == true && s["role"] == "primary")
            && status(dir.path(), 2)
                .is_some_and(|s| s["in_sync"] == true && s["disk"] == "uptodate")
    });
    // A real NBD client through the service address, from the LAN.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &topo.veth.ns_b,
            "qemu-io",
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
    for d in [&_d1, &_d2] {
        let _ = Command::new("kill")
            .args(["-TERM", &d.0.id().to_string()])
            .status();
    }
    std::thread::sleep(Duration::from_millis(1500));
    let a = std::fs::read(dir.path().join("n1.img")).unwrap();
    let b = std::fs::read(dir.path().join("n2.img")).unwrap();
    assert!(
        a[..4 << 20].iter().all(|&x| x == 0xab),
        "node 1 volume lacks the client's data"
    );
    assert!(a == b, "backing files differ");
    let log1 = std::fs::read_to_string(dir.path().join("n1.log")).unwrap();
    assert!(log1.contains("event=connected"), "{log1}");
}

fn qemu_io(ns: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "qemu-io", "-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = c.arg("nbd://10.77.1.100:10809").output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmds:?}: {text}"
    );
    text
}

#[test]
fn test_primary_killed_secondary_takes_over_old_primary_rejoins_resynced() {
    assert!(
        is_root(),
        "this test needs root (network namespaces); CI runs it as root"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cluster.key"), "22".repeat(32)).unwrap();
    let topo = Topology::new();
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
    for d in [&d1, &d2] {
        let _ = Command::new("kill")
            .args(["-TERM", &d.0.id().to_string()])
            .status();
    }
    std::thread::sleep(Duration::from_millis(1500));
    let a = std::fs::read(dir.path().join("n1.img")).unwrap();
    let b = std::fs::read(dir.path().join("n2.img")).unwrap();
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

/// Start msld for node `id` inside namespace `ns`; its console is appended
/// to `n<id>.console` (kept across restarts).
fn start_daemon(dir: &Path, ns: &str, id: u16, primary: bool) -> Daemon {
    let cfg = config(dir, id);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_msld"), "--config"])
        .arg(&cfg);
    if primary {
        cmd.arg("--initial-primary");
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("n{id}.console")))
        .unwrap();
    Daemon(cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap())
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
    std::fs::write(dir.path().join("cluster.key"), "33".repeat(32)).unwrap();
    let cfg = dir.path().join("n1.toml");
    let (ok, err) = msld_check(&["--config", cfg.to_str().unwrap()]);
    assert!(
        !ok && err.contains("msl.interface") && err.contains(IF_A),
        "{err}"
    );
    // Corrupt metadata: named, with what to do.
    std::fs::write(dir.path().join("n1.meta"), vec![0x5a; 20_000]).unwrap();
    let (ok, err) = msld_check(&["--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("n1.meta"), "{err}");
    // Wrong key file format.
    std::fs::write(dir.path().join("cluster.key"), "short").unwrap();
    std::fs::remove_file(dir.path().join("n1.meta")).unwrap();
    let (ok, err) = msld_check(&["--config", cfg.to_str().unwrap()]);
    assert!(!ok && err.contains("key_file"), "{err}");
}
