//! The MSL workers of the daemon: `msl_transport::worker`'s (the same
//! ones `msl-bench link` measures) wired to the daemon's counters and the
//! core's inbox. Frames out: an encoder into a frame pool fixed at start,
//! a transmit worker fed by lock-free queues (control ahead of data), and
//! direct sends from the thread running the core when the link is free.
//! Frames in: a receive worker (Ethernet and frame checks, reassembly),
//! then into the core's inbox. Each worker can be pinned to a CPU
//! (`[msl] tx_cpu`, `rx_cpu`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use msl_buf::Chunks;
use msl_transport::worker::{
    start_rx, start_tx, RxEvent, RxPayload, RxSink, RxWorkerConfig, TxCounters, TxWorkerConfig,
    TxWorkerEnd,
};
pub use msl_transport::worker::{Frame, FrameEncoder, FramePool, MslTx, SendMode};
use msl_transport::{RxLink, TxLink};
use msl_wire::{self as wire, Key};

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

/// The daemon's counters of the transmit side.
impl TxCounters for Shared {
    fn sent(&self, frames: usize, bytes: usize) {
        self.count_sent(frames, bytes);
    }
    fn direct(&self, n: usize) {
        self.msl_tx_direct.fetch_add(n as u64, Ordering::Relaxed);
    }
    fn lost(&self, n: usize) {
        self.count_lost(n);
    }
    fn dropped(&self, n: usize) {
        self.msl_tx_dropped.fetch_add(n as u64, Ordering::Relaxed);
    }
    /// Counted in `msl_tx_encode_errors`, the first one also logged.
    fn encode_error(&self, payload_len: usize, error: &str) {
        if self.msl_tx_encode_errors.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::error!(
                "msld: an MSL message ({payload_len} bytes of payload) could not be encoded: \
                 {error} (counted in msl_tx_encode_errors)"
            );
        }
    }
}

/// Start the MSL transmit worker (on CPU `core` if given): control frames
/// first, then data. `max_frame` is the largest frame the link takes (the
/// encoder's).
pub fn start_msl_tx(
    link: Box<dyn TxLink>,
    shared: Arc<Shared>,
    max_frame: usize,
    core: Option<usize>,
) -> (MslTx, JoinHandle<TxWorkerEnd>) {
    start_tx(
        link,
        shared,
        TxWorkerConfig {
            core,
            ..TxWorkerConfig::new(max_frame)
        },
    )
}

/// The receive worker's deliveries into the core's inbox, one batch at a
/// time, with the daemon's counters.
pub struct InboxSink {
    out: Inbox,
    shared: Arc<Shared>,
    batch: Vec<Input>,
    /// Where payloads read in place from the receive ring are copied to:
    /// buffers cut from a few chunks reused in turn, so the steady state
    /// allocates nothing per message.
    chunks: Chunks,
}

impl InboxSink {
    /// The payload as a block the core can keep.
    fn block(&mut self, payload: RxPayload<'_>) -> Block {
        match payload {
            RxPayload::Owned(b) => Block::from(b),
            RxPayload::Ring(b) => {
                let mut buf = self.chunks.take(b.len());
                buf.extend_from_slice(b);
                Block::from(buf.freeze())
            }
        }
    }
}

impl RxSink for InboxSink {
    fn frame(&mut self, bytes: usize) {
        self.shared.msl_rx_frames.fetch_add(1, Ordering::Relaxed);
        self.shared
            .msl_rx_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn refused(&mut self, e: Option<&wire::ParseError>) {
        if let Some(e) = e {
            warn_other_version("MSL", e);
            if is_auth_error(e) {
                self.shared.msl_rx_bad_auth.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.shared.msl_rx_dropped.fetch_add(1, Ordering::Relaxed);
    }

    fn event(&mut self, e: RxEvent<'_>) {
        let input = match e {
            RxEvent::Message {
                header,
                msg,
                payload,
                arrived,
            } => Input::Msl {
                header,
                msg,
                payload: (!payload.is_empty()).then(|| self.block(payload)),
                arrived,
            },
            RxEvent::Unknown {
                code,
                must_understand,
            } => Input::MslUnknown {
                code,
                must_understand,
            },
        };
        self.batch.push(input);
    }

    /// The whole batch in, then the core runs once for it (on this thread
    /// if it is free).
    fn batch_end(&mut self) -> bool {
        let queued = !self.batch.is_empty();
        for i in self.batch.drain(..) {
            if self.out.push(i).is_err() {
                return false;
            }
        }
        if queued {
            self.out.kick();
        }
        true
    }

    fn link_dropped(&mut self, total: u64) {
        self.shared
            .msl_rx_ring_dropped
            .store(total, Ordering::Relaxed);
    }
}

/// Start the MSL receive worker (on CPU `core` if given): Ethernet + frame
/// checks, reassembly, then into the driver's input channel. Frames that
/// fail a check are counted and dropped, never applied.
#[allow(clippy::too_many_arguments)]
pub fn start_msl_rx(
    link: Box<dyn RxLink>,
    cluster_id: u64,
    key: Option<Key>,
    max_message: usize,
    out: Inbox,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    core: Option<usize>,
) -> JoinHandle<InboxSink> {
    let sink = InboxSink {
        out,
        shared,
        batch: Vec::new(),
        chunks: Chunks::for_blocks(),
    };
    let cfg = RxWorkerConfig {
        cluster_id,
        key,
        max_message,
        core,
    };
    start_rx(link, cfg, stop, sink)
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
    use std::time::{Duration, Instant};

    use super::*;

    /// Frames the link dropped before the receive worker read them (here:
    /// a full in-memory wire) show in `msl_rx_ring_dropped`; the frames
    /// that did arrive are counted as received.
    #[test]
    fn test_receive_thread_exports_the_links_own_drops() {
        use msl_transport::link::TxLink;
        let (mut tx, rx) = msl_transport::mem::channel(4, 1514);
        let frames: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 60]).collect();
        let refs: Vec<msl_transport::link::FrameRef<'_>> =
            frames.iter().map(|f| f[..].into()).collect();
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
            None,
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
        assert_eq!(
            shared.msl_rx_dropped.load(Ordering::Relaxed),
            4,
            "not MSL frames"
        );
    }

    /// The daemon's counters see what the transmit worker did: frames and
    /// bytes sent, and an unencodable message counted once.
    #[test]
    fn test_transmit_worker_counts_into_the_daemon_counters() {
        let (mtx, _mrx) = msl_transport::mem::channel(64, 1514);
        let shared = Arc::new(Shared::default());
        let (tx, h) = start_msl_tx(Box::new(mtx), shared.clone(), 1514, None);
        let enc = FrameEncoder {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [0xff; 6],
            key: None,
            max_frame: 1514,
        };
        let header = wire::Header {
            cluster_id: 7,
            sender: 1,
            generation: 3,
            seq: 0,
            ack: 0,
            flags: 0,
            frag_index: 0,
            frag_count: 1,
        };
        let ack = wire::Message::Ack(wire::Ack::default());
        let mut frames = Vec::new();
        assert!(enc.encode_counted(&header, &ack, &[], &tx.pool, &mut frames, &shared));
        let big = vec![0u8; 1 << 20];
        let data = wire::Message::Data(wire::Data {
            write_id: 1,
            offset: 0,
            len: big.len() as u32,
            flags: 0,
        });
        assert!(!enc.encode_counted(&header, &data, &big, &tx.pool, &mut frames, &shared));
        let mut out: Vec<(bool, Frame)> = frames.drain(..).map(|f| (true, f)).collect();
        tx.send(&mut out, SendMode::Queue);
        drop(tx);
        h.join().unwrap();
        assert_eq!(shared.msl_tx_frames.load(Ordering::Relaxed), 1);
        assert!(shared.msl_tx_bytes.load(Ordering::Relaxed) > 0);
        assert_eq!(shared.msl_tx_encode_errors.load(Ordering::Relaxed), 1);
    }
}
