//! The client workload: stamped 4 KiB writes through the service address
//! from the client host, at queue depth 1 per connection, reconnecting in a
//! tight loop when the connection breaks, and a final read-back check.
//!
//! Every block written carries its block number, a write sequence number
//! and a checksum. For each block the workload remembers the last
//! ACKNOWLEDGED write and the writes sent since (in flight when a
//! connection broke: their outcome is unknown). At the end every block must
//! hold the last acknowledged write or one of those in flight; anything
//! else (an older write, zeros, a torn or foreign block) is an
//! acknowledged write lost.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use msl_nbd::client::Client;

/// Block size of the workload's writes.
pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"MSLWKLD1";

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The content of write `seq` to `block`.
pub fn stamp(block: u64, seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[0..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b[16..24].copy_from_slice(&seq.to_le_bytes());
    let mut s = block.rotate_left(32) ^ seq;
    for c in b[24..BLOCK - 8].chunks_mut(8) {
        let v = splitmix(&mut s).to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
    let sum = fnv1a(&b[..BLOCK - 8]);
    b[BLOCK - 8..].copy_from_slice(&sum.to_le_bytes());
    b
}

/// What a block holds: `Some((block, seq))` for an intact stamped write,
/// `None` for zeros, a torn block or anything else.
pub fn decode(b: &[u8]) -> Option<(u64, u64)> {
    if b.len() != BLOCK || &b[0..8] != MAGIC {
        return None;
    }
    let sum = u64::from_le_bytes(b[BLOCK - 8..].try_into().ok()?);
    if fnv1a(&b[..BLOCK - 8]) != sum {
        return None;
    }
    let block = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let seq = u64::from_le_bytes(b[16..24].try_into().ok()?);
    (stamp(block, seq) == b).then_some((block, seq))
}

/// An empty write-latency histogram: 1 µs to 120 s, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("constant, valid histogram bounds")
}

/// Workload settings.
#[derive(Clone, Debug)]
pub struct WorkloadOptions {
    /// The NBD server (the service address).
    pub addr: SocketAddr,
    /// First block of the region written (in 4 KiB blocks).
    pub first_block: u64,
    /// Blocks in the region.
    pub blocks: u64,
    /// Connections, each at queue depth 1 on its own blocks.
    pub connections: usize,
    /// Writes with FUA.
    pub fua: bool,
    /// A reply not received within this breaks the connection.
    pub io_timeout: Duration,
    /// Pause between reconnect attempts.
    pub reconnect_every: Duration,
    /// Bound on the connect itself (an address nobody answers for).
    pub connect_timeout: Duration,
    /// Pace each connection to at most this many writes per second.
    pub max_writes_per_s: Option<u32>,
}

impl WorkloadOptions {
    /// 16 MiB region at block 0, one connection, 1 s I/O timeout,
    /// reconnect every 5 ms, paced at 1000 writes/s.
    pub fn new(addr: SocketAddr) -> Self {
        WorkloadOptions {
            addr,
            first_block: 0,
            blocks: 4096,
            connections: 1,
            fua: false,
            io_timeout: Duration::from_secs(1),
            reconnect_every: Duration::from_millis(5),
            connect_timeout: Duration::from_millis(100),
            max_writes_per_s: Some(1000),
        }
    }
}

/// One acknowledged write.
#[derive(Clone, Copy, Debug)]
pub struct Ack {
    pub at: Instant,
    /// When the connection that carried it was opened.
    pub conn_opened: Instant,
    pub latency_us: u64,
}

#[derive(Debug)]
struct Log {
    acks: Vec<Ack>,
    hist: Histogram<u64>,
    errors: Vec<(Instant, String)>,
    connects: Vec<Instant>,
}

/// Per-block record: last acknowledged write, writes sent since.
#[derive(Clone, Debug, Default)]
pub struct BlockState {
    pub acked: Option<u64>,
    pub pending: Vec<u64>,
}

/// The running workload.
pub struct Workload {
    pub opts: WorkloadOptions,
    pub started: Instant,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
    seq: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Vec<(u64, BlockState)>>>,
}

/// What the workload did, after [`Workload::stop`].
#[derive(Debug)]
pub struct WorkloadReport {
    pub started: Instant,
    pub stopped: Instant,
    pub acked_writes: u64,
    pub errors: usize,
    pub reconnects: usize,
    /// Write latency (µs), acknowledged writes only.
    pub latency_us: Histogram<u64>,
    pub acks: Vec<Ack>,
    pub error_log: Vec<(Instant, String)>,
    pub blocks: Vec<(u64, BlockState)>,
    pub opts: WorkloadOptions,
}

/// The outcome of reading every block back.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub blocks_checked: u64,
    /// Blocks whose last acknowledged write is not there (nor a later,
    /// unacknowledged one).
    pub acked_writes_lost: u64,
    /// Blocks holding a write whose acknowledgement never arrived.
    pub in_flight_landed: u64,
    /// The first few problems, for the error message.
    pub problems: Vec<String>,
}

fn lock(log: &Mutex<Log>) -> std::sync::MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

/// Connect, retrying every `reconnect_every` until it works or `stop`.
fn connect_loop(o: &WorkloadOptions, stop: &AtomicBool, log: &Mutex<Log>) -> Option<Client> {
    let mut last_err = String::new();
    while !stop.load(Ordering::Relaxed) {
        match Client::connect(o.addr, "", o.connect_timeout).and_then(|c| {
            c.set_timeout(o.io_timeout)?;
            Ok(c)
        }) {
            Ok(c) => {
                lock(log).connects.push(Instant::now());
                return Some(c);
            }
            Err(e) => {
                let m = e.to_string();
                if m != last_err {
                    lock(log)
                        .errors
                        .push((Instant::now(), format!("connect: {m}")));
                    last_err = m;
                }
                std::thread::sleep(o.reconnect_every);
            }
        }
    }
    None
}

fn run_conn(
    idx: usize,
    o: WorkloadOptions,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Log>>,
    seq: Arc<AtomicU64>,
) -> Vec<(u64, BlockState)> {
    let conns = o.connections.max(1) as u64;
    let mine: Vec<u64> = (0..o.blocks)
        .filter(|b| b % conns == idx as u64)
        .map(|b| o.first_block + b)
        .collect();
    let mut state: Vec<BlockState> = vec![BlockState::default(); mine.len()];
    let mut rng = 0x1234_5678u64 ^ ((idx as u64) << 40);
    let pace = o
        .max_writes_per_s
        .map(|r| Duration::from_secs_f64(1.0 / f64::from(r.max(1))));
    let mut client: Option<(Client, Instant)> = None;
    while !stop.load(Ordering::Relaxed) && !mine.is_empty() {
        if client.is_none() {
            client = connect_loop(&o, &stop, &log).map(|c| (c, Instant::now()));
            continue;
        }
        let Some((c, opened)) = client.as_mut() else {
            continue;
        };
        let i = (splitmix(&mut rng) % mine.len() as u64) as usize;
        let block = mine[i];
        let s = seq.fetch_add(1, Ordering::Relaxed) + 1;
        let data = stamp(block, s);
        state[i].pending.push(s);
        let t = Instant::now();
        match c.write(block * BLOCK as u64, &data, o.fua) {
            Ok(()) => {
                let now = Instant::now();
                state[i].acked = Some(s);
                state[i].pending.clear();
                let us = now.duration_since(t).as_micros() as u64;
                let mut l = lock(&log);
                let _ = l.hist.record(us.max(1));
                l.acks.push(Ack {
                    at: now,
                    conn_opened: *opened,
                    latency_us: us,
                });
            }
            Err(e) => {
                lock(&log)
                    .errors
                    .push((Instant::now(), format!("write: {e}")));
                // A refused write on a live connection (e.g. a node that
                // is not primary) leaves it in flight too; reconnect
                // either way, the server may be going away.
                client = None;
                std::thread::sleep(o.reconnect_every);
                continue;
            }
        }
        if let Some(p) = pace {
            let spent = t.elapsed();
            if spent < p {
                std::thread::sleep(p - spent);
            }
        }
    }
    if let Some((c, _)) = client {
        let _ = c.disconnect();
    }
    mine.into_iter().zip(state).collect()
}

impl Workload {
    /// Start the workload's connections on threads inside namespace `ns`
    /// (the client host).
    pub fn start(ns: &str, opts: WorkloadOptions) -> Result<Workload, String> {
        let hist = latency_histogram();
        let log = Arc::new(Mutex::new(Log {
            acks: Vec::with_capacity(1 << 16),
            hist,
            errors: Vec::new(),
            connects: Vec::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let seq = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for idx in 0..opts.connections.max(1) {
            let (o, st, l, sq, ns) = (
                opts.clone(),
                stop.clone(),
                log.clone(),
                seq.clone(),
                ns.to_string(),
            );
            let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
            let h = std::thread::Builder::new()
                .name(format!("workload-{idx}"))
                .spawn(move || {
                    let entered = msl_transport::netns::enter(&ns).map_err(|e| e.to_string());
                    let ok = entered.is_ok();
                    let _ = ready_tx.send(entered);
                    if !ok {
                        return Vec::new();
                    }
                    run_conn(idx, o, st, l, sq)
                })
                .map_err(|e| format!("spawning a workload thread: {e}"))?;
            ready_rx
                .recv()
                .map_err(|_| "workload thread died".to_string())??;
            threads.push(h);
        }
        Ok(Workload {
            opts,
            started: Instant::now(),
            stop,
            log,
            seq,
            threads,
        })
    }

    /// Acknowledged writes so far.
    pub fn acked(&self) -> u64 {
        lock(&self.log).acks.len() as u64
    }

    /// Writes sent so far.
    pub fn sent(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    /// Wait until `n` more writes than now are acknowledged.
    pub fn wait_acks(&self, n: u64, timeout: Duration) -> Result<Duration, String> {
        let base = self.acked();
        crate::pair::wait_for(&format!("{n} acknowledged client writes"), timeout, || {
            self.acked() >= base + n
        })
        .map_err(|e| format!("{e}; last client errors: {:?}", self.last_errors(3)))
    }

    /// The last `n` client errors.
    pub fn last_errors(&self, n: usize) -> Vec<String> {
        let l = lock(&self.log);
        l.errors
            .iter()
            .rev()
            .take(n)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// The first write acknowledged on a connection opened after `t` (i.e.
    /// by whoever serves after a fault at `t`).
    pub fn first_ack_on_new_connection_after(&self, t: Instant) -> Option<Instant> {
        lock(&self.log)
            .acks
            .iter()
            .filter(|a| a.conn_opened >= t)
            .map(|a| a.at)
            .min()
    }

    /// The first write acknowledged after `t` on any connection.
    pub fn first_ack_after(&self, t: Instant) -> Option<Instant> {
        lock(&self.log)
            .acks
            .iter()
            .filter(|a| a.at >= t)
            .map(|a| a.at)
            .min()
    }

    /// Acknowledged writes in `[from, to)`.
    pub fn acks_between(&self, from: Instant, to: Instant) -> u64 {
        lock(&self.log)
            .acks
            .iter()
            .filter(|a| a.at >= from && a.at < to)
            .count() as u64
    }

    /// Client write throughput in `[from, to)`, MiB/s.
    pub fn mib_s_between(&self, from: Instant, to: Instant) -> f64 {
        let secs = to.saturating_duration_since(from).as_secs_f64();
        if secs <= 0.0 {
            return 0.0;
        }
        (self.acks_between(from, to) * BLOCK as u64) as f64 / (1 << 20) as f64 / secs
    }

    /// Longest time between two consecutive acknowledgements in
    /// `[from, to)` (the window's ends count as acknowledgements).
    pub fn longest_pause_between(&self, from: Instant, to: Instant) -> Duration {
        let mut t: Vec<Instant> = lock(&self.log)
            .acks
            .iter()
            .map(|a| a.at)
            .filter(|&a| a >= from && a < to)
            .collect();
        t.sort();
        longest_gap(from, &t, to)
    }

    /// Stop every connection and collect the record.
    pub fn stop(self) -> WorkloadReport {
        let stopped = Instant::now();
        self.stop.store(true, Ordering::Relaxed);
        let mut blocks = Vec::new();
        for t in self.threads {
            if let Ok(b) = t.join() {
                blocks.extend(b);
            }
        }
        let l = lock(&self.log);
        let mut acks = l.acks.clone();
        acks.sort_by_key(|a| a.at);
        WorkloadReport {
            started: self.started,
            stopped,
            acked_writes: acks.len() as u64,
            errors: l.errors.len(),
            reconnects: l
                .connects
                .len()
                .saturating_sub(self.opts.connections.max(1)),
            latency_us: l.hist.clone(),
            acks,
            error_log: l.errors.clone(),
            blocks,
            opts: self.opts.clone(),
        }
    }
}

fn longest_gap(from: Instant, sorted: &[Instant], to: Instant) -> Duration {
    let mut prev = from;
    let mut best = Duration::ZERO;
    for &a in sorted.iter().chain(std::iter::once(&to)) {
        best = best.max(a.saturating_duration_since(prev));
        prev = a;
    }
    best
}

impl WorkloadReport {
    /// Longest time without an acknowledgement, from the first one to
    /// the stop (an outage at the end counts).
    pub fn longest_pause(&self) -> Duration {
        match self.acks.first() {
            Some(f) => {
                let t: Vec<Instant> = self.acks.iter().map(|a| a.at).collect();
                longest_gap(f.at, &t, self.stopped.max(f.at))
            }
            None => self.stopped.saturating_duration_since(self.started),
        }
    }

    /// Read every block back through NBD (from namespace `ns`, at the
    /// workload's address) and check it against the record.
    pub fn verify(&self, ns: &str) -> Result<VerifyReport, String> {
        self.verify_at(ns, self.opts.addr)
    }

    /// [`verify`](Self::verify) reading from `addr` (e.g. one node's own
    /// LAN address rather than the service address).
    pub fn verify_at(&self, ns: &str, addr: SocketAddr) -> Result<VerifyReport, String> {
        let blocks = self.blocks.clone();
        let (first, n) = (self.opts.first_block, self.opts.blocks);
        msl_transport::netns::VethPair::in_ns(ns, move || {
            let mut c = Client::connect(addr, "", Duration::from_secs(5))
                .map_err(|e| format!("verify: connecting to {addr}: {e}"))?;
            let mut image = vec![0u8; n as usize * BLOCK];
            for (i, chunk) in image.chunks_mut(64 * BLOCK).enumerate() {
                let off = (first + i as u64 * 64) * BLOCK as u64;
                c.read(off, chunk)
                    .map_err(|e| format!("verify: reading at {off}: {e}"))?;
            }
            let _ = c.disconnect();
            Ok(check_image(&image, first, &blocks))
        })
        .map_err(|e| e.to_string())?
    }
}

/// Check a read-back region (starting at block `first`) against the record.
pub fn check_image(image: &[u8], first: u64, blocks: &[(u64, BlockState)]) -> VerifyReport {
    let mut r = VerifyReport::default();
    for (block, st) in blocks {
        let Some(b) = image
            .get(((block - first) as usize) * BLOCK..)
            .and_then(|s| s.get(..BLOCK))
        else {
            continue;
        };
        r.blocks_checked += 1;
        let found = decode(b);
        let ok = match (found, st.acked) {
            (Some((fb, s)), _) if fb == *block && st.pending.contains(&s) => {
                r.in_flight_landed += 1;
                true
            }
            (Some((fb, s)), Some(a)) => fb == *block && s == a,
            // Never acknowledged: zeros, or (above) an in-flight write.
            (None, None) => b.iter().all(|&x| x == 0),
            (Some(_), None) => false,
            (None, Some(_)) => false,
        };
        if !ok {
            // Only an acknowledged write can be lost; a block never
            // acknowledged that holds garbage is still wrong: count it.
            r.acked_writes_lost += 1;
            if r.problems.len() < 10 {
                r.problems.push(format!(
                    "block {block}: holds {found:?}, last acknowledged {:?}, in flight {:?}",
                    st.acked, st.pending
                ));
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_stamp_decode_round_trip_and_rejects_torn_blocks() {
        let b = stamp(7, 42);
        assert_eq!(decode(&b), Some((7, 42)));
        assert_ne!(stamp(7, 43), b);
        let mut torn = b.clone();
        torn[2048..].copy_from_slice(&stamp(7, 41)[2048..]);
        assert_eq!(decode(&torn), None);
        assert_eq!(decode(&[0u8; BLOCK]), None);
    }

    #[test]
    fn test_check_image_lost_vs_in_flight() {
        let st = |acked, pending: Vec<u64>| BlockState { acked, pending };
        let blocks = vec![
            (10, st(Some(5), vec![])),  // holds 5: ok
            (11, st(Some(6), vec![9])), // holds 9 (in flight): ok
            (12, st(Some(7), vec![])),  // holds 3 (older): lost
            (13, st(None, vec![])),     // zeros: ok
            (14, st(Some(8), vec![])),  // zeros: lost
            (15, st(None, vec![11])),   // holds 11, in flight: ok
        ];
        let mut img = vec![0u8; 6 * BLOCK];
        for (i, s) in [(0, 5), (1, 9), (2, 3), (5, 11)] {
            img[i * BLOCK..(i + 1) * BLOCK].copy_from_slice(&stamp(10 + i as u64, s));
        }
        let r = check_image(&img, 10, &blocks);
        assert_eq!(r.blocks_checked, 6);
        assert_eq!(r.acked_writes_lost, 2, "{:?}", r.problems);
        assert_eq!(r.in_flight_landed, 2);
    }

    #[test]
    fn test_longest_gap_counts_window_ends() {
        let t0 = Instant::now();
        let ms = |m| t0 + Duration::from_millis(m);
        assert_eq!(
            longest_gap(t0, &[ms(10), ms(20), ms(300)], ms(310)),
            Duration::from_millis(280)
        );
        assert_eq!(longest_gap(t0, &[], ms(50)), Duration::from_millis(50));
    }
}
