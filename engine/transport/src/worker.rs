//! The MSL workers msld runs, and `msl-bench link` with it: frames out
//! through an encoder into pooled buffers and a transmit worker fed by
//! lock-free queues (control ahead of data), with direct sends from the
//! producing thread when the link is free; frames in through a receive
//! worker (Ethernet and frame checks, reassembly) into a [`RxSink`].
//!
//! ```text
//!  producer --encode--> pool buffer --control queue--+
//!     |                                 --data queue--+--> TX worker --> link
//!     +--(link free, nothing queued: direct send)-------------------------^
//!  link --> RX worker: check, reassemble --> RxSink (batch, then batch_end)
//! ```
//! The queues are crossbeam `ArrayQueue`s fixed at start, as is the pool;
//! no frame takes a lock of its own: the link's lock is taken once per
//! batch of up to `MAX_BATCH` frames. Each worker can be pinned to a core.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use msl_wire::{self as wire, Header, Key, Message, ParseError, Reassembler};

use crate::link::{FrameRef, RxLink, TxLink, TxStats, MAX_BATCH};

/// An encoded frame: a pool buffer, and for a gathered frame the payload
/// it carries from the payload's own buffer. On the wire: `buf[..head]`,
/// then `payload`, then `buf[head..len]` (the tag).
#[derive(Debug)]
pub struct Frame {
    buf: Vec<u8>,
    head: usize,
    len: usize,
    payload: Option<Bytes>,
}

impl Frame {
    /// The frame's bytes, in the pieces it is sent from.
    pub fn bytes(&self) -> FrameRef<'_> {
        match &self.payload {
            None => FrameRef::whole(&self.buf[..self.len]),
            Some(p) => FrameRef::new([&self.buf[..self.head], p, &self.buf[self.head..self.len]]),
        }
    }

    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        self.len + self.payload.as_ref().map_or(0, |p| p.len())
    }

    /// True for a frame of no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A frame of the bytes in `buf` (not from a pool: dropped after use).
    pub fn from_vec(buf: Vec<u8>) -> Frame {
        let len = buf.len();
        Frame {
            buf,
            head: len,
            len,
            payload: None,
        }
    }
}

/// A message's payload as the encoder gets it: bytes to copy into the
/// frames, or a shared buffer the frames are sent from (gathered: no copy
/// in user space on AF_PACKET, one into the ring on AF_XDP).
#[derive(Clone, Copy, Debug)]
pub enum Payload<'a> {
    Copy(&'a [u8]),
    Shared(&'a Bytes),
}

impl Payload<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            Payload::Copy(b) => b,
            Payload::Shared(b) => b,
        }
    }
}

impl<'a> From<&'a [u8]> for Payload<'a> {
    fn from(b: &'a [u8]) -> Self {
        Payload::Copy(b)
    }
}

impl<'a> From<&'a Vec<u8>> for Payload<'a> {
    fn from(b: &'a Vec<u8>) -> Self {
        Payload::Copy(b)
    }
}

impl<'a, const N: usize> From<&'a [u8; N]> for Payload<'a> {
    fn from(b: &'a [u8; N]) -> Self {
        Payload::Copy(b)
    }
}

impl<'a> From<&'a Bytes> for Payload<'a> {
    fn from(b: &'a Bytes) -> Self {
        Payload::Shared(b)
    }
}

/// Shared payloads shorter than this are copied into the frame: a
/// separate piece costs the kernel more than copying a few bytes.
pub const GATHER_MIN: usize = 512;

/// Frame buffers allocated at start-up and passed lock-free between the
/// threads that encode frames and the worker that sends them, so the
/// transmit path neither allocates nor zeroes a buffer per frame. Every
/// buffer has the pool's frame size and stays initialized between uses.
/// When all are in use, `take` allocates one more (counted in `misses`);
/// the pool keeps at most its start-up count.
#[derive(Clone, Debug)]
pub struct FramePool {
    free: Arc<ArrayQueue<Vec<u8>>>,
    misses: Arc<AtomicU64>,
    size: usize,
}

impl FramePool {
    /// A pool of `count` buffers of `frame_size` bytes, allocated now
    /// (zeroed pages: memory is touched as buffers are first used).
    pub fn new(frame_size: usize, count: usize) -> Self {
        let free = ArrayQueue::new(count.max(1));
        for _ in 0..count.max(1) {
            let _ = free.push(vec![0u8; frame_size]);
        }
        FramePool {
            free: Arc::new(free),
            misses: Arc::new(AtomicU64::new(0)),
            size: frame_size,
        }
    }

    /// A buffer of at least `min` bytes.
    fn take(&self, min: usize) -> Vec<u8> {
        match self.free.pop() {
            Some(b) if b.len() >= min => b,
            other => {
                if let Some(b) = other {
                    let _ = self.free.push(b);
                }
                self.misses.fetch_add(1, Ordering::Relaxed);
                vec![0u8; self.size.max(min)]
            }
        }
    }

    /// Hand a frame's buffer back (dropped when the pool is full or the
    /// buffer has another size).
    pub fn give(&self, f: Frame) {
        if f.buf.len() == self.size {
            let _ = self.free.push(f.buf);
        }
    }

    /// Buffers waiting for reuse.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Buffers the pool holds when none is in use.
    pub fn capacity(&self) -> usize {
        self.free.capacity()
    }

    /// Buffers allocated because the pool was empty.
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }

    /// Bytes per buffer.
    pub fn frame_size(&self) -> usize {
        self.size
    }
}

/// What the transmit side counts (msld's status counters, the bench's
/// report). Every method defaults to nothing.
pub trait TxCounters: Send + Sync {
    /// Frames handed to the link, and their bytes.
    fn sent(&self, frames: usize, bytes: usize) {
        let _ = (frames, bytes);
    }
    /// Of those, frames the producing thread sent itself.
    fn direct(&self, n: usize) {
        let _ = n;
    }
    /// Frames the link refused (the reliable layer resends them).
    fn lost(&self, n: usize) {
        let _ = n;
    }
    /// Frames the transmit queue had no room for (likewise resent).
    fn dropped(&self, n: usize) {
        let _ = n;
    }
    /// A message that could not be encoded into frames.
    fn encode_error(&self, payload_len: usize, error: &str) {
        let _ = (payload_len, error);
    }
}

impl<T: TxCounters + ?Sized> TxCounters for Arc<T> {
    fn sent(&self, frames: usize, bytes: usize) {
        (**self).sent(frames, bytes)
    }
    fn direct(&self, n: usize) {
        (**self).direct(n)
    }
    fn lost(&self, n: usize) {
        (**self).lost(n)
    }
    fn dropped(&self, n: usize) {
        (**self).dropped(n)
    }
    fn encode_error(&self, payload_len: usize, error: &str) {
        (**self).encode_error(payload_len, error)
    }
}

/// Plain atomic transmit counters.
#[derive(Debug, Default)]
pub struct TxCount {
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    pub direct: AtomicU64,
    pub lost: AtomicU64,
    pub dropped: AtomicU64,
    pub encode_errors: AtomicU64,
}

impl TxCounters for TxCount {
    fn sent(&self, frames: usize, bytes: usize) {
        self.frames.fetch_add(frames as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    fn direct(&self, n: usize) {
        self.direct.fetch_add(n as u64, Ordering::Relaxed);
    }
    fn lost(&self, n: usize) {
        self.lost.fetch_add(n as u64, Ordering::Relaxed);
    }
    fn dropped(&self, n: usize) {
        self.dropped.fetch_add(n as u64, Ordering::Relaxed);
    }
    fn encode_error(&self, _: usize, _: &str) {
        self.encode_errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Encodes messages into Ethernet frames (fragmenting to the link).
#[derive(Clone, Debug)]
pub struct FrameEncoder {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub key: Option<Key>,
    pub max_frame: usize,
}

impl FrameEncoder {
    /// Encode one message into one or more frames, in buffers from `pool`;
    /// a shared payload of at least `GATHER_MIN` bytes stays where it is
    /// and the frames are sent from it.
    pub fn encode<'p>(
        &self,
        header: &Header,
        msg: &Message,
        payload: impl Into<Payload<'p>>,
        pool: &FramePool,
        out: &mut Vec<Frame>,
    ) -> Result<(), String> {
        let payload = payload.into();
        let bytes = payload.as_slice();
        let shared = match payload {
            Payload::Shared(b) if b.len() >= GATHER_MIN => Some(b),
            _ => None,
        };
        let max_msl = self.max_frame - wire::ETH_HEADER_LEN;
        let n = wire::try_fragment_count(msg, bytes.len(), max_msl, self.key.is_some())
            .map_err(|e| e.to_string())?;
        for i in 0..usize::from(n) {
            let mut f = pool.take(self.max_frame);
            let e =
                wire::emit_eth(self.dst_mac, self.src_mac, &mut f).map_err(|e| e.to_string())?;
            let end = &mut f[e..self.max_frame];
            let frame = if let Some(p) = shared {
                let (len, range, tag) = wire::emit_fragment_head(
                    header,
                    msg,
                    bytes,
                    i,
                    max_msl,
                    self.key.as_ref(),
                    end,
                )
                .map_err(|e| e.to_string())?;
                end[len..len + wire::TAG_LEN].copy_from_slice(&tag);
                Frame {
                    buf: f,
                    head: e + len,
                    len: e + len + wire::TAG_LEN,
                    payload: Some(p.slice(range)),
                }
            } else {
                let len = if n == 1 {
                    wire::emit(header, msg, bytes, self.key.as_ref(), end)
                } else {
                    wire::emit_fragment(header, msg, bytes, i, max_msl, self.key.as_ref(), end)
                }
                .map_err(|e| e.to_string())?;
                Frame {
                    buf: f,
                    head: e + len,
                    len: e + len,
                    payload: None,
                }
            };
            out.push(frame);
        }
        Ok(())
    }

    /// `encode`, counting a failure in `counters`; on failure nothing is
    /// added to `out` and the buffers taken go back to `pool`.
    pub fn encode_counted<'p>(
        &self,
        header: &Header,
        msg: &Message,
        payload: impl Into<Payload<'p>>,
        pool: &FramePool,
        out: &mut Vec<Frame>,
        counters: &dyn TxCounters,
    ) -> bool {
        let before = out.len();
        let payload = payload.into();
        match self.encode(header, msg, payload, pool, out) {
            Ok(()) => true,
            Err(e) => {
                for f in out.drain(before..) {
                    pool.give(f);
                }
                counters.encode_error(payload.as_slice().len(), &e);
                false
            }
        }
    }
}

/// How `MslTx::send` may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SendMode {
    /// Through the transmit worker.
    Queue,
    /// From the calling thread if the link is free and nothing is queued
    /// (never waiting), the rest through the transmit worker.
    #[default]
    Direct,
}

impl std::str::FromStr for SendMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "direct" => Ok(SendMode::Direct),
            "queue" => Ok(SendMode::Queue),
            o => Err(format!("send mode {o:?}: expected direct or queue")),
        }
    }
}

/// Pin the calling thread to CPU `core` (`None`: leave it alone).
/// Returns false if the system refused.
pub fn pin_current(core: Option<usize>) -> bool {
    match core {
        Some(id) => core_affinity::set_for_current(core_affinity::CoreId { id }),
        None => true,
    }
}

/// Spawn a named thread (names show in `top -H` and profiles), pinned to
/// `core` if given. Like `std::thread::spawn`, it aborts the start if the
/// OS has no thread left.
pub fn spawn_worker<T: Send + 'static>(
    name: &str,
    core: Option<usize>,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let n = name.to_string();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if !pin_current(core) {
                eprintln!("msl-transport: {n}: cannot pin to CPU {core:?}; running unpinned");
            }
            f()
        })
        .unwrap_or_else(|e| panic!("cannot start thread {name}: {e}"))
}

/// Sizes and placement of a transmit worker.
#[derive(Clone, Copy, Debug)]
pub struct TxWorkerConfig {
    /// Largest frame the link takes (the encoder's `max_frame`).
    pub max_frame: usize,
    /// Data frames the queue holds.
    pub data_frames: usize,
    /// Control frames the control queue holds.
    pub control_frames: usize,
    /// Frame buffers in the pool.
    pub pool_frames: usize,
    /// CPU to pin the worker to.
    pub core: Option<usize>,
}

impl TxWorkerConfig {
    /// msld's sizes for frames of `max_frame` bytes, unpinned.
    pub fn new(max_frame: usize) -> Self {
        TxWorkerConfig {
            max_frame,
            data_frames: 4096,
            control_frames: 256,
            pool_frames: 2048,
            core: None,
        }
    }
}

struct TxShared {
    control: ArrayQueue<Frame>,
    data: ArrayQueue<Frame>,
    /// Taken once per batch, by the worker and by a direct send (which
    /// only tries).
    link: Mutex<Box<dyn TxLink>>,
    /// Frames handed to the queues and not yet sent. Only read and
    /// lowered under the link's lock, so a direct send never overtakes
    /// queued frames.
    queued: AtomicUsize,
    closed: AtomicBool,
    worker: OnceLock<Thread>,
    counters: Arc<dyn TxCounters>,
    pool: FramePool,
}

impl TxShared {
    fn lock(&self) -> MutexGuard<'_, Box<dyn TxLink>> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake(&self) {
        if let Some(t) = self.worker.get() {
            t.unpark();
        }
    }
}

/// The transmit side's handle: queues frames for the transmit worker (or
/// sends them directly, see [`SendMode`]). Dropping it stops the worker
/// once the queues are empty.
pub struct MslTx {
    shared: Arc<TxShared>,
    /// Where frame buffers come from and go back to once sent.
    pub pool: FramePool,
}

impl MslTx {
    /// Send `frames` (each tagged control or not), emptying it: with
    /// `Direct`, on the link from this thread as far as it takes them now
    /// (if it is free and nothing is queued); the rest through the
    /// transmit worker.
    pub fn send(&self, frames: &mut Vec<(bool, Frame)>, mode: SendMode) {
        if frames.is_empty() {
            return;
        }
        if mode == SendMode::Direct {
            if let Ok(mut link) = self.shared.link.try_lock() {
                if self.shared.queued.load(Ordering::Acquire) == 0 {
                    self.send_direct(&mut **link, frames);
                }
                // Queued while the lock keeps the worker from sending
                // them ahead of what just went out.
                self.enqueue(frames);
                return;
            }
        }
        self.enqueue(frames);
    }

    /// Control first, as the worker does, and never waiting: removes from
    /// `frames` what went out.
    fn send_direct(&self, link: &mut dyn TxLink, frames: &mut Vec<(bool, Frame)>) {
        frames.sort_by_key(|(is_control, _)| !*is_control);
        let c = &self.shared.counters;
        let mut done = 0;
        while done < frames.len() {
            let n = (frames.len() - done).min(MAX_BATCH);
            let mut refs = [FrameRef::default(); MAX_BATCH];
            for (r, (_, f)) in refs.iter_mut().zip(&frames[done..done + n]) {
                *r = f.bytes();
            }
            let k = match link.try_send_frames(&refs[..n]) {
                Ok(k) => {
                    c.sent(k, refs[..k].iter().map(|f| f.len()).sum());
                    c.direct(k);
                    k
                }
                Err(_) => {
                    c.lost(n);
                    n
                }
            };
            done += k;
            if k < n {
                break;
            }
        }
        for (_, f) in frames.drain(..done) {
            self.pool.give(f);
        }
    }

    fn enqueue(&self, frames: &mut Vec<(bool, Frame)>) {
        if frames.is_empty() {
            return;
        }
        let s = &self.shared;
        for (is_control, f) in frames.drain(..) {
            s.queued.fetch_add(1, Ordering::AcqRel);
            let q = if is_control { &s.control } else { &s.data };
            if let Err(f) = q.push(f) {
                s.queued.fetch_sub(1, Ordering::AcqRel);
                s.counters.dropped(1);
                self.pool.give(f);
            }
        }
        s.wake();
    }

    /// Frames queued and not yet sent.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }
}

impl Drop for MslTx {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake();
    }
}

/// Longest the idle transmit worker sleeps before it flushes the link
/// again; producers unpark it.
const TX_IDLE: Duration = Duration::from_millis(20);

/// What a transmit worker hands back when it stops.
#[derive(Clone, Copy, Debug, Default)]
pub struct TxWorkerEnd {
    /// The worker thread's CPU time.
    pub cpu: Duration,
    /// The link's own counters.
    pub link: TxStats,
}

/// Start a transmit worker: control frames first, then data, in batches.
pub fn start_tx(
    link: Box<dyn TxLink>,
    counters: Arc<dyn TxCounters>,
    cfg: TxWorkerConfig,
) -> (MslTx, JoinHandle<TxWorkerEnd>) {
    let pool = FramePool::new(cfg.max_frame, cfg.pool_frames);
    let shared = Arc::new(TxShared {
        control: ArrayQueue::new(cfg.control_frames.max(1)),
        data: ArrayQueue::new(cfg.data_frames.max(1)),
        link: Mutex::new(link),
        queued: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        worker: OnceLock::new(),
        counters,
        pool: pool.clone(),
    });
    let s = shared.clone();
    let h = spawn_worker("msl-tx", cfg.core, move || tx_worker(&s));
    let _ = shared.worker.set(h.thread().clone());
    (MslTx { shared, pool }, h)
}

fn tx_worker(s: &TxShared) -> TxWorkerEnd {
    let mut batch: Vec<Frame> = Vec::with_capacity(MAX_BATCH);
    let mut spins = 0u32;
    loop {
        // Control traffic never waits behind data.
        while batch.len() < MAX_BATCH {
            match s.control.pop().or_else(|| s.data.pop()) {
                Some(f) => batch.push(f),
                None => break,
            }
        }
        if batch.is_empty() {
            if s.closed.load(Ordering::Acquire) && s.queued.load(Ordering::Acquire) == 0 {
                let mut link = s.lock();
                let _ = link.flush();
                return TxWorkerEnd {
                    cpu: crate::sys::thread_cpu_time(),
                    link: link.stats(),
                };
            }
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                let _ = s.lock().flush();
                std::thread::park_timeout(TX_IDLE);
            }
            continue;
        }
        spins = 0;
        let n = batch.len();
        {
            let mut refs = [FrameRef::default(); MAX_BATCH];
            for (r, f) in refs.iter_mut().zip(&batch) {
                *r = f.bytes();
            }
            let mut link = s.lock();
            if link.send_frames(&refs[..n]).is_ok() {
                s.counters.sent(n, refs[..n].iter().map(|f| f.len()).sum());
            } else {
                s.counters.lost(n);
            }
            s.queued.fetch_sub(n, Ordering::AcqRel);
        }
        for f in batch.drain(..) {
            s.pool.give(f);
        }
    }
}

/// A received message's payload: in the link's receive buffer (a message
/// in one frame: valid during the call), or handed over by the reassembler
/// (a message in fragments: the buffer it was reassembled in, no copy).
#[derive(Debug)]
pub enum RxPayload<'a> {
    Ring(&'a [u8]),
    Owned(Bytes),
}

impl std::ops::Deref for RxPayload<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            RxPayload::Ring(b) => b,
            RxPayload::Owned(v) => v,
        }
    }
}

/// A message the receive worker took off the link.
pub enum RxEvent<'a> {
    /// A whole message (reassembled if it came in fragments).
    Message {
        header: Header,
        msg: Message,
        payload: RxPayload<'a>,
        /// When its batch came off the link.
        arrived: Instant,
    },
    /// A well-formed frame of a type this release does not know.
    Unknown { code: u8, must_understand: bool },
}

/// Where the receive worker delivers. Every method but `event` defaults
/// to nothing.
pub trait RxSink: Send {
    /// One frame of `bytes` off the link (before any check).
    fn frame(&mut self, bytes: usize) {
        let _ = bytes;
    }
    /// A frame refused by the checks (`None`: not even Ethernet, or a
    /// fragment reassembly refused).
    fn refused(&mut self, error: Option<&ParseError>) {
        let _ = error;
    }
    fn event(&mut self, e: RxEvent<'_>);
    /// The batch is in; false stops the worker.
    fn batch_end(&mut self) -> bool {
        true
    }
    /// Frames the link lost below this worker, cumulative (read every
    /// `RX_STATS_EVERY`).
    fn link_dropped(&mut self, total: u64) {
        let _ = total;
    }
    /// The worker stops (called on its thread).
    fn done(&mut self) {}
}

/// What a receive worker accepts, and where it runs.
#[derive(Clone, Debug)]
pub struct RxWorkerConfig {
    pub cluster_id: u64,
    pub key: Option<Key>,
    /// Largest message payload reassembled.
    pub max_message: usize,
    /// CPU to pin the worker to.
    pub core: Option<usize>,
}

/// How often the receive worker reads the link's drop statistics (a
/// system call).
pub const RX_STATS_EVERY: Duration = Duration::from_millis(100);

/// How long the receive worker keeps looking for frames without sleeping
/// after the last one (yielding the CPU between looks). 200 us covers the
/// gap between the messages of a 64 KiB stream at QD8 on a CPU shared
/// with the sender; see bench/README.md, "A/B: how long the receiver looks
/// again".
const RX_SPIN: Duration = Duration::from_micros(200);

/// Start a receive worker: batches of frames off the link, Ethernet and
/// frame checks, reassembly, then into `sink`; runs until `stop` is set
/// or the sink says so, and hands the sink back.
pub fn start_rx<S: RxSink + 'static>(
    mut link: Box<dyn RxLink>,
    cfg: RxWorkerConfig,
    stop: Arc<AtomicBool>,
    mut sink: S,
) -> JoinHandle<S> {
    spawn_worker("msl-rx", cfg.core, move || {
        let mut reasm = Reassembler::new(16, cfg.max_message);
        let expect = wire::Expect {
            cluster_id: cfg.cluster_id,
            key: cfg.key.as_ref(),
        };
        let mut stats_at = Instant::now();
        let mut last_frame = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if stats_at.elapsed() >= RX_STATS_EVERY {
                stats_at = Instant::now();
                sink.link_dropped(link.stats().kernel_dropped);
            }
            // Right after frames, look again without sleeping (giving the
            // CPU to whoever else is runnable in between): a receiver
            // asleep on the socket costs the sender a wake-up per frame.
            let spinning = last_frame.elapsed() < RX_SPIN;
            let wait = if spinning {
                Duration::ZERO
            } else {
                Duration::from_millis(20)
            };
            // When this batch came off the link: taken here, so a consumer
            // that runs late still sees when the peer was last heard.
            let mut taken: Option<Instant> = None;
            let r = link.recv(MAX_BATCH, wait, &mut |bytes| {
                let arrived = *taken.get_or_insert_with(Instant::now);
                sink.frame(bytes.len());
                let Ok((_, body)) = wire::parse_eth(bytes) else {
                    sink.refused(None);
                    return;
                };
                match wire::parse(body, &expect) {
                    Ok(p) if p.is_fragment() => match reasm.push(&p) {
                        Ok(Some((header, msg, _))) => sink.event(RxEvent::Message {
                            header,
                            msg,
                            payload: RxPayload::Owned(reasm.take_completed().unwrap_or_default()),
                            arrived,
                        }),
                        Ok(None) => {}
                        Err(_) => sink.refused(None),
                    },
                    Ok(p) => sink.event(RxEvent::Message {
                        header: p.header,
                        msg: p.msg,
                        payload: RxPayload::Ring(p.payload),
                        arrived,
                    }),
                    Err(ParseError::UnknownType {
                        code,
                        must_understand,
                    }) => sink.event(RxEvent::Unknown {
                        code,
                        must_understand,
                    }),
                    Err(e) => sink.refused(Some(&e)),
                }
            });
            if let Some(t) = taken {
                last_frame = t;
            }
            match r {
                Ok(0) if spinning => std::thread::yield_now(),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
                Ok(_) => {}
            }
            if !sink.batch_end() {
                break;
            }
        }
        sink.link_dropped(link.stats().kernel_dropped);
        sink.done();
        sink
    })
}

#[cfg(test)]
mod tests;
