//! The activity log: which extents may hold writes that are not yet stable
//! on both sides. A crashed primary resyncs exactly these; a slot cools once
//! a flush here (and, while mirroring, one on the peer) covers its newest
//! write, and only cold slots are evicted.

use super::*;

/// The activity log: hot extents, their LRU clock, and the pressure that
/// decides how soon the next stable point comes.
pub(super) struct ActivityLog {
    pub(super) slots: Vec<AlSlot>,
    pub(super) clock: u64,
    /// Whether the activity log is under pressure (see
    /// `Config::stabilize_interval_us`), and when that was last counted.
    pub(super) pressure: bool,
    pub(super) counted_us: Micros,
    /// The next client write waits for activity-log room.
    pub(super) blocked: bool,
    pub(super) last_stabilize_us: Micros,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct AlSlot {
    pub(super) extent: u64,
    pub(super) last_wid: u64,
    pub(super) in_flight: u32,
    pub(super) lru: u64,
    /// Listed in the persisted activity log. Only hot extents are written
    /// out; a cold one left out is persisted again before its next write.
    pub(super) on_disk: bool,
    /// Its newest writes were received from the peer as secondary
    /// (`protect_received`): the peer has them, so the slot cools once a
    /// local flush covers them.
    pub(super) from_peer: bool,
}

impl<H: Payload> Node<H> {
    /// Write the metadata. The persisted activity log keeps every extent
    /// already listed plus the hot ones; with `trim`, only the hot ones: a
    /// cold extent's writes are stable here and on the peer (or covered by
    /// the dirty map), so a crash need not resync it. Trimming runs with the
    /// resync's periodic progress writes (at most once a second), so the
    /// extents a degraded backlog heated drop out and a crashed source
    /// resumes instead of restarting; a trimmed extent is persisted again
    /// before its next write (`al_reserve`).
    pub(super) fn persist_al(&mut self, trim: bool) {
        self.progress.unpersisted = false;
        self.progress.persisted_us = self.now;
        self.meta.role = self.role;
        let hot: Vec<bool> = self.actlog.slots.iter().map(|s| !self.al_cold(s)).collect();
        for (slot, hot) in self.actlog.slots.iter_mut().zip(&hot) {
            slot.on_disk = *hot || (slot.on_disk && !trim);
        }
        self.meta.al = self
            .actlog
            .slots
            .iter()
            .filter(|s| s.on_disk)
            .map(|s| s.extent)
            .collect();
        self.counters.meta_writes += 1;
        self.emit(Action::PersistMeta(self.meta.clone()));
    }

    /// When the next periodic stable point is due: soon while the
    /// activity log is under pressure, else relaxed.
    pub(super) fn stabilize_due_us(&self) -> Micros {
        let interval = if self.actlog.pressure {
            self.cfg.stabilize_interval_us
        } else {
            self.cfg.stabilize_relaxed_us
        };
        self.actlog.last_stabilize_us + interval
    }

    pub(super) fn stabilize_if_due(&mut self) {
        if self.role != Role::Primary || self.failed || self.actlog.slots.is_empty() {
            return;
        }
        if self.now >= self.actlog.counted_us + self.cfg.stabilize_interval_us {
            // Counted at most once per short interval (the log holds up
            // to `al_extents` slots).
            self.actlog.counted_us = self.now;
            let unstable = self
                .actlog
                .slots
                .iter()
                .filter(|s| !self.al_cold(s))
                .count();
            self.actlog.pressure = unstable * 4 >= self.cfg.al_extents * 3;
        }
        let unstable = self.actlog.slots.iter().any(|s| !self.al_cold(s));
        let due = self.now >= self.stabilize_due_us();
        let blocked = self.actlog.blocked && !self.writes.waiting.is_empty();
        // One stable point at a time, here and on the peer: the next one
        // starts once the local flush is done and the peer reported the
        // last barrier stable (else, while the log is full, every local
        // flush would send another barrier, and a peer with a slower disk
        // would fall ever further behind).
        let peer_busy = self.session.as_ref().is_some_and(|s| {
            s.send
                .stable_point
                .is_some_and(|b| !b.is_at_or_before(s.send.peer_stable))
        });
        if unstable && (due || blocked) && self.ios.count(io::Kind::StablePoint) == 0 && !peer_busy
        {
            self.actlog.last_stabilize_us = self.now;
            self.internal_flush();
        }
    }

    /// Flush locally and (if mirroring) on the peer, to cool AL extents.
    pub(super) fn internal_flush(&mut self) {
        let mark = self.completed_wid();
        let io = self.ios.start(io::Purpose::Flush { mark, client: None });
        self.emit(Action::Flush { io });
        if self.mirroring() {
            let d = Data {
                write_id: 0,
                offset: 0,
                len: 0,
                flags: data_flags::FLUSH,
            };
            let sent = self.send_reliable(Message::Data(d), None);
            if let Some(s) = self.session.as_mut() {
                s.send.stable_point = Some(sent.map_or(Numbered::Queued, Numbered::Sent));
            }
        }
    }

    pub(super) fn completed_wid(&self) -> u64 {
        match self.writes.inflight_wids.first_key() {
            Some(&w) => w - 1,
            None => self.writes.next_wid - 1,
        }
    }

    /// Tear the MSL session down. A primary goes degraded: everything that
    /// may be missing on the peer is marked dirty and persisted, and it
    /// starts a new generation, before any further write is acknowledged.
    /// Primary losing its peer: out of sync are the extents the peer may
    /// lack, those with a write in flight or one not yet covered by a
    /// flush the peer reported (its cache may be lost). Extents whose
    /// writes are all stable on the peer, or older than this session (their
    /// blocks were resynced or are still dirty), need nothing: with a
    /// 1237-extent log, merging every slot resynced gigabytes after a
    /// secondary restart.
    pub(super) fn mark_extents_peer_may_lack(&mut self) {
        let peer_has = self
            .writes
            .peer_stable_wid
            .max(self.writes.session_start_wid);
        for slot in &self.actlog.slots {
            if slot.in_flight == 0 && slot.last_wid <= peer_has {
                continue;
            }
            self.meta
                .dirty
                .set_range(slot.extent * self.cfg.extent_blocks, self.cfg.extent_blocks);
        }
    }

    /// Put `exts` in the activity log, hot until a local flush (issued
    /// here) covers them: if this node crashes first, it resyncs them from
    /// its peer when it comes back, like a crashed primary's in-flight
    /// region.
    pub(super) fn protect_received(&mut self, mut exts: Vec<u64>) {
        exts.sort_unstable();
        exts.dedup();
        let wid = self.writes.next_wid;
        self.writes.next_wid += 1;
        self.actlog.clock += 1;
        let clock = self.actlog.clock;
        for x in exts {
            let slot = AlSlot {
                extent: x,
                last_wid: wid,
                in_flight: 0,
                lru: clock,
                on_disk: false,
                from_peer: true,
            };
            if let Some(s) = self.actlog.slots.iter_mut().find(|s| s.extent == x) {
                // A secondary has no unacknowledged writes of its own: the
                // ones it released were applied by the peer, the rest were
                // marked out of sync. One still in flight keeps the
                // stricter rule.
                s.last_wid = wid;
                s.lru = clock;
                s.from_peer |= s.in_flight == 0;
            } else if self.actlog.slots.len() < self.cfg.al_extents {
                self.actlog.slots.push(slot);
            } else if let Some(i) = self.actlog.slots.iter().position(|s| self.al_cold(s)) {
                self.actlog.slots[i] = slot; // a cold extent is stable: evicted
            } else {
                // No room in the log (its on-disk slots are sized for
                // `al_extents`): marked out of sync instead, resent from
                // the peer at the next resync either way.
                let e = self.cfg.extent_blocks;
                self.meta.dirty.set_range(x * e, e);
            }
        }
        self.persist();
        let mark = self.completed_wid();
        let io = self.ios.start(io::Purpose::Flush { mark, client: None });
        self.emit(Action::Flush { io });
    }

    pub(super) fn extents(&self, block: u64, count: u64) -> core::ops::RangeInclusive<u64> {
        let e = self.cfg.extent_blocks;
        (block / e)..=((block + count - 1) / e)
    }

    pub(super) fn al_cold(&self, s: &AlSlot) -> bool {
        s.in_flight == 0
            && s.last_wid <= self.writes.local_stable_wid
            && (s.from_peer
                || !self.mirroring()
                || s.last_wid <= self.writes.peer_stable_wid
                || s.last_wid <= self.writes.session_start_wid)
    }

    /// Make the extents of a write hot. Returns Some(changed) or None if
    /// there is no cold slot to evict.
    pub(super) fn al_reserve(&mut self, block: u64, count: u64) -> Option<bool> {
        let need: Vec<u64> = self
            .extents(block, count)
            .filter(|e| !self.actlog.slots.iter().any(|s| s.extent == *e))
            .collect();
        if need.is_empty() {
            // Hot again after a metadata write left it out as cold.
            let range = self.extents(block, count);
            let reheat = self
                .actlog
                .slots
                .iter()
                .any(|s| range.contains(&s.extent) && !s.on_disk);
            return Some(reheat);
        }
        let free = self.cfg.al_extents.saturating_sub(self.actlog.slots.len());
        // Never evict an extent this very write needs (found by msl-sim
        // seed 838: its crashed primary's in-flight region went unsynced).
        let range = self.extents(block, count);
        let mut cold: Vec<(u64, usize)> = self
            .actlog
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !range.contains(&s.extent) && self.al_cold(s))
            .map(|(i, s)| (s.lru, i))
            .collect();
        if free + cold.len() < need.len() {
            return None;
        }
        cold.sort_unstable();
        let evict = need.len().saturating_sub(free);
        let mut victims: Vec<usize> = cold.iter().take(evict).map(|&(_, i)| i).collect();
        victims.sort_unstable_by(|a, b| b.cmp(a));
        for i in victims {
            self.actlog.slots.swap_remove(i);
        }
        for e in need {
            self.actlog.slots.push(AlSlot {
                extent: e,
                last_wid: 0,
                in_flight: 0,
                lru: 0,
                on_disk: false,
                from_peer: false,
            });
        }
        Some(true)
    }
}
