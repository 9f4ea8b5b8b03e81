//! Roles and switchover: taking over, becoming primary or secondary, the
//! planned switchover (handover, its confirmation, and taking the role back
//! when it did not land), and the fail-closed latch.

use super::*;

impl<H: Payload> Node<H> {
    pub(super) fn shut_mirror_side(&mut self) {
        if self.meta.disk == DiskState::UpToDate {
            self.meta.disk = DiskState::Outdated;
            self.renew_session();
            self.persist();
        }
        self.was_in_sync = false;
        self.notify(Notice::MirrorShutDown);
    }

    pub(super) fn try_takeover(&mut self, reason: &'static str) {
        if self.meta.disk != DiskState::UpToDate || !self.was_in_sync {
            self.notify(Notice::CannotTakeOver {
                reason: match self.meta.disk {
                    DiskState::Outdated => "local data is outdated (mirror side was shut down)",
                    DiskState::Inconsistent => "local data is inconsistent (resync incomplete)",
                    _ => "this node was not in sync with the primary",
                },
            });
            return;
        }
        self.counters.takeovers += 1;
        self.peer_role = Some(Role::Secondary);
        self.become_primary(true, reason);
        let generation = self.meta.gens.current;
        self.notify(Notice::Takeover { generation, reason });
    }

    /// Become primary in a fresh generation, persisted before any write.
    pub(super) fn become_primary(&mut self, track: bool, reason: &'static str) {
        self.handover_unconfirmed = false;
        // A switchover this node started and never saw finish is over.
        self.switching = None;
        let id = self.rng.nonzero();
        gens::new_generation(&mut self.meta.gens, id, track);
        self.role = Role::Primary;
        self.renew_session();
        self.persist();
        self.emit(Action::ServiceAddress { hold: true });
        self.notify(Notice::RoleChanged {
            role: Role::Primary,
            generation: id,
            reason,
        });
    }

    pub(super) fn become_secondary(&mut self, reason: &'static str) {
        if self.role != Role::Primary {
            return;
        }
        self.role = Role::Secondary;
        self.emit(Action::ServiceAddress { hold: false });
        self.persist();
        self.notify(Notice::RoleChanged {
            role: Role::Secondary,
            generation: self.meta.gens.current,
            reason,
        });
        for q in core::mem::take(&mut self.waiting) {
            self.counters.client_writes_refused += 1;
            self.emit(Action::Reply {
                req: q.req,
                result: Err(ClientError::NotPrimary),
            });
        }
    }

    pub(super) fn check_switchover(&mut self) {
        if self.role != Role::Primary || self.switching.is_some() || !self.in_sync() {
            self.lan_worse_since = None;
            return;
        }
        let Some(peer) = self.peer_hb else {
            return;
        };
        let mine = self.my_lan_score();
        let theirs = peer.working_adapters();
        if theirs > mine && peer.disk == DiskState::UpToDate {
            let since = *self.lan_worse_since.get_or_insert(self.now);
            if self.now >= since + self.cfg.switchover_debounce_us {
                self.start_switchover("the secondary's LAN side works better");
            }
        } else {
            self.lan_worse_since = None;
        }
    }

    pub(super) fn start_switchover(&mut self, reason: &'static str) {
        self.switching = Some(reason);
        self.notify(Notice::SwitchoverStarted { reason });
        if self.verify.status.active {
            // The peer answers verify requests only as secondary.
            self.verify.abort("planned switchover");
            self.notify(Notice::VerifyAborted {
                reason: "planned switchover",
            });
        }
        for q in core::mem::take(&mut self.waiting) {
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
            || self.switching.is_none()
            || !self.pending.is_empty()
            || !self.flush_waiters.is_empty()
        {
            return;
        }
        let Some(s) = &self.session else {
            // Peer gone mid-switchover: stay primary.
            self.switching = None;
            return;
        };
        // The RoleChange must get its sequence number now (not wait in
        // the backlog): `handover_seq` tracks it.
        if s.handover_seq.is_some()
            || s.phase != Phase::InSync
            || !s.backlog.is_empty()
            || !s.tx.has_room()
        {
            return;
        }
        let id = self.rng.nonzero();
        self.role = Role::Secondary;
        self.handover_hb_floor = self.peer_hb_counter_lan;
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
            s.handover_seq = seq;
        }
        self.peer_role = Some(Role::Primary);
    }

    /// A planned switchover that the peer never applied: this node is
    /// still the most recent copy (it accepted no write since it handed
    /// the role over), so it becomes primary again, tracking changes from
    /// the generation the peer still holds.
    pub(super) fn reclaim_role(&mut self) {
        self.handover_unconfirmed = false;
        self.msl_lost_pending = false;
        self.switching = None;
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
        self.peer_role = Some(Role::Secondary);
        self.become_primary(true, "switchover failed before the peer took the role");
        self.mark_extents_peer_may_lack();
        self.persist();
    }

    /// The peer took the role this node handed over.
    pub(super) fn finish_switchover(&mut self) {
        let reason = self.switching.take();
        self.notify(Notice::SwitchoverDone {
            new_primary: self.cfg.peer_id,
        });
        if reason == Some("the secondary's LAN side works better") {
            // The failed server restarts itself as secondary.
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
        for (_, p) in core::mem::take(&mut self.pending) {
            self.emit(Action::Reply {
                req: p.req,
                result: Err(ClientError::IoError),
            });
        }
        for q in core::mem::take(&mut self.waiting) {
            self.emit(Action::Reply {
                req: q.req,
                result: Err(ClientError::IoError),
            });
        }
        for (req, _, _) in core::mem::take(&mut self.flush_waiters) {
            self.emit(Action::Reply {
                req,
                result: Err(ClientError::IoError),
            });
        }
        if self.role == Role::Primary {
            self.role = Role::Secondary;
            self.emit(Action::ServiceAddress { hold: false });
            self.notify(Notice::RoleChanged {
                role: Role::Secondary,
                generation: self.meta.gens.current,
                reason: "disk failure",
            });
        }
        self.session = None;
        // Tell the peer at once (it takes over if it was in sync).
        self.next_hb_us = self.now;
    }
}
