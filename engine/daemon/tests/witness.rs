//! Real msld pairs with a real msl-witness on the client's host (the
//! switch namespace, 10.77.1.60), a client writing through the service
//! address and every acknowledged write checked in both volumes at the end:
//!
//! * both links between the servers cut (MSL down, the bridge's ports
//!   isolated from each other, both still reaching the witness and the
//!   client): only the lease holder serves, the other never takes over;
//!   healed, the pair resyncs by itself, volumes identical, nothing lost;
//! * the witness killed while in sync: writes go on, the notice is logged;
//! * the witness down, then the primary killed: with `suspend` the
//!   secondary waits (and takes over once the witness is back), with
//!   `sft3` it takes over without it;
//! * the primary cut from its peer and from the witness (a blackhole
//!   route), the secondary still reaching it: the secondary takes over,
//!   the old primary acknowledges nothing more, the pair rejoins healed;
//! * the takeover time after `kill -9` of the primary, with the witness.
//!
//! Needs root (network namespaces) and the msl-witness binary next to
//! msld (`cargo build -p msl-witness`); fails loudly otherwise.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod common;
use common::*;
use msl_nbd::client::Client;

const BS: usize = 4096;
const BLOCKS: u64 = 2048;
const WITNESS_IP: &str = "10.77.1.60";
const WITNESS: &str = "10.77.1.60:7790";

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The msl-witness binary (built by `cargo build -p msl-witness`).
fn witness_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_BIN_EXE_msld")).with_file_name("msl-witness");
    assert!(
        p.exists(),
        "{} missing: run `cargo build -p msl-witness` first",
        p.display()
    );
    p
}

/// The last lines of both nodes' logs and the witness's console.
fn logs(dir: &Path) -> String {
    let mut s = String::new();
    for f in [
        "n1.log",
        "n2.log",
        "n1.console",
        "n2.console",
        "witness.console",
    ] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(30)..];
        s += &format!("--- {f}\n{}\n", tail.join("\n"));
    }
    s
}

fn wait_logs(dir: &Path, what: &str, secs: u64, f: impl FnMut() -> bool) {
    wait_with(what, secs, Duration::from_millis(10), f, || logs(dir));
}

fn bytes_written(dir: &Path, id: u16) -> u64 {
    status(dir, id).expect("status")["counters"]["client_bytes_written"]
        .as_u64()
        .unwrap()
}

/// A process killed (SIGKILL) and reaped on drop.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start msl-witness in the switch namespace, listening on 10.77.1.60
/// (added to the bridge once), lease 400 ms, start-up window 400 ms.
fn start_witness(dir: &Path, topo: &Topology) -> Proc {
    let sw = topo.client_ns().unwrap();
    let have = ip_output(&["-n", sw, "-o", "addr", "show"]).unwrap();
    if !String::from_utf8_lossy(&have.stdout).contains(WITNESS_IP) {
        ip(&[
            "-n",
            sw,
            "addr",
            "add",
            &format!("{WITNESS_IP}/24"),
            "dev",
            "br0",
        ]);
    }
    let cfg = dir.join("witness.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"{WITNESS}\"\nlease_ms = 400\nstartup_ms = 400\n\
             state_file = \"{}\"\n\
             [[cluster]]\nid = 0x6d736c6532650001\nkey_file = \"{}\"\n",
            dir.join("witness-state.json").display(),
            dir.join("cluster.key").display()
        ),
    )
    .unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("witness.console"))
        .unwrap();
    let child = command_in(sw, witness_bin().to_str().unwrap())
        .arg("--config")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc(child)
}

fn opts(policy: &str) -> Opts {
    Opts {
        extra: format!("witness = \"{WITNESS}\"\non_no_quorum = \"{policy}\""),
        ..Opts::default()
    }
}

/// A switched topology, the witness, and a pair in sync with node 1
/// primary holding the lease.
fn setup(dir: &Path, policy: &str) -> (Topology, Proc, Daemon, Daemon) {
    require_root();
    let topo = switched_topology();
    let w = start_witness(dir, &topo);
    let o = opts(policy);
    let d1 = start_daemon_opts(dir, &topo.veth.ns_a, 1, true, &o);
    let d2 = start_daemon_opts(dir, &topo.veth.ns_b, 2, false, &o);
    wait_logs(dir, "in sync, node 1 holding the lease", 30, || {
        in_sync_as(dir, 1) && status(dir, 1).is_some_and(|s| s["witness"]["held"] == true)
    });
    (topo, w, d1, d2)
}

/// `bridge link set dev PORT isolated on|off` in the switch: isolated
/// ports reach the bridge's own addresses (client, witness) but not each
/// other, so the servers lose their LAN to each other only.
fn isolate(topo: &Topology, on: bool) {
    for port in ["pa", "pb"] {
        let (ok, out) = in_ns(
            topo.client_ns().unwrap(),
            "bridge",
            &[
                "link",
                "set",
                "dev",
                port,
                "isolated",
                if on { "on" } else { "off" },
            ],
        );
        assert!(ok, "bridge link set {port} isolated: {out}");
    }
}

fn msl_link(topo: &Topology, up: bool) {
    topo.set_link(1, topo.msl_if(1), up).unwrap();
}

/// Cut both links between the servers: the LAN first, the MSL once node
/// 2 hears node 1 no more on the LAN. The other order is an MSL failure
/// for node 2 (its carrier drops at once while the LAN still carries
/// fresh heartbeats): it shuts its mirror side down as outdated and never
/// takes over, which is not what these tests are about.
fn cut_both_links(dir: &Path, topo: &Topology) {
    isolate(topo, true);
    wait_logs(dir, "node 2 hears node 1 no more on the LAN", 10, || {
        status(dir, 2).is_some_and(|s| s["lan_alive"] == false)
    });
    msl_link(topo, false);
}

// ---------------------------------------------------------------------------
// The client: 4 KiB writes one at a time to the service address, block
// `seq % BLOCKS`, each carrying its block and sequence number; reconnects
// when a reply is late or the connection breaks.

fn block_data(block: u64, seq: u64) -> Vec<u8> {
    let mut d = Vec::with_capacity(BS);
    d.extend_from_slice(&block.to_le_bytes());
    d.extend_from_slice(&seq.to_le_bytes());
    let mut x = block << 40 ^ seq;
    while d.len() < BS {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        d.extend_from_slice(&x.to_le_bytes());
    }
    d
}

#[derive(Default)]
struct Book {
    /// Per block: the last acknowledged write's sequence number, the last
    /// sent.
    acked: Vec<u64>,
    sent: Vec<u64>,
    acks: u64,
    last_ack: Option<Instant>,
}

struct Writer {
    book: Arc<Mutex<Book>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    fn start(ns: &str) -> Writer {
        let book = Arc::new(Mutex::new(Book {
            acked: vec![0; BLOCKS as usize],
            sent: vec![0; BLOCKS as usize],
            ..Book::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (b, s, ns) = (book.clone(), stop.clone(), ns.to_string());
        let thread = std::thread::spawn(move || {
            msl_transport::netns::enter(&ns).unwrap();
            let addr: SocketAddr = "10.77.1.100:10809".parse().unwrap();
            let mut seq = 0u64;
            while !s.load(Ordering::SeqCst) {
                let Ok(mut c) = Client::connect(addr, "", Duration::from_millis(500)) else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = c.set_timeout(Duration::from_millis(1500));
                while !s.load(Ordering::SeqCst) {
                    seq += 1;
                    let blk = seq % BLOCKS;
                    b.lock().unwrap().sent[blk as usize] = seq;
                    if c.write(blk * BS as u64, &block_data(blk, seq), false)
                        .is_err()
                    {
                        break;
                    }
                    let mut bk = b.lock().unwrap();
                    bk.acked[blk as usize] = seq;
                    bk.acks += 1;
                    bk.last_ack = Some(Instant::now());
                    drop(bk);
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        Writer {
            book,
            stop,
            thread: Some(thread),
        }
    }

    fn acks(&self) -> u64 {
        self.book.lock().unwrap().acks
    }

    fn wait_progress(&self, dir: &Path, n: u64, secs: u64, what: &str) {
        let base = self.acks();
        wait_logs(
            dir,
            &format!("{n} more writes acknowledged {what}"),
            secs,
            || self.acks() >= base + n,
        );
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("client thread");
        }
    }

    /// Every acknowledged write, in `img`: that write or a later one sent
    /// to its block. Returns the problems (empty: none lost).
    fn check(&self, img: &[u8]) -> Vec<String> {
        let b = self.book.lock().unwrap();
        let mut bad = Vec::new();
        for blk in 0..BLOCKS as usize {
            let acked = b.acked[blk];
            if acked == 0 {
                continue;
            }
            let got = &img[blk * BS..(blk + 1) * BS];
            let seq = u64::from_le_bytes(got[8..16].try_into().unwrap());
            let ok = seq >= acked && seq <= b.sent[blk] && got == &block_data(blk as u64, seq)[..];
            if !ok && bad.len() < 10 {
                bad.push(format!(
                    "block {blk}: acknowledged write {acked} (last sent {}), holds write {seq}",
                    b.sent[blk]
                ));
            }
        }
        bad
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Stop the client, wait until the pair is in sync with `primary`, stop
/// both nodes; the volumes must be identical and hold every acknowledged
/// write.
fn finish_and_compare(dir: &Path, w: &mut Writer, primary: u16, d1: &Daemon, d2: &Daemon) {
    w.finish();
    wait_logs(
        dir,
        "the pair in sync again, without an administrator",
        60,
        || in_sync_as(dir, primary),
    );
    let (a, b) = stop_and_read_images(dir, &[d1, d2]);
    assert!(a == b, "volumes differ after the repair\n{}", logs(dir));
    let bad = w.check(&a);
    assert!(
        bad.is_empty(),
        "acknowledged writes lost: {bad:?}\n{}",
        logs(dir)
    );
    assert!(w.acks() > 0);
}

/// Both links between the servers cut while a client writes to the
/// primary, both servers still reaching the witness: the primary keeps the
/// lease and serves, the secondary never takes over; healed, the pair
/// resyncs by itself and loses nothing.
#[test]
fn test_both_links_cut_only_the_lease_holder_serves() {
    let _g = serial();
    let dir = keyed_dir("5a");
    let d = dir.path();
    let (topo, _w, d1, d2) = setup(d, "suspend");
    let mut w = Writer::start(topo.client_ns().unwrap());
    w.wait_progress(d, 100, 20, "before the cut");
    cut_both_links(d, &topo);
    wait_logs(d, "both nodes lose each other", 10, || {
        status(d, 1).is_some_and(|s| s["connected"] == false && s["lan_alive"] == false)
    });
    // Three dead intervals and more: the secondary asks and is refused.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        assert_eq!(role(d, 2).as_deref(), Some("secondary"), "{}", logs(d));
        assert!(!topo.has_address(2, "10.77.1.100").unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    w.wait_progress(d, 100, 10, "by the primary alone, with the lease");
    let s2 = status(d, 2).unwrap();
    assert!(
        s2["witness"]["counters"]["refused"].as_u64().unwrap() > 0,
        "{s2}"
    );
    assert_eq!(s2["witness"]["holder"], 1, "{s2}");
    assert_eq!(s2["witness"]["held"], false, "{s2}");
    isolate(&topo, false);
    msl_link(&topo, true);
    finish_and_compare(d, &mut w, 1, &d1, &d2);
    assert_eq!(log_events(d, 2, "takeover"), 0);
}

/// The witness killed while the pair is in sync: nothing changes, the
/// client's writes go on, and the primary reports the witness silent.
#[test]
fn test_witness_down_in_sync_changes_nothing() {
    let _g = serial();
    let dir = keyed_dir("5b");
    let d = dir.path();
    let (topo, w, d1, d2) = setup(d, "suspend");
    let mut wr = Writer::start(topo.client_ns().unwrap());
    wr.wait_progress(d, 50, 20, "before the witness dies");
    drop(w);
    wait_logs(d, "the primary reports the witness unreachable", 5, || {
        log_events(d, 1, "witness_unreachable") > 0
    });
    wr.wait_progress(d, 200, 10, "without the witness");
    assert!(in_sync_as(d, 1), "{}", logs(d));
    let s = status(d, 1).unwrap();
    assert_eq!(s["witness"]["reachable"], false, "{s}");
    finish_and_compare(d, &mut wr, 1, &d1, &d2);
}

/// The witness down, then the primary killed: `suspend` waits for the
/// witness (and takes over once it is back), `sft3` takes over without it.
fn witness_down_then_primary_killed(policy: &str, key: &str) {
    let _g = serial();
    let dir = keyed_dir(key);
    let d = dir.path();
    let (topo, w, d1, d2) = setup(d, policy);
    drop(w);
    wait_logs(d, "the primary reports the witness unreachable", 5, || {
        log_events(d, 1, "witness_unreachable") > 0
    });
    drop(d1);
    let killed = Instant::now();
    // The restarted witness must outlive the checks below: without its
    // peer and without the lease, the new primary acknowledges nothing
    // under `suspend`.
    let mut _witness_again = None;
    if policy == "suspend" {
        while killed.elapsed() < Duration::from_secs(3) {
            assert_eq!(role(d, 2).as_deref(), Some("secondary"), "{}", logs(d));
            std::thread::sleep(Duration::from_millis(50));
        }
        _witness_again = Some(start_witness(d, &topo));
        let back = Instant::now();
        wait_logs(d, "takeover once the witness is back", 10, || {
            role(d, 2).as_deref() == Some("primary")
        });
        eprintln!("takeover {:?} after the witness's restart", back.elapsed());
    } else {
        wait_logs(d, "takeover without the witness (sft3)", 5, || {
            role(d, 2).as_deref() == Some("primary")
        });
        eprintln!("sft3 takeover {:?} after the kill", killed.elapsed());
    }
    let mut wr = Writer::start(topo.client_ns().unwrap());
    wr.wait_progress(d, 50, 20, "by the new primary");
    wr.finish();
    assert!(wr.acks() >= 50);
    drop(d2);
}

#[test]
fn test_witness_down_then_primary_killed_suspend_waits() {
    witness_down_then_primary_killed("suspend", "5c");
}

#[test]
fn test_witness_down_then_primary_killed_sft3_takes_over() {
    witness_down_then_primary_killed("sft3", "5d");
}

/// The primary cut from its peer (MSL, LAN) and from the witness, the
/// secondary still reaching the witness: the secondary takes over once the
/// primary's lease ended, the old primary acknowledges nothing after, and
/// healed, the pair rejoins with the new primary, nothing lost.
#[test]
fn test_primary_cut_from_peer_and_witness_secondary_takes_over() {
    let _g = serial();
    let dir = keyed_dir("5e");
    let d = dir.path();
    let (topo, _w, d1, d2) = setup(d, "suspend");
    let mut w = Writer::start(topo.client_ns().unwrap());
    w.wait_progress(d, 100, 20, "before the cut");
    let ns_a = topo.server_ns(1).to_string();
    ip(&[
        "-n",
        &ns_a,
        "route",
        "add",
        "blackhole",
        &format!("{WITNESS_IP}/32"),
    ]);
    cut_both_links(d, &topo);
    wait_logs(d, "the secondary takes over with the lease", 10, || {
        role(d, 2).as_deref() == Some("primary")
    });
    let a_bytes = bytes_written(d, 1);
    let s1 = status(d, 1).unwrap();
    assert_eq!(s1["witness"]["held"], false, "{s1}");
    w.wait_progress(d, 100, 20, "by the new primary");
    assert_eq!(
        bytes_written(d, 1),
        a_bytes,
        "the old primary acknowledged writes after the secondary took over\n{}",
        logs(d)
    );
    ip(&[
        "-n",
        &ns_a,
        "route",
        "del",
        "blackhole",
        &format!("{WITNESS_IP}/32"),
    ]);
    isolate(&topo, false);
    msl_link(&topo, true);
    finish_and_compare(d, &mut w, 2, &d1, &d2);
}

/// Takeover time after `kill -9` of the primary, with the witness: from
/// the kill to the secondary's status saying primary.
#[test]
fn test_takeover_after_kill_within_half_a_second_with_witness() {
    let _g = serial();
    let dir = keyed_dir("5f");
    let d = dir.path();
    let (_topo, _w, d1, _d2) = setup(d, "suspend");
    // Let the lease renew a few times.
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    drop(d1);
    wait_logs(d, "the secondary takes over", 5, || {
        role(d, 2).as_deref() == Some("primary")
    });
    let took = t.elapsed();
    eprintln!(
        "takeover after kill -9 with a witness: {} ms",
        took.as_millis()
    );
    assert!(
        took <= Duration::from_millis(500),
        "takeover took {took:?}\n{}",
        logs(d)
    );
}
