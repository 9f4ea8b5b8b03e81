//! The `msl-witness` binary on 127.0.0.1, driven by two simulated nodes
//! over real UDP sockets: start-up window, grant, renewal, refusal to the
//! other node, expiry then grant to the other node, replay and forgery
//! dropped and counted, the status file, SIGHUP ignored, SIGTERM a clean
//! stop, and a restarted witness refusing during its start-up window.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use msl_wire::{Domain, Key};
use msl_witness::client::{ClientConfig, LeaseClient, Outcome};
use msl_witness::proto::Verdict;

const BIN: &str = env!("CARGO_BIN_EXE_msl-witness");
const LEASE_MS: u64 = 500;
const MASTER: [u8; 32] = [0x5A; 32];

struct Witness {
    child: Child,
    addr: SocketAddr,
    stderr: mpsc::Receiver<String>,
}

impl Witness {
    /// Start the binary and wait for its "listening on" line.
    fn start(config: &Path) -> Witness {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start msl-witness");
        let (tx, rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("msl-witness printed nothing");
        let addr = line
            .strip_prefix("msl-witness: listening on ")
            .and_then(|r| r.split(' ').next())
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .parse()
            .unwrap();
        Witness {
            child,
            addr,
            stderr: rx,
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of a child this test started.
        let r = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(r, 0);
    }

    /// SIGTERM, then wait for the exit status (at most 5 s).
    fn stop(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Node {
    sock: UdpSocket,
    client: LeaseClient,
    start: Instant,
    to: SocketAddr,
}

impl Node {
    fn new(id: u16, epoch: u64, to: SocketAddr) -> Node {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        Node {
            sock,
            client: LeaseClient::new(ClientConfig {
                cluster_id: 7,
                node_id: id,
                epoch,
                key: Key::derive(&MASTER, Domain::Witness),
                margin_us: 5_000,
            }),
            start: Instant::now(),
            to,
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// The reply to `bytes`, or None if none comes within 300 ms.
    fn exchange(&mut self, bytes: &[u8]) -> Option<Outcome> {
        self.sock.send_to(bytes, self.to).unwrap();
        let mut buf = [0u8; 256];
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                let now = self.now();
                Some(self.client.on_reply(now, &buf[..n]))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => None,
            Err(e) => panic!("recv: {e}"),
        }
    }

    /// Send an acquire/renew and return (its bytes, the outcome).
    fn acquire(&mut self) -> (Vec<u8>, Outcome) {
        let now = self.now();
        let q = self.client.request(now).to_vec();
        let o = self.exchange(&q).expect("the witness did not answer");
        (q, o)
    }
}

fn setup(dir: &Path, listen: &str) -> PathBuf {
    let key = dir.join("cluster.key");
    if !key.exists() {
        let hex: String = MASTER.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(&key, hex).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let cfg = dir.join("witness.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"{listen}\"\nlease_ms = {LEASE_MS}\nstartup_ms = {LEASE_MS}\n\
             status_file = \"{}\"\nstate_file = \"{}\"\n\n[[cluster]]\nid = 7\n\
             key_file = \"{}\"\n",
            dir.join("status.json").display(),
            dir.join("state.json").display(),
            key.display()
        ),
    )
    .unwrap();
    cfg
}

fn refused(o: Outcome) -> (Verdict, Option<u16>, u32) {
    match o {
        Outcome::Refused {
            verdict,
            holder,
            wait_us,
        } => (verdict, holder, wait_us),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The status file once it shows `pred` (it is rewritten every second).
fn status_when(path: &Path, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let t = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            let v: serde_json::Value = serde_json::from_str(&text).expect("status is JSON");
            if pred(&v) {
                return v;
            }
            if t.elapsed() > Duration::from_secs(5) {
                panic!("status never matched: {v:#}");
            }
        }
        assert!(t.elapsed() < Duration::from_secs(5), "no status file");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn test_witness_process_leases_over_udp() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "127.0.0.1:0");
    let w = Witness::start(&cfg);
    let mut a = Node::new(1, 1, w.addr);
    let mut b = Node::new(2, 1, w.addr);

    // Start-up window: nothing granted yet, told how long to wait.
    let (_, o) = a.acquire();
    let (v, holder, wait) = refused(o);
    assert_eq!((v, holder), (Verdict::Startup, None));
    assert!(
        wait > 0 && u64::from(wait) <= LEASE_MS * 1000,
        "wait {wait}"
    );
    std::thread::sleep(Duration::from_micros(u64::from(wait)) + Duration::from_millis(50));

    // Grant, then renewal.
    let (_, o) = a.acquire();
    assert!(matches!(o, Outcome::Granted { .. }), "{o:?}");
    assert!(a.client.holds(a.now()));
    let (_, o) = a.acquire();
    assert!(matches!(o, Outcome::Granted { .. }), "{o:?}");

    // The other node is refused while A's lease is live.
    let (b_refused, o) = b.acquire();
    let (v, holder, wait) = refused(o);
    assert_eq!((v, holder), (Verdict::Held, Some(1)));
    assert!(
        wait > 0 && u64::from(wait) <= LEASE_MS * 1000,
        "wait {wait}"
    );
    assert!(!b.client.holds(b.now()));

    // A stops renewing: once its lease has expired B gets it.
    std::thread::sleep(Duration::from_millis(LEASE_MS + 100));
    assert!(!a.client.holds(a.now()), "A's own view expired first");
    let (_, o) = b.acquire();
    assert!(matches!(o, Outcome::Granted { .. }), "{o:?}");
    assert!(b.client.holds(b.now()));

    // A replay of B's earlier request gets no reply.
    assert_eq!(b.exchange(&b_refused), None, "replay answered");
    // Nor does a forged request (one bit of a fresh request flipped).
    let mut forged = a.client.request(a.now()).to_vec();
    forged[20] ^= 0x04;
    assert_eq!(a.exchange(&forged), None, "forgery answered");
    // Nor garbage.
    assert_eq!(a.exchange(b"not a witness packet"), None);

    // SIGHUP neither stops nor confuses it.
    w.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(200));
    let (_, o) = a.acquire();
    assert!(!matches!(o, Outcome::Ignored(_)), "{o:?}");
    let a_granted_again = matches!(o, Outcome::Granted { .. });

    // The snapshot written after A's last request.
    let a_last = a.client.counters().sent;
    let s = status_when(&dir.path().join("status.json"), |v| {
        v["clusters"][0]["nodes"][0]["counter"] == a_last
    });
    assert_eq!(s["counters"]["bad_tag"], 1, "{s:#}");
    let c = &s["counters"];
    assert_eq!(c["refused_startup"], 1, "{s:#}");
    assert_eq!(c["granted"], 2 + u64::from(a_granted_again), "{s:#}");
    assert_eq!(c["renewed"], 1, "{s:#}");
    assert!(c["refused_held"].as_u64().unwrap() >= 1, "{s:#}");
    assert_eq!(c["replayed"], 1, "{s:#}");
    assert_eq!(c["malformed"], 1, "{s:#}");
    let cl = &s["clusters"][0];
    assert_eq!(cl["id"], 7);
    assert_eq!(cl["counters"]["bad_tag"], 1);
    let nodes = cl["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{s:#}");
    assert_eq!(nodes[0]["node_id"], 1);
    assert_eq!(nodes[0]["epoch"], 1);
    assert_eq!(nodes[0]["role"], "secondary");
    let first_epoch = s["witness_epoch"].as_u64().unwrap();

    let status = w.stop();
    assert!(status.success(), "{status:?}");

    // Restarted on the same port: it remembers nothing, so it grants
    // nothing during its start-up window, not even to a node that asks
    // with a fresh counter.
    let addr = a.to;
    let cfg = setup(dir.path(), &addr.to_string());
    let w2 = Witness::start(&cfg);
    assert_eq!(w2.addr, addr);
    let (_, o) = b.acquire();
    let (v, holder, _) = refused(o);
    assert_eq!((v, holder), (Verdict::Startup, None));
    assert!(!b.client.holds(b.now()));
    assert_eq!(b.client.counters().witness_restarts, 1);
    let s = status_when(&dir.path().join("status.json"), |v| {
        v["witness_epoch"].as_u64() != Some(first_epoch)
    });
    assert_eq!(s["counters"]["refused_startup"], 1, "{s:#}");
    assert_eq!(s["counters"]["granted"], 0, "{s:#}");
    let status = w2.stop();
    assert!(status.success(), "{status:?}");
}

#[test]
fn test_stderr_names_sighup_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "127.0.0.1:0");
    let w = Witness::start(&cfg);
    w.signal(libc::SIGHUP);
    let line = w
        .stderr
        .recv_timeout(Duration::from_secs(5))
        .expect("nothing logged after SIGHUP");
    assert!(line.contains("SIGHUP ignored"), "{line}");
    let mut w = w;
    w.signal(libc::SIGINT);
    let line = w.stderr.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(line, "msl-witness: stopped");
    let status = w.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn test_check_validates_config_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "127.0.0.1:0");
    let out = Command::new(BIN)
        .args(["--check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("is valid"));

    let key = dir.path().join("cluster.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    check_refused(&cfg, &["cluster[0].key_file", "0644"]);

    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\nlease_ms = 50\n").unwrap();
    check_refused(&cfg, &["`lease_ms` = 50"]);
}

/// The generation of the last lease holder is kept in `state_file`: a
/// witness restarted while the holder is gone (both links cut, the holder
/// acknowledged writes alone at a newer generation, then died) still
/// refuses the lease to the node that lacks those writes.
#[test]
fn test_restarted_witness_remembers_the_holders_generation() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = setup(dir.path(), "127.0.0.1:0");
    let w = Witness::start(&cfg);
    let mut a = Node::new(1, 1, w.addr);
    let mut b = Node::new(2, 1, w.addr);
    a.client.set_view(msl_wire::Role::Primary, 9);
    b.client.set_view(msl_wire::Role::Secondary, 5);
    std::thread::sleep(Duration::from_millis(LEASE_MS + 50));
    let (_, o) = a.acquire();
    assert!(matches!(o, Outcome::Granted { .. }), "{o:?}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("state.json")).unwrap())
            .unwrap();
    assert_eq!(state["remembered"][0]["node_id"], 1, "{state:#}");
    assert_eq!(state["remembered"][0]["generation"], 9, "{state:#}");
    // The witness is killed (no clean stop) and restarted on its port.
    let addr = a.to;
    drop(w);
    let cfg = setup(dir.path(), &addr.to_string());
    let w2 = Witness::start(&cfg);
    std::thread::sleep(Duration::from_millis(LEASE_MS + 50));
    let (_, o) = b.acquire();
    let (v, holder, _) = refused(o);
    assert_eq!((v, holder), (Verdict::Behind, None));
    // The holder's own generation still gets it.
    let (_, o) = a.acquire();
    assert!(matches!(o, Outcome::Granted { .. }), "{o:?}");
    drop(w2);
    // A state file that is not one: the witness does not start.
    std::fs::write(dir.path().join("state.json"), "{ torn").unwrap();
    check_refused(&cfg, &["state_file", "not a witness state"]);
}

/// `msl-witness --check` refuses `cfg` with exit 1, saying all of `needles`.
fn check_refused(cfg: &Path, needles: &[&str]) {
    let out = Command::new(BIN)
        .args(["--check", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(needles.iter().all(|n| err.contains(n)), "{err}");
}
