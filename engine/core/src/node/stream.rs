//! The send stream of a session: reliable messages numbered by
//! `ReliableTx`, a backlog while the window is full, acknowledgements from
//! the peer (applied / stable points) and retransmission.

use super::*;

/// The sending side of a session.
pub(super) struct SendStream<H> {
    pub(super) tx: ReliableTx<OutMsg<H>>,
    /// Messages waiting for room in the window (data class).
    pub(super) backlog: VecDeque<OutMsg<H>>,
    /// The peer's applied / stable points (in our sequence space).
    pub(super) peer_applied: u64,
    pub(super) peer_stable: u64,
    /// Mirrored write seq -> wid (for peer stability of AL extents).
    pub(super) mirror_wids: VecDeque<(u64, u64)>,
    /// A handover (switchover) was sent at this seq.
    pub(super) handover_seq: Option<u64>,
    /// The memory image still being sent: its chunks go before anything
    /// queued after it, as the window has room.
    pub(super) image: Option<crate::meta::ImageEncoder>,
    /// The FLUSH barrier of the newest stable point (`internal_flush`)
    /// until the peer reports it stable: the next stable point waits for
    /// it, so a peer that flushes slower than this node is not sent
    /// barriers faster than it can take them.
    pub(super) stable_point: Option<Numbered>,
}

impl<H: Payload> Node<H> {
    pub(super) fn send_control(&mut self, msg: Message) {
        let ack = self.session.as_ref().map_or(0, |s| s.recv.rx.cumulative());
        let h = self.header(0, ack);
        self.emit(Action::SendMsl {
            header: h,
            msg,
            payload: None,
        });
    }

    /// Queue a reliable message; returns its sequence number if sent now.
    pub(super) fn send_reliable(&mut self, msg: Message, payload: Option<H>) -> Option<u64> {
        let now = self.now;
        let gen = self.meta.gens.current;
        let s = self.session.as_mut()?;
        if !s.send.backlog.is_empty() || s.send.image.is_some() || !s.send.tx.has_room() {
            s.send.backlog.push_back(OutMsg { msg, payload });
            return None;
        }
        let seq = s
            .send
            .tx
            .push(
                now,
                OutMsg {
                    msg,
                    payload: payload.clone(),
                },
            )
            .ok()?;
        let ack = s.recv.rx.cumulative();
        s.recv.ack_pending = false;
        let mut h = self.header(seq, ack);
        h.generation = gen;
        self.emit(Action::SendMsl {
            header: h,
            msg,
            payload,
        });
        Some(seq)
    }

    pub(super) fn on_ack(&mut self, a: Ack) {
        let now = self.now;
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if a.applied > s.send.tx.last_seq() || a.stable > s.send.tx.last_seq() {
            self.counters.frames_unexpected += 1;
            return;
        }
        s.send.tx.on_ack(now, &a, |_, _| {});
        s.send.peer_applied = s.send.peer_applied.max(a.applied);
        s.send.peer_stable = s.send.peer_stable.max(a.stable);
        while let Some(&(seq, wid)) = s.send.mirror_wids.front() {
            if seq > s.send.peer_stable {
                break;
            }
            self.writes.peer_stable_wid = self.writes.peer_stable_wid.max(wid);
            s.send.mirror_wids.pop_front();
        }
        // Resync blocks stable on the target are clean now.
        while let Some(&SentRun { seq, block, count }) = s.resync.sent.front() {
            if !seq.is_at_or_before(s.send.peer_stable) {
                break;
            }
            s.resync.sent.pop_front();
            s.resync.busy.clear_range(block, count);
            self.meta.dirty.clear_range(block, count);
            self.progress.unpersisted = true;
        }
        self.after_peer_progress();
    }

    pub(super) fn after_peer_progress(&mut self) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        // Resync finished once RESYNC_DONE is applied by the target.
        if s.phase == Phase::Source {
            if let Some(Numbered::Sent(done)) = s.resync.done {
                if s.send.peer_applied >= done {
                    s.phase = Phase::InSync;
                    let blocks = s.resync.blocks_sent;
                    self.meta.gens.bitmap = 0;
                    self.peer.was_in_sync = true;
                    self.hs.crashed_primary = false;
                    self.persist();
                    self.notify(Notice::ResyncFinished {
                        source: true,
                        blocks,
                    });
                }
            }
        }
        // Handover acknowledged as applied: switchover complete.
        let mut restart = false;
        if let Some(s) = self.session.as_mut() {
            if let Some(hs) = s.send.handover_seq {
                if s.send.peer_applied >= hs {
                    s.send.handover_seq = None;
                    restart = true;
                }
            }
        }
        if restart {
            self.finish_switchover();
        }
        self.release_writes();
        self.flush_backlog();
        self.try_handover();
    }

    pub(super) fn flush_backlog(&mut self) {
        if !self.send_image_chunks() {
            return;
        }
        loop {
            let now = self.now;
            let gen = self.meta.gens.current;
            let Some(s) = self.session.as_mut() else {
                return;
            };
            if !s.send.tx.has_room() {
                return;
            }
            let Some(m) = s.send.backlog.pop_front() else {
                return;
            };
            let msg = m.msg;
            let payload = m.payload.clone();
            let Ok(seq) = s.send.tx.push(now, m) else {
                return;
            };
            let ack = s.recv.rx.cumulative();
            if let Message::Data(d) = msg {
                if d.len > 0 {
                    // Pending write learns its sequence number.
                    for p in self.ios.client_writes_mut() {
                        if p.peer == PeerHalf::Queued && p.wid == d.write_id {
                            p.peer = PeerHalf::Sent(seq);
                        }
                    }
                    if let Some(s) = self.session.as_mut() {
                        s.send.mirror_wids.push_back((seq, d.write_id));
                    }
                } else if d.flags & data_flags::FLUSH != 0 && d.write_id == 0 {
                    // A stable point's barrier learns its sequence number.
                    if let Some(s) = self.session.as_mut() {
                        if s.send.stable_point == Some(Numbered::Queued) {
                            s.send.stable_point = Some(Numbered::Sent(seq));
                        }
                    }
                } else if d.flags & data_flags::FLUSH != 0 {
                    // A client flush (write_id = its local flush io) learns
                    // its sequence number; internal flushes carry 0.
                    for w in self.writes.flush_waiters.iter_mut() {
                        if w.io == d.write_id {
                            debug_assert_eq!(
                                w.peer,
                                PeerHalf::Queued,
                                "flush {} numbered twice",
                                w.io
                            );
                            w.peer = PeerHalf::Sent(seq);
                        }
                    }
                }
            }
            if let Message::ResyncData(_) = msg {
                if let Some(s) = self.session.as_mut() {
                    // Unnumbered entries are the tail, in send order.
                    let first = s.resync.sent.partition_point(|e| e.seq != Numbered::Queued);
                    // The queued runs are the tail, and this message is one.
                    debug_assert!(first < s.resync.sent.len(), "no queued resync run");
                    debug_assert!(s
                        .resync
                        .sent
                        .iter()
                        .skip(first)
                        .all(|e| e.seq == Numbered::Queued));
                    if let Some(e) = s.resync.sent.get_mut(first) {
                        e.seq = Numbered::Sent(seq);
                    }
                }
            }
            if let Message::ResyncDone(_) = msg {
                if let Some(s) = self.session.as_mut() {
                    s.resync.done = Some(Numbered::Sent(seq));
                }
            }
            let mut h = self.header(seq, ack);
            h.generation = gen;
            self.emit(Action::SendMsl {
                header: h,
                msg,
                payload,
            });
        }
    }

    /// Drive resync and acks; runs at the end of every `handle`.
    pub(super) fn pump(&mut self) {
        self.retransmit();
        self.pump_resync();
        self.flush_backlog();
        self.stabilize_target();
        self.persist_progress();
        if let Some(s) = self.session.as_mut() {
            if s.recv.ack_pending {
                s.recv.ack_pending = false;
                let a = s.recv.rx.ack(s.recv.applied, s.recv.stable);
                self.send_control(Message::Ack(a));
            }
        }
    }

    pub(super) fn retransmit(&mut self) {
        let now = self.now;
        let gen = self.meta.gens.current;
        let mut out = Vec::new();
        if let Some(s) = self.session.as_mut() {
            let ack = s.recv.rx.cumulative();
            while let Some((seq, m)) = s.send.tx.poll_retransmit(now) {
                out.push((seq, ack, m.msg, m.payload.clone()));
                if out.len() >= 64 {
                    break;
                }
            }
        }
        for (seq, ack, msg, payload) in out {
            let mut h = self.header(seq, ack);
            h.generation = gen;
            self.emit(Action::SendMsl {
                header: h,
                msg,
                payload,
            });
        }
    }
}
