//! The core driver: owns a node's protocol core (`msl_core::Node`), its
//! volume and its metadata store, and executes the core's actions in
//! order.
//!
//! Inputs arrive on one queue (`inbox`: MSL frames from the receive thread,
//! LAN server-state packets, client writes and flushes from the front end,
//! admin commands), and the thread that queues an input runs the core for
//! it when no other thread is (a lone write runs on its NBD reader, an ack
//! on the MSL receive thread); the core thread handles the rest and the
//! timers. Whoever runs it, the core runs on one thread at a time and
//! takes inputs in queue order. Actions are executed in order: metadata is
//! persisted (atomically, fsync'd) before the next action runs, and if that
//! fails the rest of the batch is dropped and the core latches fail-closed.
//! Volume writes are done synchronously by the thread running the core;
//! volume flushes (fdatasync) on a flush thread. MSL frames go out from
//! the thread running the core when the link is free, else through a
//! transmit thread, control ahead of data.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{
    sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError,
};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use msl_core::meta::Meta;
use msl_core::node::{Action, ClientError, Event, IoKind, Node, Status};
use msl_core::{AdminCmd, Config};
use msl_store::{MetaStore, Volume};
use msl_transport::{RxLink, TxLink};
use msl_wire::{self as wire, Header, Key, Message, Reassembler};

use crate::inbox::{Drained, Inbox, InboxRx, Runner};
use crate::lan::{LanPacket, LanPath};
use crate::notify::{EventRecord, Notifier};

/// LAN server-state packets that failed authentication.
pub fn lan_auth_failures(rx: &wire::RxCounters) -> u64 {
    rx.bad_auth + rx.missing_auth + rx.unexpected_auth
}

/// Block data as the core holds it: shared, so keeping a block for
/// retransmission does not copy it, and a range of a buffer, so a client
/// write's pieces and a volume read's buffer become blocks without a copy.
#[derive(Clone)]
pub struct Block {
    buf: Arc<Vec<u8>>,
    start: usize,
    end: usize,
}

impl Block {
    /// Bytes `range` of a shared buffer (clamped to it).
    pub fn slice(buf: &Arc<Vec<u8>>, range: std::ops::Range<usize>) -> Block {
        let end = range.end.min(buf.len());
        Block {
            buf: buf.clone(),
            start: range.start.min(end),
            end,
        }
    }
}

impl From<Vec<u8>> for Block {
    /// Takes the buffer over (no copy).
    fn from(v: Vec<u8>) -> Block {
        let end = v.len();
        Block {
            buf: Arc::new(v),
            start: 0,
            end,
        }
    }
}

impl From<&[u8]> for Block {
    fn from(b: &[u8]) -> Block {
        Block::from(b.to_vec())
    }
}

impl std::ops::Deref for Block {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

impl msl_core::node::Payload for Block {
    fn from_bytes(bytes: &[u8]) -> Self {
        Block::from(bytes)
    }
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// What the core consumes (through its `Inbox`).
pub enum Input {
    Msl {
        header: Header,
        msg: Message,
        payload: Option<Block>,
    },
    MslUnknown {
        code: u8,
        must_understand: bool,
    },
    Lan(LanPacket),
    LanAdapter {
        adapter: u8,
        up: bool,
    },
    MslLink {
        up: bool,
    },
    Write {
        block: u64,
        count: u64,
        kind: IoKind,
        fua: bool,
        payload: Option<Block>,
        reply: ReplyTo,
    },
    Flush {
        reply: SyncSender<Reply>,
    },
    Admin(AdminCmd),
    Status(SyncSender<Status>),
    Stop,
    /// A volume flush run off the core thread finished.
    IoDone {
        io: u64,
        ok: bool,
    },
}

/// A client request's outcome.
pub type Reply = Result<(), ClientError>;

/// Where a client write's outcome goes.
pub enum ReplyTo {
    /// A thread waiting on the channel.
    Wait(SyncSender<Reply>),
    /// Called by whichever thread runs the core (an NBD reader, the MSL
    /// receive thread, ...; it must not block): the NBD front end's
    /// completion, which queues the reply for the connection's reply thread.
    Call(Box<dyn FnOnce(Reply) + Send>),
}

impl ReplyTo {
    fn send(self, r: Reply) {
        match self {
            ReplyTo::Wait(tx) => {
                let _ = tx.send(r);
            }
            ReplyTo::Call(f) => f(r),
        }
    }
}

/// Hooks the driver calls for things outside the node (service address).
pub trait Host: Send {
    /// Hold (add + gratuitous ARP) or release the service address.
    fn service_address(&mut self, hold: bool);
}

/// A host that does nothing (tests without a LAN).
pub struct NoHost;

impl Host for NoHost {
    fn service_address(&mut self, _hold: bool) {}
}

/// Why the driver stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `Input::Stop` (clean shutdown).
    Stopped,
    /// The core asked to restart as secondary (after a switchover).
    Restart,
}

/// Shared view for front ends: whether this node serves clients.
#[derive(Debug, Default)]
pub struct Shared {
    pub serving: AtomicBool,
    pub in_sync: AtomicBool,
    pub msl_tx_frames: AtomicU64,
    /// Of those, frames the thread running the core sent itself (no hand-off to the
    /// transmit thread).
    pub msl_tx_direct: AtomicU64,
    pub msl_tx_bytes: AtomicU64,
    /// Frames the core produced that the transmit queue had no room for
    /// (the reliable layer retransmits them).
    pub msl_tx_dropped: AtomicU64,
    /// Frames the link refused to send (counted per frame of the batch).
    pub msl_tx_errors: AtomicU64,
    /// Messages the core produced that could not be encoded into frames
    /// (none is expected: a message too large for the link's frames).
    /// Nothing is sent; the reliable layer keeps retrying a data message.
    pub msl_tx_encode_errors: AtomicU64,
    pub msl_rx_frames: AtomicU64,
    pub msl_rx_bytes: AtomicU64,
    /// Received frames dropped for any reason (including bad auth).
    pub msl_rx_dropped: AtomicU64,
    /// Received frames that failed authentication (wrong, missing or
    /// unexpected cluster key): a peer with another `key_file`.
    pub msl_rx_bad_auth: AtomicU64,
    /// Frames the kernel dropped before this process saw them (receive
    /// ring full, or too long for it): the socket's own statistics, read
    /// by the receive thread at most every 100 ms. The reliable layer
    /// retransmits them; a steady rise means the receive thread falls
    /// behind.
    pub msl_rx_ring_dropped: AtomicU64,
    /// Bytes of client writes the core accepted (whole blocks).
    pub client_bytes_written: AtomicU64,
    /// Measured resync rate (bytes per second, smoothed; 0 when idle).
    pub resync_rate_bytes_s: AtomicU64,
}

/// True for the parse errors that mean "not signed with our key".
pub fn is_auth_error(e: &wire::ParseError) -> bool {
    matches!(
        e,
        wire::ParseError::BadAuth
            | wire::ParseError::MissingAuth
            | wire::ParseError::UnexpectedAuth
    )
}

/// An encoded frame: the first `len` bytes of `buf`.
pub struct Frame {
    buf: Vec<u8>,
    len: usize,
}

impl std::ops::Deref for Frame {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Frame buffers for reuse, passed lock-free between the threads that
/// encode frames and the ones that send them, so the steady-state transmit
/// path neither allocates nor zeroes a buffer per frame (zeroing fresh
/// 9 KiB frames was 3 % of the machine during a resync). Every buffer has
/// the pool's frame size and stays initialized between uses.
#[derive(Clone)]
pub struct FramePool {
    free: Arc<ArrayQueue<Vec<u8>>>,
    size: usize,
}

impl FramePool {
    /// A pool of buffers of `frame_size` bytes keeping at most `keep`.
    pub fn new(frame_size: usize, keep: usize) -> Self {
        FramePool {
            free: Arc::new(ArrayQueue::new(keep.max(1))),
            size: frame_size,
        }
    }

    /// A buffer of at least `min` bytes.
    fn take(&self, min: usize) -> Vec<u8> {
        match self.free.pop() {
            Some(b) if b.len() >= min => b,
            _ => vec![0u8; self.size.max(min)],
        }
    }

    /// Hand a sent frame's buffer back (dropped when the pool is full).
    fn give(&self, f: Frame) {
        if f.buf.len() == self.size {
            let _ = self.free.push(f.buf);
        }
    }

    /// Buffers waiting for reuse.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Bytes per buffer.
    pub fn frame_size(&self) -> usize {
        self.size
    }
}

/// Encodes core messages into Ethernet frames (fragmenting to the link).
pub struct FrameEncoder {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub key: Option<Key>,
    pub max_frame: usize,
}

impl FrameEncoder {
    /// Encode one message into one or more frames, in buffers from `pool`.
    pub fn encode(
        &self,
        header: &Header,
        msg: &Message,
        payload: &[u8],
        pool: &FramePool,
        out: &mut Vec<Frame>,
    ) -> Result<(), String> {
        let max_msl = self.max_frame - wire::ETH_HEADER_LEN;
        let n = wire::try_fragment_count(msg, payload.len(), max_msl, self.key.is_some())
            .map_err(|e| e.to_string())?;
        for i in 0..usize::from(n) {
            let mut f = pool.take(self.max_frame);
            let e =
                wire::emit_eth(self.dst_mac, self.src_mac, &mut f).map_err(|e| e.to_string())?;
            let end = &mut f[e..self.max_frame];
            let len = if n == 1 {
                wire::emit(header, msg, payload, self.key.as_ref(), end)
                    .map_err(|e| e.to_string())?
            } else {
                wire::emit_fragment(header, msg, payload, i, max_msl, self.key.as_ref(), end)
                    .map_err(|e| e.to_string())?
            };
            out.push(Frame {
                buf: f,
                len: e + len,
            });
        }
        Ok(())
    }

    /// `encode`, counting a failure in `shared.msl_tx_encode_errors`
    /// (the first one also on the console); on failure nothing is added
    /// to `out` and the buffers taken go back to `pool`.
    pub fn encode_counted(
        &self,
        header: &Header,
        msg: &Message,
        payload: &[u8],
        pool: &FramePool,
        out: &mut Vec<Frame>,
        shared: &Shared,
    ) -> bool {
        let before = out.len();
        match self.encode(header, msg, payload, pool, out) {
            Ok(()) => true,
            Err(e) => {
                for f in out.drain(before..) {
                    pool.give(f);
                }
                if shared.msl_tx_encode_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                    eprintln!(
                        "msld: an MSL message ({} bytes of payload) could not be encoded: {e} \
                         (counted in msl_tx_encode_errors)",
                        payload.len()
                    );
                }
                false
            }
        }
    }
}

/// How `MslTx::send` may send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SendMode {
    /// Through the transmit thread.
    Queue,
    /// From this thread if the link is free and nothing is queued (never
    /// waiting), the rest through the transmit thread.
    Direct,
}

/// Spawn a named thread (names show in `top -H` and profiles). Like
/// `std::thread::spawn`, it aborts the start if the OS has no thread left.
fn named_thread<F: FnOnce() + Send + 'static>(name: &str, f: F) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .unwrap_or_else(|e| panic!("cannot start thread {name}: {e}"))
}

/// The MSL transmit path: a transmit thread fed by a queue (control
/// frames ahead of data), and the link itself, which the thread running the core uses
/// directly when it is about to wait for input anyway and nothing is
/// queued: a lone message (queue depth 1, an ack) then costs no thread
/// wake-up, while under load the transmit thread does the sending.
pub struct MslTx {
    queue: SyncSender<(bool, Frame)>,
    link: Arc<Mutex<Box<dyn TxLink>>>,
    /// Frames handed to the queue and not yet sent. Only read and
    /// lowered under the link's lock, so a direct send never overtakes
    /// queued frames.
    queued: Arc<AtomicUsize>,
    shared: Arc<Shared>,
    /// Where frame buffers come from and go back to once sent.
    pub pool: FramePool,
}

fn lock_link(link: &Mutex<Box<dyn TxLink>>) -> MutexGuard<'_, Box<dyn TxLink>> {
    link.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Frames handed to the link.
    fn count_sent(&self, frames: &[&[u8]]) {
        let bytes: usize = frames.iter().map(|f| f.len()).sum();
        self.msl_tx_frames
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        self.msl_tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Frames the link refused (the reliable layer resends them).
    fn count_lost(&self, n: usize) {
        self.msl_tx_errors.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Send frames on the link in batches, control first; count them; their
/// buffers go back to `pool`.
fn send_batches(
    link: &mut dyn TxLink,
    shared: &Shared,
    pool: &FramePool,
    queues: [&mut VecDeque<Frame>; 2],
) {
    for q in queues {
        while !q.is_empty() {
            let n = q.len().min(msl_transport::MAX_BATCH);
            let refs: Vec<&[u8]> = q.iter().take(n).map(|f| &**f).collect();
            if link.send_frames(&refs).is_ok() {
                shared.count_sent(&refs);
            } else {
                shared.count_lost(refs.len());
            }
            drop(refs);
            for f in q.drain(..n) {
                pool.give(f);
            }
        }
    }
}

impl MslTx {
    /// Send `frames` (each tagged control or not), emptying it: with
    /// `Direct`, on the link from this thread as far as it takes them now
    /// (if it is free and nothing is queued); the rest through the
    /// transmit thread.
    fn send(&self, frames: &mut Vec<(bool, Frame)>, mode: SendMode) {
        if frames.is_empty() {
            return;
        }
        if mode == SendMode::Direct {
            if let Ok(mut link) = self.link.try_lock() {
                if self.queued.load(Ordering::Acquire) == 0 {
                    self.send_direct(&mut **link, frames);
                }
                // Queued while the lock keeps the transmit thread from
                // sending them ahead of what just went out.
                self.enqueue(frames);
                return;
            }
        }
        self.enqueue(frames);
    }

    /// Control first, as the transmit thread does, and never waiting (the
    /// core must not block): removes from `frames` what went out.
    fn send_direct(&self, link: &mut dyn TxLink, frames: &mut Vec<(bool, Frame)>) {
        frames.sort_by_key(|(is_control, _)| !*is_control);
        let refs: Vec<&[u8]> = frames.iter().map(|(_, f)| &**f).collect();
        let sent = match link.try_send_frames(&refs) {
            Ok(k) => {
                self.shared.count_sent(&refs[..k]);
                self.shared
                    .msl_tx_direct
                    .fetch_add(k as u64, Ordering::Relaxed);
                k
            }
            Err(_) => {
                self.shared.count_lost(refs.len());
                refs.len()
            }
        };
        drop(refs);
        for (_, f) in frames.drain(..sent) {
            self.pool.give(f);
        }
    }

    fn enqueue(&self, frames: &mut Vec<(bool, Frame)>) {
        for f in frames.drain(..) {
            self.queued.fetch_add(1, Ordering::AcqRel);
            if let Err(e) = self.queue.try_send(f) {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                self.shared.msl_tx_dropped.fetch_add(1, Ordering::Relaxed);
                let (TrySendError::Full((_, f)) | TrySendError::Disconnected((_, f))) = e;
                self.pool.give(f);
            }
        }
    }
}

/// Frames the transmit queue holds.
const TX_QUEUE_FRAMES: usize = 4096;

/// Start the MSL transmit thread: control frames first, then data.
/// `max_frame` is the largest frame the link takes (the encoder's).
pub fn start_msl_tx(
    link: Box<dyn TxLink>,
    shared: Arc<Shared>,
    max_frame: usize,
) -> (MslTx, JoinHandle<()>) {
    let (tx, rx) = sync_channel::<(bool, Frame)>(TX_QUEUE_FRAMES);
    let pool = FramePool::new(max_frame, TX_QUEUE_FRAMES / 2);
    let link = Arc::new(Mutex::new(link));
    let queued = Arc::new(AtomicUsize::new(0));
    let handle = MslTx {
        queue: tx,
        link: link.clone(),
        queued: queued.clone(),
        shared: shared.clone(),
        pool: pool.clone(),
    };
    let h = named_thread("msl-tx", move || {
        let mut control = VecDeque::new();
        let mut data = VecDeque::new();
        loop {
            let first = match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(f) => f,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = lock_link(&link).flush();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut l = lock_link(&link);
            let mut taken = 0;
            for (is_control, f) in
                std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok()))
            {
                taken += 1;
                if is_control {
                    control.push_back(f)
                } else {
                    data.push_back(f)
                }
            }
            // Control traffic never waits behind data.
            send_batches(&mut **l, &shared, &pool, [&mut control, &mut data]);
            queued.fetch_sub(taken, Ordering::AcqRel);
        }
    });
    (handle, h)
}

/// How often the receive thread reads the socket's drop statistics (a
/// system call).
const RX_STATS_EVERY: Duration = Duration::from_millis(100);

/// Start the MSL receive thread: Ethernet + frame checks, reassembly, then
/// into the driver's input channel. Frames that fail a check are counted and
/// dropped, never applied.
pub fn start_msl_rx(
    mut link: Box<dyn RxLink>,
    cluster_id: u64,
    key: Option<Key>,
    max_message: usize,
    out: Inbox,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
) -> JoinHandle<()> {
    named_thread("msl-rx", move || {
        let mut reasm = Reassembler::new(16, max_message);
        let expect = wire::Expect {
            cluster_id,
            key: key.as_ref(),
        };
        let mut batch: Vec<Input> = Vec::new();
        let mut stats_at = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            if stats_at.elapsed() >= RX_STATS_EVERY {
                stats_at = Instant::now();
                shared
                    .msl_rx_ring_dropped
                    .store(link.stats().kernel_dropped, Ordering::Relaxed);
            }
            let r = link.recv(
                msl_transport::MAX_BATCH,
                Duration::from_millis(20),
                &mut |bytes| {
                    shared.msl_rx_frames.fetch_add(1, Ordering::Relaxed);
                    shared
                        .msl_rx_bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    let Ok((_, body)) = wire::parse_eth(bytes) else {
                        shared.msl_rx_dropped.fetch_add(1, Ordering::Relaxed);
                        return;
                    };
                    match wire::parse(body, &expect) {
                        Ok(p) if p.is_fragment() => match reasm.push(&p) {
                            Ok(Some((header, msg, payload))) => batch.push(Input::Msl {
                                header,
                                msg,
                                payload: (!payload.is_empty()).then(|| Block::from(payload)),
                            }),
                            Ok(None) => {}
                            Err(_) => {
                                shared.msl_rx_dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        },
                        Ok(p) => batch.push(Input::Msl {
                            header: p.header,
                            msg: p.msg,
                            payload: (!p.payload.is_empty()).then(|| Block::from(p.payload)),
                        }),
                        Err(wire::ParseError::UnknownType {
                            code,
                            must_understand,
                        }) => batch.push(Input::MslUnknown {
                            code,
                            must_understand,
                        }),
                        Err(e) => {
                            if is_auth_error(&e) {
                                shared.msl_rx_bad_auth.fetch_add(1, Ordering::Relaxed);
                            }
                            shared.msl_rx_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                },
            );
            if r.is_err() {
                std::thread::sleep(Duration::from_millis(10));
            }
            // The whole batch in, then the core runs once for it (on
            // this thread if it is free).
            let queued = !batch.is_empty();
            for i in batch.drain(..) {
                if out.push(i).is_err() {
                    return;
                }
            }
            if queued {
                out.kick();
            }
        }
    })
}

/// The driver itself.
pub struct Driver<H: Host> {
    node: Node<Block>,
    volume: Arc<Volume>,
    store: MetaStore,
    encoder: FrameEncoder,
    msl_tx: MslTx,
    /// Frames encoded and not yet handed to the link or the transmit
    /// thread (see `MslTx::send`).
    out: Vec<(bool, Frame)>,
    lan: Option<LanPath>,
    notifier: Notifier,
    host: H,
    shared: Arc<Shared>,
    /// Waiting client requests: where the answer goes, and the bytes a
    /// successful write adds to `client_bytes_written`.
    replies: HashMap<u64, (ReplyTo, u64)>,
    next_req: u64,
    epoch: Instant,
    node_id: u16,
    frames: Vec<Frame>,
    house: Housekeeping,
    /// The newest ACK the core emitted while more input was queued: acks
    /// are cumulative, so one per burst of input replaces one per frame
    /// (a resync block caused two: on receipt and once written).
    held_ack: Option<(Header, Message)>,
    /// Flushes (fdatasync) run here, off the core thread, when set: a slow
    /// fdatasync on a busy disk then delays only what waits for it, not
    /// heartbeats and acks (a 400 ms stall made the peer declare us dead).
    flusher: Option<SyncSender<u64>>,
    /// Events caused while handling one (local I/O completions).
    internal: VecDeque<Event<Block>>,
    /// Why the core stopped, once it has (whichever thread saw it).
    exit: Option<Exit>,
    /// The first tick has run.
    started: bool,
}

/// Inputs handled back to back before a held ACK goes out regardless.
const ACK_BATCH: usize = 64;

/// Once-a-second bookkeeping on the core thread: the resync rate and the
/// rate-limited "wrong cluster key" notice.
struct Housekeeping {
    next: Instant,
    /// Last resync sample: when, blocks remaining.
    resync_sample: Option<(Instant, u64)>,
    /// Authentication failures already reported, and when.
    bad_auth_reported: u64,
    bad_auth_last: Option<Instant>,
}

/// At most one "bad_auth" notice per this long (each carries the count).
pub const BAD_AUTH_NOTICE_INTERVAL: Duration = Duration::from_secs(10);

impl<H: Host> Driver<H> {
    /// Build a driver from loaded metadata.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Config,
        meta: Meta,
        store: MetaStore,
        volume: Arc<Volume>,
        encoder: FrameEncoder,
        msl_tx: MslTx,
        lan: Option<LanPath>,
        notifier: Notifier,
        host: H,
        shared: Arc<Shared>,
        seed: u64,
    ) -> Self {
        let node_id = cfg.node_id;
        if msl_tx.pool.frame_size() != encoder.max_frame {
            eprintln!(
                "msld: frame buffers of {} bytes for frames of up to {}: every frame will be \
                 allocated (start_msl_tx and FrameEncoder disagree)",
                msl_tx.pool.frame_size(),
                encoder.max_frame
            );
        }
        let epoch = Instant::now();
        let node = Node::new(cfg, meta, seed, 0);
        Driver {
            node,
            volume,
            store,
            encoder,
            msl_tx,
            out: Vec::new(),
            lan,
            notifier,
            host,
            shared,
            replies: HashMap::new(),
            next_req: 1,
            epoch,
            node_id,
            frames: Vec::new(),
            held_ack: None,
            flusher: None,
            internal: VecDeque::new(),
            exit: None,
            started: false,
            house: Housekeeping {
                next: epoch,
                resync_sample: None,
                bad_auth_reported: 0,
                bad_auth_last: None,
            },
        }
    }

    /// Run volume flushes on their own thread; completions come back as
    /// `Input::IoDone` through `inputs` (the core's own input queue). The
    /// core issues a flush only after the writes it must cover completed,
    /// so a flush running beside later writes covers what it promises.
    pub fn flush_off_thread(mut self, inputs: Inbox) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<u64>(1024);
        let volume = self.volume.clone();
        std::thread::Builder::new()
            .name("msld-flush".into())
            .spawn(move || {
                for io in rx {
                    let ok = volume.flush().is_ok();
                    if inputs.send(Input::IoDone { io, ok }).is_err() {
                        return;
                    }
                }
            })?;
        self.flusher = Some(tx);
        Ok(self)
    }

    /// Authentication failures on the MSL and on the LAN path so far.
    fn auth_failures(&self) -> (u64, u64) {
        let msl = self.shared.msl_rx_bad_auth.load(Ordering::Relaxed);
        let lan = self
            .lan
            .as_ref()
            .and_then(|l| l.counters.rx.lock().ok().map(|r| lan_auth_failures(&r)))
            .unwrap_or(0);
        (msl, lan)
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        if now < self.house.next {
            return;
        }
        self.house.next = now + Duration::from_secs(1);
        // Resync rate: blocks done since the last sample, smoothed.
        let st = self.node.status();
        let bs = u64::from(self.node.config().block_size);
        if st.resync_total > 0 {
            if let Some((t, left)) = self.house.resync_sample {
                let dt = now.duration_since(t).as_secs_f64();
                let done = left.saturating_sub(st.resync_remaining) * bs;
                if dt > 0.0 {
                    let inst = done as f64 / dt;
                    let old = self.shared.resync_rate_bytes_s.load(Ordering::Relaxed) as f64;
                    let rate = if old == 0.0 {
                        inst
                    } else {
                        0.5 * old + 0.5 * inst
                    };
                    self.shared
                        .resync_rate_bytes_s
                        .store(rate as u64, Ordering::Relaxed);
                }
            }
            self.house.resync_sample = Some((now, st.resync_remaining));
        } else {
            self.house.resync_sample = None;
            self.shared.resync_rate_bytes_s.store(0, Ordering::Relaxed);
        }
        // Wrong cluster key: one notice, then at most one per interval.
        let (msl, lan) = self.auth_failures();
        let total = msl + lan;
        let due = self
            .house
            .bad_auth_last
            .is_none_or(|t| now.duration_since(t) >= BAD_AUTH_NOTICE_INTERVAL);
        if total > self.house.bad_auth_reported && due {
            self.house.bad_auth_reported = total;
            self.house.bad_auth_last = Some(now);
            self.notifier.notify(EventRecord::now(
                self.node_id,
                "bad_auth",
                format!(
                    "{total} frames failed authentication so far (MSL {msl}, LAN {lan}): \
                     the peer signs with a different cluster key; check that key_file \
                     holds the same key on both nodes. Those frames are dropped: \
                     the nodes will not pair."
                ),
            ));
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Run until stopped; returns why. This thread becomes the core
    /// thread; threads that send inputs run the core too when it is free
    /// (see `inbox`).
    pub fn run(self, inputs: InboxRx) -> Exit
    where
        H: 'static,
    {
        inputs.run(Box::new(self))
    }

    /// The core's event for an input (`None`: handled here already).
    fn event_for(&mut self, input: Input) -> Result<Option<Event<Block>>, Exit> {
        Ok(Some(match input {
            Input::Stop => return Err(Exit::Stopped),
            Input::IoDone { io, ok } => Event::IoDone { io, ok },
            Input::Status(tx) => {
                let _ = tx.send(self.node.status());
                return Ok(None);
            }
            Input::Msl {
                header,
                msg,
                payload,
            } => Event::MslFrame {
                header,
                msg,
                payload,
            },
            Input::MslUnknown {
                code,
                must_understand,
            } => Event::MslUnknownType {
                code,
                must_understand,
            },
            Input::Lan(p) => Event::LanFrame {
                adapter: p.adapter,
                header: p.header,
                hb: p.hb,
            },
            Input::LanAdapter { adapter, up } => Event::LanAdapter {
                adapter,
                link_up: up,
                carrier: up,
            },
            Input::MslLink { up } => Event::MslLink { up },
            Input::Admin(cmd) => Event::Admin(cmd),
            Input::Write {
                block,
                count,
                kind,
                fua,
                payload,
                reply,
            } => {
                let req = self.next_req;
                self.next_req += 1;
                let bytes = match kind {
                    IoKind::Write => count * u64::from(self.node.config().block_size),
                    _ => 0,
                };
                self.replies.insert(req, (reply, bytes));
                Event::ClientWrite {
                    req,
                    block,
                    count,
                    kind,
                    fua,
                    payload,
                }
            }
            Input::Flush { reply } => {
                let req = self.next_req;
                self.next_req += 1;
                self.replies.insert(req, (ReplyTo::Wait(reply), 0));
                Event::ClientFlush { req }
            }
        }))
    }

    /// Feed one event, then everything it causes (local I/O completions).
    fn step(&mut self, ev: Event<Block>, internal: &mut VecDeque<Event<Block>>) -> Option<Exit> {
        internal.push_back(ev);
        let mut exit = None;
        while let Some(ev) = internal.pop_front() {
            let now = self.now();
            self.node.handle(now, ev);
            while let Some(a) = self.node.poll_action() {
                if let Some(e) = self.execute(a, internal) {
                    exit = Some(e);
                }
            }
        }
        self.shared
            .serving
            .store(self.node.serving(), Ordering::Relaxed);
        self.shared
            .in_sync
            .store(self.node.in_sync(), Ordering::Relaxed);
        self.housekeeping();
        exit
    }

    /// Send the held ACK (the newest: it covers every earlier one).
    fn send_held_ack(&mut self) {
        if let Some((header, msg)) = self.held_ack.take() {
            self.send_msl(&header, &msg, &[]);
        }
    }

    /// Encode one MSL message into frames and queue them for the link.
    fn send_msl(&mut self, header: &Header, msg: &Message, payload: &[u8]) {
        self.frames.clear();
        if self.encoder.encode_counted(
            header,
            msg,
            payload,
            &self.msl_tx.pool,
            &mut self.frames,
            &self.shared,
        ) {
            let control = msg.is_control();
            self.out.extend(self.frames.drain(..).map(|f| (control, f)));
        }
    }

    fn execute(&mut self, a: Action<Block>, internal: &mut VecDeque<Event<Block>>) -> Option<Exit> {
        let bs = u64::from(self.node.config().block_size);
        match a {
            Action::SendMsl {
                header,
                msg: msg @ Message::Ack(_),
                ..
            } => self.held_ack = Some((header, msg)),
            Action::SendMsl {
                header,
                msg,
                payload,
            } => self.send_msl(&header, &msg, payload.as_deref().unwrap_or(&[])),
            Action::SendLan { header, hb } => {
                if let Some(lan) = &self.lan {
                    lan.send(&header, &hb);
                }
            }
            Action::Write {
                io,
                block,
                count,
                kind,
                fua,
                payload,
            } => {
                // The core emits a write's mirror message first: send it
                // before the local write so the peer's half overlaps it.
                self.msl_tx.send(&mut self.out, SendMode::Direct);
                let (off, len) = (block * bs, count * bs);
                let ok = match (kind, &payload) {
                    (IoKind::Write, Some(p)) if p.len() as u64 == len => {
                        self.volume.write_at(p, off, fua).is_ok()
                    }
                    // A write whose payload does not cover it is refused
                    // (counted by the core as an I/O failure).
                    (IoKind::Write, _) => false,
                    (IoKind::Trim, _) => self.volume.trim(off, len).is_ok(),
                    (IoKind::Zeroes, _) => self.volume.write_zeroes(off, len).is_ok(),
                };
                internal.push_back(Event::IoDone { io, ok });
            }
            Action::Read { io, block, count } => {
                let r = self.volume.read_vec(block * bs, (count * bs) as usize);
                internal.push_back(Event::ReadDone {
                    io,
                    ok: r.is_ok(),
                    payload: r.ok().map(Block::from),
                });
            }
            Action::Flush { io } => {
                let queued = self
                    .flusher
                    .as_ref()
                    .is_some_and(|f| f.try_send(io).is_ok());
                if !queued {
                    let r = self.volume.flush();
                    internal.push_back(Event::IoDone { io, ok: r.is_ok() });
                }
            }
            Action::PersistMeta(m) => {
                if self.store.persist(&m).is_err() {
                    // Drop the rest of this batch: nothing after a failed
                    // metadata write may happen.
                    while self.node.poll_action().is_some() {}
                    internal.push_back(Event::MetaFailed);
                }
            }
            Action::Reply { req, result } => {
                if let Some((to, bytes)) = self.replies.remove(&req) {
                    if result.is_ok() && bytes > 0 {
                        self.shared
                            .client_bytes_written
                            .fetch_add(bytes, Ordering::Relaxed);
                    }
                    to.send(result);
                }
            }
            Action::Notify(n) => self.notifier.notify(EventRecord::new(self.node_id, &n)),
            Action::ServiceAddress { hold } => self.host.service_address(hold),
            Action::Restart => return Some(Exit::Restart),
        }
        None
    }

    fn finish_core(&mut self, exit: Exit) -> Exit {
        if exit == Exit::Stopped {
            let _ = self.volume.flush();
            self.node.shutdown();
            let mut internal = VecDeque::new();
            while let Some(a) = self.node.poll_action() {
                let _ = self.execute(a, &mut internal);
            }
        }
        // Whatever the core said last (a restart's handover) goes out.
        self.send_held_ack();
        self.msl_tx.send(&mut self.out, SendMode::Queue);
        for (_, (to, _)) in self.replies.drain() {
            to.send(Err(ClientError::NotPrimary));
        }
        exit
    }
}

impl<H: Host> Runner for Driver<H> {
    /// Queued inputs are handled back to back (frames produced meanwhile
    /// go to the transmit thread); the newest ACK goes out once the queue
    /// is empty or after `ACK_BATCH` inputs, and what is left to send goes
    /// from this thread (`SendMode::Direct`) before it returns.
    fn drain(&mut self, rx: &Receiver<Input>, budget: usize) -> Drained {
        let mut internal = std::mem::take(&mut self.internal);
        // Once stopped, stopped for every thread (the core thread finishes).
        let mut exit = self.exit;
        // A tick on the first run (the core's first hello and heartbeat),
        // then whenever a deadline has passed.
        if exit.is_none() && (!self.started || self.now() >= self.node.poll_timeout()) {
            self.started = true;
            exit = self.step(Event::Tick, &mut internal);
        }
        let mut handled = 0;
        while exit.is_none() && handled < budget {
            let input = match rx.try_recv() {
                Ok(i) => i,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    exit = Some(Exit::Stopped);
                    break;
                }
            };
            if handled > 0 {
                // More to do: the transmit thread sends meanwhile.
                self.msl_tx.send(&mut self.out, SendMode::Queue);
                if handled % ACK_BATCH == 0 {
                    self.send_held_ack();
                }
            }
            handled += 1;
            match self.event_for(input) {
                Ok(Some(ev)) => exit = self.step(ev, &mut internal),
                Ok(None) => {}
                Err(e) => exit = Some(e),
            }
        }
        self.internal = internal;
        self.exit = exit;
        if exit.is_none() {
            self.send_held_ack();
            // About to go back to other work or to wait: send from here.
            self.msl_tx.send(&mut self.out, SendMode::Direct);
        }
        Drained {
            handled,
            deadline_us: self.node.poll_timeout(),
            exit,
        }
    }

    fn finish(&mut self, exit: Exit) -> Exit {
        self.finish_core(exit)
    }

    fn now_us(&self) -> u64 {
        self.now()
    }
}

/// A handle for front ends (NBD): submit writes and flushes, wait for the
/// core's answer.
#[derive(Clone)]
pub struct Client {
    pub inputs: Inbox,
    pub shared: Arc<Shared>,
    pub block_size: u64,
}

impl Client {
    /// Write whole blocks (offset and length multiples of the block size).
    pub fn write_blocks(&self, offset: u64, data: &[u8], fua: bool) -> Reply {
        self.submit(offset, data.len() as u64, IoKind::Write, fua, Some(data))
    }

    /// Submit a block-aligned write, trim or write-zeroes and wait for the
    /// core's answer.
    pub fn submit(
        &self,
        offset: u64,
        len: u64,
        kind: IoKind,
        fua: bool,
        data: Option<&[u8]>,
    ) -> Reply {
        let (tx, rx) = sync_channel(1);
        let payload = data.map(Block::from);
        self.send_write(offset, len, kind, fua, payload, ReplyTo::Wait(tx))?;
        rx.recv().unwrap_or(Err(ClientError::NotPrimary))
    }

    /// Submit a block-aligned write without waiting: `done` runs on the
    /// thread that runs the core when the outcome is known (it must not
    /// block).
    pub fn submit_async(
        &self,
        offset: u64,
        len: u64,
        fua: bool,
        data: Block,
        done: Box<dyn FnOnce(Reply) + Send>,
    ) -> Result<(), ClientError> {
        self.send_write(
            offset,
            len,
            IoKind::Write,
            fua,
            Some(data),
            ReplyTo::Call(done),
        )
    }

    fn send_write(
        &self,
        offset: u64,
        len: u64,
        kind: IoKind,
        fua: bool,
        payload: Option<Block>,
        reply: ReplyTo,
    ) -> Result<(), ClientError> {
        let input = Input::Write {
            block: offset / self.block_size,
            count: len / self.block_size,
            kind,
            fua,
            payload,
            reply,
        };
        self.inputs.send(input).map_err(|_| ClientError::NotPrimary)
    }

    pub fn flush(&self) -> Reply {
        let (tx, rx) = sync_channel(1);
        self.inputs
            .send(Input::Flush { reply: tx })
            .map_err(|_| ClientError::NotPrimary)?;
        rx.recv().unwrap_or(Err(ClientError::NotPrimary))
    }

    pub fn status(&self) -> Option<Status> {
        let (tx, rx) = sync_channel(1);
        self.inputs.send(Input::Status(tx)).ok()?;
        rx.recv_timeout(Duration::from_secs(2)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(seq: u64) -> Header {
        Header {
            cluster_id: 7,
            sender: 1,
            generation: 3,
            seq,
            ack: 0,
            flags: 0,
            frag_index: 0,
            frag_count: 1,
        }
    }

    /// Decode frames back into (message, payload) as the receive thread does.
    fn decode(frames: &[Frame], key: &Key) -> (Message, Vec<u8>) {
        let mut reasm = Reassembler::new(4, 1 << 20);
        let expect = wire::Expect {
            cluster_id: 7,
            key: Some(key),
        };
        for f in frames {
            let (_, body) = wire::parse_eth(f).unwrap();
            let p = wire::parse(body, &expect).unwrap();
            if !p.is_fragment() {
                return (p.msg, p.payload.to_vec());
            }
            if let Some((_, msg, payload)) = reasm.push(&p).unwrap() {
                return (msg, payload.to_vec());
            }
        }
        panic!("message incomplete");
    }

    /// Sent frames' buffers come back to the pool and are used again with
    /// no stale bytes: a fragmented data message, then a short control one
    /// in the same (reused) buffers, both decode and authenticate.
    fn encoder(key: Option<Key>, max_frame: usize) -> FrameEncoder {
        FrameEncoder {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [0xff; 6],
            key,
            max_frame,
        }
    }

    fn data_msg(write_id: u64, offset: u64, payload: &[u8]) -> Message {
        Message::Data(wire::Data {
            write_id,
            offset,
            len: payload.len() as u32,
            flags: 0,
        })
    }

    #[test]
    fn test_frame_buffers_are_reused_and_frames_stay_exact() {
        let key = Key([5; 32]);
        let enc = encoder(Some(key.clone()), 9014);
        let pool = FramePool::new(9014, 8);
        let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let data = data_msg(9, 4096, &payload);
        let mut frames = Vec::new();
        enc.encode(&header(1), &data, &payload, &pool, &mut frames)
            .unwrap();
        assert_eq!(frames.len(), 3, "20000 bytes at MTU 9000");
        let (msg, got) = decode(&frames, &key);
        assert!(matches!(msg, Message::Data(d) if d.write_id == 9));
        assert_eq!(got, payload);
        let used: Vec<*const u8> = frames.iter().map(|f| f.buf.as_ptr()).collect();
        for f in frames.drain(..) {
            pool.give(f);
        }
        assert_eq!(pool.available(), 3);
        // A short message in a reused buffer: exact length, decodes.
        let ack = Message::Ack(wire::Ack::default());
        enc.encode(&header(0), &ack, &[], &pool, &mut frames)
            .unwrap();
        assert_eq!(frames.len(), 1);
        assert!(used.contains(&frames[0].buf.as_ptr()), "not reused");
        assert!(frames[0].len() < 200, "{} bytes", frames[0].len());
        let (msg, got) = decode(&frames, &key);
        assert!(matches!(msg, Message::Ack(_)));
        assert!(got.is_empty());
        // Buffers of another size are not kept.
        pool.give(Frame {
            buf: vec![0; 100],
            len: 10,
        });
        assert_eq!(pool.available(), 2);
    }

    /// A message the link's frames cannot carry is counted, not sent, and
    /// leaves no buffer behind.
    #[test]
    fn test_unencodable_message_is_counted_and_sends_nothing() {
        let enc = encoder(None, 200);
        let pool = FramePool::new(200, 8);
        let shared = Shared::default();
        let payload = vec![7u8; 1 << 20];
        let data = data_msg(1, 0, &payload);
        let mut frames = Vec::new();
        assert!(!enc.encode_counted(&header(1), &data, &payload, &pool, &mut frames, &shared));
        assert!(frames.is_empty());
        assert_eq!(shared.msl_tx_encode_errors.load(Ordering::Relaxed), 1);
        let ack = Message::Ack(wire::Ack::default());
        assert!(enc.encode_counted(&header(0), &ack, &[], &pool, &mut frames, &shared));
        assert_eq!(frames.len(), 1);
        assert_eq!(shared.msl_tx_encode_errors.load(Ordering::Relaxed), 1);
    }

    /// Frames the link dropped before the receive thread read them (here:
    /// a full in-memory wire) show in `msl_rx_ring_dropped`; the frames
    /// that did arrive are counted as received.
    #[test]
    fn test_receive_thread_exports_the_links_own_drops() {
        use msl_transport::link::TxLink;
        let (mut tx, rx) = msl_transport::mem::channel(4, 1514);
        let frames: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 60]).collect();
        let refs: Vec<&[u8]> = frames.iter().map(|f| &f[..]).collect();
        tx.send_frames(&refs).unwrap();
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (inbox, _inbox_rx) = crate::inbox::inbox(64);
        let h = start_msl_rx(
            Box::new(rx),
            1,
            None,
            1 << 20,
            inbox,
            stop.clone(),
            shared.clone(),
        );
        let t = Instant::now();
        while shared.msl_rx_ring_dropped.load(Ordering::Relaxed) != 6
            && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
        assert_eq!(shared.msl_rx_ring_dropped.load(Ordering::Relaxed), 6);
        assert_eq!(shared.msl_rx_frames.load(Ordering::Relaxed), 4);
    }
}
