//! Test-only fault layer: wraps a transmit half and, from a seed, drops,
//! duplicates, reorders and corrupts frames (this kernel has no netem).
//!
//! Like smoltcp's `phy::FaultInjector`: the faults are decided by a seeded
//! generator, so a failing run is replayed with the same seed. Buffers are
//! allocated once, at construction.

use std::io;

use crate::link::{TxLink, TxStats, MAX_BATCH};

/// Fault rates in parts per million of frames.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultConfig {
    pub seed: u64,
    pub drop_ppm: u32,
    pub duplicate_ppm: u32,
    pub reorder_ppm: u32,
    pub corrupt_ppm: u32,
    /// A reordered frame is held back for 1..=`reorder_depth` later frames.
    pub reorder_depth: u32,
}

impl FaultConfig {
    pub fn is_active(&self) -> bool {
        self.drop_ppm + self.duplicate_ppm + self.reorder_ppm + self.corrupt_ppm > 0
    }
}

/// splitmix64: small, seedable, good enough for fault decisions.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
    fn hit(&mut self, ppm: u32) -> bool {
        ppm > 0 && self.below(1_000_000) < u64::from(ppm)
    }
}

const MAX_HELD: usize = 16;

#[derive(Clone, Copy)]
enum Src {
    Fresh(usize),
    Held(usize),
}

/// A transmit half with injected faults.
pub struct FaultTx<T: TxLink> {
    inner: T,
    cfg: FaultConfig,
    rng: Rng,
    fresh: Vec<Vec<u8>>,
    fresh_len: [usize; MAX_BATCH],
    held: Vec<Vec<u8>>,
    held_len: [usize; MAX_HELD],
    /// Frames still to pass before a held frame goes out; 0 = slot free.
    held_wait: [u32; MAX_HELD],
    out: Vec<Src>,
    stats: TxStats,
}

impl<T: TxLink> FaultTx<T> {
    pub fn new(inner: T, cfg: FaultConfig) -> FaultTx<T> {
        let m = inner.max_frame_len();
        FaultTx {
            inner,
            cfg,
            rng: Rng::new(cfg.seed),
            fresh: (0..MAX_BATCH).map(|_| vec![0u8; m]).collect(),
            fresh_len: [0; MAX_BATCH],
            held: (0..MAX_HELD).map(|_| vec![0u8; m]).collect(),
            held_len: [0; MAX_HELD],
            held_wait: [0; MAX_HELD],
            out: Vec::with_capacity(3 * MAX_BATCH + MAX_HELD),
            stats: TxStats::default(),
        }
    }

    fn push_out(&mut self) -> io::Result<()> {
        let mut done = 0usize;
        while done < self.out.len() {
            let (out, fresh, fresh_len, held, held_len) = (
                &self.out,
                &self.fresh,
                &self.fresh_len,
                &self.held,
                &self.held_len,
            );
            let k = self.inner.send_with(out.len() - done, &mut |i, buf| {
                let (src, len) = match *out.get(done + i)? {
                    Src::Fresh(j) => (&fresh[j], fresh_len[j]),
                    Src::Held(j) => (&held[j], held_len[j]),
                };
                buf[..len].copy_from_slice(&src[..len]);
                Some(len)
            })?;
            if k == 0 {
                std::thread::yield_now();
            }
            done += k;
        }
        self.out.clear();
        Ok(())
    }

    /// Age held frames by `passed` frames; queue those that are due.
    fn age_held(&mut self, passed: u32, release_all: bool) {
        for j in 0..MAX_HELD {
            if self.held_wait[j] == 0 {
                continue;
            }
            if release_all || self.held_wait[j] <= passed {
                self.held_wait[j] = 0;
                self.out.push(Src::Held(j));
            } else {
                self.held_wait[j] -= passed;
            }
        }
    }
}

impl<T: TxLink> TxLink for FaultTx<T> {
    fn max_frame_len(&self) -> usize {
        self.inner.max_frame_len()
    }

    fn send_with(
        &mut self,
        max: usize,
        emit: &mut dyn FnMut(usize, &mut [u8]) -> Option<usize>,
    ) -> io::Result<usize> {
        let mut n = 0usize;
        while n < max.min(MAX_BATCH) {
            match emit(n, &mut self.fresh[n]) {
                Some(len) => {
                    self.fresh_len[n] = len;
                    n += 1;
                }
                None => break,
            }
        }
        for i in 0..n {
            let len = self.fresh_len[i];
            if self.rng.hit(self.cfg.drop_ppm) {
                self.stats.fault_dropped += 1;
                continue;
            }
            if self.rng.hit(self.cfg.corrupt_ppm) && len > 14 {
                // Flip one bit after the Ethernet header.
                let at = 14 + self.rng.below((len - 14) as u64) as usize;
                self.fresh[i][at] ^= 1 << self.rng.below(8);
                self.stats.fault_corrupted += 1;
            }
            if self.rng.hit(self.cfg.reorder_ppm) {
                if let Some(j) = self.held_wait.iter().position(|&w| w == 0) {
                    self.held[j][..len].copy_from_slice(&self.fresh[i][..len]);
                    self.held_len[j] = len;
                    self.held_wait[j] =
                        1 + self.rng.below(u64::from(self.cfg.reorder_depth.max(1))) as u32;
                    self.stats.fault_reordered += 1;
                    continue;
                }
            }
            self.out.push(Src::Fresh(i));
            if self.rng.hit(self.cfg.duplicate_ppm) {
                self.out.push(Src::Fresh(i));
                self.stats.fault_duplicated += 1;
            }
        }
        let passed = self.out.len() as u32;
        self.age_held(passed, false);
        self.stats.frames += self.out.len() as u64;
        self.push_out()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.age_held(0, true);
        self.stats.frames += self.out.len() as u64;
        self.push_out()?;
        self.inner.flush()
    }

    fn stats(&self) -> TxStats {
        let i = self.inner.stats();
        TxStats {
            frames: i.frames,
            ..self.stats
        }
    }
}
