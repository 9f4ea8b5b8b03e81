//! Resync as the source: read dirty blocks and send them, paced by a rate
//! cap and a floor under client load, yielding to client writes; progress
//! reaches the metadata at most once per `BITMAP_PERSIST_INTERVAL_US`.

use super::*;

/// Resync progress not yet on disk: dirty bits cleared in memory since the
/// last metadata write, and when that write was.
pub(super) struct ResyncProgress {
    /// Dirty bits cleared in memory since the last metadata write, and when
    /// that write was: resync progress is persisted at most once per
    /// `BITMAP_PERSIST_INTERVAL_US`, so a crash resumes from there.
    pub(super) unpersisted: bool,
    pub(super) persisted_us: Micros,
}

/// Largest resync message (a run of contiguous dirty blocks): fewer,
/// larger messages mean fewer reads, volume writes, core events and acks
/// per byte, and fuller frames (30 frames of a 9000-byte MTU carry 256 KiB).
/// With `resync_max_in_flight_bytes`, a 1 GiB idle resync ran 8-10 %
/// faster than at 64 KiB (bench/README.md, "A/B: resync messages of
/// 256 KiB").
pub(super) const RESYNC_MESSAGE_BYTES: u64 = 256 << 10;

/// Largest zero run in one message: a hole of the source's volume costs
/// one small message (and one hole punched on the target) per this much,
/// the most whole blocks a message's 32-bit length holds.
pub(super) fn zero_run_blocks(bs: u64) -> u64 {
    (u64::from(u32::MAX) / bs).max(1)
}

/// Token-bucket pacing: the next start time after spending one block of
/// `bs` bytes at `rate` bytes per second; up to 10 ms of unused budget may
/// be spent at once.
pub(super) fn pace(next: Micros, now: Micros, bs: u64, rate: u64) -> Micros {
    next.max(now.saturating_sub(10_000)) + (bs * 1_000_000).div_ceil(rate)
}

impl<H: Payload> Node<H> {
    /// Resync progress reaches the metadata at most once per
    /// `BITMAP_PERSIST_INTERVAL_US`: a bit cleared in memory was cleared
    /// only once its block is stable on the target, so the persisted map is
    /// always a superset of what really differs.
    pub(super) fn persist_progress(&mut self) {
        if self.progress.unpersisted
            && !self.failed
            && self.now >= self.progress.persisted_us + BITMAP_PERSIST_INTERVAL_US
        {
            self.persist_al(true);
        }
    }

    /// Source: read dirty blocks and send them, yielding to client writes.
    pub(super) fn pump_resync(&mut self) {
        let idle = self.now >= self.writes.last_write_us + self.cfg.resync_idle_us
            && self.ios.count(io::Kind::ClientWrite) == 0;
        let (min, max) = (self.cfg.resync_min_in_flight, self.cfg.resync_max_in_flight);
        let window = self.cfg.window;
        let bs = u64::from(self.cfg.block_size);
        // Blocks per resync message: with clients idle up to 64 KiB, and no
        // more than 10 ms of a rate cap (pacing stays smooth at low rates);
        // under client load one (the floors are counted in blocks).
        let mut max_run = if idle {
            (RESYNC_MESSAGE_BYTES / bs).max(1)
        } else {
            1
        };
        if self.cfg.resync_max_bytes_per_s > 0 {
            max_run = max_run.min((self.cfg.resync_max_bytes_per_s / 100 / bs).max(1));
        }
        // No more bytes in flight than the target's receive ring holds.
        let by_bytes = self.cfg.resync_max_in_flight_bytes / (max_run * bs);
        let max = max.min(usize::try_from(by_bytes).unwrap_or(usize::MAX).max(min));
        loop {
            let Some(s) = self.session.as_mut() else {
                return;
            };
            if s.phase != Phase::Source || s.resync.done.is_some() {
                return;
            }
            // Pace by blocks read or sent but not yet applied by the target.
            // Under client load only the floor runs (`resync_min_in_flight`
            // blocks, and `resync_min_bytes_per_s`), so the resync keeps
            // moving but client writes go first.
            let applied_upto = s.send.peer_applied;
            let unapplied = s.resync.sent.len()
                - s.resync
                    .sent
                    .partition_point(|r| r.seq.is_at_or_before(applied_upto));
            let outstanding = self.ios.count(io::Kind::ResyncRead) + unapplied;
            let congested = !s.send.backlog.is_empty() || s.send.tx.in_flight() >= window * 3 / 4;
            let floor_due = self.cfg.resync_min_bytes_per_s > 0
                && self.now >= self.timers.deadline(Timer::ResyncFloor);
            let may = if idle {
                outstanding < max && !(congested && outstanding >= min)
            } else {
                outstanding < min || (floor_due && outstanding < max)
            };
            // Sent blocks wait for the target's next stable point (it
            // flushes every `2 * window` applied frames under bulk input).
            if !may || s.resync.sent.len() >= window * 16 {
                break;
            }
            let Some(block) = self.meta.dirty.next_set(s.resync.cursor) else {
                // Everything dirty has been read; done once all are stable.
                if self.ios.count(io::Kind::ResyncRead) == 0 && s.resync.sent.is_empty() {
                    if self.meta.dirty.count() == 0 {
                        let blocks = s.resync.blocks_sent;
                        let seq = self.send_reliable(
                            Message::ResyncDone(ResyncDone {
                                blocks_sent: blocks,
                            }),
                            None,
                        );
                        if let Some(s) = self.session.as_mut() {
                            s.resync.done = Some(seq.map_or(Numbered::Queued, Numbered::Sent));
                        }
                    } else if let Some(s) = self.session.as_mut() {
                        s.resync.cursor = 0; // wrap: resend blocks re-dirtied meanwhile
                        s.resync.hole_until = 0;
                    }
                }
                break;
            };
            let ios = &self.ios;
            let free = |b: u64, s: &Session<H>| {
                !s.resync.busy.get(b)
                    && !ios
                        .client_writes()
                        .any(|(_, p)| b >= p.block && b < p.block + p.count)
            };
            if !free(block, s) {
                s.resync.cursor = block + 1;
                continue;
            }
            if block < s.resync.hole_until {
                // In a hole of this volume: the dirty, free run there goes
                // as zeroes, with no read and outside the rate cap (it
                // carries no data). It ends at the first block being read
                // or sent, or written by a client.
                let cap = (s.resync.hole_until - block).min(zero_run_blocks(bs));
                let mut count = self.meta.dirty.run_len(block, cap);
                if let Some(b) = s.resync.busy.next_set(block) {
                    count = count.min(b - block);
                }
                if let Some(w) = ios
                    .client_writes()
                    .map(|(_, p)| p.block)
                    .filter(|&b| b > block)
                    .min()
                {
                    count = count.min(w - block);
                }
                let count = count.max(1);
                s.resync.cursor = block + count;
                s.resync.busy.set_range(block, count);
                self.send_resync_run(block, count, None);
                continue;
            }
            // A run of up to `max_run` dirty, free blocks goes as one read
            // and one message (fewer events, reads, frames and acks).
            let mut count = 1;
            while count < max_run && self.meta.dirty.get(block + count) && free(block + count, s) {
                count += 1;
            }
            // Rate limit: each block costs block_size / rate seconds; up
            // to 10 ms of unused budget may be spent at once.
            let now = self.now;
            let rate = self.cfg.resync_max_bytes_per_s;
            if rate > 0 {
                let next = self.timers.deadline(Timer::ResyncPace);
                if now < next {
                    break;
                }
                self.timers
                    .set(Timer::ResyncPace, pace(next, now, bs * count, rate));
            }
            let floor = self.cfg.resync_min_bytes_per_s;
            if floor > 0 && !idle {
                // Every read under load spends floor budget, so the floor
                // rate adds to the in-flight floor only where that is slower.
                let next = self.timers.deadline(Timer::ResyncFloor);
                self.timers
                    .set(Timer::ResyncFloor, pace(next, now, bs * count, floor));
            }
            let Some(s) = self.session.as_mut() else {
                return;
            };
            s.resync.cursor = block + count;
            // A client write still in flight may not be on the volume when
            // the read runs: a hole reported beyond the read is then not
            // to be trusted (never equal to the count).
            let writes = if self.ios.count(io::Kind::ClientWrite) == 0 {
                s.resync.writes
            } else {
                u64::MAX
            };
            let io = self.ios.start(io::Purpose::ResyncRead {
                block,
                count,
                cancelled: false,
                writes,
            });
            s.resync.busy.set_range(block, count);
            self.emit(Action::Read { io, block, count });
        }
        self.resync_progress();
    }

    pub(super) fn resync_progress(&mut self) {
        let now = self.now;
        let remaining = self.meta.dirty.count();
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if matches!(s.phase, Phase::Source | Phase::Target)
            && now >= s.resync.last_progress_us + 1_000_000
        {
            s.resync.last_progress_us = now;
            let (source, total) = (s.phase == Phase::Source, s.resync.total);
            self.notify(Notice::ResyncProgress {
                source,
                remaining,
                total,
            });
        }
    }
}
