//! The MSL session: the HELLO handshake that decides the resync direction
//! from both sides' generations, the memory image sent at its start, and
//! its end (a primary goes degraded; a secondary protects what it received
//! but has not flushed).

use super::*;

/// The handshake's state across sessions: this node's session id, the
/// peer's last HELLO, why the last session ended, and what HELLO reports.
pub(super) struct Handshake {
    pub(super) my_session: u64,
    /// Peer HELLO session last seen (echoed in our HELLO's ack field).
    pub(super) peer_hello_seen: Option<u64>,
    /// Why the last MSL session ended (shown by `mslctl status`).
    pub(super) last_session_end: Option<&'static str>,
    /// Crashed as primary and not yet resynced.
    pub(super) crashed_primary: bool,
    pub(super) admin_disconnected: bool,
    pub(super) last_hello_us: Micros,
}

#[derive(Clone, Debug)]
pub(super) struct OutMsg<H> {
    pub(super) msg: Message,
    pub(super) payload: Option<H>,
}

#[derive(Clone, Debug)]
pub(super) struct InMsg<H> {
    pub(super) generation: u64,
    pub(super) msg: Message,
    pub(super) payload: Option<H>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Images being exchanged (peer's not received yet).
    Images,
    /// Local node sends the resync.
    Source,
    /// Local node receives the resync.
    Target,
    InSync,
    /// Refused (split brain, unrelated, no good data): no data flows.
    Refused,
}

/// A reliable message's sequence number, once it leaves the backlog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Numbered {
    /// In the send backlog (the window was full).
    Queued,
    Sent(u64),
}

impl Numbered {
    /// Sent with a sequence number at or before `seq`.
    pub(super) fn is_at_or_before(self, seq: u64) -> bool {
        matches!(self, Numbered::Sent(s) if s <= seq)
    }
}

/// A run of resync blocks sent to the target.
#[derive(Clone, Copy, Debug)]
pub(super) struct SentRun {
    pub(super) seq: Numbered,
    pub(super) block: u64,
    pub(super) count: u64,
}

/// One MSL session: the outcome of the handshake, and its parts.
pub(super) struct Session<H> {
    /// Our HELLO as the peer decided on it (its session is our base).
    pub(super) my_hello: Hello,
    pub(super) peer_session: u64,
    pub(super) decision: Decision,
    pub(super) phase: Phase,
    /// What this node sends.
    pub(super) send: SendStream<H>,
    /// What this node receives and applies.
    pub(super) recv: ApplyPipeline<H>,
    /// The peer's memory image.
    pub(super) image: ImageRx,
    /// Resync progress (source side; the total on both sides).
    pub(super) resync: ResyncSource,
}

/// The peer's memory image as it arrives: decoded chunk by chunk, so
/// only the bitmap it builds and one chunk are ever held.
pub(super) struct ImageRx {
    /// The image being received (from its chunk at offset 0).
    pub(super) dec: Option<crate::meta::ImageDecoder>,
    /// Its length and whole-image CRC32C (from its first chunk), and the
    /// CRC32C of the bytes received so far.
    pub(super) total_len: u64,
    pub(super) image_crc: u32,
    pub(super) crc: u32,
    /// Installed.
    pub(super) installed: bool,
}

/// Resync progress of a session.
pub(super) struct ResyncSource {
    /// Blocks to resync when it started (both sides).
    pub(super) total: u64,
    /// The next block to look at.
    pub(super) cursor: u64,
    /// Runs sent, awaiting the target's stable point, in send order (the
    /// ones still in the backlog, unnumbered, at the tail).
    pub(super) sent: VecDeque<SentRun>,
    /// Blocks being read or in `sent` (sized when the resync starts): one
    /// bit test instead of scanning both per block.
    pub(super) busy: Bitmap,
    /// Blocks before this read as zeroes on the source (a hole its host
    /// reported): dirty ones there go as zero runs, without reading them.
    pub(super) hole_until: u64,
    /// Client writes during the session: a hole reported by a read issued
    /// before the last of them may no longer be one.
    pub(super) writes: u64,
    /// RESYNC_DONE, once queued.
    pub(super) done: Option<Numbered>,
    pub(super) blocks_sent: u64,
    pub(super) last_progress_us: Micros,
}

impl<H: Payload> Node<H> {
    pub(super) fn my_hello(&self) -> Hello {
        let mut flags = 0;
        if self.hs.crashed_primary {
            flags |= hello_flags::CRASHED_PRIMARY;
        }
        if self.meta.disk == DiskState::Inconsistent {
            flags |= hello_flags::RESYNC_TARGET;
        }
        Hello {
            role: self.role,
            disk: if self.failed {
                DiskState::Failed
            } else {
                self.meta.disk
            },
            volume_bytes: self.cfg.volume_blocks * u64::from(self.cfg.block_size),
            block_size: self.cfg.block_size,
            gens: self.meta.gens,
            flags,
            dirty_blocks: self.meta.dirty.count(),
            session: self.hs.my_session,
            epoch: self.cfg.epoch,
            counter: 0,
        }
    }

    /// `h` with the next `(epoch, counter)`: every HELLO sent, repeats
    /// included, is newer than the last packet this node sent.
    pub(super) fn stamped(&mut self, mut h: Hello) -> Hello {
        (h.epoch, h.counter) = self.next_stamp();
        h
    }

    /// Any change to what HELLO says starts a new session id, so a peer never
    /// decides on stale state.
    pub(super) fn renew_session(&mut self) {
        self.hs.my_session = (self.rng.nonzero() & !0xFFFF_FFFF).max(1 << 32);
    }

    pub(super) fn on_hello(&mut self, header: Header, h: Hello) {
        if self.hs.admin_disconnected || self.failed {
            return;
        }
        if h.volume_bytes != self.cfg.volume_blocks * u64::from(self.cfg.block_size)
            || h.block_size != self.cfg.block_size
        {
            self.counters.frames_unexpected += 1;
            self.notify(Notice::Warning {
                what: "peer volume geometry differs: not connecting",
            });
            return;
        }
        self.check_deposed(h.role, h.gens.current);
        self.peer.role = Some(h.role);
        if self.role == Role::Secondary
            && h.role == Role::Primary
            && h.gens.current != self.meta.gens.current
        {
            // The primary serves in a generation this node never followed
            // (it went on alone, e.g. while this node was paused): its
            // writes there are not here, so this copy may not take over
            // until a session brings it in sync again.
            self.peer.was_in_sync = false;
        }
        if let Some(s) = &self.session {
            if s.peer_session == h.session {
                if h.flags & hello_flags::ESTABLISHED == 0 {
                    // The peer's timer still sends HELLOs: it has not
                    // established (our establishing HELLO was lost). Repeat
                    // it. Establishing HELLOs are never answered, so this
                    // cannot loop.
                    let hello = s.my_hello;
                    let hello = self.stamped(hello);
                    let hdr = self.header(0, h.session);
                    self.emit(Action::SendMsl {
                        header: hdr,
                        msg: Message::Hello(hello),
                        payload: None,
                    });
                }
                return;
            }
            if self.stall_hold() {
                // The peer may have ended the session because this node
                // was silent, and may take over next: a primary that ended
                // it now would go degraded and acknowledge writes alone.
                // Judged once the hold is over.
                return;
            }
            // Peer restarted or its state changed: renegotiate.
            self.end_session("peer started a new session");
        }
        self.hs.peer_hello_seen = Some(h.session);
        if header.ack == self.hs.my_session {
            self.establish(h);
        } else {
            // Answer soon so the peer can establish (at most one immediate
            // answer per millisecond, so duplicates cannot snowball).
            let soon = self.now.max(self.hs.last_hello_us + 1_000);
            let at = self.timers.deadline(Timer::Hello).min(soon);
            self.timers.set(Timer::Hello, at);
        }
    }

    pub(super) fn establish(&mut self, peer: Hello) {
        if self.switchover.unconfirmed && self.role == Role::Secondary {
            if peer.role == Role::Secondary
                && peer.gens.current == self.meta.gens.history[0]
                && peer.gens.bitmap == 0
                && peer.flags & hello_flags::CRASHED_PRIMARY == 0
            {
                // A new session: the peer can no longer apply the old
                // handover. Take the role back; the next HELLOs (a new
                // session id) connect the pair with this node primary.
                self.reclaim_role();
                return;
            }
            self.switchover.unconfirmed = false;
            if peer.role == Role::Primary
                && peer.gens.current != self.meta.gens.current
                && !peer.gens.history.contains(&self.meta.gens.current)
            {
                // The peer became primary without the handover (it took
                // over): the handover's generation, in which this node
                // served nothing, never reached it. Back to the one before,
                // so the pair reconnects with this node behind, not
                // diverged.
                gens::undo_generation(&mut self.meta.gens);
                self.persist();
            }
            if peer.role == Role::Primary {
                self.finish_switchover();
            } else {
                self.switchover.running = None;
            }
        }
        let local = SideView {
            node_id: self.cfg.node_id,
            role: self.role,
            disk: self.meta.disk,
            gens: self.meta.gens,
            crashed_primary: self.hs.crashed_primary,
        };
        let remote = SideView {
            node_id: self.cfg.peer_id,
            role: peer.role,
            disk: peer.disk,
            gens: peer.gens,
            crashed_primary: peer.flags & hello_flags::CRASHED_PRIMARY != 0,
        };
        let mut decision = gens::decide(&local, &remote);
        if (decision.strategy.is_target() && self.role == Role::Primary)
            || (decision.strategy.is_source() && peer.role == Role::Primary)
        {
            // A primary would lose its writes: both wrote independently.
            decision = Decision {
                strategy: Strategy::SplitBrain,
                rule: decision.rule,
            };
        }
        // Sequence spaces: ours from our session id, theirs from theirs.
        let txcfg = TxConfig {
            window: self.cfg.window,
            rto_initial_us: self.cfg.rto_initial_us,
            rto_min_us: self.cfg.rto_min_us,
            rto_max_us: self.cfg.rto_max_us,
        };
        let mut my_hello = self.my_hello();
        my_hello.flags |= hello_flags::ESTABLISHED;
        let mut s = Session {
            my_hello,
            peer_session: peer.session,
            decision,
            phase: Phase::Images,
            send: SendStream {
                tx: ReliableTx::new(txcfg, self.hs.my_session),
                backlog: VecDeque::new(),
                peer_applied: self.hs.my_session,
                peer_stable: self.hs.my_session,
                mirror_wids: VecDeque::new(),
                handover_seq: None,
                image: None,
                stable_point: None,
            },
            recv: ApplyPipeline {
                rx: ReliableRx::new(self.cfg.window, peer.session),
                ack_pending: false,
                apply_q: VecDeque::new(),
                applying: SeqMap::new(),
                last_processed: peer.session,
                applied: peer.session,
                stable: peer.session,
                last_flush_us: self.now,
                flush_wanted: false,
                flush_upto: 0,
                target_unflushed: VecDeque::new(),
                unstable_applied: BTreeMap::new(),
            },
            image: ImageRx {
                dec: None,
                total_len: 0,
                image_crc: 0,
                crc: 0,
                installed: false,
            },
            resync: ResyncSource {
                total: 0,
                cursor: 0,
                sent: VecDeque::new(),
                busy: Bitmap::new(0),
                hole_until: 0,
                writes: 0,
                done: None,
                blocks_sent: 0,
                last_progress_us: self.now,
            },
        };
        // Tell the peer we established (it may still wait for our ack).
        let ack_hdr = self.header(0, peer.session);
        let my_hello = self.stamped(my_hello);
        self.emit(Action::SendMsl {
            header: ack_hdr,
            msg: Message::Hello(my_hello),
            payload: None,
        });
        if decision.strategy.is_refusal() {
            s.phase = Phase::Refused;
            if decision.strategy == Strategy::SplitBrain {
                self.counters.split_brains += 1;
            }
            self.session = Some(s);
            self.notify(Notice::Refused {
                strategy: decision.strategy,
                rule: decision.rule,
            });
            if decision.strategy == Strategy::SplitBrain
                && self.role == Role::Primary
                && peer.role == Role::Primary
                && self.cfg.node_id > self.cfg.peer_id
            {
                // Two primaries must not both hold the service address. The
                // higher node id steps down; its data is kept as it is (not
                // merged, not discarded) until the administrator decides.
                self.become_secondary(Reason::SplitBrainStepDown);
            }
            return;
        }
        self.session = Some(s);
        self.writes.session_start_wid = self.writes.next_wid - 1;
        self.notify(Notice::Connected {
            strategy: decision.strategy,
            rule: decision.rule,
        });
        // Cold start of the pair: the source with good data serves.
        if decision.strategy.is_source()
            && self.cfg.auto_takeover
            && self.role == Role::Secondary
            && peer.role == Role::Secondary
            && self.meta.disk == DiskState::UpToDate
        {
            self.become_primary(false, Reason::PairStarted);
            // The peer adopts our new generation from our image.
        }
        if decision.strategy == Strategy::SourceFull {
            self.meta.dirty.set_all();
            self.persist();
        }
        self.send_image();
    }

    pub(super) fn send_image(&mut self) {
        let img = Image {
            cluster_id: self.cfg.cluster_id,
            node_id: self.cfg.node_id,
            volume_blocks: self.cfg.volume_blocks,
            block_size: self.cfg.block_size,
            gens: self.meta.gens,
            disk: self.meta.disk,
            role: self.role,
            dirty: self.meta.dirty.clone(),
            tx_next_seq: self.session.as_ref().map_or(0, |s| s.send.tx.next_seq()),
            frontend: Vec::new(),
        };
        // Streamed: chunks are encoded as the send window has room
        // (`send_image_chunks`), ahead of any message queued after this.
        if let Some(s) = self.session.as_mut() {
            s.send.image = Some(crate::meta::ImageEncoder::new(&img));
        }
        self.flush_backlog();
    }

    /// Send memory-image chunks while the window has room; false while
    /// some of the image is still to be sent.
    pub(super) fn send_image_chunks(&mut self) -> bool {
        loop {
            let Some(s) = self.session.as_mut() else {
                return true;
            };
            let Some(enc) = s.send.image.as_mut() else {
                return true;
            };
            if !s.send.tx.has_room() {
                return false;
            }
            let offset = enc.total_len() - enc.remaining();
            let Some(chunk) = enc.next_chunk(IMAGE_CHUNK) else {
                s.send.image = None;
                return true;
            };
            let c = StateImageChunk {
                total_len: enc.total_len(),
                offset,
                image_crc: enc.image_crc(),
            };
            let now = self.now;
            let gen = self.meta.gens.current;
            let payload = Some(H::from_bytes(&chunk));
            let Ok(seq) = s.send.tx.push(
                now,
                OutMsg {
                    msg: Message::StateImage(c),
                    payload: payload.clone(),
                },
            ) else {
                return false;
            };
            let ack = s.recv.rx.cumulative();
            s.recv.ack_pending = false;
            let mut h = self.header(seq, ack);
            h.generation = gen;
            self.emit(Action::SendMsl {
                header: h,
                msg: Message::StateImage(c),
                payload,
            });
        }
    }

    pub(super) fn end_session(&mut self, why: &'static str) {
        let Some(s) = self.session.take() else {
            return;
        };
        // Every session attempt gets a fresh id: a peer that still holds the
        // old session (it has not timed out yet) then sees a new session and
        // renegotiates, instead of answering with stale state (msl-sim seed
        // 1292).
        self.renew_session();
        // Applies still in flight belong to the ended session: their late
        // completions must not release a new session's entry that reuses
        // the sequence number (nothing is released; their blocks stay as
        // the bitmaps say).
        self.ios.end_session();
        self.peer.was_in_sync = self.peer.was_in_sync && s.phase == Phase::InSync;
        self.hs.last_session_end = Some(why);
        self.counters.retransmits += s.send.tx.stats.retransmits;
        if self.online.run.status.active {
            self.online.run.abort("the MSL session ended");
            self.notify(Notice::VerifyAborted {
                reason: "the MSL session ended",
            });
        }
        // In-flight resync reads are abandoned (their blocks stay dirty).
        if self.role == Role::Primary && !self.failed {
            // Extents the peer may lack: a write in flight, or one not yet
            // covered by a flush the peer reported (its cache may be lost).
            // Extents whose writes are all stable on the peer, or older
            // than this session (their blocks were resynced or are still
            // dirty), need nothing: with a 1237-extent log, merging every
            // slot resynced gigabytes after a secondary restart.
            self.mark_extents_peer_may_lack();
            for (_, p) in self.ios.client_writes() {
                self.meta.dirty.set_range(p.block, p.count);
            }
            let id = self.rng.nonzero();
            gens::new_generation(&mut self.meta.gens, id, true);
            self.renew_session();
            self.persist();
            self.notify(Notice::Degraded {
                reason: if self.lan.alive() {
                    "MSL lost; secondary alive on the LAN"
                } else {
                    "secondary is down"
                },
            });
            // Writes waiting only for the peer are released now.
            for p in self.ios.client_writes_mut() {
                p.peer = PeerHalf::Local;
            }
            for w in self.writes.flush_waiters.iter_mut() {
                w.peer = PeerHalf::Local;
            }
            self.switchover.running = None;
            self.release_writes();
        } else if s.phase == Phase::Target
            || (s.phase == Phase::Images && s.decision.strategy.is_target())
        {
            // Interrupted resync as target: dirty map persisted as is.
            self.persist();
        } else if !self.failed
            && (!s.recv.unstable_applied.is_empty() || !s.recv.applying.is_empty())
        {
            // Writes received from the primary that no flush here covered
            // yet: a power loss of this node could still lose them, and no
            // activity log tracks writes received as secondary, so if this
            // node took over and then crashed they would go unsynced
            // (msl-sim seed 839, with stable points 5 s apart).
            // Writes still in flight here may land after any flush issued
            // now: marked out of sync instead.
            for b in s.recv.applying.values() {
                self.meta.dirty.set_range(b.block, b.count);
            }
            self.protect_received(s.recv.unstable_applied.keys().copied().collect());
        }
        if s.send.handover_seq.is_some() {
            self.peer.role = Some(Role::Primary);
            self.switchover.unconfirmed = self.role == Role::Secondary;
        }
        self.hs.peer_hello_seen = None;
        self.timers.set(Timer::Hello, self.now);
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    /// 4 TiB of 4 KiB blocks: its bitmap is 128 MiB when dense.
    const BLOCKS: u64 = 1 << 30;

    fn drain(n: &mut Node<Vec<u8>>) -> Vec<Action<Vec<u8>>> {
        core::iter::from_fn(|| n.poll_action()).collect()
    }

    /// True once `n`'s session installed the peer's image.
    fn installed(n: &Node<Vec<u8>>) -> bool {
        n.session.as_ref().is_some_and(|s| s.image.installed)
    }

    #[test]
    fn test_image_of_a_4tib_volume_dirty_every_1000th_block_streams_and_installs() {
        // A degraded primary (generation 9 since it lost its peer at 5,
        // every 1000th block written since) meets its returning secondary.
        let mut ma = Meta::create(7, 1, BLOCKS, 4096, Some(5));
        ma.gens.current = 9;
        ma.gens.bitmap = 5;
        let mut b = 0;
        while b < BLOCKS {
            ma.dirty.set(b);
            b += 1000;
        }
        let dirty = ma.dirty.clone();
        let mb = Meta::create(7, 2, BLOCKS, 4096, Some(5));
        let mut a = Node::new(Config::new(1, 2, 7, BLOCKS, 4096), ma, 1, 0);
        let mut bn = Node::new(Config::new(2, 1, 7, BLOCKS, 4096), mb, 2, 0);
        let window = a.cfg.window;
        let mut image_bytes = 0u64;
        let mut now = 0;
        let mut streaming_seen = false;
        while !installed(&bn) {
            assert!(now < 600_000_000, "image not installed after {now} us");
            now += 100;
            for from_a in [true, false] {
                let acts = if from_a {
                    drain(&mut a)
                } else {
                    drain(&mut bn)
                };
                for act in acts {
                    let (src, dst) = if from_a {
                        (&mut a, &mut bn)
                    } else {
                        (&mut bn, &mut a)
                    };
                    if let Action::SendMsl {
                        msg: Message::StateImage(c),
                        ..
                    } = &act
                    {
                        if from_a {
                            image_bytes = c.total_len;
                        }
                    }
                    match super::super::tests::deliver(dst, now, act) {
                        Some(Action::Write { io, .. } | Action::Flush { io }) => {
                            src.handle(now, Event::IoDone { io, ok: true })
                        }
                        Some(Action::Read { io, count, .. }) => src.handle(
                            now,
                            Event::ReadDone {
                                io,
                                ok: true,
                                payload: Some(alloc::vec![0; count as usize * 4096]),
                            },
                        ),
                        _ => {}
                    }
                }
            }
            // While the image streams, the sender holds no encoded chunk
            // beyond its window: none waits in the backlog.
            if let Some(s) = a.session.as_ref() {
                if s.send.image.is_some() {
                    streaming_seen = true;
                    assert!(s.send.tx.in_flight() <= window);
                    assert!(!s
                        .send
                        .backlog
                        .iter()
                        .any(|m| matches!(m.msg, Message::StateImage(_))));
                }
            }
            a.handle(now, Event::Tick);
            bn.handle(now, Event::Tick);
        }
        assert!(streaming_seen, "the image was never in flight");
        assert!(image_bytes > 64 << 20, "image of {image_bytes} bytes");
        let s = bn.session.as_ref().unwrap();
        assert_eq!(s.decision.strategy, Strategy::TargetBitmap);
        assert_eq!(bn.meta.dirty.count(), dirty.count());
        assert!(
            bn.meta.dirty == dirty,
            "target's map differs from the source's"
        );
        assert_eq!(bn.counters.frames_unexpected, 0);
    }
}
