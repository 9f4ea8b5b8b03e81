//! Real msld pairs whose processes stall or whose heartbeats are replayed,
//! under a client that keeps writing through the service address at queue
//! depth 8 and checks at the end that every acknowledged write reads back:
//!
//! * the secondary stopped (SIGSTOP) for 0.6 s, 3 s and a seeded random
//!   length must not take over when it wakes: the primary is alive;
//! * the primary stopped past the dead interval is replaced, and on waking
//!   acknowledges nothing more, gives up the address and rejoins as an
//!   in-sync secondary without an administrator;
//! * four LAN-adapter-failure switchovers in a row, each serving again
//!   within 0.6 s of the fault;
//! * heartbeats of a killed primary replayed on the LAN must not keep the
//!   secondary from taking over.
//!
//! Needs root (network namespaces); fails loudly otherwise.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod common;
use common::*;
use msl_nbd::client::Client;
use msl_nbd::proto::{CMD_WRITE, REQUEST_LEN, REQUEST_MAGIC, SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC};
use serde_json::Value;

const SERVICE_IP: &str = "10.77.1.100";
const BS: usize = 4096;
/// The dead interval of the test config (8 heartbeats of 50 ms).
const DEAD: Duration = Duration::from_millis(400);

/// One test of this file at a time: their timings (the dead interval, the
/// 0.6 s switchover) are what they check, and each pair already keeps a
/// 2-CPU machine busy.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The run directory; when the test fails it is kept (logs, metadata,
/// consoles; the 64 MiB volume images are removed) and its path printed.
struct RunDir(tempfile::TempDir);

impl RunDir {
    fn new(key_byte: &str) -> RunDir {
        RunDir(keyed_dir(key_byte))
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.disable_cleanup(true);
            for f in ["n1.img", "n2.img"] {
                let _ = std::fs::remove_file(self.0.path().join(f));
            }
            eprintln!("test directory kept: {}", self.0.path().display());
        }
    }
}

/// The last lines of both nodes' logs and consoles, for failure messages.
fn node_logs(dir: &Path) -> String {
    let mut s = String::new();
    for f in ["n1.log", "n2.log", "n1.console", "n2.console"] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        s += &format!(
            "--- {f}: last {} of {} lines\n{}\n",
            tail.len(),
            lines.len(),
            tail.join("\n")
        );
    }
    s
}

/// `assert!` whose message ends with the nodes' log tails.
macro_rules! check {
    ($dir:expr, $cond:expr, $($arg:tt)+) => {
        if !$cond {
            panic!("{}\n{}", format!($($arg)+), node_logs($dir));
        }
    };
}

/// `wait`, whose timeout message ends with the nodes' log tails.
fn wait_logs(dir: &Path, what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "timed out after {secs} s waiting for: {what}\n{}",
        node_logs(dir)
    );
}

fn role(dir: &Path, id: u16) -> Option<String> {
    status(dir, id).and_then(|s| s["role"].as_str().map(str::to_string))
}

fn counter(s: &Value, name: &str) -> u64 {
    s["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("counter {name} missing: {s}"))
}

/// Node `primary` primary and the other secondary, both in sync.
fn in_sync_as(dir: &Path, primary: u16) -> bool {
    status(dir, primary).is_some_and(|s| s["in_sync"] == true && s["role"] == "primary")
        && status(dir, 3 - primary)
            .is_some_and(|s| s["in_sync"] == true && s["role"] == "secondary")
}

/// Start a pair (node 1 initial primary) on `topo` and wait until in sync.
fn pair_in_sync(dir: &Path, topo: &Topology) -> (Daemon, Daemon) {
    let d1 = start_daemon(dir, &topo.veth.ns_a, 1, true);
    let d2 = start_daemon(dir, &topo.veth.ns_b, 2, false);
    wait_logs(dir, "both nodes in sync", 30, || in_sync_as(dir, 1));
    (d1, d2)
}

fn signal(d: &Daemon, sig: i32) {
    let pid = d.0.id() as libc::pid_t;
    // SAFETY: kill(2) on the pid of a child this test started and has not
    // reaped (Daemon waits only on drop).
    let r = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        r,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// A daemon stopped with SIGSTOP; continued (SIGCONT) when dropped, so a
/// failing test never leaves it stopped.
struct Paused<'a>(&'a Daemon);

impl<'a> Paused<'a> {
    fn new(d: &'a Daemon) -> Paused<'a> {
        signal(d, libc::SIGSTOP);
        Paused(d)
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        signal(self.0, libc::SIGCONT);
    }
}

/// Whether node `id`'s namespace holds the service address.
fn holds_address(topo: &Topology, id: u16) -> bool {
    topo.has_address(id, SERVICE_IP)
        .unwrap_or_else(|e| panic!("ip addr in node {id}'s namespace: {e}"))
}

/// How often `event=NAME` appears in node `id`'s log.
fn log_events(dir: &Path, id: u16, name: &str) -> usize {
    std::fs::read_to_string(dir.join(format!("n{id}.log")))
        .unwrap_or_default()
        .matches(&format!("event={name} "))
        .count()
}

/// splitmix64: the seeded choices of a test (the seed is printed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The seed from `MSL_STALL_SEED`, or one from the clock.
fn seed() -> u64 {
    std::env::var("MSL_STALL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

// ---------------------------------------------------------------------------
// The client: 4 KiB writes pipelined at queue depth `depth` on one NBD
// connection to the service address, reconnecting when the connection
// breaks or a reply is late. Every block written carries its block number
// and the write's sequence number, the rest a pattern derived from both, so
// that a read tells which write a block holds.

/// The 4 KiB a write of sequence number `seq` puts in block `block`.
fn block_data(block: u64, seq: u64) -> Vec<u8> {
    let mut d = Vec::with_capacity(BS);
    d.extend_from_slice(&block.to_le_bytes());
    d.extend_from_slice(&seq.to_le_bytes());
    let mut r = Rng(block << 40 ^ seq);
    while d.len() < BS {
        d.extend_from_slice(&r.next().to_le_bytes());
    }
    d
}

/// One acknowledged write: when, and when its connection was made.
#[derive(Clone, Copy, Debug)]
struct Ack {
    at: Instant,
    conn_at: Instant,
}

#[derive(Default)]
struct Book {
    /// Per block: the sequence number of the last acknowledged write (0:
    /// none) and of the last one sent.
    acked: Vec<u64>,
    sent: Vec<u64>,
    acks: Vec<Ack>,
    connections: usize,
    /// Why connections ended (connect failures are not counted).
    lost: Vec<String>,
    /// Writes the server answered with an error.
    errors: Vec<String>,
}

struct Writer {
    book: Arc<Mutex<Book>>,
    stop: Arc<AtomicBool>,
    hold: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
    ns: String,
    blocks: u64,
}

struct WriterCfg {
    /// Writes in flight on the connection.
    depth: usize,
    /// Blocks written, from block 0, in turn.
    blocks: u64,
    /// A reply later than this (or a connect or handshake slower) ends the
    /// connection: its writes in flight are abandoned (not acknowledged)
    /// and the client connects again.
    timeout: Duration,
    /// At most this many writes a second (the pair runs on a busy machine).
    rate: u32,
}

impl Writer {
    fn start(ns: &str, cfg: WriterCfg) -> Writer {
        let n = cfg.blocks as usize;
        let book = Arc::new(Mutex::new(Book {
            acked: vec![0; n],
            sent: vec![0; n],
            ..Book::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let hold = Arc::new(AtomicBool::new(false));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (b, s, h, f, name) = (
            book.clone(),
            stop.clone(),
            hold.clone(),
            in_flight.clone(),
            ns.to_string(),
        );
        let blocks = cfg.blocks;
        let thread = std::thread::spawn(move || {
            msl_transport::netns::enter(&name).unwrap();
            write_loop(&cfg, &b, &s, &h, &f);
        });
        Writer {
            book,
            stop,
            hold,
            in_flight,
            thread: Some(thread),
            ns: ns.to_string(),
            blocks,
        }
    }

    fn acks(&self) -> usize {
        self.book.lock().unwrap().acks.len()
    }

    /// Wait until `n` more writes than now are acknowledged.
    fn wait_progress(&self, dir: &Path, n: usize, secs: u64, what: &str) {
        let base = self.acks();
        wait_logs(
            dir,
            &format!("{n} more writes acknowledged {what}"),
            secs,
            || self.acks() >= base + n,
        );
    }

    /// Stop sending and wait until nothing is in flight.
    fn hold_and_drain(&self, dir: &Path) {
        self.hold.store(true, Ordering::SeqCst);
        wait_logs(dir, "the client's writes in flight answered", 10, || {
            self.in_flight.load(Ordering::SeqCst) == 0
        });
    }

    fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
    }

    /// The first write acknowledged on a connection made after `t`, as the
    /// time from `t`.
    fn first_ack_on_connection_after(&self, t: Instant) -> Option<Duration> {
        let b = self.book.lock().unwrap();
        b.acks
            .iter()
            .find(|a| a.conn_at > t)
            .map(|a| a.at.duration_since(t))
    }

    fn summary(&self) -> String {
        let b = self.book.lock().unwrap();
        format!(
            "{} writes acknowledged over {} connections, {} connections lost (last: {:?}), {} error answers (first: {:?})",
            b.acks.len(),
            b.connections,
            b.lost.len(),
            b.lost.last(),
            b.errors.len(),
            b.errors.first()
        )
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("the client thread panicked");
        }
    }

    /// Stop, then read every block that has an acknowledged write through
    /// the service address: each must hold that write or a later one sent
    /// to it. Returns the problems found (empty: all read back).
    fn verify(&mut self) -> Vec<String> {
        self.finish();
        let book = self.book.clone();
        let blocks = self.blocks;
        msl_transport::netns::VethPair::in_ns(&self.ns, move || {
            let b = book.lock().unwrap();
            let addr: SocketAddr = format!("{SERVICE_IP}:10809").parse().unwrap();
            let mut c = Client::connect(addr, "", Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("connect for the read-back: {e}"));
            let mut bad = Vec::new();
            let chunk = 64u64;
            let mut buf = vec![0u8; chunk as usize * BS];
            let mut first = 0;
            while first < blocks {
                let n = chunk.min(blocks - first);
                let buf = &mut buf[..n as usize * BS];
                c.read(first * BS as u64, buf)
                    .unwrap_or_else(|e| panic!("read-back of blocks {first}..: {e}"));
                for i in 0..n {
                    let blk = first + i;
                    let acked = b.acked[blk as usize];
                    if acked == 0 {
                        continue;
                    }
                    let got = &buf[(i as usize) * BS..(i as usize + 1) * BS];
                    let seq = u64::from_le_bytes(got[8..16].try_into().unwrap());
                    let ok = seq >= acked
                        && seq <= b.sent[blk as usize]
                        && got == &block_data(blk, seq)[..];
                    if !ok && bad.len() < 20 {
                        bad.push(format!(
                            "block {blk}: acknowledged write {acked} (last sent {}), read block {} write {seq}{}",
                            b.sent[blk as usize],
                            u64::from_le_bytes(got[0..8].try_into().unwrap()),
                            if got.iter().all(|&x| x == 0) { " (zeros)" } else { "" }
                        ));
                    }
                }
                first += n;
            }
            bad
        })
        .unwrap()
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

/// Connect to the service address and open the export: the stream for the
/// pipelined writes (the handshake is the library client's).
fn connect(timeout: Duration) -> std::io::Result<TcpStream> {
    let addr: SocketAddr = format!("{SERVICE_IP}:10809").parse().unwrap();
    // A connect to a server that left (its ARP entry not yet replaced by
    // the new primary's announcement) is retried soon.
    let sock = TcpStream::connect_timeout(&addr, timeout.min(Duration::from_millis(50)))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    let raw = sock.try_clone()?;
    Client::handshake(sock, "").map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(raw)
}

fn write_loop(
    cfg: &WriterCfg,
    book: &Mutex<Book>,
    stop: &AtomicBool,
    hold: &AtomicBool,
    in_flight: &AtomicUsize,
) {
    let mut seq = 0u64;
    let mut next_block = 0u64;
    let gap = Duration::from_secs(1) / cfg.rate;
    let mut next_send = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        in_flight.store(0, Ordering::SeqCst);
        let mut sock = match connect(cfg.timeout) {
            Ok(s) => s,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let conn_at = Instant::now();
        book.lock().unwrap().connections += 1;
        // handle -> (block, seq)
        let mut pending: HashMap<u64, (u64, u64)> = HashMap::new();
        let why = loop {
            if stop.load(Ordering::SeqCst) && pending.is_empty() {
                return;
            }
            let mut send_err = None;
            while send_err.is_none()
                && !hold.load(Ordering::SeqCst)
                && !stop.load(Ordering::SeqCst)
                && pending.len() < cfg.depth
                && Instant::now() >= next_send
            {
                seq += 1;
                let block = next_block;
                next_block = (next_block + 1) % cfg.blocks;
                book.lock().unwrap().sent[block as usize] = seq;
                let mut m = Vec::with_capacity(REQUEST_LEN + BS);
                m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
                m.extend_from_slice(&0u16.to_be_bytes());
                m.extend_from_slice(&CMD_WRITE.to_be_bytes());
                m.extend_from_slice(&seq.to_be_bytes());
                m.extend_from_slice(&(block * BS as u64).to_be_bytes());
                m.extend_from_slice(&(BS as u32).to_be_bytes());
                m.extend_from_slice(&block_data(block, seq));
                pending.insert(seq, (block, seq));
                in_flight.store(pending.len(), Ordering::SeqCst);
                next_send = next_send.max(Instant::now() - gap * 4) + gap;
                if let Err(e) = sock.write_all(&m) {
                    send_err = Some(format!("send: {e}"));
                }
            }
            if let Some(e) = send_err {
                break e;
            }
            if pending.is_empty() {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let mut r = [0u8; SIMPLE_REPLY_LEN];
            if let Err(e) = sock.read_exact(&mut r) {
                break format!("reply: {e} ({} in flight)", pending.len());
            }
            let magic = u32::from_be_bytes(r[0..4].try_into().unwrap());
            let errno = u32::from_be_bytes(r[4..8].try_into().unwrap());
            let handle = u64::from_be_bytes(r[8..16].try_into().unwrap());
            let Some((block, s)) = pending.remove(&handle) else {
                break format!("reply for unknown handle {handle} (magic {magic:#x})");
            };
            if magic != SIMPLE_REPLY_MAGIC {
                break format!("reply magic {magic:#x}");
            }
            in_flight.store(pending.len(), Ordering::SeqCst);
            let mut b = book.lock().unwrap();
            if errno == 0 {
                let a = &mut b.acked[block as usize];
                *a = (*a).max(s);
                b.acks.push(Ack {
                    at: Instant::now(),
                    conn_at,
                });
            } else {
                b.errors
                    .push(format!("write {s} to block {block}: errno {errno}"));
            }
        };
        // The writes in flight are abandoned: never acknowledged.
        book.lock().unwrap().lost.push(why);
    }
    in_flight.store(0, Ordering::SeqCst);
}

// ---------------------------------------------------------------------------

/// Watch node `id`'s role from a thread (polled every 20 ms) until told to
/// stop; returns every distinct role seen, in order.
struct RoleWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<String>>>,
}

impl RoleWatch {
    fn start(dir: &Path, id: u16) -> RoleWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, d) = (stop.clone(), dir.to_path_buf());
        let thread = std::thread::spawn(move || {
            let mut seen: Vec<String> = Vec::new();
            while !s.load(Ordering::SeqCst) {
                if let Some(r) = role(&d, id) {
                    if seen.last() != Some(&r) {
                        seen.push(r);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        });
        RoleWatch {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for RoleWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn test_secondary_paused_does_not_take_over() {
    require_root();
    let _serial = serial();
    let dir = RunDir::new("5a");
    let d = dir.path();
    let topo = switched_topology();
    let client = topo.client_ns().unwrap().to_string();
    let (d1, d2) = pair_in_sync(d, &topo);
    let mut w = Writer::start(
        &client,
        WriterCfg {
            depth: 8,
            blocks: 4096,
            timeout: Duration::from_secs(5),
            rate: 1500,
        },
    );
    w.wait_progress(d, 200, 20, "before the first pause");
    let s = seed();
    let random = Duration::from_millis(200 + Rng(s).next() % 9800);
    eprintln!("MSL_STALL_SEED={s}: random pause {random:?}");
    for pause in [Duration::from_millis(600), Duration::from_secs(3), random] {
        let watch1 = RoleWatch::start(d, 1);
        let watch2 = RoleWatch::start(d, 2);
        let t = Instant::now();
        {
            let _p = Paused::new(&d2);
            std::thread::sleep(pause);
            // The primary went on serving meanwhile (degraded once the
            // secondary was silent for the dead interval).
            check!(
                d,
                holds_address(&topo, 1) && !holds_address(&topo, 2),
                "service address not on node 1 alone during a {pause:?} pause of node 2"
            );
        }
        eprintln!("node 2 continued after {:?}", t.elapsed());
        // Awake: it must stay secondary and be resynced.
        wait_logs(
            d,
            &format!("the pair back in sync after a {pause:?} pause of the secondary"),
            30,
            || in_sync_as(d, 1) || log_events(d, 2, "takeover") > 0,
        );
        std::thread::sleep(Duration::from_millis(300));
        let (r1, r2) = (watch1.finish(), watch2.finish());
        eprintln!("pause {pause:?}: roles seen: node 1 {r1:?}, node 2 {r2:?}");
        check!(
            d,
            r2.iter().all(|r| r == "secondary") && r1.iter().all(|r| r == "primary"),
            "after a {pause:?} SIGSTOP of the secondary: node 1 was {r1:?}, node 2 was {r2:?} (the secondary took over although the primary was alive)"
        );
        check!(
            d,
            log_events(d, 2, "takeover") == 0,
            "node 2 logged a takeover after a {pause:?} pause"
        );
        let s2 = status(d, 2).unwrap();
        check!(
            d,
            counter(&s2, "takeovers") == 0,
            "node 2 counts a takeover after a {pause:?} pause: {s2}"
        );
        check!(
            d,
            holds_address(&topo, 1) && !holds_address(&topo, 2),
            "service address not on node 1 alone after a {pause:?} pause of node 2"
        );
        w.wait_progress(d, 100, 20, &format!("after the {pause:?} pause"));
    }
    let bad = w.verify();
    eprintln!("client: {}", w.summary());
    check!(
        d,
        bad.is_empty(),
        "acknowledged writes do not read back: {bad:#?}"
    );
    check!(
        d,
        w.book.lock().unwrap().errors.is_empty(),
        "writes refused while the secondary stalled: {}",
        w.summary()
    );
    wait_logs(d, "in sync at the end", 20, || in_sync_as(d, 1));
    let (a, b) = stop_and_read_images(d, &[&d1, &d2]);
    check!(d, a == b, "backing files differ after the pauses");
}

/// Emulate systemd's `Restart=always`: when node `id`'s msld has exited,
/// start it again (as a secondary, as after a LAN-failure switchover).
/// Returns whether it had exited (and how).
fn restart_if_exited(dir: &Path, topo: &Topology, id: u16, d: &mut Daemon) -> Option<i32> {
    let st = d.0.try_wait().unwrap()?;
    *d = start_daemon(dir, topo.server_ns(id), id, false);
    Some(st.code().unwrap_or(-1))
}

#[test]
fn test_primary_paused_past_dead_interval_is_replaced_and_rejoins() {
    require_root();
    let _serial = serial();
    let dir = RunDir::new("5b");
    let d = dir.path();
    let topo = switched_topology();
    let client = topo.client_ns().unwrap().to_string();
    let (mut d1, d2) = pair_in_sync(d, &topo);
    let mut w = Writer::start(
        &client,
        WriterCfg {
            depth: 8,
            blocks: 4096,
            timeout: Duration::from_millis(300),
            rate: 1500,
        },
    );
    w.wait_progress(d, 200, 20, "before the pause");
    // Nothing in flight: the bytes node 1 has acknowledged stay exact.
    w.hold_and_drain(d);
    let acked_by_1 = counter(&status(d, 1).unwrap(), "client_bytes_written");
    let acks_before = w.acks();
    let t = Instant::now();
    let mut restarts = Vec::new();
    {
        let _p = Paused::new(&d1);
        w.release();
        wait_logs(d, "node 2 takes over from the stopped primary", 10, || {
            role(d, 2).as_deref() == Some("primary")
        });
        eprintln!("node 2 primary {:?} after the SIGSTOP", t.elapsed());
        w.wait_progress(d, 100, 10, "by node 2 while node 1 is stopped");
        let left = Duration::from_secs(2).saturating_sub(t.elapsed());
        std::thread::sleep(left);
        check!(
            d,
            holds_address(&topo, 2),
            "node 2 serves without the service address"
        );
    }
    let woke = Instant::now();
    // Awake: node 1 must acknowledge nothing more, give up the address and
    // come back as an in-sync secondary (restarting itself if it must).
    let mut max_seen = acked_by_1;
    wait_logs(
        d,
        "node 1 back as an in-sync secondary without the address",
        30,
        || {
            if let Some(code) = restart_if_exited(d, &topo, 1, &mut d1) {
                restarts.push(code);
            }
            if restarts.is_empty() {
                if let Some(s) = status(d, 1) {
                    max_seen = max_seen.max(counter(&s, "client_bytes_written"));
                }
            }
            (in_sync_as(d, 2) && !holds_address(&topo, 1))
                || log_events(d, 1, "split_brain_refused") + log_events(d, 2, "split_brain_refused")
                    > 0
        },
    );
    eprintln!(
        "{:?} after node 1 woke: node 1 {:?}, node 2 {:?}, in sync {}; node 1 restarted after exit codes {restarts:?}",
        woke.elapsed(),
        role(d, 1),
        role(d, 2),
        in_sync_as(d, 2)
    );
    check!(
        d,
        max_seen == acked_by_1,
        "node 1 acknowledged {} bytes of client writes after its pause (it was replaced)",
        max_seen - acked_by_1
    );
    check!(
        d,
        log_events(d, 1, "split_brain_refused") + log_events(d, 2, "split_brain_refused") == 0,
        "split brain after the stopped primary woke (it had been replaced): roles now node 1 {:?}, node 2 {:?}",
        role(d, 1),
        role(d, 2)
    );
    check!(
        d,
        holds_address(&topo, 2) && !holds_address(&topo, 1),
        "service address not on node 2 alone"
    );
    check!(
        d,
        log_events(d, 2, "takeover") >= 1,
        "node 2 logged no takeover"
    );
    // The client goes on through the service address: now node 2.
    w.wait_progress(d, 200, 20, "by node 2 after node 1 rejoined");
    check!(
        d,
        w.acks() > acks_before,
        "no writes acknowledged after the pause"
    );
    let bad = w.verify();
    eprintln!("client: {}", w.summary());
    check!(
        d,
        bad.is_empty(),
        "acknowledged writes do not read back from the new primary: {bad:#?}"
    );
    wait_logs(d, "in sync at the end", 20, || in_sync_as(d, 2));
    let (a, b) = stop_and_read_images(d, &[&d1, &d2]);
    check!(d, a == b, "backing files differ after the rejoin");
}

#[test]
fn test_four_lan_switchovers_in_a_row() {
    require_root();
    let _serial = serial();
    let dir = RunDir::new("5c");
    let d = dir.path();
    let topo = switched_topology();
    let client = topo.client_ns().unwrap().to_string();
    let (d1, d2) = pair_in_sync(d, &topo);
    let mut daemons = [d1, d2];
    // A short reply timeout: the old primary's connection goes silent
    // when its adapter fails; the client must notice quickly.
    let mut w = Writer::start(
        &client,
        WriterCfg {
            depth: 8,
            blocks: 4096,
            timeout: Duration::from_millis(100),
            rate: 1500,
        },
    );
    // Per round: fault to the first write acknowledged on a connection
    // made after the fault (`None`: none within 10 s).
    let mut took: Vec<Option<Duration>> = Vec::new();
    for round in 0..4 {
        let p: u16 = if round % 2 == 0 { 1 } else { 2 };
        let s = 3 - p;
        wait_logs(
            d,
            &format!("round {round}: node {p} primary in sync"),
            30,
            || in_sync_as(d, p),
        );
        w.wait_progress(d, 200, 20, &format!("before round {round}"));
        let lan = Topology::lan_if(p);
        let t = Instant::now();
        topo.set_link(p, lan, false).unwrap();
        let mut first = None;
        while first.is_none() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
            first = w.first_ack_on_connection_after(t);
        }
        eprintln!(
            "round {round}: node {p}'s LAN adapter down; first write acknowledged after {first:?}"
        );
        took.push(first);
        if first.is_none() {
            break;
        }
        wait_logs(d, &format!("round {round}: node {s} primary"), 10, || {
            role(d, s).as_deref() == Some("primary")
        });
        // The old primary restarts itself as secondary (exit 75); the
        // adapter is repaired and systemd starts it again.
        let old = &mut daemons[usize::from(p - 1)];
        let mut code = None;
        wait_logs(d, &format!("round {round}: node {p} exits"), 10, || {
            code = old.0.try_wait().unwrap().map(|st| st.code());
            code.is_some()
        });
        eprintln!("round {round}: node {p} exited {code:?}, restarted");
        topo.set_link(p, lan, true).unwrap();
        *old = start_daemon(d, topo.server_ns(p), p, false);
    }
    eprintln!("fault to first write acknowledged: {took:?}");
    if took.len() == 4 {
        wait_logs(d, "in sync after four switchovers", 30, || in_sync_as(d, 1));
        let bad = w.verify();
        eprintln!("client: {}", w.summary());
        check!(
            d,
            bad.is_empty(),
            "acknowledged writes do not read back: {bad:#?}"
        );
    }
    check!(
        d,
        took.len() == 4
            && took
                .iter()
                .all(|t| t.is_some_and(|t| t <= Duration::from_millis(600))),
        "fault to first write acknowledged over 0.6 s (None: none within 10 s): {took:?}"
    );
    let (a, b) = stop_and_read_images(d, &[&daemons[0], &daemons[1]]);
    check!(d, a == b, "backing files differ after four switchovers");
}

// ---------------------------------------------------------------------------
// Replayed heartbeats.

/// Capture the UDP payloads sent from `src` to port `port` that arrive on
/// `ifname` (an `AF_PACKET` socket in the current thread's namespace),
/// until `count` are caught or `within` has passed.
fn capture_udp(
    ifname: &str,
    src: [u8; 4],
    port: u16,
    count: usize,
    within: Duration,
) -> Vec<Vec<u8>> {
    const ETH_P_IP: u16 = 0x0800;
    // SAFETY: plain socket calls on a descriptor owned here and closed at
    // the end; the buffers passed are valid for their lengths.
    unsafe {
        let fd = libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM,
            i32::from(ETH_P_IP.to_be()),
        );
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let name = std::ffi::CString::new(ifname).unwrap();
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETH_P_IP.to_be();
        sll.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
        assert!(sll.sll_ifindex > 0, "no interface {ifname}");
        let r = libc::bind(
            fd,
            &sll as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(r, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
        let mut got = Vec::new();
        let t = Instant::now();
        let mut buf = [0u8; 2048];
        while got.len() < count && t.elapsed() < within {
            let n = libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0);
            if n <= 0 {
                continue;
            }
            let p = &buf[..n as usize];
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if p.len() < ihl + 8 || p[0] >> 4 != 4 || p[9] != 17 || p[12..16] != src {
                continue;
            }
            let udp = &p[ihl..];
            let dport = u16::from_be_bytes([udp[2], udp[3]]);
            let ulen = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
            if dport != port || ulen < 8 || ulen > udp.len() {
                continue;
            }
            got.push(udp[8..ulen].to_vec());
        }
        libc::close(fd);
        got
    }
}

#[test]
fn test_replayed_heartbeat_does_not_block_takeover() {
    require_root();
    let _serial = serial();
    require_tool("qemu-io", "apt-get install qemu-utils (scripts/setup.sh)");
    let dir = RunDir::new("5d");
    let d = dir.path();
    let topo = topology();
    let (mut d1, _d2) = pair_in_sync(d, &topo);
    qemu_io(&topo.veth.ns_b, &["write -P 0x4d 0 1M", "flush"]);
    // Two seconds of the primary's LAN heartbeats, as they reach node 2.
    let caught = VethPair::in_ns(&topo.veth.ns_b, || {
        capture_udp("b-lan", [10, 77, 1, 1], 7789, 40, Duration::from_secs(5))
    })
    .unwrap();
    check!(
        d,
        caught.len() >= 20,
        "captured only {} LAN heartbeats of node 1",
        caught.len()
    );
    let delivered0 = counter(&status(d, 2).unwrap(), "lan_rx_delivered");
    // From node 1's own address and port (free once node 1 is dead), over
    // and over at twice the heartbeat rate: the newest first, then all.
    let stop = Arc::new(AtomicBool::new(false));
    let t = Instant::now();
    d1.0.kill().unwrap();
    let _ = d1.0.wait();
    let sock = VethPair::in_ns(&topo.veth.ns_a, || UdpSocket::bind("10.77.1.1:7789"))
        .unwrap()
        .unwrap_or_else(|e| panic!("bind node 1's heartbeat address after its death: {e}"));
    let replayer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sent = 0u64;
            let mut i = caught.len() - 1;
            while !stop.load(Ordering::SeqCst) {
                let _ = sock.send_to(&caught[i], "10.77.1.2:7789");
                sent += 1;
                i = (i + 1) % caught.len();
                std::thread::sleep(Duration::from_millis(25));
            }
            sent
        })
    };
    let mut took = None;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_logs(
            d,
            "node 2 takes over while node 1's heartbeats are replayed",
            10,
            || role(d, 2).as_deref() == Some("primary"),
        );
        took = Some(t.elapsed());
        // Still replaying: node 2 keeps the role and serves.
        std::thread::sleep(Duration::from_secs(2));
        qemu_io(
            &topo.veth.ns_b,
            &[
                "read -P 0x4d 0 1M",
                "write -P 0x5e 1M 1M",
                "read -P 0x5e 1M 1M",
            ],
        );
    }));
    stop.store(true, Ordering::SeqCst);
    let sent = replayer.join().unwrap();
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
    let took = took.unwrap();
    let s2 = status(d, 2).unwrap();
    let delivered = counter(&s2, "lan_rx_delivered") - delivered0;
    eprintln!("node 2 took over {took:?} after the kill; {sent} replays sent, {delivered} LAN packets delivered to node 2's core");
    // The replays reached node 2's core (they pass authentication: they
    // are the primary's own packets), so the takeover happened despite
    // them, not because they were lost.
    check!(
        d,
        delivered >= 20,
        "only {delivered} of {sent} replayed heartbeats reached node 2's core"
    );
    check!(
        d,
        took <= Duration::from_millis(1500),
        "takeover {took:?} after the kill with replayed heartbeats (dead interval {DEAD:?})"
    );
    check!(
        d,
        s2["role"] == "primary" && holds_address(&topo, 2),
        "node 2 gave up the role or the address while the replays went on: {s2}"
    );
}
