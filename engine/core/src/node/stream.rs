//! The send stream of a session: reliable messages numbered by
//! `ReliableTx`, a backlog while the window is full, acknowledgements from
//! the peer (applied / stable points) and retransmission.

use super::*;

impl<H: Payload> Node<H> {
    pub(super) fn send_control(&mut self, msg: Message) {
        let ack = self.session.as_ref().map_or(0, |s| s.rx.cumulative());
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
        if !s.backlog.is_empty() || !s.tx.has_room() {
            s.backlog.push_back(OutMsg { msg, payload });
            return None;
        }
        let seq =
            s.tx.push(
                now,
                OutMsg {
                    msg,
                    payload: payload.clone(),
                },
            )
            .ok()?;
        let ack = s.rx.cumulative();
        s.ack_pending = false;
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
        if a.applied > s.tx.last_seq() || a.stable > s.tx.last_seq() {
            self.counters.frames_unexpected += 1;
            return;
        }
        s.tx.on_ack(now, &a, |_, _| {});
        s.peer_applied = s.peer_applied.max(a.applied);
        s.peer_stable = s.peer_stable.max(a.stable);
        while let Some(&(seq, wid)) = s.mirror_wids.front() {
            if seq > s.peer_stable {
                break;
            }
            self.peer_stable_wid = self.peer_stable_wid.max(wid);
            s.mirror_wids.pop_front();
        }
        // Resync blocks stable on the target are clean now.
        while let Some(&SentRun { seq, block, count }) = s.resync_sent.front() {
            if !seq.is_at_or_before(s.peer_stable) {
                break;
            }
            s.resync_sent.pop_front();
            for b in block..block + count {
                s.resync_busy.clear(b);
                self.meta.dirty.clear(b);
            }
            self.bitmap_unpersisted = true;
        }
        self.after_peer_progress();
    }

    pub(super) fn after_peer_progress(&mut self) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        // Resync finished once RESYNC_DONE is applied by the target.
        if s.phase == Phase::Source {
            if let Some(Numbered::Sent(done)) = s.resync_done {
                if s.peer_applied >= done {
                    s.phase = Phase::InSync;
                    let blocks = s.resync_blocks_sent;
                    self.meta.gens.bitmap = 0;
                    self.was_in_sync = true;
                    self.crashed_primary = false;
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
            if let Some(hs) = s.handover_seq {
                if s.peer_applied >= hs {
                    s.handover_seq = None;
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
        loop {
            let now = self.now;
            let gen = self.meta.gens.current;
            let Some(s) = self.session.as_mut() else {
                return;
            };
            if !s.tx.has_room() {
                return;
            }
            let Some(m) = s.backlog.pop_front() else {
                return;
            };
            let msg = m.msg;
            let payload = m.payload.clone();
            let Ok(seq) = s.tx.push(now, m) else {
                return;
            };
            let ack = s.rx.cumulative();
            if let Message::Data(d) = msg {
                if d.len > 0 {
                    // Pending write learns its sequence number.
                    for p in self.ios.client_writes_mut() {
                        if p.peer == PeerHalf::Queued && p.wid == d.write_id {
                            p.peer = PeerHalf::Sent(seq);
                        }
                    }
                    if let Some(s) = self.session.as_mut() {
                        s.mirror_wids.push_back((seq, d.write_id));
                    }
                } else if d.flags & data_flags::FLUSH != 0 && d.write_id != 0 {
                    // A client flush (write_id = its local flush io) learns
                    // its sequence number; internal flushes carry 0.
                    for w in self.flush_waiters.iter_mut() {
                        if w.io == d.write_id {
                            w.peer = PeerHalf::Sent(seq);
                        }
                    }
                }
            }
            if let Message::ResyncData(_) = msg {
                if let Some(s) = self.session.as_mut() {
                    // Unnumbered entries are the tail, in send order.
                    let first = s.resync_sent.partition_point(|e| e.seq != Numbered::Queued);
                    if let Some(e) = s.resync_sent.get_mut(first) {
                        e.seq = Numbered::Sent(seq);
                    }
                }
            }
            if let Message::ResyncDone(_) = msg {
                if let Some(s) = self.session.as_mut() {
                    s.resync_done = Some(Numbered::Sent(seq));
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
            if s.ack_pending {
                s.ack_pending = false;
                let a = s.rx.ack(s.applied, s.stable);
                self.send_control(Message::Ack(a));
            }
        }
    }

    pub(super) fn retransmit(&mut self) {
        let now = self.now;
        let gen = self.meta.gens.current;
        let mut out = Vec::new();
        if let Some(s) = self.session.as_mut() {
            let ack = s.rx.cumulative();
            while let Some((seq, m)) = s.tx.poll_retransmit(now) {
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
