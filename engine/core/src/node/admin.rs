//! Administrator commands (`mslctl`).

use super::*;

impl<H: Payload> Node<H> {
    pub(super) fn on_admin(&mut self, cmd: AdminCmd) {
        match cmd {
            AdminCmd::Promote { force } => {
                if self.role == Role::Primary || self.failed {
                    return;
                }
                if self.peer.role == Some(Role::Primary)
                    && (self.msl.alive() || self.lan.alive())
                    && !force
                {
                    self.notify(Notice::Warning {
                        what: "promote refused: the peer is primary and alive",
                    });
                    return;
                }
                if self.meta.disk != DiskState::UpToDate && !force {
                    self.notify(Notice::Warning {
                        what: "promote refused: local data is not up to date (use force)",
                    });
                    return;
                }
                if force && self.meta.disk != DiskState::UpToDate {
                    self.transition(Reason::ForcedUpToDate);
                }
                self.end_session("promote");
                self.become_primary(true, Reason::AdminPromoted);
            }
            AdminCmd::Demote => {
                self.become_secondary(Reason::AdminDemoted);
            }
            AdminCmd::Switchover => {
                if self.role == Role::Primary && self.in_sync() && self.switchover.running.is_none()
                {
                    self.start_switchover(Switchover::Admin);
                } else {
                    self.notify(Notice::Warning {
                        what: "switchover refused: this node is not an in-sync primary",
                    });
                }
            }
            AdminCmd::Disconnect => {
                self.hs.admin_disconnected = true;
                self.end_session("administrator disconnected");
            }
            AdminCmd::Connect => {
                self.hs.admin_disconnected = false;
                self.timers.set(Timer::Hello, self.now);
            }
            AdminCmd::Verify {
                start_block,
                count,
                resync,
            } => {
                if self.role != Role::Primary || !self.in_sync() {
                    self.notify(Notice::Warning {
                        what: "verify refused: this node is not an in-sync primary",
                    });
                    return;
                }
                if self.online.run.status.active {
                    self.notify(Notice::Warning {
                        what: "verify refused: a verify is already running",
                    });
                    return;
                }
                self.online
                    .run
                    .start(start_block, count, self.cfg.volume_blocks);
                self.online.resync = resync;
                self.notify(Notice::VerifyStarted {
                    start_block: self.online.run.status.start_block,
                    blocks: self.online.run.status.total_blocks,
                });
                self.verify_progress();
            }
            AdminCmd::Invalidate => {
                if self.role == Role::Primary {
                    self.notify(Notice::Warning {
                        what: "invalidate refused on the primary",
                    });
                    return;
                }
                self.meta.dirty.set_all();
                self.transition(Reason::Invalidated);
                self.end_session("invalidate");
                self.renew_session();
                self.persist();
            }
        }
    }
}
