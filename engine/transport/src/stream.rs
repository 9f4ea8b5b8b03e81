//! The MSL data path with pinned workers, for block streaming.
//!
//! Sender (primary) side:
//! ```text
//!  capture thread --data queue (SPSC, lock-free)--> TX worker --> link
//!        ^                                             ^   |
//!        +------------ free blocks (pool) -------------+   | ReliableTx
//!                                                           |
//!  link --> RX worker --ack queue (lock-free)--> TX worker (on_ack)
//! ```
//! Receiver (secondary) side:
//! ```text
//!  link --> RX worker: check -> ReliableRx -> apply in order (verify)
//!                 |
//!                 +--control queue (acks)--> TX worker --> link
//! ```
//! Control frames have their own queue and the TX worker sends them before
//! any data. Blocks live in a pool of boxes allocated at start-up and passed
//! by pointer through the queues: nothing is allocated per frame in steady
//! state. Workers spin briefly, then park; producers unpark them.
//!
//! The pattern every block carries is a function of its write id, so the
//! receiver checks each block's content, order and uniqueness.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use hdrhistogram::Histogram;
use msl_core::reliable::{ReliableRx, ReliableTx, TxConfig};
use msl_wire::{
    emit, emit_eth, parse, parse_eth, Ack, AdapterHealth, Data, DiskState, Expect, Header,
    Heartbeat, Key, Message, Role, RxCounters, ETH_HEADER_LEN, MAX_ADAPTERS,
};

use crate::link::{RxLink, TxLink, TxStats, MAX_BATCH};
use crate::sys;

/// Bytes per mirrored block.
pub const BLOCK_SIZE: usize = 4096;
/// Most consecutive blocks one DATA frame carries (two 4 KiB blocks fit
/// a 9000-byte MTU).
pub const MAX_BLOCKS_PER_FRAME: usize = 2;
/// A pooled buffer: on the sender, one encoded DATA frame carrying up to
/// `MAX_BLOCKS_PER_FRAME` consecutive blocks; on the receiver, the payload
/// of an out-of-order frame.
pub type Slot = Box<[u8]>;

/// Bytes of the largest DATA frame (Ethernet header, MSL header, body,
/// `MAX_BLOCKS_PER_FRAME` blocks, CRC, authentication tag).
pub fn max_data_frame_len() -> usize {
    let msg = Message::Data(Data {
        write_id: 0,
        offset: 0,
        len: 0,
        flags: 0,
    });
    ETH_HEADER_LEN + msl_wire::buffer_len(&msg, MAX_BLOCKS_PER_FRAME * BLOCK_SIZE, true)
}

fn new_slot() -> Slot {
    vec![0u8; max_data_frame_len()].into_boxed_slice()
}

/// Word `i` of block `write_id`'s test pattern: unique per block and
/// position, cheap enough to fill and check at memory speed (the loops
/// vectorise).
#[inline(always)]
fn pattern_word(write_id: u64, i: u64) -> u64 {
    (write_id << 12 | i).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x6D73_6C21_6D73_6C21
}

/// Write the test pattern of block `write_id` into `out`.
pub fn fill_pattern(write_id: u64, out: &mut [u8]) {
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&pattern_word(write_id, i as u64).to_le_bytes());
    }
}

/// Whether `data` is exactly the pattern of block `write_id`.
pub fn check_pattern(write_id: u64, data: &[u8]) -> bool {
    if data.len() != BLOCK_SIZE {
        return false;
    }
    let mut diff = 0u64;
    for (i, w) in data.chunks_exact(8).enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        diff |= u64::from_le_bytes(b) ^ pattern_word(write_id, i as u64);
    }
    diff == 0
}

/// CPU cores for the workers of one side (`None`: not pinned).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cores {
    pub capture: Option<usize>,
    pub tx: Option<usize>,
    pub rx: Option<usize>,
}

/// What to stream and how.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    pub cluster_id: u64,
    /// Authenticate every frame (AEGIS-128L MAC under the key) when set.
    pub key: Option<Key>,
    /// Node ids on the wire.
    pub sender_id: u16,
    pub receiver_id: u16,
    pub generation: u64,
    /// Both sides start sequence numbers after this.
    pub seq_base: u64,
    /// Retransmission and window settings (`window` is also the
    /// receiver's reorder window).
    pub reliable: TxConfig,
    /// Stop producing after this many blocks.
    pub blocks: u64,
    /// Consecutive blocks per DATA frame (1 ..= `MAX_BLOCKS_PER_FRAME`):
    /// fewer, larger frames cost the kernel less per byte.
    pub blocks_per_frame: usize,
    /// Stop producing after this long.
    pub duration: Option<Duration>,
    /// Once production stops, wait at most this long for the last acks.
    pub drain_timeout: Duration,
    /// Give up when no ack arrives for this long with blocks in flight.
    pub stall_timeout: Duration,
    /// The sender queues a HEARTBEAT on its control queue this often; the
    /// TX worker sends control frames before any data.
    pub heartbeat_interval: Option<Duration>,
    /// MACs: `sender_mac` is side A's, `receiver_mac` side B's.
    pub sender_mac: [u8; 6],
    pub receiver_mac: [u8; 6],
    pub sender_cores: Cores,
    pub receiver_cores: Cores,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            cluster_id: 0x6D73_6C00_0000_0001,
            key: None,
            sender_id: 1,
            receiver_id: 2,
            generation: 1,
            seq_base: 0x5EED << 32,
            // A loaded 2-core host can stall a worker for milliseconds; a
            // lower RTO floor turns that into a retransmission storm. Losses
            // are mostly recovered early through selective acks anyway.
            reliable: TxConfig {
                window: 1024,
                rto_initial_us: 50_000,
                rto_min_us: 20_000,
                rto_max_us: 1_000_000,
            },
            blocks: u64::MAX,
            blocks_per_frame: 1,
            duration: None,
            drain_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(5),
            heartbeat_interval: Some(Duration::from_millis(100)),
            sender_mac: [0; 6],
            receiver_mac: [0; 6],
            sender_cores: Cores::default(),
            receiver_cores: Cores::default(),
        }
    }
}

/// What the sender saw.
#[derive(Debug)]
pub struct SenderReport {
    /// Distinct blocks handed to the link.
    pub blocks_sent: u64,
    /// Blocks the peer acknowledged (released from the window).
    pub blocks_acked: u64,
    pub retransmits: u64,
    /// From the first send to the last ack.
    pub elapsed: Duration,
    /// Block sent -> peer's ack received, microseconds.
    pub rtt_us: Histogram<u64>,
    /// Thread CPU time: capture, TX worker, RX worker.
    pub cpu: [Duration; 3],
    pub acks_received: u64,
    /// Control frames (heartbeats) sent ahead of data.
    pub control_sent: u64,
    /// Frames refused by the checks (bad CRC, wrong cluster, ...).
    pub rx_malformed: u64,
    pub tx: TxStats,
    pub rx_kernel_dropped: u64,
    /// Every block produced was acknowledged before the drain timeout.
    pub complete: bool,
}

/// What the receiver saw.
#[derive(Debug, Default)]
pub struct ReceiverReport {
    /// Blocks applied in order whose content matched the pattern.
    pub verified: u64,
    /// Blocks applied whose content did not match (must stay 0).
    pub bad_pattern: u64,
    /// Blocks applied out of write order, or twice (must stay 0).
    pub order_errors: u64,
    /// Frames dropped as duplicates by reliable delivery.
    pub duplicates: u64,
    pub out_of_window: u64,
    /// Frames refused by the frame checks, by reason.
    pub malformed: u64,
    pub malformed_by_reason: Vec<(&'static str, u64)>,
    /// Frames that parsed but were not a well-formed block write.
    pub bad_data: u64,
    pub acks_sent: u64,
    /// Heartbeats received from the sender (sent on its control queue).
    pub heartbeats: u64,
    pub kernel_dropped: u64,
    pub tx: TxStats,
    /// Thread CPU time: TX worker, RX worker.
    pub cpu: [Duration; 2],
}

fn pin(core: Option<usize>) {
    if let Some(id) = core {
        core_affinity::set_for_current(core_affinity::CoreId { id });
    }
}

/// Longest a parked worker sleeps: every producer unparks its consumer,
/// so this only bounds how late a missed wake-up or a stop is noticed.
const IDLE_MAX: Duration = Duration::from_millis(5);

/// Wait for work: spin a little (cheap when the producer is close behind),
/// then park until unparked or `max` passes.
fn idle(spins: &mut u32, max: Duration) {
    if *spins < 32 {
        *spins += 1;
        std::hint::spin_loop();
    } else if *spins < 36 {
        *spins += 1;
        thread::yield_now();
    } else {
        thread::park_timeout(max);
    }
}

/// The peer closed a connection-based link (TCP backend) at the end of a
/// stream.
fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

struct InFlight {
    /// The encoded frame, kept for retransmission.
    slot: Slot,
    frame_len: usize,
    /// Blocks in the frame.
    blocks: u32,
    sent_us: u64,
}

/// Queued from capture to the TX worker: an encoded DATA frame.
struct Captured {
    slot: Slot,
    frame_len: usize,
    blocks: u32,
    /// The sequence number encoded in the frame; the TX worker hands frames
    /// to reliable delivery in queue order, so it is the one it assigns.
    seq: u64,
}

fn data_header(cfg: &StreamConfig, seq: u64) -> Header {
    Header {
        cluster_id: cfg.cluster_id,
        sender: cfg.sender_id,
        generation: cfg.generation,
        seq,
        ack: 0,
        flags: 0,
        frag_index: 0,
        frag_count: 1,
    }
}

/// Emit one unsequenced control frame (ACK, HEARTBEAT) into `buf`.
fn emit_control(
    cfg: &StreamConfig,
    sender: u16,
    dst: [u8; 6],
    src: [u8; 6],
    msg: &Message,
    ack: u64,
    buf: &mut [u8],
) -> Option<usize> {
    emit_eth(dst, src, buf).ok()?;
    let h = Header {
        cluster_id: cfg.cluster_id,
        sender,
        generation: cfg.generation,
        seq: 0,
        ack,
        flags: 0,
        frag_index: 0,
        frag_count: 1,
    };
    let n = emit(&h, msg, &[], cfg.key.as_ref(), &mut buf[ETH_HEADER_LEN..]).ok()?;
    Some(ETH_HEADER_LEN + n)
}

/// Emit one DATA frame (Ethernet header included) into `buf`.
pub fn emit_block(
    cfg: &StreamConfig,
    seq: u64,
    write_id: u64,
    block: &[u8],
    buf: &mut [u8],
) -> Option<usize> {
    emit_eth(cfg.receiver_mac, cfg.sender_mac, buf).ok()?;
    let msg = Message::Data(Data {
        write_id,
        offset: write_id * BLOCK_SIZE as u64,
        len: block.len() as u32,
        flags: 0,
    });
    let n = emit(
        &data_header(cfg, seq),
        &msg,
        block,
        cfg.key.as_ref(),
        &mut buf[ETH_HEADER_LEN..],
    )
    .ok()?;
    Some(ETH_HEADER_LEN + n)
}

/// The sender's transmit state: reliable window, link, statistics.
struct SenderState {
    rel: ReliableTx<InFlight>,
    tx: Box<dyn TxLink>,
    rtt: Histogram<u64>,
    blocks_sent: u64,
    blocks_acked: u64,
    acks_received: u64,
    first_send: Option<Instant>,
    last_ack: Instant,
    last_progress: Instant,
    control_sent: u64,
    /// New frames of the current step (capacity `MAX_BATCH`, reused).
    batch: Vec<Captured>,
}

/// The lock-free queues around the sender's TX worker.
struct SenderQueues<'a> {
    data: &'a ArrayQueue<Captured>,
    free: &'a ArrayQueue<Slot>,
    acks: &'a ArrayQueue<Ack>,
    /// Control messages (heartbeats) to send ahead of any data.
    ctrl: &'a ArrayQueue<Message>,
    /// The capture thread parks when the pool is empty and says so here.
    capture: &'a OnceLock<Thread>,
    capture_waiting: &'a AtomicBool,
}

impl SenderState {
    /// Apply queued acks, then send retransmissions and new blocks while
    /// the window has room. Returns whether anything happened.
    fn step(&mut self, cfg: &StreamConfig, q: &SenderQueues<'_>, now: u64) -> io::Result<bool> {
        let mut progressed = false;
        let acked_before = self.blocks_acked;
        while let Some(a) = q.acks.pop() {
            self.acks_received += 1;
            let (rtt, acked, free) = (&mut self.rtt, &mut self.blocks_acked, q.free);
            self.rel.on_ack(now, &a, |_, m| {
                let us = now.saturating_sub(m.sent_us).max(1);
                let _ = rtt.record_n(us, u64::from(m.blocks));
                *acked += u64::from(m.blocks);
                let _ = free.push(m.slot);
            });
            self.last_ack = Instant::now();
            progressed = true;
        }
        if self.blocks_acked != acked_before || self.rel.in_flight() == 0 {
            self.last_progress = Instant::now();
        }
        // Wake the capture thread only once half the pool is free, so it
        // refills in batches instead of once per ack.
        if self.blocks_acked != acked_before
            && q.free.len() * 2 >= q.free.capacity()
            && q.capture_waiting.load(Ordering::SeqCst)
        {
            if let Some(t) = q.capture.get() {
                t.unpark();
            }
        }
        // Control frames first, then retransmissions (they hold the
        // window), then new frames while the window has room.
        let mut due = self.rel.poll_timeout().is_some_and(|t| t <= now);
        let (rel, sent_ctrl) = (&mut self.rel, &mut self.control_sent);
        let mut sent = self.tx.send_with(MAX_BATCH, &mut |_, buf| {
            if let Some(msg) = q.ctrl.pop() {
                *sent_ctrl += 1;
                return emit_control(
                    cfg,
                    cfg.sender_id,
                    cfg.receiver_mac,
                    cfg.sender_mac,
                    &msg,
                    0,
                    buf,
                );
            }
            if due {
                if let Some((_, m)) = rel.poll_retransmit(now) {
                    buf[..m.frame_len].copy_from_slice(&m.slot[..m.frame_len]);
                    return Some(m.frame_len);
                }
                due = false;
            }
            None
        })?;
        // New frames, sent from the pool's memory (no copy where the
        // backend allows it), then kept in the window.
        let room = self
            .rel
            .config()
            .window
            .saturating_sub(self.rel.in_flight())
            .min(MAX_BATCH);
        self.batch.clear();
        while self.batch.len() < room {
            let Some(c) = q.data.pop() else { break };
            self.batch.push(c);
        }
        if !self.batch.is_empty() {
            let first = self.rel.next_seq();
            for (i, c) in self.batch.iter().enumerate() {
                if c.seq != first.wrapping_add(i as u64) {
                    return Err(io::Error::other(format!(
                        "capture numbered a frame {} where reliable delivery expects {}",
                        c.seq,
                        first.wrapping_add(i as u64)
                    )));
                }
            }
            let mut refs: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
            for (r, c) in refs.iter_mut().zip(&self.batch) {
                *r = &c.slot[..c.frame_len];
            }
            self.tx.send_frames(&refs[..self.batch.len()])?;
            sent += self.batch.len();
            for c in self.batch.drain(..) {
                self.blocks_sent += u64::from(c.blocks);
                let pushed = self.rel.push(
                    now,
                    InFlight {
                        slot: c.slot,
                        frame_len: c.frame_len,
                        blocks: c.blocks,
                        sent_us: now,
                    },
                );
                debug_assert!(pushed.is_ok(), "window room was checked");
            }
        }
        if sent > 0 {
            self.first_send.get_or_insert_with(Instant::now);
            progressed = true;
        }
        Ok(progressed)
    }
}

/// Run the sender side until `cfg.blocks`/`cfg.duration` are produced and
/// acknowledged, the drain timeout passes, or `stop` is set.
pub fn run_sender(
    tx: Box<dyn TxLink>,
    mut rx: Box<dyn RxLink>,
    cfg: &StreamConfig,
    stop: &AtomicBool,
) -> io::Result<SenderReport> {
    let window = cfg.reliable.window.max(1);
    let pool = window + 4 * MAX_BATCH;
    let per_frame = cfg.blocks_per_frame.clamp(1, MAX_BLOCKS_PER_FRAME);
    let free: ArrayQueue<Slot> = ArrayQueue::new(pool);
    for _ in 0..pool {
        let _ = free.push(new_slot());
    }
    let data: ArrayQueue<Captured> = ArrayQueue::new(pool);
    let acks: ArrayQueue<Ack> = ArrayQueue::new(256);
    let capture_thread: OnceLock<Thread> = OnceLock::new();
    let capture_waiting = AtomicBool::new(false);
    let ctrl: ArrayQueue<Message> = ArrayQueue::new(16);
    let capture_done = AtomicBool::new(false);
    let tx_done = AtomicBool::new(false);
    let start = Instant::now();
    let deadline = cfg.duration.map(|d| start + d);
    let tx_thread: OnceLock<Thread> = OnceLock::new();
    let unpark_tx = || {
        if let Some(t) = tx_thread.get() {
            t.unpark();
        }
    };

    let state = Mutex::new(SenderState {
        rel: ReliableTx::new(
            TxConfig {
                window,
                ..cfg.reliable
            },
            cfg.seq_base,
        ),
        tx,
        rtt: Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
            .map_err(|e| io::Error::other(format!("histogram: {e}")))?,
        blocks_sent: 0,
        blocks_acked: 0,
        acks_received: 0,
        first_send: None,
        last_ack: start,
        last_progress: Instant::now(),
        control_sent: 0,
        batch: Vec::with_capacity(MAX_BATCH),
    });
    let queues = SenderQueues {
        data: &data,
        free: &free,
        acks: &acks,
        ctrl: &ctrl,
        capture: &capture_thread,
        capture_waiting: &capture_waiting,
    };
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());

    thread::scope(|s| -> io::Result<SenderReport> {
        // TX worker: owns the sending state; the RX worker may run a step
        // itself when it can take the lock uncontended (one wake-up less
        // per round trip), otherwise it queues the ack and unparks us.
        let tx_h = s.spawn(|| -> io::Result<(SenderReport, Duration)> {
            pin(cfg.sender_cores.tx);
            let debug = std::env::var_os("MSL_DEBUG").is_some();
            let mut last_debug = Instant::now();
            let mut spins = 0u32;
            let mut drain_deadline: Option<Instant> = None;
            loop {
                let mut st = lock();
                let now = start.elapsed().as_micros() as u64;
                let progressed = st.step(cfg, &queues, now)?;
                if debug && last_debug.elapsed() > Duration::from_secs(1) {
                    last_debug = Instant::now();
                    eprintln!(
                        "msl-transport debug: in_flight {} sent {} acked {} rexmit {} acks {} free {} data {} rto {} srtt {:?} tx {:?}",
                        st.rel.in_flight(), st.blocks_sent, st.blocks_acked, st.rel.stats.retransmits,
                        st.acks_received, free.len(), data.len(), st.rel.rto_us(), st.rel.srtt_us(), st.tx.stats()
                    );
                }
                let finished = capture_done.load(Ordering::Acquire) && data.is_empty();
                if finished && st.rel.in_flight() == 0 {
                    break;
                }
                if finished {
                    let dl = *drain_deadline
                        .get_or_insert_with(|| Instant::now() + cfg.drain_timeout);
                    if Instant::now() >= dl {
                        break;
                    }
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if st.last_progress.elapsed() > cfg.stall_timeout {
                    eprintln!(
                        "msl-transport: stream stalled: no ack for {:?} with {} blocks in flight \
                         (sent {}, acked {}, retransmits {}, acks received {}, tx {:?})",
                        cfg.stall_timeout,
                        st.rel.in_flight(),
                        st.blocks_sent,
                        st.blocks_acked,
                        st.rel.stats.retransmits,
                        st.acks_received,
                        st.tx.stats(),
                    );
                    break;
                }
                if progressed {
                    spins = 0;
                    drop(st);
                } else {
                    st.tx.flush()?;
                    let wait = st
                        .rel
                        .poll_timeout()
                        .map(|t| Duration::from_micros(t.saturating_sub(now)))
                        .unwrap_or(IDLE_MAX)
                        .min(IDLE_MAX);
                    drop(st);
                    idle(&mut spins, wait);
                }
            }
            let mut st = lock();
            st.tx.flush()?;
            let complete = capture_done.load(Ordering::Acquire)
                && data.is_empty()
                && st.rel.in_flight() == 0;
            let elapsed = st
                .last_ack
                .saturating_duration_since(st.first_send.unwrap_or(start));
            // Return blocks still in flight to the pool (not required, tidy).
            for (_, m) in st.rel.drain() {
                let _ = free.push(m.slot);
            }
            tx_done.store(true, Ordering::Release);
            let rtt = std::mem::replace(
                &mut st.rtt,
                Histogram::<u64>::new(1).map_err(|e| io::Error::other(format!("{e}")))?,
            );
            Ok((
                SenderReport {
                    blocks_sent: st.blocks_sent,
                    blocks_acked: st.blocks_acked,
                    retransmits: st.rel.stats.retransmits,
                    elapsed,
                    rtt_us: rtt,
                    cpu: [Duration::ZERO; 3],
                    acks_received: st.acks_received,
                    control_sent: st.control_sent,
                    rx_malformed: 0,
                    tx: st.tx.stats(),
                    rx_kernel_dropped: 0,
                    complete,
                },
                sys::thread_cpu_time(),
            ))
        });
        let _ = tx_thread.set(tx_h.thread().clone());

        // RX worker: acks in, handed to the TX worker.
        let rx_h = s.spawn(|| -> io::Result<(u64, u64, Duration)> {
            pin(cfg.sender_cores.rx);
            let expect = Expect {
                cluster_id: cfg.cluster_id,
                key: cfg.key.as_ref(),
            };
            let mut malformed = 0u64;
            let mut next_heartbeat = Instant::now();
            let mut hb_counter = 0u64;
            while !tx_done.load(Ordering::Acquire) {
                // Stand-in for the protocol core's heartbeat timer.
                if let Some(every) = cfg.heartbeat_interval {
                    if Instant::now() >= next_heartbeat {
                        next_heartbeat += every;
                        hb_counter += 1;
                        let _ = ctrl.force_push(Message::Heartbeat(Heartbeat {
                            role: Role::Primary,
                            disk: DiskState::UpToDate,
                            msl_up: true,
                            in_sync: true,
                            adapters: [AdapterHealth::default(); MAX_ADAPTERS],
                            adapter_count: 0,
                            epoch: 1,
                            counter: hb_counter,
                        }));
                        unpark_tx();
                    }
                }
                let mut got_ack = false;
                let r = rx.recv(MAX_BATCH, Duration::from_millis(1), &mut |frame| {
                    let Ok((_, body)) = parse_eth(frame) else {
                        malformed += 1;
                        return;
                    };
                    match parse(body, &expect) {
                        Ok(p) => {
                            if let Message::Ack(a) = p.msg {
                                if p.header.sender == cfg.receiver_id {
                                    let _ = acks.force_push(a);
                                    got_ack = true;
                                }
                            }
                        }
                        Err(_) => malformed += 1,
                    }
                });
                match r {
                    Ok(_) => {}
                    Err(e) if peer_gone(&e) => {
                        while !tx_done.load(Ordering::Acquire) {
                            thread::sleep(Duration::from_millis(1));
                        }
                        break;
                    }
                    Err(e) => return Err(e),
                }
                if got_ack {
                    match state.try_lock() {
                        Ok(mut st) => {
                            let now = start.elapsed().as_micros() as u64;
                            if st.step(cfg, &queues, now).is_err() {
                                // The TX worker meets the error and reports it.
                                unpark_tx();
                            }
                        }
                        Err(_) => unpark_tx(),
                    }
                }
            }
            let dropped = rx.stats().kernel_dropped;
            Ok((malformed, dropped, sys::thread_cpu_time()))
        });

        // Capture: fill blocks with the pattern, queue them for the TX worker.
        let cap_h = s.spawn(|| -> Duration {
            let _ = capture_thread.set(thread::current());
            pin(cfg.sender_cores.capture);
            let mut id = 0u64;
            let mut next_seq = cfg.seq_base.wrapping_add(1);
            let mut scratch = vec![0u8; MAX_BLOCKS_PER_FRAME * BLOCK_SIZE];
            let mut spins = 0u32;
            while id < cfg.blocks && !stop.load(Ordering::Relaxed) {
                if id.is_multiple_of(64) && deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                if tx_done.load(Ordering::Relaxed) {
                    break;
                }
                match free.pop() {
                    Some(mut slot) => {
                        // Capture: the blocks' data, then the frame that
                        // carries them, encoded here (copy + CRC off the TX
                        // worker's core).
                        let n = (per_frame as u64).min(cfg.blocks - id);
                        let bytes = n as usize * BLOCK_SIZE;
                        for k in 0..n as usize {
                            let b = &mut scratch[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE];
                            fill_pattern(id + k as u64, b);
                        }
                        let Some(frame_len) =
                            emit_block(cfg, next_seq, id, &scratch[..bytes], &mut slot)
                        else {
                            eprintln!("msl-transport: encoding a DATA frame failed");
                            break;
                        };
                        let c = Captured {
                            slot,
                            frame_len,
                            blocks: n as u32,
                            seq: next_seq,
                        };
                        if data.push(c).is_err() {
                            // Cannot happen: the queue holds the whole pool.
                            break;
                        }
                        next_seq = next_seq.wrapping_add(1);
                        id += n;
                        spins = 0;
                        if id.is_multiple_of(16) || n > 1 {
                            unpark_tx();
                        }
                    }
                    None => {
                        unpark_tx();
                        if deadline.is_some_and(|d| Instant::now() >= d) {
                            break;
                        }
                        if spins < 36 {
                            idle(&mut spins, IDLE_MAX);
                        } else {
                            // Park until the TX worker frees a slot; announce
                            // it first and look again, so no wake-up is lost.
                            capture_waiting.store(true, Ordering::SeqCst);
                            if free.is_empty() {
                                thread::park_timeout(IDLE_MAX);
                            }
                            capture_waiting.store(false, Ordering::SeqCst);
                        }
                    }
                }
            }
            capture_done.store(true, Ordering::Release);
            unpark_tx();
            sys::thread_cpu_time()
        });

        let cap_cpu = cap_h
            .join()
            .map_err(|_| io::Error::other("capture thread panicked"))?;
        let (mut rep, tx_cpu) = tx_h
            .join()
            .map_err(|_| io::Error::other("TX worker panicked"))??;
        let (malformed, dropped, rx_cpu) = rx_h
            .join()
            .map_err(|_| io::Error::other("RX worker panicked"))??;
        rep.cpu = [cap_cpu, tx_cpu, rx_cpu];
        rep.rx_malformed = malformed;
        rep.rx_kernel_dropped = dropped;
        Ok(rep)
    })
}

/// Run the receiver side until `stop` is set.
pub fn run_receiver(
    tx: Box<dyn TxLink>,
    mut rx: Box<dyn RxLink>,
    cfg: &StreamConfig,
    stop: &AtomicBool,
) -> io::Result<ReceiverReport> {
    let window = cfg.reliable.window.max(1);
    let ctrl: ArrayQueue<Ack> = ArrayQueue::new(64);
    let txm = Mutex::new(tx);
    let lock_tx = || txm.lock().unwrap_or_else(|e| e.into_inner());
    let acks_sent = AtomicU64::new(0);
    let send_ack = |t: &mut Box<dyn TxLink>, cfg: &StreamConfig, a: Ack| -> io::Result<()> {
        let msg = Message::Ack(a);
        t.send_with(1, &mut |_, buf| {
            emit_control(
                cfg,
                cfg.receiver_id,
                cfg.sender_mac,
                cfg.receiver_mac,
                &msg,
                a.cumulative,
                buf,
            )
        })?;
        acks_sent.fetch_add(1, Ordering::Relaxed);
        Ok(())
    };
    let rx_done = AtomicBool::new(false);
    let tx_thread: OnceLock<Thread> = OnceLock::new();
    let unpark_tx = || {
        if let Some(t) = tx_thread.get() {
            t.unpark();
        }
    };

    thread::scope(|s| -> io::Result<ReceiverReport> {
        // TX worker: control frames only on this side (acks), latest first.
        // The RX worker sends an ack itself when it can take the link
        // uncontended, and queues it for this worker otherwise.
        let tx_h = s.spawn(|| -> io::Result<(u64, TxStats, Duration)> {
            pin(cfg.receiver_cores.tx);
            let mut spins = 0u32;
            loop {
                let mut latest = None;
                while let Some(a) = ctrl.pop() {
                    latest = Some(a);
                }
                if let Some(a) = latest {
                    match send_ack(&mut lock_tx(), cfg, a) {
                        Ok(()) => {}
                        // The sender is done and hung up (TCP backend).
                        Err(e) if peer_gone(&e) => {
                            while !rx_done.load(Ordering::Acquire) {
                                thread::sleep(Duration::from_millis(1));
                            }
                            break;
                        }
                        Err(e) => return Err(e),
                    }
                    spins = 0;
                } else {
                    if rx_done.load(Ordering::Acquire) {
                        break;
                    }
                    match lock_tx().flush() {
                        Ok(()) => {}
                        Err(e) if peer_gone(&e) => {}
                        Err(e) => return Err(e),
                    }
                    idle(&mut spins, IDLE_MAX);
                }
            }
            let mut t = lock_tx();
            match t.flush() {
                Ok(()) => {}
                Err(e) if peer_gone(&e) => {}
                Err(e) => return Err(e),
            }
            Ok((
                acks_sent.load(Ordering::Relaxed),
                t.stats(),
                sys::thread_cpu_time(),
            ))
        });
        let _ = tx_thread.set(tx_h.thread().clone());

        let rx_h = s.spawn(|| -> io::Result<(ReceiverReport, Duration)> {
            pin(cfg.receiver_cores.rx);
            let expect = Expect {
                cluster_id: cfg.cluster_id,
                key: cfg.key.as_ref(),
            };
            // Out-of-order frames wait in a slot: (slot, first write id, bytes).
            let mut rel: ReliableRx<Option<(Slot, u64, usize)>> =
                ReliableRx::new(window, cfg.seq_base);
            let mut spare: Vec<Slot> = (0..window).map(|_| new_slot()).collect();
            let mut counters = RxCounters::default();
            let mut rep = ReceiverReport::default();
            let mut next_write_id = 0u64;
            let mut apply = |rep: &mut ReceiverReport, first_id: u64, data: &[u8]| {
                for (k, block) in data.chunks_exact(BLOCK_SIZE).enumerate() {
                    let write_id = first_id.wrapping_add(k as u64);
                    if write_id != next_write_id {
                        rep.order_errors += 1;
                    }
                    next_write_id = write_id.wrapping_add(1);
                    if check_pattern(write_id, block) {
                        rep.verified += 1;
                    } else {
                        rep.bad_pattern += 1;
                    }
                }
            };
            let result = (|| -> io::Result<()> {
                while !stop.load(Ordering::Relaxed) {
                    let mut any = false;
                    let r = rx.recv(MAX_BATCH, Duration::from_millis(1), &mut |frame| {
                        any = true;
                        let body = match parse_eth(frame) {
                            Ok((_, b)) => b,
                            Err(e) => {
                                counters.record_error(&e);
                                return;
                            }
                        };
                        let p = match parse(body, &expect) {
                            Ok(p) => p,
                            Err(e) => {
                                counters.record_error(&e);
                                return;
                            }
                        };
                        let d = match p.msg {
                            Message::Data(d) => d,
                            Message::Heartbeat(_) if p.header.sender == cfg.sender_id => {
                                rep.heartbeats += 1;
                                return;
                            }
                            _ => return,
                        };
                        if p.header.sender != cfg.sender_id
                            || p.header.generation != cfg.generation
                            || p.is_fragment()
                            || p.payload.len() != d.len as usize
                            || p.payload.is_empty()
                            || p.payload.len() > MAX_BLOCKS_PER_FRAME * BLOCK_SIZE
                            || !p.payload.len().is_multiple_of(BLOCK_SIZE)
                            || d.offset != d.write_id.wrapping_mul(BLOCK_SIZE as u64)
                        {
                            rep.bad_data += 1;
                            return;
                        }
                        let seq = p.header.seq;
                        let delivered = rel.delivered();
                        if seq <= delivered || seq - delivered > window as u64 {
                            // Duplicate or outside the window: counted and
                            // dropped by `on_frame`, no copy needed.
                            let _ = rel.on_frame(seq, None);
                        } else if seq == delivered + 1 {
                            // In order: apply straight from the ring, no copy.
                            apply(&mut rep, d.write_id, p.payload);
                            let _ = rel.on_frame(seq, None);
                        } else {
                            let Some(mut b) = spare.pop() else {
                                rep.out_of_window += 1;
                                return;
                            };
                            let len = p.payload.len();
                            b[..len].copy_from_slice(p.payload);
                            match rel.on_frame(seq, Some((b, d.write_id, len))) {
                                msl_core::reliable::RxOutcome::Accepted => {}
                                _ => {
                                    // A duplicate of a frame already buffered
                                    // (rare: only injected duplicates). Its box
                                    // was dropped with it; replace it.
                                    spare.push(new_slot());
                                }
                            }
                        }
                        while let Some((_, item)) = rel.pop() {
                            if let Some((b, wid, len)) = item {
                                apply(&mut rep, wid, &b[..len]);
                                spare.push(b);
                            }
                        }
                    });
                    match r {
                        Ok(_) => {}
                        // The sender hung up (TCP backend): the stream is over.
                        Err(e) if peer_gone(&e) => break,
                        Err(e) => return Err(e),
                    }
                    if any {
                        let d = rel.delivered();
                        let ack = rel.ack(d, d);
                        match txm.try_lock() {
                            Ok(mut t) if ctrl.is_empty() => match send_ack(&mut t, cfg, ack) {
                                Ok(()) => {}
                                Err(e) if peer_gone(&e) => break,
                                Err(e) => return Err(e),
                            },
                            _ => {
                                let _ = ctrl.force_push(ack);
                                unpark_tx();
                            }
                        }
                    }
                }
                Ok(())
            })();
            rx_done.store(true, Ordering::Release);
            unpark_tx();
            result?;
            rep.duplicates = rel.stats.duplicates;
            rep.out_of_window += rel.stats.out_of_window;
            rep.malformed = counters.dropped();
            rep.malformed_by_reason = counters
                .snapshot()
                .iter()
                .filter(|(_, v)| *v > 0)
                .copied()
                .collect();
            rep.kernel_dropped = rx.stats().kernel_dropped;
            Ok((rep, sys::thread_cpu_time()))
        });

        let rx_res = rx_h
            .join()
            .map_err(|_| io::Error::other("RX worker panicked"));
        let tx_res = tx_h
            .join()
            .map_err(|_| io::Error::other("TX worker panicked"));
        let (mut rep, rx_cpu) = rx_res??;
        let (acks, txs, tx_cpu) = tx_res??;
        rep.acks_sent = acks;
        rep.tx = txs;
        rep.cpu = [tx_cpu, rx_cpu];
        Ok(rep)
    })
}

/// Run both sides (already opened links) until the sender is done; the
/// receiver is stopped once the sender has its last ack.
pub fn run_pair(
    a: (Box<dyn TxLink>, Box<dyn RxLink>),
    b: (Box<dyn TxLink>, Box<dyn RxLink>),
    cfg: &StreamConfig,
) -> io::Result<(SenderReport, ReceiverReport)> {
    let stop_rx = AtomicBool::new(false);
    let stop_tx = AtomicBool::new(false);
    thread::scope(|s| {
        let r = s.spawn(|| run_receiver(b.0, b.1, cfg, &stop_rx));
        let snd = run_sender(a.0, a.1, cfg, &stop_tx);
        // Let the receiver see the last frames and acks in flight.
        thread::sleep(Duration::from_millis(20));
        stop_rx.store(true, Ordering::Relaxed);
        let rcv = r
            .join()
            .map_err(|_| io::Error::other("receiver panicked"))?;
        Ok((snd?, rcv?))
    })
}
