//! Helpers shared by the msld end-to-end tests: the two-namespace
//! topology, msld processes (killed on drop), configs, status, waiting.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use msl_daemon::control::request;
#[allow(unused_imports)] // each test file uses a part
pub use msl_transport::netns::{
    command_in, ip_output, is_root, Lan, Topology, VethPair, IF_A, IF_B,
};
use serde_json::{json, Value};

/// The pair's two hosts with a direct LAN veth (`a-lan` 10.77.1.1 <->
/// `b-lan` 10.77.1.2): the builder shared with the harness and the benches
/// (`msl_transport::netns::Topology`; unique names, removed on drop, on
/// signals, and swept after a SIGKILL).
pub fn topology() -> Topology {
    Topology::create(Lan::Direct).expect("create the namespaces, the MSL and the LAN")
}

/// As `topology`, the LAN through a bridge in a third namespace, so that
/// one host's LAN adapter can fail alone.
pub fn switched_topology() -> Topology {
    Topology::create(Lan::Switched).expect("create the namespaces, the MSL and the switched LAN")
}

/// `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) {
    if let Err(e) = ip_output(args) {
        panic!("{e}");
    }
}

pub struct Daemon(pub Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Per-node variations of the test config.
#[derive(Clone, Debug)]
pub struct Opts {
    /// Key file name inside the test directory.
    pub key_file: String,
    /// Extra top-level TOML lines (e.g. `metrics_address = "..."`).
    pub extra: String,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            key_file: "cluster.key".into(),
            extra: String::new(),
        }
    }
}

/// A run directory holding the pair's cluster key (32 bytes of `byte`, in
/// hex), removed on drop.
pub fn keyed_dir(byte: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_key(&dir.path().join("cluster.key"), &byte.repeat(32));
    dir
}

/// Write a key file owner-only (msld refuses one that others may read).
pub fn write_key(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

pub fn config(dir: &Path, id: u16) -> PathBuf {
    config_opts(dir, id, &Opts::default())
}

pub fn config_opts(dir: &Path, id: u16, o: &Opts) -> PathBuf {
    let (me, peer, side) = if id == 1 {
        ("10.77.1.1", "10.77.1.2", "a")
    } else {
        ("10.77.1.2", "10.77.1.1", "b")
    };
    let text = format!(
        r#"node_id = {id}
peer_id = {peer_id}
cluster_id = 0x6d736c6532650001
key_file = "{dir}/{key}"
{extra}
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
        dir = dir.display(),
        key = o.key_file,
        extra = o.extra,
    );
    let p = dir.join(format!("n{id}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

pub fn status(dir: &Path, id: u16) -> Option<Value> {
    let v = request(&dir.join(format!("n{id}.sock")), &json!({"cmd": "status"})).ok()?;
    (v["ok"] == true).then(|| v["status"].clone())
}

pub fn wait(what: &str, secs: u64, f: impl FnMut() -> bool) {
    wait_with(what, secs, Duration::from_millis(50), f, String::new);
}

/// `wait`, polling every `poll`, whose timeout message ends with
/// `context()` (the nodes' logs, say).
pub fn wait_with(
    what: &str,
    secs: u64,
    poll: Duration,
    mut f: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if f() {
            return;
        }
        std::thread::sleep(poll);
    }
    panic!(
        "timed out after {secs} s waiting for: {what}\n{}",
        context()
    );
}

/// Node `id`'s role as its status says.
pub fn role(dir: &Path, id: u16) -> Option<String> {
    status(dir, id).and_then(|s| s["role"].as_str().map(str::to_string))
}

/// Node `primary` primary and the other secondary, both in sync.
pub fn in_sync_as(dir: &Path, primary: u16) -> bool {
    status(dir, primary).is_some_and(|s| s["in_sync"] == true && s["role"] == "primary")
        && status(dir, 3 - primary)
            .is_some_and(|s| s["in_sync"] == true && s["role"] == "secondary")
}

/// How often `event=NAME` appears in node `id`'s log.
pub fn log_events(dir: &Path, id: u16, name: &str) -> usize {
    std::fs::read_to_string(dir.join(format!("n{id}.log")))
        .unwrap_or_default()
        .matches(&format!("event={name} "))
        .count()
}

pub fn qemu_io(ns: &str, cmds: &[&str]) -> String {
    let mut c = command_in(ns, "qemu-io");
    c.args(["-f", "raw"]);
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

/// Start msld for node `id` inside namespace `ns`; its console is appended
/// to `n<id>.console` (kept across restarts).
pub fn start_daemon(dir: &Path, ns: &str, id: u16, primary: bool) -> Daemon {
    start_daemon_opts(dir, ns, id, primary, &Opts::default())
}

/// `start_daemon` with a varied config.
pub fn start_daemon_opts(dir: &Path, ns: &str, id: u16, primary: bool, o: &Opts) -> Daemon {
    let cfg = config_opts(dir, id, o);
    let mut cmd = command_in(ns, env!("CARGO_BIN_EXE_msld"));
    cmd.arg("--config").arg(&cfg);
    // The first start creates the volume and metadata; later starts find
    // them (a missing one would be an error without the flag).
    cmd.arg(if primary {
        "--initial-primary"
    } else {
        "--create"
    });
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("n{id}.console")))
        .unwrap();
    Daemon(cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap())
}

/// Send SIGTERM to both daemons, give them time to stop cleanly (caches
/// flushed), then return both backing files.
pub fn stop_and_read_images(dir: &Path, daemons: &[&Daemon]) -> (Vec<u8>, Vec<u8>) {
    for d in daemons {
        let _ = Command::new("kill")
            .args(["-TERM", &d.0.id().to_string()])
            .status();
    }
    std::thread::sleep(Duration::from_millis(1500));
    (
        std::fs::read(dir.join("n1.img")).unwrap(),
        std::fs::read(dir.join("n2.img")).unwrap(),
    )
}

/// Run a command inside namespace `ns`; returns (success, stdout+stderr).
pub fn in_ns(ns: &str, prog: &str, args: &[&str]) -> (bool, String) {
    let out = command_in(ns, prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {prog} in {ns}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Fail loudly when a tool the test needs is missing.
pub fn require_tool(prog: &str, hint: &str) {
    assert!(
        Command::new(prog)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "{prog} missing: {hint}"
    );
}

pub fn require_root() {
    assert!(
        is_root(),
        "this test needs root (network namespaces); CI runs it as root"
    );
}

/// The `mslctl` binary next to `msld` (built by `cargo build -p mslctl` or
/// any workspace build).
pub fn mslctl_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_msld")).with_file_name("mslctl");
    assert!(
        p.exists(),
        "{} missing: run `cargo build -p mslctl` first",
        p.display()
    );
    p
}

/// Run `mslctl --socket <node's socket> args...`: (exit code, stdout, stderr).
pub fn mslctl(dir: &Path, id: u16, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(mslctl_bin())
        .arg("--socket")
        .arg(dir.join(format!("n{id}.sock")))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Run fio's nbd engine inside namespace `ns` against the service address
/// (working directory `dir`, so fio's state files stay out of the tree);
/// bounded by `timeout`, which ends it whole: fio runs its jobs as threads
/// (`--thread`), so no worker process outlives it.
pub fn fio_cmd(ns: &str, dir: &Path, args: &[&str]) -> Command {
    let mut c = command_in(ns, "timeout");
    c.args(["--kill-after=10", "180", "fio", "--thread"])
        .args(["--ioengine=nbd", "--uri=nbd://10.77.1.100:10809/"])
        .args(args)
        .current_dir(dir);
    c
}

pub fn fio_ok(out: std::process::Output, what: &str) -> String {
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("err= 0") && !text.contains("verify: bad"),
        "fio {what} failed:\n{text}"
    );
    text
}

/// Open a node's metadata from the test process once the lock is free.
///
/// A `flock` belongs to the open file description. Another test in this
/// process that spawns a program shares the descriptions it had open until
/// the child's `exec` closes them, so a lock this process just dropped can
/// stay held for that moment. Anything else (or a lock held for over five
/// seconds) fails the test.
pub fn open_meta(path: &Path) -> (msl_store::MetaStore, msl_core::meta::Meta) {
    let t = Instant::now();
    loop {
        match msl_store::MetaStore::open(path) {
            Ok(opened) => return opened,
            Err(msl_store::StoreError::Locked { .. }) if t.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("open {}: {e}", path.display()),
        }
    }
}
