//! The MSL threads: frames out (an encoder into pooled buffers, a transmit
//! thread fed by a queue, control ahead of data, and direct sends from the
//! thread running the core when the link is free) and frames in (a receive
//! thread: Ethernet and frame checks, reassembly, then into the core's
//! inbox).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use msl_transport::{RxLink, TxLink};
use msl_wire::{self as wire, Header, Key, Message, Reassembler};

use crate::counters::Shared;
use crate::inbox::Inbox;
use crate::input::{Block, Input};

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
                    tracing::error!(
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
pub(crate) enum SendMode {
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
    pub(crate) fn send(&self, frames: &mut Vec<(bool, Frame)>, mode: SendMode) {
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
            // When this batch came off the link: taken here, on the
            // receive thread, so a core that runs late still sees when
            // the peer was last heard.
            let mut taken: Option<Instant> = None;
            let r = link.recv(
                msl_transport::MAX_BATCH,
                Duration::from_millis(20),
                &mut |bytes| {
                    let arrived = *taken.get_or_insert_with(Instant::now);
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
                                arrived,
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
                            arrived,
                        }),
                        Err(wire::ParseError::UnknownType {
                            code,
                            must_understand,
                        }) => batch.push(Input::MslUnknown {
                            code,
                            must_understand,
                        }),
                        Err(e) => {
                            warn_other_version("MSL", &e);
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

/// A frame of another wire version means the peer runs another release:
/// the error says which side to upgrade. Logged at most once a minute
/// (`rx_bad_version` counts every one).
pub(crate) fn warn_other_version(path: &str, e: &msl_wire::ParseError) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    if !matches!(e, msl_wire::ParseError::BadVersion(_)) {
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    if (last == 0 || now >= last + 60)
        && LAST
            .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!("{path}: {e}");
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
