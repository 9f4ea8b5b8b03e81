//! A real msld pair in the [`Topology`]: configuration files, a small
//! supervisor per node, status and events over the control socket, logs,
//! backing files and their digests.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use msl_daemon::control::request;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::bins::binary;
use crate::topology::{Topology, LAN_A, LAN_B, SERVICE_IP, WITNESS_IP, WITNESS_PORT};

/// msld's exit code asking to be started again as secondary.
pub const EXIT_RESTART: i32 = 75;

/// How the pair is configured.
#[derive(Clone, Debug)]
pub struct PairOptions {
    /// Volume size in bytes (both nodes).
    pub volume_bytes: u64,
    /// NBD port on the service address.
    pub nbd_port: u16,
    /// MSL backend (`afpacket`, `afxdp`, `auto`).
    pub backend: String,
    /// Extra top-level config keys, value as TOML (e.g.
    /// `("resync_max_mib_s", "200")`, `("write_mode", "\"sync\"")`).
    pub tunables: Vec<(String, String)>,
    /// Tunables for one node only (node id, key, TOML value); they replace
    /// a shared tunable of the same key on that node.
    pub node_tunables: Vec<(u16, String, String)>,
    /// Restart msld after any exit, not only after exit 75 (what systemd's
    /// `Restart=always` would do). Off by default: the harness restarts
    /// only what msld asks for, so the tests see every other exit.
    pub restart_on_any_exit: bool,
    /// Give both nodes the cluster key (`key_file`), so every MSL frame
    /// and LAN packet is authenticated. On by default; off shows what
    /// authentication costs (msld then warns that nothing is).
    pub authenticate: bool,
    /// Run msl-witness on the client host (10.77.1.60:7790, lease and
    /// start-up window 400 ms) and point both nodes at it (`witness`).
    pub witness: bool,
}

impl Default for PairOptions {
    fn default() -> Self {
        PairOptions {
            volume_bytes: 64 << 20,
            nbd_port: 10809,
            backend: "afpacket".into(),
            tunables: Vec::new(),
            node_tunables: Vec::new(),
            restart_on_any_exit: false,
            authenticate: true,
            witness: false,
        }
    }
}

impl PairOptions {
    /// Set (or replace) a tunable.
    pub fn tunable(mut self, key: &str, toml_value: impl ToString) -> Self {
        self.tunables.retain(|(k, _)| k != key);
        self.tunables.push((key.into(), toml_value.to_string()));
        self
    }

    /// NBD over TLS on both nodes (`nbd_tls`, `nbd_tls_dir`,
    /// `nbd_tls_verify_peer`): `mode` is "off", "on" or "require"; with
    /// `verify_peer` clients need a certificate signed by the directory's
    /// ca-cert.pem.
    pub fn nbd_tls(self, mode: &str, dir: &Path, verify_peer: bool) -> Self {
        self.tunable("nbd_tls", format!("{mode:?}"))
            .tunable("nbd_tls_dir", format!("{:?}", dir.display().to_string()))
            .tunable("nbd_tls_verify_peer", verify_peer)
    }

    /// A witness on the client host, `on_no_quorum = policy` ("suspend"
    /// or "sft3") on both nodes.
    pub fn with_witness(mut self, policy: &str) -> Self {
        self.witness = true;
        self.tunable("witness", format!("\"{WITNESS_IP}:{WITNESS_PORT}\""))
            .tunable("on_no_quorum", format!("{policy:?}"))
    }

    /// Admit NBD clients from these networks only (`nbd_allow`).
    pub fn nbd_allow(self, nets: &[&str]) -> Self {
        self.tunable("nbd_allow", format!("{nets:?}"))
    }

    /// Set (or replace) a tunable on node `id` only.
    pub fn node_tunable(mut self, id: u16, key: &str, toml_value: impl ToString) -> Self {
        self.node_tunables
            .retain(|(n, k, _)| !(*n == id && k == key));
        self.node_tunables
            .push((id, key.into(), toml_value.to_string()));
        self
    }
}

/// One exit of an msld process.
#[derive(Clone, Debug)]
pub struct ExitRecord {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub at: Instant,
    /// Whether the supervisor started msld again after it.
    pub restarted: bool,
}

/// One event a daemon reported (a line of its log file; the same events
/// go to its console and its control socket's event stream).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub node: u16,
    /// The daemon's timestamp (Unix ms).
    pub ts_ms: u64,
    pub kind: String,
    pub message: String,
}

impl Event {
    /// Parse a log line `ts=<ms> node=<id> event=<kind> msg="<text>"`.
    pub fn parse_log_line(line: &str) -> Option<Event> {
        let rest = line.strip_prefix("ts=")?;
        let (ts, rest) = rest.split_once(" node=")?;
        let (node, rest) = rest.split_once(" event=")?;
        let (kind, rest) = rest.split_once(" msg=\"")?;
        let raw = rest.strip_suffix('"')?;
        let mut message = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some('n') => message.push('\n'),
                    Some(o) => message.push(o),
                    None => {}
                }
            } else {
                message.push(c);
            }
        }
        Some(Event {
            node: node.parse().ok()?,
            ts_ms: ts.parse().ok()?,
            kind: kind.to_string(),
            message,
        })
    }
}

#[derive(Debug, Default)]
struct NodeState {
    pid: Option<u32>,
    supervising: bool,
    stop_requested: bool,
    starts: u32,
    restarts: u32,
    exits: Vec<ExitRecord>,
    spawn_error: Option<String>,
}

/// A node and its supervisor.
#[derive(Debug)]
struct NodeCtl {
    id: u16,
    ns: String,
    config: PathBuf,
    console: PathBuf,
    msld: PathBuf,
    meta: PathBuf,
    restart_any: bool,
    state: Mutex<NodeState>,
    changed: Condvar,
}

impl NodeCtl {
    fn lock(&self) -> MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn_msld(&self) -> io::Result<std::process::Child> {
        let console = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.console)?;
        let mut cmd = Topology::command_in(&self.ns, &self.msld.to_string_lossy());
        cmd.arg("--config").arg(&self.config);
        // Node 1 is the initial primary: the flag only matters when its
        // metadata is created (first start).
        // Node 2's first start creates its files explicitly (msld never
        // creates a missing volume or metadata file on its own).
        if !self.meta.exists() {
            cmd.arg(if self.id == 1 {
                "--initial-primary"
            } else {
                "--create"
            });
        }
        cmd.stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to
        // SIGKILL msld when the supervisor thread that forked it goes away
        // (so a SIGKILLed harness leaves no daemon behind). `ip netns exec`
        // execs msld in place, keeping the setting.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd.spawn()
    }

    /// The supervisor loop (runs on its own thread).
    fn supervise(self: Arc<Self>) {
        loop {
            let mut child = {
                let mut st = self.lock();
                if st.stop_requested {
                    break;
                }
                match self.spawn_msld() {
                    Ok(c) => {
                        st.pid = Some(c.id());
                        st.starts += 1;
                        self.changed.notify_all();
                        c
                    }
                    Err(e) => {
                        st.spawn_error = Some(format!("starting msld for node {}: {e}", self.id));
                        break;
                    }
                }
            };
            let status = child.wait();
            let mut st = self.lock();
            st.pid = None;
            let (code, signal) = match &status {
                Ok(s) => (s.code(), s.signal()),
                Err(_) => (None, None),
            };
            let restart = !st.stop_requested && (code == Some(EXIT_RESTART) || self.restart_any);
            st.exits.push(ExitRecord {
                code,
                signal,
                at: Instant::now(),
                restarted: restart,
            });
            if restart {
                st.restarts += 1;
            }
            self.changed.notify_all();
            if !restart {
                break;
            }
            drop(st);
            if code != Some(EXIT_RESTART) {
                // Do not spin on a daemon that fails at start.
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let mut st = self.lock();
        st.supervising = false;
        self.changed.notify_all();
    }

    fn signal_and_wait(&self, sig: libc::c_int, timeout: Duration) -> Result<(), String> {
        let mut st = self.lock();
        st.stop_requested = true;
        if let Some(pid) = st.pid {
            // SAFETY: kill has no memory preconditions; the pid is our own
            // child, not yet reaped (the supervisor clears `pid` after wait).
            unsafe { libc::kill(pid as libc::pid_t, sig) };
        }
        let t = Instant::now();
        while st.supervising {
            let left = timeout.saturating_sub(t.elapsed());
            if left.is_zero() {
                return Err(format!(
                    "node {}: msld did not exit within {timeout:?} after signal {sig}",
                    self.id
                ));
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }
}

/// A running (or stopped) pair of msld processes in their namespaces.
pub struct Pair {
    pub topo: Topology,
    pub opts: PairOptions,
    dir_path: PathBuf,
    dir: Option<tempfile::TempDir>,
    nodes: [Arc<NodeCtl>; 2],
    /// The msl-witness binary (with `PairOptions::witness`) and its
    /// process while it runs.
    witness_bin: Option<PathBuf>,
    witness: Mutex<Option<std::process::Child>>,
}

/// Run directories are `<tmp>/msl-harness-<pid>-<random>`.
const RUN_DIR_PREFIX: &str = "msl-harness-";

/// Remove run directories left by harness processes that are gone (a
/// SIGKILL skips the drop that removes them).
fn sweep_stale_run_dirs() {
    let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(RUN_DIR_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Milliseconds since the Unix epoch (the clock msld stamps events with).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Poll `f` every 10 ms until it holds; the time it took, or an error
/// naming `what` after `timeout`.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
) -> Result<Duration, String> {
    let t = Instant::now();
    loop {
        if f() {
            return Ok(t.elapsed());
        }
        if t.elapsed() >= timeout {
            return Err(format!("timed out after {timeout:?} waiting for: {what}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn config_text(dir: &Path, id: u16, o: &PairOptions, msl_if: &str) -> String {
    let (me, peer, lan_if) = if id == 1 {
        (LAN_A, LAN_B, Topology::lan_if(1))
    } else {
        (LAN_B, LAN_A, Topology::lan_if(2))
    };
    let d = dir.display();
    let mut t = format!(
        "node_id = {id}\npeer_id = {peer_id}\ncluster_id = 0x6d736c6861726e01\n\
         service_address = \"{SERVICE_IP}/24\"\n\
         service_interface = \"{lan_if}\"\nnbd_port = {port}\n\
         log_file = \"{d}/n{id}.log\"\ncontrol_socket = \"{d}/n{id}.sock\"\n",
        peer_id = 3 - id,
        port = o.nbd_port,
    );
    if o.authenticate {
        t.push_str(&format!("key_file = \"{d}/cluster.key\"\n"));
    } else {
        t.push_str("insecure_no_auth = true\n");
    }
    let own: Vec<(&str, &str)> = o
        .node_tunables
        .iter()
        .filter(|(n, _, _)| *n == id)
        .map(|(_, k, v)| (k.as_str(), v.as_str()))
        .collect();
    for (k, v) in &o.tunables {
        if !own.iter().any(|(ok, _)| ok == k) {
            t.push_str(&format!("{k} = {v}\n"));
        }
    }
    for (k, v) in own {
        t.push_str(&format!("{k} = {v}\n"));
    }
    t.push_str(&format!(
        "[msl]\ninterface = \"{msl_if}\"\nbackend = \"{backend}\"\n\
         [[lan]]\ninterface = \"{lan_if}\"\naddress = \"{me}\"\npeer_address = \"{peer}\"\n\
         [volume]\npath = \"{d}/n{id}.img\"\nsize_bytes = {size}\nmetadata = \"{d}/n{id}.meta\"\n",
        backend = o.backend,
        size = o.volume_bytes,
    ));
    t
}

impl Pair {
    /// Build the topology and write both configurations; no daemon runs
    /// yet (see [`Pair::start`] / [`Pair::start_both`]). Needs root.
    pub fn new(opts: PairOptions) -> Result<Pair, String> {
        if !msl_transport::netns::is_root() {
            return Err(
                "msl-harness needs root (network namespaces, raw sockets): run as root".into(),
            );
        }
        let msld = binary("msld")?;
        let topo = Topology::create().map_err(|e| format!("building the topology: {e}"))?;
        sweep_stale_run_dirs();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{RUN_DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .map_err(|e| format!("creating a run directory: {e}"))?;
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut k = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.path().join("cluster.key"))
                .map_err(|e| format!("writing the cluster key: {e}"))?;
            k.write_all("5a".repeat(32).as_bytes())
                .map_err(|e| format!("writing the cluster key: {e}"))?;
        }
        let mk = |id: u16| -> Result<Arc<NodeCtl>, String> {
            let config = dir.path().join(format!("n{id}.toml"));
            std::fs::write(&config, config_text(dir.path(), id, &opts, topo.msl_if(id)))
                .map_err(|e| format!("writing {}: {e}", config.display()))?;
            Ok(Arc::new(NodeCtl {
                id,
                ns: topo.server_ns(id).to_string(),
                config,
                console: dir.path().join(format!("n{id}.console")),
                msld: msld.clone(),
                meta: dir.path().join(format!("n{id}.meta")),
                restart_any: opts.restart_on_any_exit,
                state: Mutex::new(NodeState::default()),
                changed: Condvar::new(),
            }))
        };
        let nodes = [mk(1)?, mk(2)?];
        let witness_bin = if opts.witness {
            crate::topology::ip(&[
                "-n",
                topo.client_ns(),
                "addr",
                "add",
                &format!("{WITNESS_IP}/24"),
                "dev",
                crate::topology::BRIDGE,
            ])
            .map_err(|e| format!("adding the witness's address: {e}"))?;
            let cfg = dir.path().join("witness.toml");
            std::fs::write(
                &cfg,
                format!(
                    "listen = \"{WITNESS_IP}:{WITNESS_PORT}\"\nlease_ms = 400\nstartup_ms = 400\n\
                     state_file = \"{}\"\n\
                     [[cluster]]\nid = 0x6d736c6861726e01\nkey_file = \"{}\"\n",
                    dir.path().join("witness-state.json").display(),
                    dir.path().join("cluster.key").display()
                ),
            )
            .map_err(|e| format!("writing {}: {e}", cfg.display()))?;
            Some(binary("msl-witness")?)
        } else {
            None
        };
        let pair = Pair {
            topo,
            opts,
            dir_path: dir.path().to_path_buf(),
            dir: Some(dir),
            nodes,
            witness_bin,
            witness: Mutex::new(None),
        };
        Ok(pair)
    }

    fn node(&self, id: u16) -> &Arc<NodeCtl> {
        assert!(id == 1 || id == 2, "node ids are 1 and 2, not {id}");
        &self.nodes[usize::from(id - 1)]
    }

    /// Start node `id` under its supervisor (which restarts msld after
    /// exit 75, and after any exit if `restart_on_any_exit`).
    pub fn start(&self, id: u16) -> Result<(), String> {
        let n = self.node(id).clone();
        {
            let mut st = n.lock();
            if st.supervising {
                return Err(format!("node {id} is already running"));
            }
            st.supervising = true;
            st.stop_requested = false;
            st.spawn_error = None;
        }
        let starts_before = n.lock().starts;
        let sup = n.clone();
        std::thread::Builder::new()
            .name(format!("msld-sup-{id}"))
            .spawn(move || sup.supervise())
            .map_err(|e| format!("spawning the supervisor of node {id}: {e}"))?;
        // Wait until msld is spawned (not until it is ready).
        let mut st = n.lock();
        while st.starts == starts_before && st.supervising {
            st = n
                .changed
                .wait_timeout(st, Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        match &st.spawn_error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Start the witness (with `PairOptions::witness`), node 1 (the
    /// initial primary), then node 2.
    pub fn start_both(&self) -> Result<(), String> {
        if self.opts.witness {
            self.start_witness()?;
        }
        self.start(1)?;
        self.start(2)
    }

    /// Start msl-witness on the client host (its console goes to
    /// `witness.console`); a no-op while it runs.
    pub fn start_witness(&self) -> Result<(), String> {
        let bin = self
            .witness_bin
            .as_ref()
            .ok_or("this pair has no witness (PairOptions::witness)")?;
        let mut w = self.witness.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_some() {
            return Ok(());
        }
        let console = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir_path.join("witness.console"))
            .map_err(|e| format!("witness console: {e}"))?;
        let child = Topology::command_in(self.topo.client_ns(), &bin.to_string_lossy())
            .arg("--config")
            .arg(self.dir_path.join("witness.toml"))
            .stdout(Stdio::null())
            .stderr(console)
            .spawn()
            .map_err(|e| format!("starting msl-witness: {e}"))?;
        *w = Some(child);
        Ok(())
    }

    /// `kill -9` the witness (its process, by pid) and reap it.
    pub fn kill_witness(&self) {
        let mut w = self.witness.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut c) = w.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Cut (or restore) node `id`'s path to the witness alone: a blackhole
    /// route to its address in the node's namespace.
    pub fn cut_witness(&self, id: u16, cut: bool) -> Result<(), String> {
        crate::topology::ip(&[
            "-n",
            self.topo.server_ns(id),
            "route",
            if cut { "add" } else { "del" },
            "blackhole",
            &format!("{WITNESS_IP}/32"),
        ])
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    /// `kill -9` node `id`'s msld; the supervisor does not restart it.
    /// Returns once it has exited.
    pub fn kill9(&self, id: u16) -> Result<(), String> {
        self.node(id)
            .signal_and_wait(libc::SIGKILL, Duration::from_secs(10))
    }

    /// Stop node `id` cleanly (SIGTERM; SIGKILL after 10 s).
    pub fn stop(&self, id: u16) -> Result<(), String> {
        let n = self.node(id);
        match n.signal_and_wait(libc::SIGTERM, Duration::from_secs(10)) {
            Ok(()) => Ok(()),
            Err(e) => {
                n.signal_and_wait(libc::SIGKILL, Duration::from_secs(5))?;
                Err(e)
            }
        }
    }

    /// Whether node `id`'s supervisor is running (msld up or restarting).
    pub fn is_running(&self, id: u16) -> bool {
        self.node(id).lock().supervising
    }

    /// msld's pid for node `id`, if one runs now.
    pub fn pid(&self, id: u16) -> Option<u32> {
        self.node(id).lock().pid
    }

    /// How many times the supervisor restarted node `id`.
    pub fn restarts(&self, id: u16) -> u32 {
        self.node(id).lock().restarts
    }

    /// Every exit of node `id`'s msld so far.
    pub fn exits(&self, id: u16) -> Vec<ExitRecord> {
        self.node(id).lock().exits.clone()
    }

    /// The NBD export's address as clients reach it: the service address
    /// and the pair's NBD port.
    pub fn service_addr(&self) -> std::net::SocketAddr {
        let ip: std::net::IpAddr = SERVICE_IP.parse().expect("SERVICE_IP is an address");
        (ip, self.opts.nbd_port).into()
    }

    /// The run directory (configs, key, logs, volumes, sockets).
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    pub fn config_path(&self, id: u16) -> PathBuf {
        self.node(id).config.clone()
    }
    pub fn socket(&self, id: u16) -> PathBuf {
        self.dir().join(format!("n{id}.sock"))
    }
    /// msld's log file (`log_file`).
    pub fn log_path(&self, id: u16) -> PathBuf {
        self.dir().join(format!("n{id}.log"))
    }
    /// msld's console (stdout + stderr, appended across restarts).
    pub fn console_path(&self, id: u16) -> PathBuf {
        self.node(id).console.clone()
    }
    /// The backing file.
    pub fn volume_path(&self, id: u16) -> PathBuf {
        self.dir().join(format!("n{id}.img"))
    }
    pub fn meta_path(&self, id: u16) -> PathBuf {
        self.node(id).meta.clone()
    }

    /// The log file's text (empty if none yet).
    pub fn log(&self, id: u16) -> String {
        std::fs::read_to_string(self.log_path(id)).unwrap_or_default()
    }
    /// The console's text (empty if none yet).
    pub fn console(&self, id: u16) -> String {
        std::fs::read_to_string(self.console_path(id)).unwrap_or_default()
    }

    /// SHA-256 of node `id`'s backing file.
    pub fn sha256(&self, id: u16) -> io::Result<String> {
        sha256_file(&self.volume_path(id))
    }

    /// Send one control request to node `id`.
    pub fn request(&self, id: u16, req: &Value) -> Result<Value, String> {
        request(&self.socket(id), req)
    }

    /// Node `id`'s status document (`mslctl status --json`).
    pub fn status(&self, id: u16) -> Result<Value, String> {
        let v = self.request(id, &json!({"cmd": "status"}))?;
        if v["ok"] == true {
            Ok(v["status"].clone())
        } else {
            Err(format!("node {id} status: {v}"))
        }
    }

    /// An administrator command (`promote`, `demote`, `switchover`,
    /// `disconnect`, `connect`, `invalidate`).
    pub fn admin(&self, id: u16, cmd: &str) -> Result<Value, String> {
        let v = self.request(id, &json!({"cmd": cmd}))?;
        if v["ok"] == true {
            Ok(v)
        } else {
            Err(format!("node {id} {cmd}: {v}"))
        }
    }

    /// Poll node `id`'s status until `f` holds.
    pub fn wait_status(
        &self,
        id: u16,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&Value) -> bool,
    ) -> Result<Duration, String> {
        wait_for(&format!("node {id}: {what}"), timeout, || {
            self.status(id).is_ok_and(|s| f(&s))
        })
        .map_err(|e| format!("{e}\n{}", self.diagnostics()))
    }

    /// Wait until `primary` is primary, the other node secondary, both in
    /// sync, no resync running.
    pub fn wait_in_sync(&self, primary: u16, timeout: Duration) -> Result<Duration, String> {
        let secondary = 3 - primary;
        wait_for(
            &format!("node {primary} primary and node {secondary} secondary, in sync"),
            timeout,
            || {
                let (Ok(p), Ok(s)) = (self.status(primary), self.status(secondary)) else {
                    return false;
                };
                p["role"] == "primary"
                    && p["in_sync"] == true
                    && s["role"] == "secondary"
                    && s["in_sync"] == true
                    && s["disk"] == "uptodate"
                    && p["resync"]["active"] == false
                    && s["resync"]["active"] == false
            },
        )
        .map_err(|e| format!("{e}\n{}", self.diagnostics()))
    }

    /// Every event node `id` logged so far (its log file, in order).
    pub fn node_events(&self, id: u16) -> Vec<Event> {
        self.log(id)
            .lines()
            .filter_map(Event::parse_log_line)
            .collect()
    }

    /// Every event of both nodes, by timestamp.
    pub fn events(&self) -> Vec<Event> {
        let mut v = self.node_events(1);
        v.extend(self.node_events(2));
        v.sort_by_key(|e| e.ts_ms);
        v
    }

    /// The first event of `kind` from node `id` stamped at or after
    /// `since_ms` (Unix ms).
    pub fn event_after(&self, id: u16, kind: &str, since_ms: u64) -> Option<Event> {
        self.node_events(id)
            .into_iter()
            .find(|e| e.kind == kind && e.ts_ms >= since_ms)
    }

    /// Run a command on the client host; its output (errors if it could
    /// not run or exited non-zero).
    pub fn run_in_client_ns(&self, program: &str, args: &[&str]) -> Result<Output, String> {
        let out = self
            .topo
            .client_command(program)
            .args(args)
            .output()
            .map_err(|e| format!("running {program} in the client namespace: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{program} {}: {}\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(out)
    }

    /// Run `f` on a thread inside the client namespace.
    pub fn in_client_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        self.topo.in_client_ns(f)
    }

    /// The tail of both nodes' logs and consoles and their statuses: for
    /// error messages.
    pub fn diagnostics(&self) -> String {
        let tail = |s: String| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(25)..].join("\n")
        };
        let mut out = String::new();
        for id in [1, 2] {
            out.push_str(&format!(
                "--- node {id} status: {}\n--- node {id} log (tail):\n{}\n--- node {id} console (tail):\n{}\n",
                self.status(id).map_or_else(|e| e, |v| v.to_string()),
                tail(self.log(id)),
                tail(self.console(id)),
            ));
        }
        out
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for n in &self.nodes {
            let _ = n.signal_and_wait(libc::SIGKILL, Duration::from_secs(5));
        }
        self.kill_witness();
        if std::env::var_os("MSL_HARNESS_KEEP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("msl-harness: kept run directory {}", d.keep().display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_log_line_unescapes_and_rejects_other_lines() {
        let e = Event::parse_log_line(
            r#"ts=1795546623558 node=2 event=split_brain_refused msg="a \"b\" c\\d\ne""#,
        )
        .unwrap();
        assert_eq!(e.ts_ms, 1795546623558);
        assert_eq!(e.node, 2);
        assert_eq!(e.kind, "split_brain_refused");
        assert_eq!(e.message, "a \"b\" c\\d\ne");
        assert_eq!(
            Event::parse_log_line("msld: MSL on msla via afpacket"),
            None
        );
        assert_eq!(Event::parse_log_line("ts=x node=1 event=a msg=\"\""), None);
    }

    #[test]
    fn test_config_text_is_a_valid_msld_config_with_tunables() {
        let dir = tempfile::tempdir().unwrap();
        let o = PairOptions::default()
            .tunable("resync_max_mib_s", 200)
            .tunable("heartbeat_interval_ms", 20);
        let text = config_text(dir.path(), 2, &o, "mslb");
        let cfg = msl_daemon::config::DaemonConfig::parse(&text, Path::new("n2.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(cfg.file.node_id, 2);
        assert_eq!(cfg.file.resync_max_mib_s, 200);
        assert_eq!(cfg.file.heartbeat_interval_ms, 20);
        assert_eq!(cfg.file.service_interface, "b-lan");
        assert_eq!(cfg.file.volume.size_bytes, 64 << 20);
        let key = dir.path().join("cluster.key");
        assert_eq!(cfg.file.key_file.as_deref(), Some(key.as_path()));
    }

    #[test]
    fn test_unauthenticated_pair_has_no_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let o = PairOptions {
            authenticate: false,
            ..PairOptions::default()
        };
        let text = config_text(dir.path(), 1, &o, "msla");
        let cfg = msl_daemon::config::DaemonConfig::parse(&text, Path::new("n1.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(cfg.file.key_file, None);
        assert!(
            cfg.warnings.iter().any(|w| w.contains("insecure_no_auth")),
            "{:?}",
            cfg.warnings
        );
    }

    #[test]
    fn test_node_tunable_overrides_the_shared_one_on_its_node_only() {
        let dir = tempfile::tempdir().unwrap();
        let o = PairOptions::default()
            .tunable("resync_max_mib_s", 200)
            .node_tunable(2, "resync_max_mib_s", 300)
            .node_tunable(2, "heartbeat_interval_ms", 20);
        let parse = |id: u16| {
            let text = config_text(dir.path(), id, &o, "msla");
            msl_daemon::config::DaemonConfig::parse(&text, Path::new("n.toml"))
                .unwrap_or_else(|e| panic!("{e}\n{text}"))
        };
        let (one, two) = (parse(1), parse(2));
        assert_eq!(one.file.resync_max_mib_s, 200);
        assert_eq!(two.file.resync_max_mib_s, 300);
        assert_eq!(two.file.heartbeat_interval_ms, 20);
        assert_ne!(one.file.heartbeat_interval_ms, 20);
    }
}
