//! The receive/apply pipeline on the receiving side of a session: delivered
//! messages are processed strictly in order; writes to disjoint blocks
//! overlap, barriers (flush, image install, resync done, handover) wait for
//! everything before them; periodic flushes here advance `stable`.

use super::*;

/// `count` blocks from `block`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Blocks {
    pub(super) block: u64,
    pub(super) count: u64,
}

impl Blocks {
    pub(super) fn overlaps(self, block: u64, count: u64) -> bool {
        block < self.block + self.count && self.block < block + count
    }
}

/// The receiving side of a session: the in-order apply pipeline.
pub(super) struct ApplyPipeline<H> {
    pub(super) rx: ReliableRx<InMsg<H>>,
    /// An ack (applied / stable points) is owed to the peer.
    pub(super) ack_pending: bool,
    /// Delivered messages, in order, not yet processed.
    pub(super) apply_q: VecDeque<(u64, InMsg<H>)>,
    /// Writes in flight here, by message.
    pub(super) applying: SeqMap<u64, Blocks>,
    pub(super) last_processed: u64,
    /// Everything up to here is applied / flushed here.
    pub(super) applied: u64,
    pub(super) stable: u64,
    pub(super) last_flush_us: Micros,
    /// A flush is due (FUA write, or periodic). It is issued once every
    /// message up to `flush_upto` is applied; applies go on meanwhile, and
    /// while it runs (it covers what completed before it was issued).
    pub(super) flush_wanted: bool,
    pub(super) flush_upto: u64,
    /// Target side: blocks written during the resync, in message order,
    /// whose dirty bits clear once a flush covering them completes.
    pub(super) target_unflushed: VecDeque<(u64, Blocks)>,
    /// Receiver side outside a resync: activity-log extents holding
    /// applied writes no flush here has covered yet (extent -> newest
    /// seq). A power loss would lose them, and no activity log tracks
    /// writes received as secondary: if this node ends the session (and
    /// perhaps takes over) they are marked out of sync.
    pub(super) unstable_applied: BTreeMap<u64, u64>,
}

impl<H: Payload> Node<H> {
    pub(super) fn on_reliable(&mut self, header: Header, msg: Message, payload: Option<H>) {
        let Some(s) = self.session.as_mut() else {
            self.counters.frames_unexpected += 1;
            return;
        };
        if s.phase == Phase::Refused {
            return;
        }
        let outcome = s.recv.rx.on_frame(
            header.seq,
            InMsg {
                generation: header.generation,
                msg,
                payload,
            },
        );
        s.recv.ack_pending = true;
        if outcome == RxOutcome::OutOfWindow {
            self.counters.frames_unexpected += 1;
        }
        while let Some(s) = self.session.as_mut() {
            let Some((seq, m)) = s.recv.rx.pop() else {
                break;
            };
            s.recv.apply_q.push_back((seq, m));
        }
        self.run_apply_queue();
    }

    /// Receiver pipeline: process delivered messages strictly in order.
    /// Writes to disjoint blocks overlap; barriers (flush, image install,
    /// resync done, handover) wait for everything before them.
    pub(super) fn run_apply_queue(&mut self) {
        loop {
            let Some(s) = self.session.as_mut() else {
                return;
            };
            let Some((seq, m)) = s.recv.apply_q.front() else {
                break;
            };
            let seq = *seq;
            let idle = s.recv.applying.is_empty() && self.ios.count(io::Kind::ApplyFlush) == 0;
            match m.msg {
                Message::Data(d) if d.flags & data_flags::FLUSH != 0 || d.len == 0 => {
                    if !idle {
                        break;
                    }
                    let io = self.ios.start(io::Purpose::ApplyFlush { seq });
                    let s = self.session.as_mut().unwrap_or_else(|| unreachable!());
                    s.recv.apply_q.pop_front();
                    s.recv.last_processed = seq;
                    s.recv.last_flush_us = self.now;
                    self.emit(Action::Flush { io });
                }
                Message::Data(Data {
                    offset, len, flags, ..
                })
                | Message::ResyncData(ResyncData { offset, len, flags }) => {
                    let bs = u64::from(self.cfg.block_size);
                    let block = offset / bs;
                    let count = u64::from(len) / bs;
                    let overlaps = s.recv.applying.values().any(|b| b.overlaps(block, count));
                    if overlaps {
                        break;
                    }
                    if m.generation != self.meta.gens.current && matches!(m.msg, Message::Data(_)) {
                        self.counters.frames_wrong_generation += 1;
                    }
                    let is_resync = matches!(m.msg, Message::ResyncData(_));
                    let kind = if flags & data_flags::TRIM != 0 {
                        IoKind::Trim
                    } else if flags & data_flags::ZEROES != 0 {
                        IoKind::Zeroes
                    } else {
                        IoKind::Write
                    };
                    let fua = flags & data_flags::FUA != 0;
                    let Some((_, m)) = s.recv.apply_q.pop_front() else {
                        break;
                    };
                    let prev = s.recv.applying.insert(seq, Blocks { block, count });
                    debug_assert!(prev.is_none(), "message {seq} applied twice");
                    s.recv.last_processed = seq;
                    let io = self.ios.start(io::Purpose::Apply { seq });
                    if is_resync {
                        self.counters.resync_blocks_received += count;
                    }
                    if kind == IoKind::Write && m.payload.is_none() {
                        self.counters.frames_unexpected += 1;
                    }
                    self.emit(Action::Write {
                        io,
                        block,
                        count,
                        kind,
                        fua,
                        payload: m.payload,
                    });
                    if fua {
                        // FUA: flush once it is written so `stable` covers it.
                        if let Some(s) = self.session.as_mut() {
                            s.recv.flush_wanted = true;
                            s.recv.flush_upto = s.recv.flush_upto.max(seq);
                        }
                    }
                }
                Message::StateImage(c) => {
                    let Some((_, m)) = s.recv.apply_q.pop_front() else {
                        break;
                    };
                    s.recv.last_processed = seq;
                    if let Some(p) = &m.payload {
                        let bytes = p.bytes();
                        if c.offset == 0 {
                            s.image.dec =
                                Some(crate::meta::ImageDecoder::new(self.cfg.volume_blocks));
                            s.image.total_len = c.total_len;
                            s.image.image_crc = c.image_crc;
                            s.image.crc = 0;
                        }
                        let img = &mut s.image;
                        let fits = img.dec.as_ref().is_some_and(|d| {
                            d.received() == c.offset
                                && c.total_len == img.total_len
                                && c.image_crc == img.image_crc
                                && (bytes.len() as u64) <= img.total_len - c.offset
                        });
                        if !fits {
                            self.counters.frames_unexpected += 1;
                            continue;
                        }
                        let Some(dec) = img.dec.as_mut() else {
                            continue;
                        };
                        img.crc = crc32c::crc32c_append(img.crc, bytes);
                        let pushed = dec.push(bytes);
                        let done = dec.received() == img.total_len;
                        if let Err(e) = pushed {
                            img.dec = None;
                            self.counters.frames_unexpected += 1;
                            let why = match e {
                                crate::meta::DecodeError::Geometry { .. } => {
                                    "memory image geometry differs"
                                }
                                _ => "undecodable memory image",
                            };
                            self.end_session(why);
                            return;
                        }
                        if done {
                            let dec = img.dec.take();
                            if img.crc != img.image_crc {
                                self.counters.frames_unexpected += 1;
                                self.end_session("corrupt memory image");
                                return;
                            }
                            match dec.map(|d| d.finish()) {
                                Some(Ok(img)) => self.install_image(img),
                                _ => {
                                    self.counters.frames_unexpected += 1;
                                    self.end_session("undecodable memory image");
                                    return;
                                }
                            }
                        }
                    }
                }
                Message::ResyncDone(_) => {
                    if !idle {
                        break;
                    }
                    s.recv.apply_q.pop_front();
                    s.recv.last_processed = seq;
                    s.phase = Phase::InSync;
                    let total = s.resync.total;
                    self.meta.dirty.clear_all();
                    self.transition(Reason::ResyncTargetFinished);
                    self.peer.was_in_sync = true;
                    self.hs.crashed_primary = false;
                    self.persist();
                    self.notify(Notice::ResyncFinished {
                        source: false,
                        blocks: total,
                    });
                }
                Message::VerifyReq(v) => {
                    // After every write sent before it is applied.
                    if !idle {
                        break;
                    }
                    s.recv.apply_q.pop_front();
                    s.recv.last_processed = seq;
                    self.verify_request(v);
                }
                Message::VerifyReply(v) => {
                    let Some((_, m)) = s.recv.apply_q.pop_front() else {
                        break;
                    };
                    s.recv.last_processed = seq;
                    let d = m.payload.as_ref().map_or(&[][..], |p| p.bytes());
                    self.verify_reply(v, d);
                }
                Message::RoleChange(rc) => {
                    if !idle {
                        break;
                    }
                    // Received writes not yet flushed here: this node's
                    // activity log covers them once it is primary.
                    let unstable: Vec<u64> = s.recv.unstable_applied.keys().copied().collect();
                    s.recv.apply_q.pop_front();
                    s.recv.last_processed = seq;
                    if rc.phase == RolePhase::Leaving && self.role == Role::Primary {
                        // The old primary of a switchover restarts itself:
                        // end the session now (its writes in flight are
                        // marked for resync) rather than hold writes for a
                        // dead interval of its silence.
                        self.end_session("peer restarting as secondary");
                        return;
                    }
                    if rc.phase == RolePhase::Handover
                        && self.role == Role::Secondary
                        && s.phase == Phase::InSync
                    {
                        if !unstable.is_empty() {
                            self.protect_received(unstable);
                        }
                        let cur = self.meta.gens.current;
                        gens::push_history(&mut self.meta.gens, cur);
                        self.meta.gens.current = rc.generation;
                        self.transition(Reason::HandoverReceived);
                        self.peer.role = Some(Role::Secondary);
                        // The session goes on with the directions swapped:
                        // this node's writes are mirrored from now on.
                        if let Some(s) = self.session.as_mut() {
                            s.decision.strategy = Strategy::SourceBitmap;
                        }
                        self.persist();
                        self.emit(Action::ServiceAddress { hold: true });
                        self.notify(Notice::RoleChanged {
                            role: Role::Primary,
                            generation: rc.generation,
                            reason: Reason::HandoverReceived.text(),
                        });
                    } else {
                        self.counters.frames_unexpected += 1;
                    }
                }
                _ => {
                    s.recv.apply_q.pop_front();
                    s.recv.last_processed = seq;
                    self.counters.frames_unexpected += 1;
                }
            }
        }
        self.update_applied();
    }

    pub(super) fn update_applied(&mut self) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        // Everything processed before the oldest write still in flight is
        // applied. (A FLUSH barrier counts as applied once processed: its
        // durability is reported through `stable`.)
        let applied = match s.recv.applying.keys().next() {
            Some(&first) => first - 1,
            None => s.recv.last_processed,
        };
        if applied > s.recv.applied {
            s.recv.applied = applied;
            s.recv.ack_pending = true;
        }
    }

    pub(super) fn install_image(&mut self, img: Image) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if img.volume_blocks != self.cfg.volume_blocks || img.dirty.len() != self.meta.dirty.len() {
            self.counters.frames_unexpected += 1;
            self.end_session("memory image geometry differs");
            return;
        }
        s.image.installed = true;
        let strategy = s.decision.strategy;
        if strategy.is_target() {
            // Adopt the source's generation; everything either side marked
            // is to be received.
            if self.meta.gens.current != img.gens.current {
                let cur = self.meta.gens.current;
                gens::push_history(&mut self.meta.gens, cur);
                self.meta.gens.current = img.gens.current;
            }
            self.meta.gens.bitmap = 0;
            if strategy == Strategy::TargetFull {
                self.meta.dirty.set_all();
            } else {
                self.meta.dirty.union(&img.dirty);
            }
            let total = self.meta.dirty.count();
            s.resync.total = total;
            s.phase = Phase::Target;
            self.transition(Reason::ResyncTargetStarted);
            self.peer.role = Some(img.role);
            self.persist();
            self.notify(Notice::ResyncStarted {
                source: false,
                blocks: total,
                full: strategy == Strategy::TargetFull,
            });
        } else if strategy.is_source() {
            self.meta.dirty.union(&img.dirty);
            let total = self.meta.dirty.count();
            s.resync.total = total;
            s.resync.cursor = 0;
            s.resync.busy = Bitmap::new(self.cfg.volume_blocks);
            s.phase = Phase::Source;
            self.persist();
            self.notify(Notice::ResyncStarted {
                source: true,
                blocks: total,
                full: strategy == Strategy::SourceFull,
            });
        }
    }

    /// How often the target side flushes what it applied: briskly while
    /// resync blocks wait for a stable point (their bits clear then, and
    /// the resync ends); otherwise relaxed, since the primary's own stable
    /// points under activity-log pressure reach this side as FLUSH
    /// barriers anyway.
    pub(super) fn target_flush_interval(&self) -> Option<Micros> {
        let s = self.session.as_ref()?;
        Some(if s.recv.target_unflushed.is_empty() {
            self.cfg.stabilize_relaxed_us / 2
        } else {
            self.cfg.stabilize_interval_us / 2
        })
    }

    /// Secondary: flush periodically so the primary's AL can cool and
    /// resync bits can clear.
    pub(super) fn stabilize_target(&mut self) {
        let now = self.now;
        let Some(interval) = self.target_flush_interval() else {
            return;
        };
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if s.recv.applied <= s.recv.stable {
            // Everything applied is stable already (a FLUSH barrier got
            // there first): nothing to wait for, unless a FUA write is
            // still being written.
            if s.recv.flush_upto <= s.recv.stable {
                s.recv.flush_wanted = false;
            }
            return;
        }
        if self.ios.count(io::Kind::ApplyFlush) > 0 {
            return;
        }
        // Periodic, and during a resync after `2 * window` applied frames:
        // the bulk stream then gets its stable points, and bits clear,
        // without waiting for the timer.
        let bulk = 2 * self.cfg.window as u64;
        if now >= s.recv.last_flush_us + interval
            || (!s.recv.target_unflushed.is_empty() && s.recv.applied >= s.recv.stable + bulk)
        {
            s.recv.flush_wanted = true;
        }
        // The flush covers everything applied when it is issued: writes
        // still in flight are not waited for (the next flush covers them),
        // only a FUA write that asked for it.
        if s.recv.flush_wanted && s.recv.applied >= s.recv.flush_upto {
            let io = self.ios.start(io::Purpose::ApplyFlush {
                seq: s.recv.applied,
            });
            s.recv.flush_wanted = false;
            s.recv.last_flush_us = now;
            self.emit(Action::Flush { io });
        }
    }
}
