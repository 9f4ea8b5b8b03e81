//! Liveness of the peer on each path (MSL and LAN), the heartbeats and
//! HELLOs this node sends on time, and what the secondary concludes when a
//! path dies.

use super::*;

/// This node's own links: MSL carrier, LAN adapters, the packet counter.
pub(super) struct LocalLinks {
    pub(super) msl_carrier: bool,
    /// The counter of the last HELLO or heartbeat sent in this epoch
    /// (`Config::epoch`); the first is 1.
    pub(super) hb_counter: u64,
    pub(super) adapters: [AdapterHealth; MAX_ADAPTERS],
    pub(super) adapter_count: u8,
    pub(super) adapter_last_rx: [Option<Micros>; MAX_ADAPTERS],
}

/// What this node knows of its peer: its last heartbeat and role, and
/// whether the pair was in sync when it last saw it.
pub(super) struct PeerView {
    /// The newest heartbeat heard on either path.
    pub(super) last_hb: Option<Heartbeat>,
    pub(super) role: Option<Role>,
    pub(super) was_in_sync: bool,
    /// `(epoch, counter)` of `last_hb`.
    pub(super) newest: Stamp,
    /// The newest `(epoch, counter)` heard on each path: a HELLO or
    /// heartbeat not newer than it is a replay (or a duplicate, or
    /// reordered) and is dropped, whatever the path's state.
    pub(super) fresh_msl: Stamp,
    pub(super) fresh_lan: Stamp,
    /// The peer's newest epoch heard on either path: a packet from an
    /// earlier one is a replay on every path (a path this node has not
    /// heard the peer on since its own start knows no counter yet).
    pub(super) epoch: u64,
    /// MSL lost while the primary was still heard on the LAN: waiting for
    /// one more LAN heartbeat to tell "MSL broken" from "primary dead".
    pub(super) msl_lost_pending: bool,
}

/// Stalls: times this node did not run, and the primary's hold on new
/// writes after one.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct StallGuard {
    /// When the last stall ended (the first call of the core after it).
    pub(super) ended: Option<Micros>,
    /// After a stall, until then (one dead interval of its own running
    /// time), a primary starts no write and ends no session: the peer may
    /// have taken over while it did not run, and until the peer has had
    /// that long to show it, acknowledging a write alone could lose it.
    pub(super) hold_until: Option<Micros>,
}

/// A HELLO's or heartbeat's `(epoch, counter)`: ordered lexicographically,
/// a restarted sender's first packet is newer than anything it sent before.
pub(super) type Stamp = (u64, u64);

/// Whether the peer is heard on one path (MSL or LAN).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct PathLiveness {
    /// When the peer was last heard here.
    last_rx: Option<Micros>,
    alive: bool,
}

impl PathLiveness {
    pub(super) fn alive(&self) -> bool {
        self.alive
    }

    /// A packet from the peer arrived at `arrived` (the host's receive
    /// time, which may be earlier than the core's `now`); true if the path
    /// just came alive.
    pub(super) fn heard(&mut self, arrived: Micros) -> bool {
        let t = self.last_rx.map_or(arrived, |t| t.max(arrived));
        self.last_rx = Some(t);
        let found = !self.alive;
        self.alive = true;
        debug_assert!(self.alive && self.last_rx >= Some(arrived));
        found
    }

    /// The node did not run until `now`: a path that was alive gets a full
    /// dead interval from `now` (silence counts only while the node runs).
    pub(super) fn restart(&mut self, now: Micros) {
        if self.alive {
            self.last_rx = Some(now);
        }
    }

    /// Declared dead at once (carrier lost); true if it was alive.
    pub(super) fn lose(&mut self) -> bool {
        let lost = self.alive;
        self.alive = false;
        lost
    }

    /// Silent for `dead` at `now`: true if the path just died.
    pub(super) fn expire(&mut self, now: Micros, dead: Micros) -> bool {
        if self.alive && self.last_rx.is_some_and(|t| now >= t + dead) {
            self.alive = false;
            return true;
        }
        false
    }

    /// When the path dies unless the peer is heard again.
    pub(super) fn deadline(&self, dead: Micros) -> Option<Micros> {
        match (self.last_rx, self.alive) {
            (Some(x), true) => Some(x + dead),
            _ => None,
        }
    }
}

impl<H: Payload> Node<H> {
    /// The next `(epoch, counter)` for a HELLO or heartbeat.
    pub(super) fn next_stamp(&mut self) -> Stamp {
        self.local.hb_counter += 1;
        (self.cfg.epoch, self.local.hb_counter)
    }

    pub(super) fn my_heartbeat(&mut self) -> Heartbeat {
        let (epoch, counter) = self.next_stamp();
        Heartbeat {
            role: self.role,
            disk: if self.failed {
                DiskState::Failed
            } else {
                self.meta.disk
            },
            msl_up: self.msl.alive(),
            in_sync: self.in_sync(),
            adapters: self.local.adapters,
            adapter_count: self.local.adapter_count,
            counter,
            epoch,
        }
    }

    pub(super) fn my_lan_score(&self) -> u8 {
        let n = usize::from(self.local.adapter_count);
        self.local.adapters[..n]
            .iter()
            .filter(|a| a.working())
            .count() as u8
    }

    pub(super) fn on_msl_link(&mut self, up: bool) {
        if up == self.local.msl_carrier {
            return;
        }
        self.local.msl_carrier = up;
        if up {
            self.notify(Notice::MslLinkUp);
            self.timers.set(Timer::Hello, self.now);
        } else {
            self.notify(Notice::MslLinkDown);
            if self.msl.lose() {
                self.on_msl_lost();
            }
        }
    }

    pub(super) fn on_lan_adapter(&mut self, adapter: u8, link_up: bool, carrier: bool) {
        let i = usize::from(adapter);
        if i >= MAX_ADAPTERS {
            self.counters.frames_unexpected += 1;
            return;
        }
        if adapter >= self.local.adapter_count {
            self.local.adapter_count = adapter + 1;
        }
        let before = self.local.adapters[i].working();
        self.local.adapters[i].link_up = link_up;
        self.local.adapters[i].carrier = carrier;
        let after = self.local.adapters[i].working();
        if before != after {
            self.notify(Notice::AdapterHealth {
                adapter,
                working: after,
            });
        }
    }

    /// This node did not run for `for_us`: the silence it measured across
    /// the gap is void. Every path that was alive gets a fresh, full dead
    /// interval, and a primary holds new writes for that interval (see
    /// `StallGuard::hold_until`).
    pub(super) fn on_stall(&mut self, for_us: Micros) {
        let now = self.now;
        self.counters.stalls += 1;
        self.void_silence();
        self.stall.ended = Some(now);
        // Checked before the stall, the lease may have ended meanwhile and
        // been granted to the peer: void until a request sent after it wins.
        self.drop_lease("this node stalled");
        // Also when secondary: input queued during the stall can make it
        // primary (a handover the peer sent before it gave up on this node
        // and took the role back).
        self.stall.hold_until = Some(now + self.cfg.dead_after_us());
        // Tell the peer at once that this node runs again.
        self.timers.set(Timer::Heartbeat, now);
        self.notify(Notice::Stalled { for_us });
    }

    /// The host lost input while this node ran: the peer's frames may be
    /// among it, so the silence measured so far is void (a secondary must
    /// not take over from a primary it could not hear). Nothing else: the
    /// node ran, so its heartbeats went out (a gap under the stall
    /// threshold leaves at least two heartbeat intervals of the dead
    /// interval, see `Config::validate`) and the peer cannot have taken
    /// over; a primary keeps serving and keeps its lease.
    pub(super) fn on_input_lost(&mut self) {
        self.counters.input_lost += 1;
        self.void_silence();
    }

    /// Every path that was alive gets a fresh, full dead interval.
    fn void_silence(&mut self) {
        let now = self.now;
        self.msl.restart(now);
        self.lan.restart(now);
        for i in 0..usize::from(self.local.adapter_count) {
            if self.local.adapters[i].reachable {
                self.local.adapter_last_rx[i] = Some(now);
            }
        }
    }

    /// A primary holding writes after a stall.
    pub(super) fn stall_hold(&self) -> bool {
        self.role == Role::Primary && self.stall.hold_until.is_some_and(|t| self.now < t)
    }

    /// A fresh packet shows the peer as `role` in `generation`. A primary
    /// holding after a stall that hears the peer as primary in a generation
    /// it does not know was replaced while it did not run: it steps down.
    /// A generation in its own history is one this node has moved on from
    /// (a packet the peer sent before this node took over from it). True
    /// if it stepped down.
    pub(super) fn check_deposed(&mut self, role: Role, generation: u64) -> bool {
        let g = &self.meta.gens;
        let unknown = generation != g.current && !g.history.contains(&generation);
        // Without the lease, only a primary that acknowledged nothing
        // alone steps down: a node that took over (and may have) keeps the
        // role, and two that both did are a split brain for the handshake.
        let lease_deposable = self.lease_hold() && self.lease.before_degraded.is_some();
        if (self.stall_hold() || lease_deposable) && role == Role::Primary && unknown {
            self.depose();
            return true;
        }
        false
    }

    /// Step down after the peer took over while this node did not run:
    /// every client write not yet acknowledged fails (the new primary may
    /// not have it, so it must never be acknowledged), the service address
    /// goes, and the data is outdated until the new primary resyncs it.
    /// The blocks this node may have written that the new primary lacks
    /// (its activity log's extents and the writes in flight) are marked
    /// out of sync, as after a crash of a primary.
    pub(super) fn depose(&mut self) {
        self.counters.deposed += 1;
        self.stall.hold_until = None;
        let e = self.cfg.extent_blocks;
        for slot in self.actlog.slots.iter_mut() {
            self.meta.dirty.set_range(slot.extent * e, e);
            // Their completions are no longer looked for.
            slot.in_flight = 0;
        }
        for p in self.ios.take_client_writes() {
            self.meta.dirty.set_range(p.block, p.count);
            self.counters.client_writes_refused += 1;
            self.emit(Action::Reply {
                req: p.req,
                result: Err(ClientError::NotPrimary),
            });
        }
        self.writes.inflight_wids.clear();
        for q in core::mem::take(&mut self.writes.waiting) {
            self.counters.client_writes_refused += 1;
            self.emit(Action::Reply {
                req: q.req,
                result: Err(ClientError::NotPrimary),
            });
        }
        for FlushWaiter { req, .. } in core::mem::take(&mut self.writes.flush_waiters) {
            self.emit(Action::Reply {
                req,
                result: Err(ClientError::NotPrimary),
            });
        }
        self.writes.local_flush_done.clear();
        self.switchover.running = None;
        self.switchover.unconfirmed = false;
        // Never take over with this data: the new primary's writes are not
        // here.
        self.peer.was_in_sync = false;
        self.peer.role = Some(Role::Primary);
        self.transition(Reason::Deposed);
        if let Some(g) = self.lease.before_degraded.take() {
            // Lost its peer without the lease and acknowledged nothing
            // alone: the generation it started then holds no acknowledged
            // write, and the new primary's bitmap counts from the one before.
            self.meta.gens = g;
        }
        self.emit(Action::ServiceAddress { hold: false });
        self.persist();
        self.notify(Notice::RoleChanged {
            role: Role::Secondary,
            generation: self.meta.gens.current,
            reason: Reason::Deposed.text(),
        });
        self.end_session(Reason::Deposed.text());
    }

    /// Timers due at `now`. The peer's silence is judged (`judge`) only on
    /// a Tick, after every input that arrived before it.
    pub(super) fn on_timers(&mut self, judge: bool) {
        let now = self.now;
        let dead = self.cfg.dead_after_us();
        if judge && self.msl.expire(now, dead) {
            self.notify(Notice::PeerLost { path: Path::Msl });
            self.on_msl_lost();
        }
        if judge && self.lan.expire(now, dead) {
            self.notify(Notice::PeerLost { path: Path::Lan });
            self.on_lan_lost();
        }
        if judge && self.stall.hold_until.is_some_and(|t| now >= t) {
            // A full dead interval of running time without news of a
            // takeover: the paths that stayed silent died above (the
            // primary is degraded), the others carry the peer's word.
            self.stall.hold_until = None;
            self.start_waiting_writes();
        }
        for i in 0..usize::from(self.local.adapter_count) {
            self.local.adapters[i].reachable =
                self.local.adapter_last_rx[i].is_some_and(|t| now < t + dead);
        }
        if self.timers.expired(Timer::Heartbeat, now) {
            self.timers
                .set(Timer::Heartbeat, now + self.cfg.heartbeat_interval_us);
            let hb = self.my_heartbeat();
            let h = self.header(0, 0);
            self.emit(Action::SendLan { header: h, hb });
            if self.local.msl_carrier {
                let ack = self.session.as_ref().map_or(0, |s| s.recv.rx.cumulative());
                let h = self.header(0, ack);
                self.emit(Action::SendMsl {
                    header: h,
                    msg: Message::Heartbeat(hb),
                    payload: None,
                });
            }
            // Acks are unreliable: refresh ours every heartbeat so a lost
            // final ack (the one carrying `stable` for a FLUSH) cannot leave
            // the peer waiting forever.
            if let Some(s) = self.session.as_mut() {
                s.recv.ack_pending = true;
            }
        }
        if self.session.is_none()
            && !self.hs.admin_disconnected
            && self.local.msl_carrier
            && self.timers.expired(Timer::Hello, now)
        {
            self.timers
                .set(Timer::Hello, now + self.cfg.heartbeat_interval_us);
            self.hs.last_hello_us = now;
            let ack = self.hs.peer_hello_seen.unwrap_or(0);
            let h = self.header(0, ack);
            let hello = self.my_hello();
            let hello = self.stamped(hello);
            self.emit(Action::SendMsl {
                header: h,
                msg: Message::Hello(hello),
                payload: None,
            });
        }
        self.check_switchover();
        self.stabilize_if_due();
    }

    /// MSL path declared dead (timeout or carrier loss).
    pub(super) fn on_msl_lost(&mut self) {
        let was_connected = self.session.is_some();
        self.end_session("MSL lost");
        if self.role == Role::Primary {
            return; // end_session went degraded
        }
        self.secondary_decide(was_connected);
    }

    pub(super) fn on_lan_lost(&mut self) {
        if self.role != Role::Primary {
            self.secondary_decide(false);
        }
    }

    /// The secondary's rule, evaluated whenever a path dies.
    pub(super) fn secondary_decide(&mut self, msl_just_lost: bool) {
        if self.role == Role::Primary || self.failed {
            return;
        }
        let peer_primary = self.peer.role == Some(Role::Primary);
        if !peer_primary {
            return;
        }
        if !self.msl.alive() && !self.lan.alive() {
            // Primary silent on both paths: it is dead.
            self.notify(Notice::PeerDown {
                peer_was: Role::Primary,
            });
            self.try_takeover(Reason::TakeoverPeerSilent);
        } else if !self.msl.alive() && self.lan.alive() && msl_just_lost {
            // Either the MSL broke or the primary just died and its LAN
            // silence is not yet timed out. The next LAN heartbeat from the
            // primary settles it (see `on_lan_frame`).
            self.peer.msl_lost_pending = true;
        }
    }

    pub(super) fn on_lan_frame(
        &mut self,
        adapter: u8,
        header: Header,
        hb: Heartbeat,
        arrived: Micros,
    ) {
        if header.sender != self.cfg.peer_id {
            self.counters.frames_from_stranger += 1;
            return;
        }
        let stamp = (hb.epoch, hb.counter);
        if stamp <= self.peer.fresh_lan || stamp.0 < self.peer.epoch {
            // Replayed, duplicated or reordered: neither liveness nor the
            // peer's role or health.
            self.counters.frames_replayed += 1;
            return;
        }
        self.peer.fresh_lan = stamp;
        self.peer.epoch = stamp.0;
        let i = usize::from(adapter).min(MAX_ADAPTERS - 1);
        let last = &mut self.local.adapter_last_rx[i];
        *last = Some(last.map_or(arrived, |t| t.max(arrived)));
        if self.lan.heard(arrived) {
            self.notify(Notice::PeerFound { path: Path::Lan });
        }
        if self.check_deposed(hb.role, header.generation) {
            return;
        }
        let peer_was = self.peer.role;
        self.observe_peer(hb);
        let unmirrored =
            !self.msl.alive() && self.session.is_none() && self.role == Role::Secondary;
        if hb.role == Role::Primary && self.switchover.unconfirmed {
            // The peer took the role (the handover landed after all).
            self.switchover.unconfirmed = false;
            self.finish_switchover();
        }
        if unmirrored
            && hb.role == Role::Primary
            && !hb.in_sync
            && (self.peer.msl_lost_pending
                || peer_was == Some(Role::Secondary)
                || self.peer.was_in_sync)
        {
            // The primary is alive and serving, and this node does not
            // receive its writes: its copy falls behind. A heartbeat that
            // reports the pair in sync was sent while the primary still
            // mirrored every write here (its only peer): it shows no write
            // this node lacks. It may also be one held back on the wire
            // (fresh by its counter, late by the time it arrives) from a
            // primary that died since: shutting the mirror side on it
            // would leave nobody to serve.
            self.peer.msl_lost_pending = false;
            self.shut_mirror_side();
        }
        let n = usize::from(hb.adapter_count).min(MAX_ADAPTERS);
        if self.switchover.unconfirmed
            && self.role == Role::Secondary
            && self.session.is_none()
            && hb.role == Role::Secondary
            && !hb.msl_up
            && stamp > self.switchover.hb_floor
            && header.generation == self.meta.gens.history[0]
            && hb.adapters[..n].iter().any(|a| a.reachable)
        {
            // Sent after the handover, by a peer that is secondary in the
            // generation before it (so it never applied it, nor served
            // since), whose MSL session has ended (so it never will), and
            // which hears this node on the LAN (so it will not take over
            // while this node serves): nobody serves unless this node takes
            // the role back.
            self.reclaim_role();
        }
    }

    pub(super) fn observe_peer(&mut self, hb: Heartbeat) {
        // A primary that fails its disk demotes itself; judge it by the role
        // it had.
        let peer_was_primary = self.peer.role == Some(Role::Primary) || hb.role == Role::Primary;
        self.peer.role = Some(hb.role);
        if (hb.epoch, hb.counter) > self.peer.newest {
            self.peer.newest = (hb.epoch, hb.counter);
            self.peer.last_hb = Some(hb);
        }
        // A primary that reports its disk failed is as good as dead.
        if hb.disk == DiskState::Failed {
            if self.role == Role::Secondary
                && peer_was_primary
                && (self.peer.was_in_sync || self.in_sync())
            {
                self.peer.role = Some(Role::Secondary);
                self.end_session("peer disk failed");
                self.try_takeover(Reason::TakeoverPeerDiskFailed);
            } else if self.role == Role::Primary && self.session.is_some() {
                self.end_session("peer disk failed");
            }
        }
        if hb.role == Role::Primary && self.role == Role::Primary && self.session.is_none() {
            self.notify(Notice::Warning { what: "peer also claims the primary role (both paths were cut?): split brain will be refused on reconnect" });
        }
    }

    pub(super) fn on_unknown_type(&mut self, must_understand: bool) {
        if !must_understand {
            self.counters.frames_unknown_ignored += 1;
            return;
        }
        self.counters.frames_unknown_refused += 1;
        if self.session.is_some() {
            self.notify(Notice::Warning {
                what: "peer sent a must-understand message type this version does not know: MSL session refused (upgrade this node)",
            });
            self.end_session("unknown must-understand message");
        }
    }

    pub(super) fn on_msl_frame(
        &mut self,
        header: Header,
        msg: Message,
        payload: Option<H>,
        arrived: Micros,
    ) {
        if header.sender != self.cfg.peer_id || header.cluster_id != self.cfg.cluster_id {
            self.counters.frames_from_stranger += 1;
            return;
        }
        let stamp = match &msg {
            Message::Hello(h) => Some((h.epoch, h.counter)),
            Message::Heartbeat(hb) => Some((hb.epoch, hb.counter)),
            _ => None,
        };
        if let Some(stamp) = stamp {
            if stamp <= self.peer.fresh_msl || stamp.0 < self.peer.epoch {
                // A replayed HELLO never ends a session, a replayed
                // heartbeat never keeps the path alive.
                self.counters.frames_replayed += 1;
                return;
            }
            self.peer.fresh_msl = stamp;
            self.peer.epoch = stamp.0;
            // Only the peer's own fresh packets show it alive: any other
            // frame could be a capture replayed by someone else.
            if self.msl.heard(arrived) {
                self.peer.msl_lost_pending = false;
                self.notify(Notice::PeerFound { path: Path::Msl });
            }
        }
        match msg {
            Message::Hello(h) => self.on_hello(header, h),
            Message::Heartbeat(hb) => {
                if !self.check_deposed(hb.role, header.generation) {
                    self.observe_peer(hb);
                }
            }
            Message::Ack(a) => self.on_ack(a),
            _ => self.on_reliable(header, msg, payload),
        }
    }
}

/// The witness lease (with `Config::witness`): whether this node may serve
/// without its peer.
#[derive(Debug, Default)]
pub(super) struct LeaseState {
    /// End of the lease held (the host's clock); `None`: not held. Void
    /// after a stall until the host reports a lease won after it.
    pub(super) until: Option<Micros>,
    /// The host reported the witness unreachable.
    pub(super) unreachable: bool,
    /// The last `WantLease` emitted.
    pub(super) wanted: bool,
    /// A takeover decided but waiting for the lease.
    pub(super) takeover: Option<Reason>,
    /// Client requests whose success was withheld: this node, primary
    /// without its peer, did not hold the lease when they completed.
    pub(super) withheld: Vec<ReqId>,
    /// Writes were withheld at the last look (to restart the queue when
    /// they no longer are).
    pub(super) holding: bool,
    /// The generations before the session ended, while this node has
    /// acknowledged nothing alone since: if the peer took over meanwhile
    /// (it held the lease), this node's own degraded generation carries no
    /// acknowledged write and is dropped, so the pair resyncs from the new
    /// primary instead of refusing a split brain.
    pub(super) before_degraded: Option<Generations>,
    /// A session (this node primary) was up when the current event began.
    pub(super) session_at_start: bool,
    /// Ask the host for a lease at once (`WantLease(true)` again).
    pub(super) renew_now: bool,
}

impl<H: Payload> Node<H> {
    /// The lease is held at `now`.
    pub(super) fn lease_valid(&self) -> bool {
        self.lease.until.is_some_and(|u| self.now < u)
    }

    /// May serve without the peer: no witness, the lease held, or the
    /// witness unreachable with `NoQuorum::Sft3`.
    pub(super) fn lease_ok(&self) -> bool {
        !self.cfg.witness
            || self.lease_valid()
            || (self.lease.unreachable && self.cfg.on_no_quorum == NoQuorum::Sft3)
    }

    /// A primary without its peer and without the lease: it acknowledges
    /// nothing (its writes wait, completed ones are withheld).
    pub(super) fn lease_hold(&self) -> bool {
        self.role == Role::Primary && self.session.is_none() && !self.lease_ok()
    }

    /// `Event::Lease`: `held` is false when the report was made before a
    /// stall this same event revealed.
    pub(super) fn on_lease(&mut self, held: bool, until: Micros) {
        if !self.cfg.witness {
            return;
        }
        if held && until > self.now {
            let was = self.lease_valid();
            self.lease.until = Some(until);
            if !was {
                self.notify(Notice::LeaseGained { until });
            }
        } else {
            self.drop_lease("the witness refused it or it was released");
        }
    }

    pub(super) fn drop_lease(&mut self, reason: &'static str) {
        if self.lease.until.take().is_some() {
            self.notify(Notice::LeaseLost { reason });
        }
    }

    pub(super) fn on_witness_unreachable(&mut self, unreachable: bool) {
        if !self.cfg.witness || self.lease.unreachable == unreachable {
            return;
        }
        self.lease.unreachable = unreachable;
        self.notify(Notice::WitnessReachable {
            reachable: !unreachable,
        });
    }

    /// Whether a takeover waiting for the lease still has its cause.
    fn takeover_still_due(&self, reason: Reason) -> bool {
        if self.role != Role::Secondary || self.failed {
            return false;
        }
        match reason {
            Reason::TakeoverPeerSilent => {
                !self.msl.alive() && !self.lan.alive() && self.peer.role == Some(Role::Primary)
            }
            Reason::TakeoverPeerDiskFailed => self
                .peer
                .last_hb
                .is_some_and(|h| h.disk == DiskState::Failed),
            _ => false,
        }
    }

    /// The session of this primary just ended: a lease checked while the
    /// peer mirrored every write is not enough to acknowledge alone. Only a
    /// lease the witness confirms after the peer was lost counts: a
    /// primary cut from its peer and from the witness at once never
    /// acknowledges alone, so the secondary that wins the lease next has
    /// every acknowledged write.
    fn void_lease_on_peer_loss(&mut self) {
        if self.lease.session_at_start && self.session.is_none() && self.role == Role::Primary {
            self.lease.session_at_start = false;
            self.lease.renew_now = true;
            self.drop_lease("lost the peer: the lease must be renewed without it");
        }
    }

    /// After every event: the lease's expiry, withheld acknowledgements,
    /// a takeover waiting for the lease, and the lease this node wants.
    /// `session_before`: the generations if a session was up (as primary)
    /// before the event.
    pub(super) fn lease_after(&mut self, session_before: Option<Generations>) {
        if !self.cfg.witness {
            return;
        }
        self.void_lease_on_peer_loss();
        if self.lease.until.is_some() && !self.lease_valid() {
            self.drop_lease("expired");
        }
        if self.session.is_some() {
            self.lease.before_degraded = None;
        } else if let (Some(g), Role::Primary) = (session_before, self.role) {
            self.lease.before_degraded = Some(g);
        }
        if let Some(reason) = self.lease.takeover {
            if !self.takeover_still_due(reason) {
                self.lease.takeover = None;
            } else if self.lease_ok() {
                self.lease.takeover = None;
                if reason == Reason::TakeoverPeerDiskFailed {
                    self.peer.role = Some(Role::Secondary);
                }
                self.try_takeover(reason);
            }
        }
        let hold = self.lease_hold();
        if !hold && !self.lease.withheld.is_empty() {
            let result = if self.role == Role::Primary && !self.failed {
                Ok(())
            } else if self.failed {
                Err(ClientError::IoError)
            } else {
                Err(ClientError::NotPrimary)
            };
            for req in core::mem::take(&mut self.lease.withheld) {
                self.emit(Action::Reply { req, result });
            }
        }
        if self.lease.holding && !hold {
            self.start_waiting_writes();
        }
        self.lease.holding = hold;
        let want = !self.failed && (self.role == Role::Primary || self.lease.takeover.is_some());
        let renew = core::mem::take(&mut self.lease.renew_now) && want;
        if want != self.lease.wanted || renew {
            self.lease.wanted = want;
            self.emit(Action::WantLease(want));
        }
    }

    /// A client acknowledgement about to leave: withheld while this node,
    /// primary without its peer, lacks the lease. False if withheld.
    pub(super) fn lease_gate(&mut self, req: ReqId) -> bool {
        if !self.cfg.witness || self.role != Role::Primary || self.session.is_some() {
            return true;
        }
        self.void_lease_on_peer_loss();
        if self.lease_hold() {
            self.lease.withheld.push(req);
            return false;
        }
        // Acknowledged alone: this generation now carries its own writes.
        self.lease.before_degraded = None;
        true
    }
}
