//! An in-memory link pair for tests without root: frames go through two
//! bounded lock-free queues (dropped when full, like a NIC ring).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;

use crate::link::{RxLink, RxStats, TxLink, TxStats, MAX_BATCH};

type Wire = Arc<ArrayQueue<Vec<u8>>>;

/// Transmit half of an in-memory link.
pub struct MemTx {
    wire: Wire,
    max_frame: usize,
    buf: Vec<u8>,
    stats: TxStats,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

/// Receive half of an in-memory link.
pub struct MemRx {
    wire: Wire,
    stats: RxStats,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

/// One direction: frames sent on the `MemTx` arrive at the `MemRx`.
/// `capacity` frames fit in flight; more are dropped and counted.
pub fn channel(capacity: usize, max_frame: usize) -> (MemTx, MemRx) {
    let wire: Wire = Arc::new(ArrayQueue::new(capacity));
    let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    (
        MemTx {
            wire: wire.clone(),
            max_frame,
            buf: vec![0u8; max_frame],
            stats: TxStats::default(),
            dropped: dropped.clone(),
        },
        MemRx {
            wire,
            stats: RxStats::default(),
            dropped,
        },
    )
}

impl TxLink for MemTx {
    fn max_frame_len(&self) -> usize {
        self.max_frame
    }

    fn send_with(
        &mut self,
        max: usize,
        emit: &mut dyn FnMut(usize, &mut [u8]) -> Option<usize>,
    ) -> io::Result<usize> {
        let mut n = 0;
        while n < max.min(MAX_BATCH) {
            let Some(len) = emit(n, &mut self.buf) else {
                break;
            };
            if self.wire.push(self.buf[..len].to_vec()).is_err() {
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            n += 1;
        }
        self.stats.frames += n as u64;
        Ok(n)
    }

    fn stats(&self) -> TxStats {
        self.stats
    }
}

impl RxLink for MemRx {
    fn recv(
        &mut self,
        max: usize,
        timeout: Duration,
        f: &mut dyn FnMut(&[u8]),
    ) -> io::Result<usize> {
        if self.wire.is_empty() && !timeout.is_zero() {
            std::thread::sleep(timeout.min(Duration::from_micros(50)));
        }
        let mut n = 0;
        while n < max {
            let Some(frame) = self.wire.pop() else { break };
            f(&frame);
            n += 1;
        }
        self.stats.frames += n as u64;
        Ok(n)
    }

    fn stats(&mut self) -> RxStats {
        self.stats.kernel_dropped = self.dropped.load(std::sync::atomic::Ordering::Relaxed);
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::{FaultConfig, FaultTx};
    use crate::stream::{check_pattern, fill_pattern, run_pair, StreamConfig, BLOCK_SIZE};

    fn drain(rx: &mut MemRx) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        rx.recv(usize::MAX, Duration::ZERO, &mut |f| out.push(f.to_vec()))
            .unwrap();
        out
    }

    fn send_numbered(tx: &mut dyn TxLink, range: std::ops::Range<u32>) {
        let mut it = range;
        loop {
            let sent = tx
                .send_with(MAX_BATCH, &mut |_, buf| {
                    let i = it.next()?;
                    buf[..20].fill(0);
                    buf[16..20].copy_from_slice(&i.to_be_bytes());
                    Some(20)
                })
                .unwrap();
            if sent == 0 {
                break;
            }
        }
        tx.flush().unwrap();
    }

    fn number(f: &[u8]) -> u32 {
        u32::from_be_bytes([f[16], f[17], f[18], f[19]])
    }

    #[test]
    fn test_pattern_detects_wrong_block_and_flip() {
        let mut b = vec![0u8; BLOCK_SIZE];
        fill_pattern(42, &mut b);
        assert!(check_pattern(42, &b));
        assert!(!check_pattern(43, &b));
        b[1000] ^= 4;
        assert!(!check_pattern(42, &b));
        assert!(!check_pattern(42, &b[..BLOCK_SIZE - 8]));
    }

    #[test]
    fn test_fault_layer_same_seed_same_faults() {
        let cfg = FaultConfig {
            seed: 99,
            drop_ppm: 100_000,
            duplicate_ppm: 50_000,
            reorder_ppm: 50_000,
            corrupt_ppm: 0,
            reorder_depth: 4,
        };
        let run = || {
            let (tx, mut rx) = channel(4096, 64);
            let mut f = FaultTx::new(tx, cfg);
            send_numbered(&mut f, 0..1000);
            (drain(&mut rx), f.stats())
        };
        let (a, sa) = run();
        let (b, sb) = run();
        assert_eq!(a, b);
        assert_eq!(sa, sb);
        // Roughly 10 % dropped, some duplicated, some out of order.
        assert!(sa.fault_dropped > 50 && sa.fault_dropped < 150, "{sa:?}");
        assert!(sa.fault_duplicated > 0 && sa.fault_reordered > 0, "{sa:?}");
        let nums: Vec<u32> = a.iter().map(|f| number(f)).collect();
        assert!(
            nums.windows(2).any(|w| w[1] < w[0]),
            "some frames reordered"
        );
        let mut uniq = nums.clone();
        uniq.sort_unstable();
        uniq.dedup();
        assert_eq!(uniq.len() as u64, 1000 - sa.fault_dropped);
    }

    #[test]
    fn test_fault_layer_inactive_passes_everything_in_order() {
        let (tx, mut rx) = channel(4096, 64);
        let mut f = FaultTx::new(tx, FaultConfig::default());
        send_numbered(&mut f, 0..500);
        let nums: Vec<u32> = drain(&mut rx).iter().map(|f| number(f)).collect();
        assert_eq!(nums, (0..500).collect::<Vec<_>>());
    }

    #[test]
    fn test_fault_layer_corrupt_flips_one_bit_after_ethernet_header() {
        let cfg = FaultConfig {
            seed: 5,
            corrupt_ppm: 1_000_000,
            ..FaultConfig::default()
        };
        let (tx, mut rx) = channel(16, 64);
        let mut f = FaultTx::new(tx, cfg);
        send_numbered(&mut f, 7..8);
        let got = drain(&mut rx);
        let mut want = vec![0u8; 20];
        want[16..20].copy_from_slice(&7u32.to_be_bytes());
        let diff: u32 = got[0]
            .iter()
            .zip(&want)
            .map(|(a, b)| (a ^ b).count_ones())
            .sum();
        assert_eq!(diff, 1);
        assert_eq!(got[0][..14], want[..14]);
    }

    /// The whole pipeline (capture, queues, workers, reliable delivery,
    /// verification) over lossy in-memory links: no root needed.
    #[test]
    fn test_stream_over_lossy_memory_link_delivers_every_block_once() {
        let fault = |seed| FaultConfig {
            seed,
            drop_ppm: 20_000,
            duplicate_ppm: 5_000,
            reorder_ppm: 10_000,
            corrupt_ppm: 2_000,
            reorder_depth: 6,
        };
        for blocks_per_frame in [1, 2] {
            let (atx, brx) = channel(512, 9014);
            let (btx, arx) = channel(512, 9014);
            let cfg = StreamConfig {
                blocks: 20_000,
                blocks_per_frame,
                reliable: msl_core::reliable::TxConfig {
                    window: 256,
                    rto_initial_us: 20_000,
                    rto_min_us: 5_000,
                    rto_max_us: 200_000,
                },
                ..StreamConfig::default()
            };
            let (s, r) = run_pair(
                (Box::new(FaultTx::new(atx, fault(1))), Box::new(arx)),
                (Box::new(FaultTx::new(btx, fault(2))), Box::new(brx)),
                &cfg,
            )
            .unwrap();
            assert!(s.complete);
            assert_eq!(s.blocks_acked, 20_000);
            assert_eq!(r.verified, 20_000);
            assert_eq!(r.bad_pattern + r.order_errors + r.bad_data, 0);
            assert!(s.retransmits > 0);
            assert!(r.malformed > 0, "corrupted frames are refused");
        }
    }
}
