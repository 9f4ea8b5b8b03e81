//! Patterned block streaming over msld's own MSL workers, for the tests
//! and `msl-bench link`.
//!
//! Sender (primary) side, as in msld:
//! ```text
//!  core thread: acks -> ReliableTx -> encode (FrameEncoder, FramePool)
//!      | direct send when the link is free          ^
//!      +--> control / data queues --> TX worker --> link
//!  link --> RX worker --ack queue (lock-free)--> core thread
//! ```
//! Receiver (secondary) side:
//! ```text
//!  link --> RX worker: check -> ReliableRx -> apply in order (verify)
//!                 +--> ack: direct send, else control queue --> TX worker
//! ```
//! The workers are [`crate::worker`]'s, the ones msld runs; this module
//! adds only the stand-in for the protocol core (reliable delivery and a
//! test pattern). Every block's pattern is a function of its write id, so
//! the receiver checks each block's content, order and uniqueness.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use hdrhistogram::Histogram;
use msl_core::reliable::{ReliableRx, ReliableTx, RxOutcome, TxConfig};
use msl_wire::{
    Ack, AdapterHealth, Data, DiskState, Header, Heartbeat, Key, Message, ParseError, Role,
    RxCounters, ETH_HEADER_LEN, MAX_ADAPTERS,
};

use crate::link::{RxLink, TxLink, TxStats, MAX_BATCH};
use crate::sys;
use crate::worker::{
    pin_current, start_rx, start_tx, Frame, FrameEncoder, MslTx, RxEvent, RxSink, RxWorkerConfig,
    SendMode, TxCount, TxWorkerConfig,
};

/// Bytes per mirrored block.
pub const BLOCK_SIZE: usize = 4096;
/// Most consecutive blocks one DATA frame carries (two 4 KiB blocks fit
/// a 9000-byte MTU).
pub const MAX_BLOCKS_PER_FRAME: usize = 2;
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
    /// The thread playing the protocol core: encodes, runs reliable
    /// delivery, sends directly when the link is free.
    pub capture: Option<usize>,
    pub tx: Option<usize>,
    pub rx: Option<usize>,
}

/// What to stream and how.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    pub cluster_id: u64,
    /// Authenticate every frame (AEGIS-128X4 MAC under the key) when set.
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
    /// How the core thread hands frames to the transmit worker.
    pub send_mode: SendMode,
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
            send_mode: SendMode::Direct,
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
    /// Thread CPU time: core, TX worker, RX worker.
    pub cpu: [Duration; 3],
    /// Frames the core thread sent itself (`SendMode::Direct`).
    pub direct_frames: u64,
    /// Frames the transmit queue had no room for (resent).
    pub queue_dropped: u64,
    /// Frame buffers allocated because the pool ran dry.
    pub pool_misses: u64,
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

/// Longest the idle core thread sleeps: the receive worker unparks it on
/// every ack, so this only bounds how late a missed wake-up or a timer is
/// noticed.
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

fn header(cfg: &StreamConfig, sender: u16, seq: u64, ack: u64) -> Header {
    Header {
        cluster_id: cfg.cluster_id,
        sender,
        generation: cfg.generation,
        seq,
        ack,
        flags: 0,
        frag_index: 0,
        frag_count: 1,
    }
}

fn data_msg(write_id: u64, bytes: usize) -> Message {
    Message::Data(Data {
        write_id,
        offset: write_id * BLOCK_SIZE as u64,
        len: bytes as u32,
        flags: 0,
    })
}

/// Frame buffers and queue room for one side: the whole window, plus a
/// few batches of control frames and retransmissions.
fn tx_worker_config(cfg: &StreamConfig, core: Option<usize>) -> TxWorkerConfig {
    let frames = cfg.reliable.window.max(1) + 4 * MAX_BATCH;
    TxWorkerConfig {
        max_frame: max_data_frame_len(),
        data_frames: frames,
        control_frames: 256,
        pool_frames: frames,
        core,
    }
}

/// A receive worker for one side: whole data frames, no fragments.
fn rx_worker_config(cfg: &StreamConfig, core: Option<usize>) -> RxWorkerConfig {
    RxWorkerConfig {
        cluster_id: cfg.cluster_id,
        key: cfg.key.clone(),
        max_message: MAX_BLOCKS_PER_FRAME * BLOCK_SIZE,
        core,
    }
}

/// Most frames the sender's core keeps waiting for its transmit worker.
const QUEUED_AHEAD: usize = 4 * MAX_BATCH;

/// A block range in flight: re-encoded from its write id if resent.
struct InFlight {
    write_id: u64,
    blocks: u32,
    sent_us: u64,
}

/// The sender's protocol core: taken by whichever thread is free, as
/// msld's inbox does: the receive worker right after a batch of acks if
/// no one holds it (no wake-up per round trip), else the core thread,
/// which it unparks.
type SharedCore = Arc<Mutex<Core>>;

fn lock(core: &Mutex<Core>) -> MutexGuard<'_, Core> {
    core.lock().unwrap_or_else(|e| e.into_inner())
}

/// The sender's receive side: acks into a lock-free queue, then the core
/// runs once for the batch.
struct AckSink {
    receiver_id: u16,
    acks: Arc<ArrayQueue<Ack>>,
    core: SharedCore,
    core_thread: Arc<OnceLock<Thread>>,
    got: bool,
    refused: u64,
    kernel_dropped: u64,
    cpu: Duration,
}

impl RxSink for AckSink {
    fn refused(&mut self, _: Option<&ParseError>) {
        self.refused += 1;
    }
    fn event(&mut self, e: RxEvent<'_>) {
        if let RxEvent::Message {
            header,
            msg: Message::Ack(a),
            ..
        } = e
        {
            if header.sender == self.receiver_id {
                let _ = self.acks.force_push(a);
                self.got = true;
            }
        }
    }
    fn batch_end(&mut self) -> bool {
        if std::mem::take(&mut self.got) {
            let ran = match self.core.try_lock() {
                Ok(mut c) => c.run(&self.acks).is_ok(),
                Err(_) => false,
            };
            if !ran {
                if let Some(t) = self.core_thread.get() {
                    t.unpark();
                }
            }
        }
        true
    }
    fn link_dropped(&mut self, total: u64) {
        self.kernel_dropped = total;
    }
    fn done(&mut self) {
        self.cpu = sys::thread_cpu_time();
    }
}

/// The sender's protocol core: reliable delivery, encoding, heartbeats.
struct Core {
    cfg: StreamConfig,
    enc: FrameEncoder,
    msl: MslTx,
    rel: ReliableTx<InFlight>,
    out: Vec<(bool, Frame)>,
    frames: Vec<Frame>,
    report: SenderReport,
    start: Instant,
    first_send: Option<Instant>,
    last_ack: Instant,
    last_progress: Instant,
    count: Arc<TxCount>,
    next_id: u64,
    /// Still producing new blocks (set by the core thread).
    producing: bool,
    next_heartbeat: Instant,
    hb_counter: u64,
}

impl Core {
    fn encode(&mut self, control: bool, h: &Header, msg: &Message, payload: &Bytes) -> bool {
        self.frames.clear();
        let ok = self.enc.encode_counted(
            h,
            msg,
            payload,
            &self.msl.pool,
            &mut self.frames,
            &self.count,
        );
        self.out.extend(self.frames.drain(..).map(|f| (control, f)));
        ok
    }

    /// Encode the data frame `seq` carrying `blocks` blocks from `write_id`.
    fn encode_data(&mut self, seq: u64, write_id: u64, blocks: u32) -> bool {
        // As msld does with a client's write: the data lands in a buffer
        // of its own, and the frames are sent from it.
        let bytes = blocks as usize * BLOCK_SIZE;
        let mut data = vec![0u8; bytes];
        for (k, b) in data.chunks_exact_mut(BLOCK_SIZE).enumerate() {
            fill_pattern(write_id + k as u64, b);
        }
        let h = header(&self.cfg, self.cfg.sender_id, seq, 0);
        self.encode(false, &h, &data_msg(write_id, bytes), &Bytes::from(data))
    }

    fn on_acks(&mut self, acks: &ArrayQueue<Ack>, now: u64) -> bool {
        let before = self.report.blocks_acked;
        let mut any = false;
        while let Some(a) = acks.pop() {
            any = true;
            self.report.acks_received += 1;
            let r = &mut self.report;
            self.rel.on_ack(now, &a, |_, m| {
                let us = now.saturating_sub(m.sent_us).max(1);
                let _ = r.rtt_us.record_n(us, u64::from(m.blocks));
                r.blocks_acked += u64::from(m.blocks);
            });
            self.last_ack = Instant::now();
        }
        if self.report.blocks_acked != before || self.rel.in_flight() == 0 {
            self.last_progress = Instant::now();
        }
        any
    }

    /// Take the queued acks, send a heartbeat if due, resend what is due,
    /// then new blocks while the window has room. Returns whether
    /// anything happened.
    fn run(&mut self, acks: &ArrayQueue<Ack>) -> io::Result<bool> {
        let now = self.start.elapsed().as_micros() as u64;
        let mut n = usize::from(self.on_acks(acks, now));
        // Stand-in for the protocol core's heartbeat timer: control
        // frames go ahead of any data.
        if let Some(every) = self.cfg.heartbeat_interval {
            if Instant::now() >= self.next_heartbeat {
                self.next_heartbeat += every;
                self.hb_counter += 1;
                self.heartbeat(self.hb_counter);
            }
        }
        if self.rel.poll_timeout().is_some_and(|t| t <= now) {
            while n < MAX_BATCH {
                let Some((seq, m)) = self.rel.poll_retransmit(now) else {
                    break;
                };
                let (write_id, blocks) = (m.write_id, m.blocks);
                self.encode_data(seq, write_id, blocks);
                n += 1;
            }
        }
        let per_frame = self.cfg.blocks_per_frame.clamp(1, MAX_BLOCKS_PER_FRAME) as u64;
        // New frames only while few wait for the transmit worker: a frame's
        // retransmission timer runs from here, not from when it leaves.
        while self.producing
            && n < MAX_BATCH
            && self.rel.has_room()
            && self.next_id < self.cfg.blocks
            && self.msl.queued() < QUEUED_AHEAD
        {
            let id = self.next_id;
            let blocks = per_frame.min(self.cfg.blocks - id) as u32;
            let seq = self.rel.next_seq();
            if !self.encode_data(seq, id, blocks) {
                return Err(io::Error::other("encoding a DATA frame failed"));
            }
            let item = InFlight {
                write_id: id,
                blocks,
                sent_us: now,
            };
            if self.rel.push(now, item).is_err() {
                return Err(io::Error::other("window room was checked"));
            }
            self.next_id += u64::from(blocks);
            self.report.blocks_sent += u64::from(blocks);
            n += 1;
        }
        if !self.out.is_empty() {
            self.first_send.get_or_insert_with(Instant::now);
            self.msl.send(&mut self.out, self.cfg.send_mode);
        }
        Ok(n > 0)
    }

    fn heartbeat(&mut self, counter: u64) {
        let msg = Message::Heartbeat(Heartbeat {
            role: Role::Primary,
            disk: DiskState::UpToDate,
            msl_up: true,
            in_sync: true,
            adapters: [AdapterHealth::default(); MAX_ADAPTERS],
            adapter_count: 0,
            epoch: 1,
            counter,
        });
        let h = header(&self.cfg, self.cfg.sender_id, 0, 0);
        if self.encode(true, &h, &msg, &Bytes::new()) {
            self.report.control_sent += 1;
        }
    }
}

fn new_histogram() -> io::Result<Histogram<u64>> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| io::Error::other(format!("histogram: {e}")))
}

/// Run the sender side until `cfg.blocks`/`cfg.duration` are produced and
/// acknowledged, the drain timeout passes, or `stop` is set. The calling
/// thread waits; the core thread is a thread of its own.
pub fn run_sender(
    tx: Box<dyn TxLink>,
    rx: Box<dyn RxLink>,
    cfg: &StreamConfig,
    stop: &AtomicBool,
) -> io::Result<SenderReport> {
    let count = Arc::new(TxCount::default());
    let (msl, tx_h) = start_tx(
        tx,
        count.clone(),
        tx_worker_config(cfg, cfg.sender_cores.tx),
    );
    let start = Instant::now();
    let core = Arc::new(Mutex::new(Core {
        cfg: cfg.clone(),
        enc: FrameEncoder {
            src_mac: cfg.sender_mac,
            dst_mac: cfg.receiver_mac,
            key: cfg.key.clone(),
            max_frame: max_data_frame_len(),
        },
        msl,
        rel: ReliableTx::new(
            TxConfig {
                window: cfg.reliable.window.max(1),
                ..cfg.reliable
            },
            cfg.seq_base,
        ),
        out: Vec::with_capacity(2 * MAX_BATCH),
        frames: Vec::with_capacity(4),
        report: SenderReport {
            blocks_sent: 0,
            blocks_acked: 0,
            retransmits: 0,
            elapsed: Duration::ZERO,
            rtt_us: new_histogram()?,
            cpu: [Duration::ZERO; 3],
            direct_frames: 0,
            queue_dropped: 0,
            pool_misses: 0,
            acks_received: 0,
            control_sent: 0,
            rx_malformed: 0,
            tx: TxStats::default(),
            rx_kernel_dropped: 0,
            complete: false,
        },
        start,
        first_send: None,
        last_ack: start,
        last_progress: start,
        count: count.clone(),
        next_id: 0,
        producing: true,
        next_heartbeat: start,
        hb_counter: 0,
    }));
    let acks = Arc::new(ArrayQueue::new(256));
    let core_thread = Arc::new(OnceLock::new());
    let rx_stop = Arc::new(AtomicBool::new(false));
    let rx_h = start_rx(
        rx,
        rx_worker_config(cfg, cfg.sender_cores.rx),
        rx_stop.clone(),
        AckSink {
            receiver_id: cfg.receiver_id,
            acks: acks.clone(),
            core: core.clone(),
            core_thread: core_thread.clone(),
            got: false,
            refused: 0,
            kernel_dropped: 0,
            cpu: Duration::ZERO,
        },
    );
    let res = thread::scope(|s| {
        s.spawn(|| {
            let _ = core_thread.set(thread::current());
            pin_current(cfg.sender_cores.capture);
            run_core(cfg, &core, &acks, stop)
        })
        .join()
        .map_err(|_| io::Error::other("core thread panicked"))?
    });
    rx_stop.store(true, Ordering::Relaxed);
    let sink = rx_h
        .join()
        .map_err(|_| io::Error::other("RX worker panicked"))?;
    drop(sink.core);
    let core = Arc::into_inner(core)
        .ok_or_else(|| io::Error::other("the core is still shared"))?
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    let pool_misses = core.msl.pool.misses();
    drop(core.msl);
    let tx_end = tx_h
        .join()
        .map_err(|_| io::Error::other("TX worker panicked"))?;
    let core_cpu = res?;
    let mut rep = core.report;
    rep.complete = core.rel.in_flight() == 0;
    rep.elapsed = core
        .last_ack
        .saturating_duration_since(core.first_send.unwrap_or(start));
    rep.retransmits = core.rel.stats.retransmits;
    rep.pool_misses = pool_misses;
    rep.cpu = [core_cpu, tx_end.cpu, sink.cpu];
    rep.tx = tx_end.link;
    rep.rx_malformed = sink.refused;
    rep.rx_kernel_dropped = sink.kernel_dropped;
    rep.direct_frames = count.direct.load(Ordering::Relaxed);
    rep.queue_dropped = count.dropped.load(Ordering::Relaxed);
    Ok(rep)
}

/// The core thread: runs the core until the stream is done, sleeping
/// while the receive worker runs it. Returns its CPU time.
fn run_core(
    cfg: &StreamConfig,
    core: &Mutex<Core>,
    acks: &ArrayQueue<Ack>,
    stop: &AtomicBool,
) -> io::Result<Duration> {
    let deadline = cfg.duration.map(|d| Instant::now() + d);
    let debug = std::env::var_os("MSL_DEBUG").is_some();
    let mut last_debug = Instant::now();
    let mut spins = 0u32;
    let mut drain_deadline: Option<Instant> = None;
    loop {
        let mut c = lock(core);
        c.producing = c.next_id < cfg.blocks
            && deadline.is_none_or(|d| Instant::now() < d)
            && !stop.load(Ordering::Relaxed);
        let progressed = c.run(acks)?;
        if debug && last_debug.elapsed() > Duration::from_secs(1) {
            last_debug = Instant::now();
            eprintln!(
                "msl-transport debug: in_flight {} sent {} acked {} rexmit {} acks {} queued {} pool {} rto {} srtt {:?}",
                c.rel.in_flight(), c.report.blocks_sent, c.report.blocks_acked,
                c.rel.stats.retransmits, c.report.acks_received, c.msl.queued(),
                c.msl.pool.available(), c.rel.rto_us(), c.rel.srtt_us()
            );
        }
        if !c.producing {
            if c.rel.in_flight() == 0 {
                break;
            }
            let dl = *drain_deadline.get_or_insert_with(|| Instant::now() + cfg.drain_timeout);
            if Instant::now() >= dl || stop.load(Ordering::Relaxed) {
                break;
            }
        }
        if c.last_progress.elapsed() > cfg.stall_timeout {
            eprintln!(
                "msl-transport: stream stalled: no ack for {:?} with {} blocks in flight \
                 (sent {}, acked {}, retransmits {}, acks received {})",
                cfg.stall_timeout,
                c.rel.in_flight(),
                c.report.blocks_sent,
                c.report.blocks_acked,
                c.rel.stats.retransmits,
                c.report.acks_received,
            );
            break;
        }
        let now = c.start.elapsed().as_micros() as u64;
        let wait = c
            .rel
            .poll_timeout()
            .map(|t| Duration::from_micros(t.saturating_sub(now)))
            .unwrap_or(IDLE_MAX)
            .min(IDLE_MAX);
        drop(c);
        if progressed {
            spins = 0;
        } else {
            idle(&mut spins, wait);
        }
    }
    Ok(sys::thread_cpu_time())
}

/// The receiver: reliable delivery, in-order application with the
/// pattern check, and one ack per batch, all on the receive worker (as
/// msld runs its core there when it is free).
struct ApplySink {
    cfg: StreamConfig,
    msl: Option<MslTx>,
    enc: FrameEncoder,
    rel: ReliableRx<Option<(Vec<u8>, u64)>>,
    spare: Vec<Vec<u8>>,
    next_write_id: u64,
    counters: RxCounters,
    rep: ReceiverReport,
    any: bool,
    out: Vec<(bool, Frame)>,
    frames: Vec<Frame>,
    count: Arc<TxCount>,
}

impl ApplySink {
    fn apply(&mut self, first_id: u64, data: &[u8]) {
        for (k, block) in data.chunks_exact(BLOCK_SIZE).enumerate() {
            let write_id = first_id.wrapping_add(k as u64);
            if write_id != self.next_write_id {
                self.rep.order_errors += 1;
            }
            self.next_write_id = write_id.wrapping_add(1);
            if check_pattern(write_id, block) {
                self.rep.verified += 1;
            } else {
                self.rep.bad_pattern += 1;
            }
        }
    }

    fn data(&mut self, h: &Header, d: &Data, payload: &[u8]) {
        let cfg = &self.cfg;
        if h.sender != cfg.sender_id
            || h.generation != cfg.generation
            || payload.len() != d.len as usize
            || payload.is_empty()
            || payload.len() > MAX_BLOCKS_PER_FRAME * BLOCK_SIZE
            || !payload.len().is_multiple_of(BLOCK_SIZE)
            || d.offset != d.write_id.wrapping_mul(BLOCK_SIZE as u64)
        {
            self.rep.bad_data += 1;
            return;
        }
        let seq = h.seq;
        let delivered = self.rel.delivered();
        let window = cfg.reliable.window.max(1) as u64;
        if seq <= delivered || seq - delivered > window {
            // Duplicate or outside the window: counted and dropped.
            let _ = self.rel.on_frame(seq, None);
        } else if seq == delivered + 1 {
            // In order: applied straight from the link's buffer.
            self.apply(d.write_id, payload);
            let _ = self.rel.on_frame(seq, None);
        } else {
            let Some(mut b) = self.spare.pop() else {
                self.rep.out_of_window += 1;
                return;
            };
            b.clear();
            b.extend_from_slice(payload);
            if self.rel.on_frame(seq, Some((b, d.write_id))) != RxOutcome::Accepted {
                // A duplicate of a frame already held: its buffer went
                // with it.
                self.spare
                    .push(Vec::with_capacity(MAX_BLOCKS_PER_FRAME * BLOCK_SIZE));
            }
        }
        while let Some((_, item)) = self.rel.pop() {
            if let Some((b, wid)) = item {
                self.apply(wid, &b);
                self.spare.push(b);
            }
        }
    }
}

impl RxSink for ApplySink {
    fn refused(&mut self, e: Option<&ParseError>) {
        match e {
            Some(e) => self.counters.record_error(e),
            None => self.rep.bad_data += 1,
        }
    }
    fn event(&mut self, e: RxEvent<'_>) {
        let RxEvent::Message {
            header,
            msg,
            payload,
            ..
        } = e
        else {
            return;
        };
        self.any = true;
        match msg {
            Message::Data(d) => self.data(&header, &d, &payload),
            Message::Heartbeat(_) if header.sender == self.cfg.sender_id => {
                self.rep.heartbeats += 1
            }
            _ => {}
        }
    }
    fn batch_end(&mut self) -> bool {
        if !std::mem::take(&mut self.any) {
            return true;
        }
        let Some(msl) = &self.msl else {
            return true;
        };
        let d = self.rel.delivered();
        let ack = self.rel.ack(d, d);
        let h = header(&self.cfg, self.cfg.receiver_id, 0, ack.cumulative);
        self.frames.clear();
        if self.enc.encode_counted(
            &h,
            &Message::Ack(ack),
            &[],
            &msl.pool,
            &mut self.frames,
            &self.count,
        ) {
            self.rep.acks_sent += 1;
            self.out.extend(self.frames.drain(..).map(|f| (true, f)));
            msl.send(&mut self.out, SendMode::Direct);
        }
        true
    }
    fn link_dropped(&mut self, total: u64) {
        self.rep.kernel_dropped = total;
    }
    fn done(&mut self) {
        self.rep.cpu[1] = sys::thread_cpu_time();
    }
}

/// Run the receiver side until `stop` is set.
pub fn run_receiver(
    tx: Box<dyn TxLink>,
    rx: Box<dyn RxLink>,
    cfg: &StreamConfig,
    stop: &AtomicBool,
) -> io::Result<ReceiverReport> {
    let window = cfg.reliable.window.max(1);
    let count = Arc::new(TxCount::default());
    let (msl, tx_h) = start_tx(
        tx,
        count.clone(),
        tx_worker_config(cfg, cfg.receiver_cores.tx),
    );
    let rx_stop = Arc::new(AtomicBool::new(false));
    let sink = ApplySink {
        cfg: cfg.clone(),
        msl: Some(msl),
        enc: FrameEncoder {
            src_mac: cfg.receiver_mac,
            dst_mac: cfg.sender_mac,
            key: cfg.key.clone(),
            max_frame: max_data_frame_len(),
        },
        rel: ReliableRx::new(window, cfg.seq_base),
        spare: (0..window)
            .map(|_| Vec::with_capacity(MAX_BLOCKS_PER_FRAME * BLOCK_SIZE))
            .collect(),
        next_write_id: 0,
        counters: RxCounters::default(),
        rep: ReceiverReport::default(),
        any: false,
        out: Vec::with_capacity(4),
        frames: Vec::with_capacity(4),
        count,
    };
    let rx_h = start_rx(
        rx,
        rx_worker_config(cfg, cfg.receiver_cores.rx),
        rx_stop.clone(),
        sink,
    );
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(1));
    }
    rx_stop.store(true, Ordering::Relaxed);
    let mut sink = rx_h
        .join()
        .map_err(|_| io::Error::other("RX worker panicked"))?;
    drop(sink.msl.take());
    let tx_end = tx_h
        .join()
        .map_err(|_| io::Error::other("TX worker panicked"))?;
    let mut rep = sink.rep;
    rep.duplicates = sink.rel.stats.duplicates;
    rep.out_of_window += sink.rel.stats.out_of_window;
    rep.malformed = sink.counters.dropped();
    rep.malformed_by_reason = sink
        .counters
        .snapshot()
        .iter()
        .filter(|(_, v)| *v > 0)
        .copied()
        .collect();
    rep.tx = tx_end.link;
    rep.cpu[0] = tx_end.cpu;
    Ok(rep)
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
