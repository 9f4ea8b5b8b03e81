use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use msl_wire::{self as wire, Header, Key, Message};

use super::*;

/// A link that records every frame sent, holds its first send until the
/// gate opens, and takes at most `direct` frames per `try_send_frames`.
#[derive(Clone, Default)]
struct Gate {
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
    open: Arc<AtomicBool>,
    /// Sends started (a worker waiting at the gate has started one).
    entered: Arc<AtomicUsize>,
    direct: usize,
}

impl Gate {
    fn wait_entered(&self, n: usize) {
        let t = Instant::now();
        while self.entered.load(Ordering::SeqCst) < n {
            assert!(t.elapsed() < Duration::from_secs(5), "worker never sent");
            std::thread::yield_now();
        }
    }

    fn numbers(&self) -> Vec<u32> {
        self.sent
            .lock()
            .unwrap()
            .iter()
            .map(|f| number(f))
            .collect()
    }
}

impl TxLink for Gate {
    fn max_frame_len(&self) -> usize {
        64
    }
    fn send_with(
        &mut self,
        _: usize,
        _: &mut dyn FnMut(usize, &mut [u8]) -> Option<usize>,
    ) -> io::Result<usize> {
        unreachable!("the workers send encoded frames")
    }
    fn send_frames(&mut self, frames: &[FrameRef<'_>]) -> io::Result<()> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        while !self.open.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let mut s = self.sent.lock().unwrap();
        s.extend(frames.iter().map(|f| f.to_vec()));
        Ok(())
    }
    fn try_send_frames(&mut self, frames: &[FrameRef<'_>]) -> io::Result<usize> {
        let k = frames.len().min(self.direct);
        let mut s = self.sent.lock().unwrap();
        s.extend(frames[..k].iter().map(|f| f.to_vec()));
        Ok(k)
    }
}

/// Frame `i`: the number in bytes 16..20; control frames have bit 31 set.
fn frame(pool: &FramePool, i: u32) -> Frame {
    let mut buf = pool.take(20);
    buf[..20].fill(0);
    buf[16..20].copy_from_slice(&i.to_be_bytes());
    Frame {
        buf,
        head: 20,
        len: 20,
        payload: None,
    }
}

fn number(f: &[u8]) -> u32 {
    u32::from_be_bytes([f[16], f[17], f[18], f[19]])
}

const CONTROL: u32 = 1 << 31;

fn frames(pool: &FramePool, range: std::ops::Range<u32>, control: bool) -> Vec<(bool, Frame)> {
    range
        .map(|i| (control, frame(pool, if control { i | CONTROL } else { i })))
        .collect()
}

fn cfg(data_frames: usize, pool_frames: usize) -> TxWorkerConfig {
    TxWorkerConfig {
        max_frame: 64,
        data_frames,
        control_frames: 16,
        pool_frames,
        core: None,
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(5), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Control frames queued behind data go out ahead of it; each stream
/// keeps its own order.
#[test]
fn test_control_frames_overtake_queued_data() {
    let link = Gate::default();
    let count = Arc::new(TxCount::default());
    let (tx, h) = start_tx(Box::new(link.clone()), count.clone(), cfg(256, 256));
    // The worker takes data frame 0 and waits at the gate with it.
    tx.send(&mut frames(&tx.pool, 0..1, false), SendMode::Queue);
    link.wait_entered(1);
    tx.send(&mut frames(&tx.pool, 1..101, false), SendMode::Queue);
    tx.send(&mut frames(&tx.pool, 0..3, true), SendMode::Direct);
    link.open.store(true, Ordering::SeqCst);
    wait_for("all sent", || link.sent.lock().unwrap().len() == 104);
    let want: Vec<u32> = [0, CONTROL, CONTROL | 1, CONTROL | 2]
        .into_iter()
        .chain(1..101)
        .collect();
    assert_eq!(link.numbers(), want);
    drop(tx);
    h.join().unwrap();
    assert_eq!(count.frames.load(Ordering::Relaxed), 104);
    assert_eq!(count.direct.load(Ordering::Relaxed), 0, "link was busy");
}

/// With the queue full, every frame is either sent exactly once, in
/// order, or counted as dropped; all buffers come back to the pool.
#[test]
fn test_full_queue_loses_nothing_it_accepted_and_duplicates_nothing() {
    let link = Gate::default();
    let count = Arc::new(TxCount::default());
    let (tx, h) = start_tx(Box::new(link.clone()), count.clone(), cfg(16, 256));
    tx.send(&mut frames(&tx.pool, 0..1, false), SendMode::Queue);
    link.wait_entered(1);
    for i in 1..200 {
        tx.send(&mut frames(&tx.pool, i..i + 1, false), SendMode::Queue);
    }
    assert_eq!(tx.queued(), 17, "one frame at the gate, 16 queued");
    assert_eq!(count.dropped.load(Ordering::Relaxed), 199 - 16);
    link.open.store(true, Ordering::SeqCst);
    wait_for("queue drained", || tx.queued() == 0);
    // Room again: the next frames are taken.
    tx.send(&mut frames(&tx.pool, 200..210, false), SendMode::Queue);
    let pool = tx.pool.clone();
    drop(tx);
    h.join().unwrap();
    let got = link.numbers();
    let want: Vec<u32> = (0..17).chain(200..210).collect();
    assert_eq!(got, want);
    assert_eq!(
        count.frames.load(Ordering::Relaxed) + count.dropped.load(Ordering::Relaxed),
        210
    );
    assert_eq!(pool.available(), pool.capacity(), "every buffer returned");
    assert_eq!(pool.misses(), 0);
}

/// A direct send takes what the link accepts now, the rest follows
/// through the worker in order, and never overtakes queued frames.
#[test]
fn test_direct_sends_keep_order_with_the_worker() {
    let link = Gate {
        direct: 3,
        ..Gate::default()
    };
    link.open.store(true, Ordering::SeqCst);
    let count = Arc::new(TxCount::default());
    let (tx, h) = start_tx(Box::new(link.clone()), count.clone(), cfg(256, 64));
    tx.send(&mut frames(&tx.pool, 0..10, false), SendMode::Direct);
    wait_for("sent", || tx.queued() == 0);
    assert_eq!(count.direct.load(Ordering::Relaxed), 3);
    tx.send(&mut frames(&tx.pool, 10..20, false), SendMode::Direct);
    wait_for("sent", || tx.queued() == 0);
    let pool = tx.pool.clone();
    drop(tx);
    h.join().unwrap();
    assert_eq!(link.numbers(), (0..20).collect::<Vec<_>>());
    assert_eq!(count.frames.load(Ordering::Relaxed), 20);
    assert_eq!(pool.available(), pool.capacity());
}

/// Dropping the handle lets the worker send what is queued, then stop.
#[test]
fn test_worker_drains_its_queues_before_it_stops() {
    let link = Gate::default();
    let (tx, h) = start_tx(
        Box::new(link.clone()),
        Arc::new(TxCount::default()),
        cfg(256, 256),
    );
    tx.send(&mut frames(&tx.pool, 0..1, false), SendMode::Queue);
    link.wait_entered(1);
    tx.send(&mut frames(&tx.pool, 1..50, false), SendMode::Queue);
    drop(tx);
    link.open.store(true, Ordering::SeqCst);
    h.join().unwrap();
    assert_eq!(link.numbers(), (0..50).collect::<Vec<_>>());
}

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

fn encoder(key: Option<Key>, max_frame: usize) -> FrameEncoder {
    FrameEncoder {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [0xff; 6],
        key,
        max_frame,
    }
}

fn data_msg(write_id: u64, payload: &[u8]) -> Message {
    Message::Data(wire::Data {
        write_id,
        offset: 4096,
        len: payload.len() as u32,
        flags: 0,
    })
}

/// Runs a receive worker over `rx` until the frames already sent are read;
/// returns what its sink saw.
fn receive_all<S: RxSink + Send + 'static>(rx: Box<dyn RxLink>, key: Key, sink: S) -> S {
    let stop = Arc::new(AtomicBool::new(false));
    let rx = start_rx(
        rx,
        RxWorkerConfig {
            cluster_id: 7,
            key: Some(key),
            max_message: 1 << 20,
            core: None,
        },
        stop.clone(),
        sink,
    );
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    rx.join().unwrap()
}

/// Sent frames' buffers come back to the pool and are used again with no
/// stale bytes: a fragmented data message, then a short control one in
/// the same buffers; the receive worker reassembles and checks both, and
/// refuses garbage.
#[test]
fn test_encoded_frames_reuse_buffers_and_arrive_whole() {
    #[derive(Default)]
    struct Sink {
        got: Vec<(Message, Vec<u8>)>,
        frames: usize,
        refused: usize,
    }
    impl RxSink for Sink {
        fn frame(&mut self, _: usize) {
            self.frames += 1;
        }
        fn refused(&mut self, _: Option<&ParseError>) {
            self.refused += 1;
        }
        fn event(&mut self, e: RxEvent<'_>) {
            if let RxEvent::Message { msg, payload, .. } = e {
                self.got.push((msg, payload.to_vec()));
            }
        }
    }
    let key = Key([5; 32]);
    let enc = encoder(Some(key.clone()), 9014);
    let (mtx, mrx) = crate::mem::channel(64, 9014);
    let count = Arc::new(TxCount::default());
    let (tx, h) = start_tx(
        Box::new(mtx),
        count.clone(),
        TxWorkerConfig {
            pool_frames: 3,
            ..TxWorkerConfig::new(9014)
        },
    );
    let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut out = Vec::new();
    enc.encode(
        &header(1),
        &data_msg(9, &payload),
        &payload,
        &tx.pool,
        &mut out,
    )
    .unwrap();
    assert_eq!(out.len(), 3, "20000 bytes at MTU 9000");
    assert_eq!(tx.pool.available(), 0);
    let mut q: Vec<(bool, Frame)> = out.drain(..).map(|f| (false, f)).collect();
    tx.send(&mut q, SendMode::Queue);
    wait_for("buffers back", || tx.pool.available() == 3);
    let ack = Message::Ack(wire::Ack::default());
    enc.encode(&header(0), &ack, &[], &tx.pool, &mut out)
        .unwrap();
    assert!(out[0].len() < 200, "{} bytes", out[0].len());
    let mut q: Vec<(bool, Frame)> = out.drain(..).map(|f| (true, f)).collect();
    q.push((false, Frame::from_vec(vec![0xAB; 60])));
    tx.send(&mut q, SendMode::Direct);
    let pool = tx.pool.clone();
    drop(tx);
    h.join().unwrap();
    assert_eq!(pool.misses(), 0, "the pool never ran dry");
    assert_eq!(pool.available(), 3, "a buffer of another size is not kept");

    let sink = receive_all(Box::new(mrx), key, Sink::default());
    assert_eq!(sink.frames, 5);
    assert_eq!(sink.refused, 1);
    assert_eq!(sink.got.len(), 2);
    assert!(matches!(sink.got[0].0, Message::Data(d) if d.write_id == 9));
    assert_eq!(sink.got[0].1, payload);
    assert!(matches!(sink.got[1].0, Message::Ack(_)));
    assert!(sink.got[1].1.is_empty());
}

/// A message the link's frames cannot carry is counted, not sent, and
/// leaves no buffer behind.
#[test]
fn test_unencodable_message_is_counted_and_sends_nothing() {
    let enc = encoder(None, 200);
    let pool = FramePool::new(200, 8);
    let count = TxCount::default();
    let payload = vec![7u8; 1 << 20];
    let mut out = Vec::new();
    let data = data_msg(1, &payload);
    assert!(!enc.encode_counted(&header(1), &data, &payload, &pool, &mut out, &count));
    assert!(out.is_empty());
    assert_eq!(pool.available(), 8);
    assert_eq!(count.encode_errors.load(Ordering::Relaxed), 1);
    let ack = Message::Ack(wire::Ack::default());
    assert!(enc.encode_counted(&header(0), &ack, &[], &pool, &mut out, &count));
    assert_eq!(out.len(), 1);
}

/// A shared payload is not copied into the frames: they are sent from
/// its buffer (gathered), arrive whole and verified at the receiver, and
/// let go of the buffer once sent. A short one is copied.
#[test]
fn test_shared_payload_is_sent_from_its_own_buffer() {
    #[derive(Default)]
    struct Sink {
        got: Vec<Vec<u8>>,
        refused: usize,
    }
    impl RxSink for Sink {
        fn refused(&mut self, _: Option<&ParseError>) {
            self.refused += 1;
        }
        fn event(&mut self, e: RxEvent<'_>) {
            if let RxEvent::Message { payload, .. } = e {
                self.got.push(payload.to_vec());
            }
        }
    }
    let key = Key([9; 32]);
    let enc = encoder(Some(key.clone()), 9014);
    let pool = FramePool::new(9014, 8);
    let long: Vec<u8> = (0..20_000u32).map(|i| (i * 11 + 1) as u8).collect();
    let shared = Bytes::from(long.clone());
    let mut out = Vec::new();
    enc.encode(&header(1), &data_msg(3, &long), &shared, &pool, &mut out)
        .unwrap();
    assert_eq!(out.len(), 3);
    for f in &out {
        let [head, payload, tag] = f.bytes().parts();
        assert!(head.len() < 200 && tag.len() == wire::TAG_LEN);
        // The frame's payload is a window on the shared buffer itself.
        let at = payload.as_ptr() as usize - shared.as_ptr() as usize;
        assert!(at + payload.len() <= shared.len());
    }
    let short = Bytes::from(vec![5u8; GATHER_MIN - 1]);
    enc.encode(&header(2), &data_msg(4, &short), &short, &pool, &mut out)
        .unwrap();
    assert_eq!(
        out[3].bytes().parts()[1].len(),
        0,
        "a short payload is copied"
    );

    let (mut mtx, mrx) = crate::mem::channel(64, 9014);
    let refs: Vec<FrameRef<'_>> = out.iter().map(|f| f.bytes()).collect();
    mtx.send_frames(&refs).unwrap();
    drop(refs);
    for f in out.drain(..) {
        pool.give(f);
    }
    assert!(shared.is_unique(), "the frames let go of the payload");

    let sink = receive_all(Box::new(mrx), key, Sink::default());
    assert_eq!(sink.refused, 0);
    assert_eq!(sink.got, vec![long, short.to_vec()]);
}

/// Right after frames the receive worker looks again without sleeping on
/// the socket (a sleeping receiver costs the sender a wake-up per frame),
/// and once nothing came for `RX_SPIN` it waits on the link again.
#[test]
fn test_receiver_looks_again_without_sleeping_after_frames() {
    /// Hands out one frame on the first call, then none; records the
    /// timeout of every call and when it was made.
    struct Scripted {
        calls: Arc<Mutex<Vec<(Duration, Instant)>>>,
        first: bool,
    }
    impl RxLink for Scripted {
        fn recv(
            &mut self,
            _max: usize,
            timeout: Duration,
            f: &mut dyn FnMut(&[u8]),
        ) -> io::Result<usize> {
            self.calls.lock().unwrap().push((timeout, Instant::now()));
            if std::mem::take(&mut self.first) {
                f(&[0u8; 60]);
                return Ok(1);
            }
            // Stand in for the kernel's wait, shortened.
            std::thread::sleep(timeout.min(Duration::from_millis(1)));
            Ok(0)
        }
    }
    struct Nothing;
    impl RxSink for Nothing {
        fn event(&mut self, _: RxEvent<'_>) {}
    }
    let calls = Arc::new(Mutex::new(Vec::new()));
    let link = Scripted {
        calls: calls.clone(),
        first: true,
    };
    receive_all(Box::new(link), Key([1; 32]), Nothing);
    let calls = calls.lock().unwrap();
    let (_, frame_at) = calls[0];
    assert!(calls.len() > 3, "{} calls", calls.len());
    assert!(
        calls[1].0.is_zero(),
        "the call right after a frame must not sleep: {:?}",
        calls[1].0
    );
    for &(timeout, at) in &calls[1..] {
        let since = at.duration_since(frame_at);
        if since + Duration::from_micros(5) < RX_SPIN {
            assert!(
                timeout.is_zero(),
                "slept {timeout:?} {since:?} after a frame"
            );
        }
        if since > RX_SPIN + Duration::from_millis(5) {
            assert!(!timeout.is_zero(), "still spinning {since:?} after a frame");
        }
    }
}
