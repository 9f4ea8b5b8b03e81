//! Roles and switchover: taking over, becoming primary or secondary, the
//! planned switchover (handover, its confirmation, and taking the role back
//! when it did not land), and the fail-closed latch.
//!
//! The node's role and its disk state change in ONE place,
//! [`Node::transition`], and only for a [`Reason`]; the table of what each
//! reason does ([`Reason::transition`]) is checked against a snapshot
//! (`role_table.txt`). The actions around a change (persisting, the service
//! address, notices) stay with the callers: their order is part of the
//! protocol.

use super::*;

/// A planned switchover this node runs or ran (primary side).
pub(super) struct SwitchoverState {
    pub(super) running: Option<Switchover>,
    /// This node handed the primary role over (planned switchover) and its
    /// session ended before the peer confirmed taking it: until the peer
    /// shows which way it went, nobody may be serving.
    pub(super) unconfirmed: bool,
    /// The peer's newest LAN heartbeat when the handover was sent: only a
    /// heartbeat sent after it can show the handover did not land.
    pub(super) hb_floor: liveness::Stamp,
}

/// Why the role or the disk state changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Reason {
    /// The primary is silent on both MSL and LAN.
    TakeoverPeerSilent,
    /// The primary reported its disk failed.
    TakeoverPeerDiskFailed,
    /// Cold start of the pair: this node holds the newest data.
    PairStarted,
    /// `mslctl promote`.
    AdminPromoted,
    /// `mslctl promote --force` on data that is not up to date.
    ForcedUpToDate,
    /// A planned switchover the peer never applied: the role comes back.
    SwitchoverReclaimed,
    /// The peer handed the primary role over (planned switchover).
    HandoverReceived,
    /// This node handed the primary role over (planned switchover).
    HandoverSent,
    /// Both nodes primary after a double cut: the higher id steps down.
    SplitBrainStepDown,
    /// `mslctl demote`.
    AdminDemoted,
    /// A volume or metadata I/O error latched the node fail-closed.
    DiskFailure,
    /// Clean shutdown of a primary.
    Shutdown,
    /// The primary stalled and the peer took over meanwhile: it steps down
    /// and its data is outdated until the new primary resyncs it.
    Deposed,
    /// MSL lost while the primary is alive on the LAN.
    MirrorShutDown,
    /// `mslctl invalidate`: full resync of this node from the peer.
    Invalidated,
    /// A resync into this node started.
    ResyncTargetStarted,
    /// A resync into this node finished.
    ResyncTargetFinished,
}

/// What a [`Reason`] does: the role it requires before (if any), and the
/// role and disk state after (`None`: unchanged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Transition {
    pub(super) from: Option<Role>,
    pub(super) role: Option<Role>,
    pub(super) disk: Option<DiskState>,
}

impl Reason {
    /// Every reason, in table order.
    #[cfg(test)]
    pub(super) const ALL: [Reason; 17] = [
        Reason::TakeoverPeerSilent,
        Reason::TakeoverPeerDiskFailed,
        Reason::PairStarted,
        Reason::AdminPromoted,
        Reason::ForcedUpToDate,
        Reason::SwitchoverReclaimed,
        Reason::HandoverReceived,
        Reason::HandoverSent,
        Reason::SplitBrainStepDown,
        Reason::AdminDemoted,
        Reason::DiskFailure,
        Reason::Shutdown,
        Reason::Deposed,
        Reason::MirrorShutDown,
        Reason::Invalidated,
        Reason::ResyncTargetStarted,
        Reason::ResyncTargetFinished,
    ];

    /// The transition table.
    pub(super) const fn transition(self) -> Transition {
        use DiskState::{Inconsistent, Outdated, UpToDate};
        use Role::{Primary, Secondary};
        let (from, role, disk) = match self {
            Reason::TakeoverPeerSilent
            | Reason::TakeoverPeerDiskFailed
            | Reason::PairStarted
            | Reason::AdminPromoted
            | Reason::SwitchoverReclaimed
            | Reason::HandoverReceived => (Some(Secondary), Some(Primary), None),
            Reason::HandoverSent
            | Reason::SplitBrainStepDown
            | Reason::AdminDemoted
            | Reason::DiskFailure
            | Reason::Shutdown => (Some(Primary), Some(Secondary), None),
            Reason::Deposed => (Some(Primary), Some(Secondary), Some(Outdated)),
            Reason::ForcedUpToDate => (Some(Secondary), None, Some(UpToDate)),
            Reason::Invalidated => (Some(Secondary), None, Some(Inconsistent)),
            Reason::MirrorShutDown => (None, None, Some(Outdated)),
            Reason::ResyncTargetStarted => (None, None, Some(Inconsistent)),
            Reason::ResyncTargetFinished => (None, None, Some(UpToDate)),
        };
        Transition { from, role, disk }
    }

    /// The reason as notices and the log give it.
    pub(super) const fn text(self) -> &'static str {
        match self {
            Reason::TakeoverPeerSilent => "primary silent on both MSL and LAN",
            Reason::TakeoverPeerDiskFailed => "primary reported a disk failure",
            Reason::PairStarted => "pair started: this node holds the newest data",
            Reason::AdminPromoted => "administrator promoted this node",
            Reason::ForcedUpToDate => "administrator forced the local data up to date",
            Reason::SwitchoverReclaimed => "switchover failed before the peer took the role",
            Reason::HandoverReceived => "planned switchover from the peer",
            Reason::HandoverSent => "planned switchover",
            Reason::SplitBrainStepDown => {
                "split brain: the node with the higher id steps down; its data is kept unmerged"
            }
            Reason::AdminDemoted => "administrator demoted this node",
            Reason::DiskFailure => "disk failure",
            Reason::Shutdown => "clean shutdown",
            Reason::Deposed => "the peer took over while this node was stalled",
            Reason::MirrorShutDown => "MSL lost while the primary is alive on the LAN",
            Reason::Invalidated => "administrator invalidated the local data",
            Reason::ResyncTargetStarted => "resync into this node started",
            Reason::ResyncTargetFinished => "resync into this node finished",
        }
    }
}

/// Why a planned switchover runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Switchover {
    /// The secondary's LAN side works better: once it lands, this node
    /// restarts itself as secondary.
    LanWorse,
    /// `mslctl switchover`.
    Admin,
}

impl Switchover {
    pub(super) const fn text(self) -> &'static str {
        match self {
            Switchover::LanWorse => "the secondary's LAN side works better",
            Switchover::Admin => "administrator requested a switchover",
        }
    }
}

impl<H: Payload> Node<H> {
    /// The only writer of the role and the disk state.
    pub(super) fn transition(&mut self, reason: Reason) {
        let t = reason.transition();
        assert!(
            t.from.is_none_or(|r| r == self.role),
            "{reason:?} needs role {:?}, node is {:?}",
            t.from,
            self.role
        );
        if let Some(r) = t.role {
            self.role = r;
        }
        if let Some(d) = t.disk {
            self.meta.disk = d;
        }
        debug_assert!(t.role.is_none_or(|r| self.role == r));
        debug_assert!(t.disk.is_none_or(|d| self.meta.disk == d));
    }

    pub(super) fn shut_mirror_side(&mut self) {
        if self.meta.disk == DiskState::UpToDate {
            self.transition(Reason::MirrorShutDown);
            self.renew_session();
            self.persist();
        }
        self.peer.was_in_sync = false;
        self.notify(Notice::MirrorShutDown);
    }

    pub(super) fn try_takeover(&mut self, reason: Reason) {
        if !self.cfg.auto_takeover {
            self.notify(Notice::CannotTakeOver {
                reason: "role_control = cluster: waiting for the cluster manager to promote",
            });
            return;
        }
        if self.meta.disk != DiskState::UpToDate || !self.peer.was_in_sync {
            self.notify(Notice::CannotTakeOver {
                reason: match self.meta.disk {
                    DiskState::Outdated => "local data is outdated (mirror side was shut down)",
                    DiskState::Inconsistent => "local data is inconsistent (resync incomplete)",
                    _ => "this node was not in sync with the primary",
                },
            });
            return;
        }
        if !self.lease_ok() {
            // Only the witness's lease holder serves without its peer:
            // ask for it, take over when it comes (see `lease_after`).
            if self.lease.takeover.is_none() {
                self.notify(Notice::CannotTakeOver {
                    reason: "waiting for the witness lease",
                });
            }
            self.lease.takeover = Some(reason);
            return;
        }
        self.counters.takeovers += 1;
        self.peer.role = Some(Role::Secondary);
        self.become_primary(true, reason);
        let generation = self.meta.gens.current;
        self.notify(Notice::Takeover {
            generation,
            reason: reason.text(),
        });
    }

    /// Become primary in a fresh generation, persisted before any write.
    pub(super) fn become_primary(&mut self, track: bool, reason: Reason) {
        self.switchover.unconfirmed = false;
        // A switchover this node started and never saw finish is over.
        self.switchover.running = None;
        let id = self.rng.nonzero();
        gens::new_generation(&mut self.meta.gens, id, track);
        self.transition(reason);
        debug_assert_eq!(self.role, Role::Primary);
        self.renew_session();
        self.persist();
        self.emit(Action::ServiceAddress { hold: true });
        self.notify(Notice::RoleChanged {
            role: Role::Primary,
            generation: id,
            reason: reason.text(),
        });
    }

    pub(super) fn become_secondary(&mut self, reason: Reason) {
        if self.role != Role::Primary {
            return;
        }
        self.transition(reason);
        debug_assert_eq!(self.role, Role::Secondary);
        self.emit(Action::ServiceAddress { hold: false });
        self.persist();
        self.notify(Notice::RoleChanged {
            role: Role::Secondary,
            generation: self.meta.gens.current,
            reason: reason.text(),
        });
        for q in core::mem::take(&mut self.writes.waiting) {
            self.counters.client_writes_refused += 1;
            self.emit(Action::Reply {
                req: q.req,
                result: Err(ClientError::NotPrimary),
            });
        }
    }

    pub(super) fn check_switchover(&mut self) {
        if self.role != Role::Primary
            || !self.cfg.auto_takeover
            || self.switchover.running.is_some()
            || !self.in_sync()
            || self.stall_hold()
        {
            self.timers.stop(Timer::SwitchoverDebounce);
            return;
        }
        let Some(peer) = self.peer.last_hb else {
            return;
        };
        let mine = self.my_lan_score();
        let theirs = peer.working_adapters();
        if theirs > mine && peer.disk == DiskState::UpToDate {
            if self.timers.get(Timer::SwitchoverDebounce).is_none() {
                let at = self.now + self.cfg.switchover_debounce_us;
                self.timers.set(Timer::SwitchoverDebounce, at);
            }
            if self.timers.expired(Timer::SwitchoverDebounce, self.now) {
                self.start_switchover(Switchover::LanWorse);
            }
        } else {
            self.timers.stop(Timer::SwitchoverDebounce);
        }
    }

    pub(super) fn start_switchover(&mut self, why: Switchover) {
        self.switchover.running = Some(why);
        self.notify(Notice::SwitchoverStarted { reason: why.text() });
        if self.online.run.status.active {
            // The peer answers verify requests only as secondary.
            self.online.run.abort("planned switchover");
            self.notify(Notice::VerifyAborted {
                reason: Reason::HandoverSent.text(),
            });
        }
        for q in core::mem::take(&mut self.writes.waiting) {
            self.counters.client_writes_refused += 1;
            self.emit(Action::Reply {
                req: q.req,
                result: Err(ClientError::NotPrimary),
            });
        }
        self.try_handover();
    }

    /// Once every accepted write is released, hand the role over.
    pub(super) fn try_handover(&mut self) {
        if self.role != Role::Primary
            || self.switchover.running.is_none()
            || self.ios.count(io::Kind::ClientWrite) > 0
            || !self.writes.flush_waiters.is_empty()
        {
            return;
        }
        let Some(s) = &self.session else {
            // Peer gone mid-switchover: stay primary.
            self.switchover.running = None;
            return;
        };
        // The RoleChange must get its sequence number now (not wait in
        // the backlog): `handover_seq` tracks it.
        if s.send.handover_seq.is_some()
            || s.phase != Phase::InSync
            || !s.send.backlog.is_empty()
            || !s.send.tx.has_room()
        {
            return;
        }
        let id = self.rng.nonzero();
        self.transition(Reason::HandoverSent);
        self.switchover.hb_floor = self.peer.fresh_lan;
        if let Some(s) = self.session.as_mut() {
            s.decision.strategy = Strategy::TargetBitmap;
        }
        self.emit(Action::ServiceAddress { hold: false });
        gens::new_generation(&mut self.meta.gens, id, false);
        self.persist();
        self.notify(Notice::RoleChanged {
            role: Role::Secondary,
            generation: id,
            reason: "planned switchover",
        });
        let seq = self.send_reliable(
            Message::RoleChange(RoleChange {
                phase: RolePhase::Handover,
                generation: id,
            }),
            None,
        );
        if let Some(s) = self.session.as_mut() {
            s.send.handover_seq = seq;
        }
        self.peer.role = Some(Role::Primary);
    }

    /// A planned switchover that the peer never applied: this node is
    /// still the most recent copy (it accepted no write since it handed
    /// the role over), so it becomes primary again, tracking changes from
    /// the generation the peer still holds.
    pub(super) fn reclaim_role(&mut self) {
        self.switchover.unconfirmed = false;
        self.peer.msl_lost_pending = false;
        self.switchover.running = None;
        if self.failed || self.meta.disk != DiskState::UpToDate {
            return;
        }
        self.notify(Notice::Warning {
            what: "planned switchover failed: the MSL broke before the peer took the primary role, and the peer is still secondary; this node takes the role back",
        });
        // Nothing changed here since the generation the peer holds (the
        // one before the handover's): the bitmap counts from it.
        if self.meta.gens.bitmap == 0 {
            self.meta.gens.bitmap = self.meta.gens.history[0];
        }
        self.peer.role = Some(Role::Secondary);
        self.become_primary(true, Reason::SwitchoverReclaimed);
        self.mark_extents_peer_may_lack();
        self.persist();
    }

    /// The peer took the role this node handed over.
    pub(super) fn finish_switchover(&mut self) {
        let reason = self.switchover.running.take();
        self.notify(Notice::SwitchoverDone {
            new_primary: self.cfg.peer_id,
        });
        if reason == Some(Switchover::LanWorse) {
            // The failed server restarts itself as secondary, and says so
            // first: the new primary stops mirroring to it at once.
            if self.session.is_some() {
                let generation = self.meta.gens.current;
                self.send_reliable(
                    Message::RoleChange(RoleChange {
                        phase: RolePhase::Leaving,
                        generation,
                    }),
                    None,
                );
            }
            self.emit(Action::Restart);
        }
    }

    /// Latch fail-closed: no acknowledgement ever again until restarted.
    pub(super) fn fail(&mut self, what: &'static str) {
        if self.failed {
            return;
        }
        self.failed = true;
        self.notify(Notice::DiskFailed { what });
        for p in self.ios.take_client_writes() {
            self.emit(Action::Reply {
                req: p.req,
                result: Err(ClientError::IoError),
            });
        }
        for q in core::mem::take(&mut self.writes.waiting) {
            self.emit(Action::Reply {
                req: q.req,
                result: Err(ClientError::IoError),
            });
        }
        for FlushWaiter { req, .. } in core::mem::take(&mut self.writes.flush_waiters) {
            self.emit(Action::Reply {
                req,
                result: Err(ClientError::IoError),
            });
        }
        if self.role == Role::Primary {
            self.transition(Reason::DiskFailure);
            self.emit(Action::ServiceAddress { hold: false });
            self.notify(Notice::RoleChanged {
                role: Role::Secondary,
                generation: self.meta.gens.current,
                reason: Reason::DiskFailure.text(),
            });
        }
        self.session = None;
        self.ios.end_session();
        // Tell the peer at once (it takes over if it was in sync).
        self.timers.set(Timer::Heartbeat, self.now);
    }
}
