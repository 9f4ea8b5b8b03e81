//! The write path on the primary: client writes and flushes are queued,
//! started once their activity-log extents are hot, mirrored to the peer
//! (sync or async) and released when both halves are done; local I/O
//! completions come back here.

use super::*;

/// The primary's write path: write ids, queued writes and flush waiters,
/// and the stable points of both sides in write ids.
pub(super) struct WritePath<H> {
    pub(super) next_wid: u64,
    pub(super) waiting: VecDeque<QueuedWrite<H>>,
    pub(super) flush_waiters: VecDeque<FlushWaiter>,
    pub(super) local_flush_done: BTreeSet<IoId>,
    pub(super) inflight_wids: SeqMap<u64, ()>,
    pub(super) local_stable_wid: u64,
    pub(super) peer_stable_wid: u64,
    pub(super) session_start_wid: u64,
    pub(super) last_write_us: Micros,
    /// Scratch space of `start_waiting_writes` and `release_writes`, kept
    /// between calls so the steady state allocates nothing.
    pub(super) batch: Vec<(QueuedWrite<H>, u64)>,
    pub(super) released: Vec<IoId>,
}

#[derive(Clone, Debug)]
pub(super) struct PendingWrite {
    pub(super) req: ReqId,
    pub(super) wid: u64,
    pub(super) block: u64,
    pub(super) count: u64,
    pub(super) fua: bool,
    pub(super) local_done: bool,
    /// The peer's half.
    pub(super) peer: PeerHalf,
    /// The first write after a metadata write: until it is done locally,
    /// that metadata write may still be under way.
    pub(super) opens_txn: bool,
}

/// Where the peer's half of a client write or flush stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PeerHalf {
    /// Not mirrored (degraded, async mode, or the session ended): only the
    /// local half counts.
    Local,
    /// Mirrored, but still in the send backlog: numbered when it is sent.
    Queued,
    /// Mirrored as this sequence number.
    Sent(u64),
}

/// A client flush waiting for its local flush and the peer's.
#[derive(Clone, Copy, Debug)]
pub(super) struct FlushWaiter {
    pub(super) req: ReqId,
    /// The local flush's io id (also the `write_id` of the mirrored FLUSH).
    pub(super) io: IoId,
    pub(super) peer: PeerHalf,
}

#[derive(Clone, Debug)]
pub(super) struct QueuedWrite<H> {
    pub(super) req: ReqId,
    pub(super) block: u64,
    pub(super) count: u64,
    pub(super) kind: IoKind,
    pub(super) fua: bool,
    pub(super) payload: Option<H>,
}

impl<H: Payload> Node<H> {
    pub(super) fn mirroring(&self) -> bool {
        self.role == Role::Primary
            && self
                .session
                .as_ref()
                .is_some_and(|s| matches!(s.phase, Phase::Images | Phase::Source | Phase::InSync))
            && self
                .session
                .as_ref()
                .is_some_and(|s| s.decision.strategy.is_source())
    }

    pub(super) fn on_client_write(&mut self, q: QueuedWrite<H>) {
        if !self.accepting() {
            self.counters.client_writes_refused += 1;
            let e = if self.failed {
                ClientError::IoError
            } else {
                ClientError::NotPrimary
            };
            self.emit(Action::Reply {
                req: q.req,
                result: Err(e),
            });
            return;
        }
        if q.count == 0
            || q.block
                .checked_add(q.count)
                .is_none_or(|end| end > self.cfg.volume_blocks)
        {
            self.emit(Action::Reply {
                req: q.req,
                result: Err(ClientError::OutOfRange),
            });
            return;
        }
        if self.extents(q.block, q.count).count() > self.cfg.al_extents {
            // Could never get its extents hot at once.
            self.emit(Action::Reply {
                req: q.req,
                result: Err(ClientError::OutOfRange),
            });
            return;
        }
        if self.writes.waiting.len() + self.ios.count(io::Kind::ClientWrite)
            >= self.cfg.max_pending_writes
        {
            self.counters.client_writes_refused += 1;
            self.emit(Action::Reply {
                req: q.req,
                result: Err(ClientError::Busy),
            });
            return;
        }
        self.writes.waiting.push_back(q);
        self.start_waiting_writes();
    }

    /// Start queued writes in order while they don't overlap writes in
    /// flight and their AL extents can be made hot.
    ///
    /// Activity-log transactions are batched: while the transaction of
    /// the previous batch may still be being written (the write started
    /// right after it has not completed locally: the host executes actions
    /// in order, so that completion proves the transaction durable), a
    /// write that needs a new one waits. When it completes, every waiting
    /// write that fits goes out behind one metadata write carrying all
    /// their extents, up to what one transaction block holds
    /// (`al_txn_extents`). A write is still emitted only after the
    /// metadata covering its extents.
    pub(super) fn start_waiting_writes(&mut self) {
        self.actlog.blocked = false;
        if !self.serving() {
            return;
        }
        let txn_open = self
            .ios
            .client_writes()
            .any(|(_, p)| p.opens_txn && !p.local_done);
        let cap = crate::meta::al_txn_extents(self.cfg.extent_blocks);
        let mut new_extents = 0usize;
        let mut persist = false;
        let mut batch = core::mem::take(&mut self.writes.batch);
        batch.clear();
        while let Some(q) = self.writes.waiting.front() {
            let (block, count) = (q.block, q.count);
            let overlaps = |b: u64, c: u64| c > 0 && block < b + c && b < block + count;
            if self
                .ios
                .client_writes()
                .any(|(_, p)| overlaps(p.block, p.count))
                || batch.iter().any(|(w, _)| overlaps(w.block, w.count))
            {
                break;
            }
            let adds = self.al_extents_to_add(block, count);
            if adds > 0 || self.degraded_mark_needed(block, count) {
                if txn_open {
                    break;
                }
                if !batch.is_empty() && new_extents + adds > cap {
                    break;
                }
            }
            let Some(al_changed) = self.al_reserve(block, count) else {
                // Not enough free or cold extents: a stable point cools
                // some (`stabilize_if_due` issues it at once).
                self.actlog.blocked = true;
                break;
            };
            new_extents += adds;
            let Some(q) = self.writes.waiting.pop_front() else {
                break;
            };
            let (wid, changed) = self.prepare_write(&q, al_changed);
            persist |= changed;
            batch.push((q, wid));
        }
        if persist {
            self.persist();
        }
        for (i, (q, wid)) in batch.drain(..).enumerate() {
            self.start_write(q, wid, persist && i == 0);
        }
        self.writes.batch = batch;
    }

    /// Extents of `[block, block + count)` the next metadata write must
    /// add to the persisted activity log.
    fn al_extents_to_add(&self, block: u64, count: u64) -> usize {
        self.extents(block, count)
            .filter(|e| {
                !self
                    .actlog
                    .slots
                    .iter()
                    .any(|s| s.extent == *e && s.on_disk)
            })
            .count()
    }

    /// Degraded: whether the write's extents still lack their dirty mark.
    fn degraded_mark_needed(&self, block: u64, count: u64) -> bool {
        if self.mirroring() {
            return false;
        }
        let e = self.cfg.extent_blocks;
        let first = block / e * e;
        let end = ((block + count).div_ceil(e) * e).min(self.cfg.volume_blocks);
        self.meta.dirty.count_range(first, end - first) < end - first
    }

    /// Make a write's extents hot and give it its write id; returns the
    /// id and whether metadata must be written before it.
    fn prepare_write(&mut self, q: &QueuedWrite<H>, al_changed: bool) -> (u64, bool) {
        let wid = self.writes.next_wid;
        self.writes.next_wid += 1;
        self.actlog.clock += 1;
        let clock = self.actlog.clock;
        let exts = self.extents(q.block, q.count);
        for s in self
            .actlog
            .slots
            .iter_mut()
            .filter(|s| exts.contains(&s.extent))
        {
            s.in_flight += 1;
            s.last_wid = wid;
            s.lru = clock;
            s.from_peer = false;
        }
        let mut persist = al_changed;
        if !self.mirroring() {
            // Degraded: the dirty mark is persisted before the write, for
            // the whole activity-log extent at its first write: one
            // metadata write per extent touched instead of one per new
            // block (4 KiB random writes ran at a tenth of the speed), at
            // the price of resyncing whole extents when the peer returns.
            let e = self.cfg.extent_blocks;
            let first = q.block / e * e;
            let end = ((q.block + q.count).div_ceil(e) * e).min(self.cfg.volume_blocks);
            persist |= self.meta.dirty.set_range(first, end - first) > 0;
        }
        (wid, persist)
    }

    /// Emit a prepared write (after the metadata write covering it);
    /// `opens_txn`: the first write after that metadata write.
    pub(super) fn start_write(&mut self, q: QueuedWrite<H>, wid: u64, opens_txn: bool) {
        let mirror = self.mirroring() && self.cfg.write_mode == WriteMode::Sync;
        let mirror_async = self.mirroring() && self.cfg.write_mode == WriteMode::Async;
        self.writes.last_write_us = self.now;
        self.writes.inflight_wids.insert(wid, ());
        // Before the write reaches the volume or the stream: a hole a
        // verify read reported before it no longer holds where it writes.
        self.online.run.note_write(q.block, q.count);
        // The local write is emitted after the mirror message: the peer's
        // half of the round trip then overlaps the local write instead of
        // waiting for it (the client's reply needs both either way).
        let mut local = Action::Write {
            io: 0,
            block: q.block,
            count: q.count,
            kind: q.kind,
            fua: q.fua,
            payload: q.payload.clone(),
        };
        let mut peer = PeerHalf::Local;
        if mirror || mirror_async {
            let bs = u64::from(self.cfg.block_size);
            let mut flags = if q.fua { data_flags::FUA } else { 0 };
            flags |= match q.kind {
                IoKind::Write => 0,
                IoKind::Trim => data_flags::TRIM,
                IoKind::Zeroes => data_flags::ZEROES,
            };
            let d = Data {
                write_id: wid,
                offset: q.block * bs,
                len: (q.count * bs) as u32,
                flags,
            };
            let sent = self.send_reliable(Message::Data(d), q.payload);
            match sent {
                Some(s) => {
                    if let Some(sess) = self.session.as_mut() {
                        sess.send.mirror_wids.push_back((s, wid));
                    }
                    peer = PeerHalf::Sent(s);
                }
                // Numbered when it leaves the backlog (`flush_backlog`).
                None => peer = PeerHalf::Queued,
            }
            if mirror_async {
                peer = PeerHalf::Local;
            }
            // Cancel resync reads of these blocks: their data is stale now.
            self.ios.cancel_resync_reads(q.block, q.count);
        }
        // A resync source's knowledge of its holes ends at these blocks
        // (the next read there finds out again).
        if let Some(sess) = self.session.as_mut() {
            sess.resync.hole_until = sess.resync.hole_until.min(q.block);
            sess.resync.writes += 1;
        }
        let io = self.ios.start(io::Purpose::ClientWrite(PendingWrite {
            req: q.req,
            wid,
            block: q.block,
            count: q.count,
            fua: q.fua,
            local_done: false,
            peer,
            opens_txn,
        }));
        if let Action::Write { io: id, .. } = &mut local {
            *id = io;
        }
        self.emit(local);
    }

    pub(super) fn on_client_flush(&mut self, req: ReqId) {
        if !self.accepting() {
            let e = if self.failed {
                ClientError::IoError
            } else {
                ClientError::NotPrimary
            };
            self.emit(Action::Reply {
                req,
                result: Err(e),
            });
            return;
        }
        let mark = self.completed_wid();
        let io = self.ios.start(io::Purpose::Flush {
            mark,
            client: Some(req),
        });
        self.emit(Action::Flush { io });
        if self.mirroring() {
            // Registered first: if the message goes to the backlog,
            // `flush_backlog` finds the waiter by its io id.
            self.writes.flush_waiters.push_back(FlushWaiter {
                req,
                io,
                peer: PeerHalf::Queued,
            });
            let d = Data {
                write_id: io,
                offset: 0,
                len: 0,
                flags: data_flags::FLUSH,
            };
            let sent = self.send_reliable(Message::Data(d), None);
            if let (Some(seq), Some(w)) = (sent, self.writes.flush_waiters.back_mut()) {
                debug_assert_eq!(w.io, io);
                if w.peer == PeerHalf::Queued {
                    w.peer = PeerHalf::Sent(seq);
                }
            }
            return;
        }
        self.writes.flush_waiters.push_back(FlushWaiter {
            req,
            io,
            peer: PeerHalf::Local,
        });
    }

    /// Release client writes and flushes whose conditions are met.
    pub(super) fn release_writes(&mut self) {
        let (peer_applied, peer_stable, connected) = match &self.session {
            Some(s) => (s.send.peer_applied, s.send.peer_stable, true),
            None => (0, 0, false),
        };
        let mut done = core::mem::take(&mut self.writes.released);
        done.clear();
        for (io, p) in self.ios.client_writes() {
            if !p.local_done {
                continue;
            }
            let peer_ok = match p.peer {
                PeerHalf::Local => true,
                PeerHalf::Queued => false,
                PeerHalf::Sent(seq) => {
                    connected
                        && if p.fua {
                            peer_stable >= seq
                        } else {
                            peer_applied >= seq
                        }
                }
            };
            if peer_ok {
                done.push(io);
            }
        }
        for io in done.drain(..) {
            if let Some(io::Purpose::ClientWrite(p)) = self.ios.take(io) {
                self.emit(Action::Reply {
                    req: p.req,
                    result: Ok(()),
                });
            }
        }
        self.writes.released = done;
        while let Some(&FlushWaiter { req, io, peer }) = self.writes.flush_waiters.front() {
            let local = self.writes.local_flush_done.contains(&io);
            let peer_ok = match peer {
                PeerHalf::Local => true,
                PeerHalf::Queued => false,
                PeerHalf::Sent(seq) => connected && peer_stable >= seq,
            };
            if !(local && peer_ok) {
                break;
            }
            self.writes.flush_waiters.pop_front();
            self.writes.local_flush_done.remove(&io);
            self.emit(Action::Reply {
                req,
                result: Ok(()),
            });
        }
        self.start_waiting_writes();
        self.try_handover();
    }

    pub(super) fn on_io_done(&mut self, io: IoId, ok: bool) {
        if !ok {
            self.fail("volume write or flush");
            return;
        }
        let Some(kind) = self.ios.kind(io) else {
            // A write from an ended session, or unknown: nothing to release.
            return;
        };
        if let Some(io::Purpose::ClientWrite(p)) = self.ios.get_mut(io) {
            p.local_done = true;
            let (wid, block, count) = (p.wid, p.block, p.count);
            self.writes.inflight_wids.remove(&wid);
            let exts = self.extents(block, count);
            for s in self
                .actlog
                .slots
                .iter_mut()
                .filter(|s| exts.contains(&s.extent))
            {
                s.in_flight = s.in_flight.saturating_sub(1);
            }
            self.release_writes();
            return;
        }
        if matches!(kind, io::Kind::Flush | io::Kind::StablePoint) {
            let Some(io::Purpose::Flush { mark, client }) = self.ios.take(io) else {
                unreachable!("io {io} is a flush");
            };
            self.writes.local_stable_wid = self.writes.local_stable_wid.max(mark);
            if client.is_some() || self.writes.flush_waiters.iter().any(|w| w.io == io) {
                self.writes.local_flush_done.insert(io);
            }
            self.release_writes();
            return;
        }
        if kind == io::Kind::Apply {
            let Some(io::Purpose::Apply { seq }) = self.ios.take(io) else {
                unreachable!("io {io} is an apply");
            };
            if let Some(s) = self.session.as_mut() {
                // Its entry went in with the io (`run_apply_queue`); both
                // leave with the session.
                let found = s.recv.applying.remove(&seq);
                debug_assert!(
                    found.is_some(),
                    "apply io of message {seq} without its entry"
                );
                if let Some(Blocks { block, count }) = found {
                    if s.phase == Phase::Target {
                        // Clean once a flush covering it completes.
                        let at = s.recv.target_unflushed.partition_point(|e| e.0 < seq);
                        s.recv
                            .target_unflushed
                            .insert(at, (seq, Blocks { block, count }));
                    }
                    // In every phase: a resync's last writes may still be
                    // unflushed when it ends and this node is in sync.
                    if count > 0 {
                        let e = self.cfg.extent_blocks;
                        for x in block / e..=(block + count - 1) / e {
                            let v = s.recv.unstable_applied.entry(x).or_insert(seq);
                            *v = (*v).max(seq);
                        }
                    }
                }
            }
            self.run_apply_queue();
            return;
        }
        if kind == io::Kind::ApplyFlush {
            let Some(io::Purpose::ApplyFlush { seq: fseq }) = self.ios.take(io) else {
                unreachable!("io {io} is an apply flush");
            };
            // Session I/O leaves the table when its session ends.
            let s = self.session.as_mut();
            debug_assert!(s.is_some(), "apply flush {io} outlived its session");
            if let Some(s) = s {
                s.recv.stable = s.recv.stable.max(fseq);
                s.recv.ack_pending = true;
                let stable = s.recv.stable;
                s.recv.unstable_applied.retain(|_, seq| *seq > stable);
                // Blocks written up to the flush point are stable here:
                // their bits clear (persisted by `persist_progress`).
                while let Some(&(seq, Blocks { block, count })) = s.recv.target_unflushed.front() {
                    if seq > s.recv.stable {
                        break;
                    }
                    s.recv.target_unflushed.pop_front();
                    self.meta.dirty.clear_range(block, count);
                    self.progress.unpersisted = true;
                }
                self.run_apply_queue();
            }
        }
        // A read's io reported as a write: nothing to release.
    }

    pub(super) fn on_read_done(&mut self, io: IoId, ok: bool, payload: Option<H>) {
        if !ok {
            self.fail("volume read");
            return;
        }
        if self.ios.kind(io) == Some(io::Kind::VerifyRead) {
            self.verify_read_done(io, payload, None);
            return;
        }
        if self.ios.kind(io) != Some(io::Kind::ResyncRead) {
            return;
        }
        self.resync_read_done(io, payload, 0);
    }

    /// `Event::ReadHole`: a verify read digests zeroes without hashing
    /// them, and the run covers the rest of the hole with a zero range (or
    /// answers the peer's zero range); a resync read's range goes as a
    /// zero run, and the source skips the rest of the hole without reading
    /// it.
    pub(super) fn on_read_hole(&mut self, io: IoId, blocks: u64) {
        match self.ios.kind(io) {
            Some(io::Kind::VerifyRead) => self.verify_read_done(io, None, Some(blocks)),
            Some(io::Kind::ResyncRead) => self.resync_read_done(io, None, blocks),
            // Not a read (or no longer in the table): as `ReadDone`.
            _ => {}
        }
    }

    /// A resync read completed: its data (`payload`), or no payload when
    /// it found a hole of `hole` blocks from its first.
    fn resync_read_done(&mut self, io: IoId, payload: Option<H>, hole: u64) {
        let Some(io::Purpose::ResyncRead {
            block,
            count,
            cancelled,
            writes,
        }) = self.ios.take(io)
        else {
            unreachable!("io {io} is a resync read");
        };
        // Session I/O leaves the table when its session ends.
        let Some(s) = self.session.as_mut() else {
            debug_assert!(false, "resync read {io} outlived its session");
            return;
        };
        if cancelled || s.phase != Phase::Source {
            // A client wrote these blocks meanwhile; read them again later.
            s.resync.busy.clear_range(block, count);
            s.resync.cursor = s.resync.cursor.min(block);
            return;
        }
        // The hole beyond the read's own blocks (which `cancelled`
        // guards) holds only if no client wrote since the read was issued.
        if payload.is_none() && writes == s.resync.writes {
            let end = block.saturating_add(hole).min(self.cfg.volume_blocks);
            s.resync.hole_until = s.resync.hole_until.max(end);
        }
        self.send_resync_run(block, count, payload);
    }

    /// Send blocks `block..block + count` (busy) to the resync target:
    /// their data, or without a payload as a zero run (the target makes
    /// them read as zeroes).
    pub(super) fn send_resync_run(&mut self, block: u64, count: u64, payload: Option<H>) {
        let bs = u64::from(self.cfg.block_size);
        let Some(s) = self.session.as_mut() else {
            return;
        };
        s.resync.blocks_sent += count;
        // A run that reads as zeroes goes as "zero this range", without
        // its bytes (the target makes it read as zeroes), as a hole does:
        // the link carries only the message.
        let payload = payload.filter(|p| !all_zero(p.bytes()));
        let flags = if payload.is_some() {
            self.counters.resync_blocks_sent += count;
            0
        } else {
            self.counters.resync_zero_blocks_sent += count;
            data_flags::ZEROES
        };
        let r = ResyncData {
            offset: block * bs,
            len: (count * bs) as u32,
            flags,
        };
        // Not yet numbered if it went to the backlog.
        let seq = match self.send_reliable(Message::ResyncData(r), payload) {
            Some(seq) => Numbered::Sent(seq),
            None => Numbered::Queued,
        };
        if let Some(s) = self.session.as_mut() {
            // Sent at once only with an empty backlog: every run before it
            // is numbered (`flush_backlog` relies on the queued ones being
            // the tail).
            debug_assert!(
                seq == Numbered::Queued || s.resync.sent.iter().all(|r| r.seq != Numbered::Queued),
                "resync run numbered ahead of a queued one"
            );
            s.resync.sent.push_back(SentRun { seq, block, count });
        }
    }
}

/// Every byte is zero (eight at a time).
fn all_zero(b: &[u8]) -> bool {
    let mut words = b.chunks_exact(8);
    words.all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
        && words.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A primary alone (its peer down) on a 64-extent volume.
    fn lone_primary() -> Node<Vec<u8>> {
        let blocks = 64 * 1024;
        let cfg = Config::new(1, 2, 7, blocks, 4096);
        let mut n = Node::new(cfg, Meta::create(7, 1, blocks, 4096, Some(5)), 1, 0);
        n.handle(0, Event::Admin(AdminCmd::Promote { force: true }));
        assert_eq!(n.role, Role::Primary);
        while n.poll_action().is_some() {}
        n
    }

    fn write(n: &mut Node<Vec<u8>>, now: Micros, req: u64, block: u64) {
        n.handle(
            now,
            Event::ClientWrite {
                req,
                block,
                count: 1,
                kind: IoKind::Write,
                fua: false,
                payload: Some(alloc::vec![1; 4096]),
            },
        );
    }

    /// Drain the actions; every write must follow a metadata write whose
    /// activity log holds its extent. Returns the metadata writes and the
    /// writes (io, extent) in order.
    fn drain(n: &mut Node<Vec<u8>>, al: &mut Vec<u64>) -> (usize, Vec<(IoId, u64)>) {
        let mut metas = 0;
        let mut writes = Vec::new();
        while let Some(a) = n.poll_action() {
            match a {
                Action::PersistMeta(m) => {
                    metas += 1;
                    *al = m.al.clone();
                }
                Action::Write { io, block, .. } => {
                    let e = block / 1024;
                    assert!(al.contains(&e), "write to extent {e} before its log entry");
                    writes.push((io, e));
                }
                _ => {}
            }
        }
        (metas, writes)
    }

    #[test]
    fn test_writes_arriving_during_a_log_transaction_share_the_next_one() {
        let mut n = lone_primary();
        let mut al = Vec::new();
        // The first write to a new extent: its own transaction.
        write(&mut n, 10, 1, 0);
        let (metas, first) = drain(&mut n, &mut al);
        assert_eq!((metas, first.len()), (1, 1));
        // Ten more, each to a new extent, while that transaction may still
        // be under way: none goes out yet.
        for i in 1..=10u64 {
            write(&mut n, 20, 1 + i, i * 1024 + 7);
        }
        let (metas, none) = drain(&mut n, &mut al);
        assert_eq!((metas, none.len()), (0, 0));
        // The first write is done: one transaction carries all ten.
        n.handle(
            30,
            Event::IoDone {
                io: first[0].0,
                ok: true,
            },
        );
        let (metas, ten) = drain(&mut n, &mut al);
        assert_eq!(metas, 1, "one metadata write for the batch");
        let exts: Vec<u64> = ten.iter().map(|&(_, e)| e).collect();
        assert_eq!(exts, (1..=10).collect::<Vec<u64>>());
        // A write to an extent already logged needs no transaction and
        // does not wait for the open one.
        write(&mut n, 40, 20, 5 * 1024 + 9);
        let (metas, hot) = drain(&mut n, &mut al);
        assert_eq!((metas, hot.len()), (0, 1));
    }

    #[test]
    fn test_a_batch_never_exceeds_one_transaction_block() {
        let mut n = lone_primary();
        let cap = crate::meta::al_txn_extents(n.cfg.extent_blocks);
        assert!(cap > 1 && cap < 60, "cap {cap}");
        let mut al = Vec::new();
        write(&mut n, 10, 1, 0);
        let (_, first) = drain(&mut n, &mut al);
        for i in 1..=cap as u64 + 5 {
            write(&mut n, 20, 1 + i, i * 1024);
        }
        n.handle(
            30,
            Event::IoDone {
                io: first[0].0,
                ok: true,
            },
        );
        let (metas, batch) = drain(&mut n, &mut al);
        assert_eq!((metas, batch.len()), (1, cap));
        // The rest go with the next transaction, after the batch's first
        // write completes.
        n.handle(
            40,
            Event::IoDone {
                io: batch[0].0,
                ok: true,
            },
        );
        let (metas, rest) = drain(&mut n, &mut al);
        assert_eq!((metas, rest.len()), (1, 5));
    }
}
