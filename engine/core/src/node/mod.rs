//! The node state machine.
//!
//! Inputs are pushed with [`Node::handle`] (an [`Event`] and the current
//! time); outputs are pulled with [`Node::poll_action`]; the next timer is
//! [`Node::poll_timeout`]. The host executes actions in order. A
//! `PersistMeta` action is synchronous and atomic: the host writes it
//! durably before executing the next action, and if that fails it reports
//! [`Event::MetaFailed`] and drops the rest of the batch (the node then
//! latches fail-closed and never acknowledges again).
//!
//! Roles and safety rules:
//! * A client write is released only after the local write and the peer's
//!   write (sync mode), or after the local write and a persisted dirty mark
//!   (degraded).
//! * A node starts accepting writes only in a generation it created itself,
//!   persisted before the first write.
//! * The secondary takes over only when the primary is silent on BOTH the
//!   MSL and the LAN (or reports its disk failed) and the secondary was in
//!   sync. If only the MSL is lost while the primary is heard on the LAN, the
//!   secondary shuts its mirror side down (Outdated) and never takes over
//!   from that state.
//! * With a witness (`Config::witness`), serving without the peer needs
//!   its lease: the secondary takes over only while it holds it, and a
//!   primary that lost its peer acknowledges writes only under a lease
//!   confirmed after the loss (writes wait otherwise). A stall voids the
//!   lease. `NoQuorum::Sft3` lets a node whose witness is unreachable act
//!   as without one.
//!
//! # Parts
//!
//! `Node` (this file) holds one value per part and the entry points
//! (`new`, `handle`, `poll_action`, `poll_timeout`, `status`, `shutdown`).
//! Each part owns its data, in its own file:
//!
//! | part | file | data |
//! |---|---|---|
//! | public API types | `api.rs` | `Event`, `Action`, `Notice`, `Status`, ... |
//! | outbox | `outbox.rs` | `Outbox`: actions for the host, in order |
//! | timers | `timers.rs` | `TimerTable`, indexed by `Timer` |
//! | I/O table | `io.rs` | `IoTable`: `IoId` -> `Purpose` |
//! | liveness per path | `liveness.rs` | `PathLiveness` (MSL, LAN), `PeerView`, `LocalLinks` |
//! | role and switchover | `role.rs` | `Node::transition(Reason)`, `SwitchoverState` |
//! | handshake, image, session end | `session.rs` | `Handshake`, `Session`, `ImageRx`, `ResyncSource` |
//! | send stream | `stream.rs` | `SendStream` |
//! | receive/apply pipeline | `apply.rs` | `ApplyPipeline` |
//! | write path | `write.rs` | `WritePath`, `PeerHalf`, `FlushWaiter` |
//! | activity log | `al.rs` | `ActivityLog`, `AlSlot` |
//! | resync (source) | `resync.rs` | `ResyncProgress`, pacing |
//! | online verify | `online_verify.rs` | `OnlineVerify` |
//! | admin commands | `admin.rs` | (none: drives the others) |
//!
//! Rules that hold: the role and the disk state change only in
//! `Node::transition`, for a `Reason`, per a table that a test compares
//! with `role_table.txt`; every local I/O is registered in the I/O table
//! and its completion is looked up there once; every deadline is in the
//! timer table.
//!
//! Where this differs from quinn-proto's `Connection`, whose parts are
//! driven only from the top module: a protocol step here often touches
//! several parts at once (a client write reserves activity-log extents,
//! goes on the send stream, and registers its I/O; the end of a session
//! marks the log's extents, rewrites pending writes and starts a
//! generation). Those steps are `impl Node` methods in the file of the part
//! where they start, and reach the other parts through `Node`'s fields.
//! Pulling every such step into this file would have put most of the logic
//! back in one place; the split was made move by move, each step shown to
//! leave the simulator's traces byte-identical (`msl-sim --trace`).

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;

use msl_wire::{
    data_flags, hello_flags, Ack, AdapterHealth, Data, DiskState, Generations, Header, Heartbeat,
    Hello, Message, ResyncData, ResyncDone, Role, RoleChange, RolePhase, StateImageChunk, Verify,
    MAX_ADAPTERS,
};

use crate::bitmap::Bitmap;
use crate::config::{Config, NoQuorum, WriteMode};
use crate::gens::{self, Decision, SideView, Strategy};
use crate::meta::{Image, Meta};
use crate::reliable::{ReliableRx, ReliableTx, RxOutcome, TxConfig};
use crate::rng::Rng;
use crate::seqmap::SeqMap;
use crate::verify::{self, VerifyRun};
use crate::Micros;
use al::ActivityLog;
use apply::{ApplyPipeline, Blocks};
use liveness::{LeaseState, LocalLinks, PathLiveness, PeerView, StallGuard};
use online_verify::OnlineVerify;
use outbox::Outbox;
use resync::ResyncProgress;
use role::{Reason, Switchover, SwitchoverState};
use session::{Handshake, InMsg, Numbered, OutMsg, Phase, SentRun, Session};
use stream::SendStream;
use timers::{Timer, TimerTable};
use write::{FlushWaiter, PeerHalf, QueuedWrite, WritePath};

mod admin;
mod al;
mod api;
mod apply;
mod io;
mod liveness;
mod online_verify;
mod outbox;
mod resync;
mod role;
mod session;
mod stream;
#[cfg(test)]
mod tests;
mod timers;
mod write;

pub use api::*;

/// LAN adapters a node reports in its server-state packets.
pub const MAX_LAN_ADAPTERS: usize = MAX_ADAPTERS;

/// One node of the pair.
pub struct Node<H> {
    cfg: Config,
    rng: Rng,
    /// Written only by `Node::transition` (role.rs).
    role: Role,
    /// The persisted state; `meta.disk` is written only by
    /// `Node::transition`.
    meta: Meta,
    /// Latched fail-closed after an I/O error.
    failed: bool,
    now: Micros,
    /// Actions for the host, in order.
    out: Outbox<H>,
    /// Every timer's deadline.
    timers: TimerTable,
    /// Local I/O in flight, by id, with what it is for.
    ios: io::IoTable,

    /// The peer heard on the MSL and on the LAN.
    msl: PathLiveness,
    lan: PathLiveness,
    /// What this node knows of its peer.
    peer: PeerView,
    /// This node's own links.
    local: LocalLinks,
    /// Stalls of this node and the primary's hold after one.
    stall: StallGuard,
    /// The witness lease.
    lease: LeaseState,

    /// The handshake's state across sessions.
    hs: Handshake,
    /// The MSL session, while one is up.
    session: Option<Session<H>>,
    /// A planned switchover this node runs or ran.
    switchover: SwitchoverState,

    /// The primary's write path.
    writes: WritePath<H>,
    /// The activity log.
    actlog: ActivityLog,
    /// Resync progress not yet on disk.
    progress: ResyncProgress,
    /// The primary's online verify run.
    online: OnlineVerify,

    pub counters: Counters,
}

/// How often resync progress (cleared dirty bits) is written to the
/// metadata during a resync, on the source and on the target (DRBD writes
/// its bitmap out lazily in the same way). Bounded cost: one metadata write
/// per second at most; a crash repeats at most one second of resync.
pub const BITMAP_PERSIST_INTERVAL_US: Micros = 1_000_000;

impl<H: Payload> Node<H> {
    /// Start a node from its metadata (as loaded from disk, or created).
    /// A node always starts as secondary; a node that crashed as primary
    /// merges its activity log into the dirty map so that its in-flight
    /// region is resynchronized.
    pub fn new(cfg: Config, mut meta: Meta, seed: u64, now: Micros) -> Self {
        let mut rng = Rng::new(seed ^ u64::from(cfg.node_id).rotate_left(32));
        let crashed = !meta.clean;
        if crashed {
            let al = core::mem::take(&mut meta.al);
            for e in al {
                meta.dirty
                    .set_range(e * cfg.extent_blocks, cfg.extent_blocks);
            }
        }
        let crashed_primary = crashed && meta.role == Role::Primary;
        meta.clean = false;
        let my_session = rng.nonzero() & !0xFFFF_FFFF;
        let mut node = Node {
            cfg,
            rng,
            role: Role::Secondary,
            meta,
            failed: false,
            now,
            out: Outbox::new(),
            session: None,
            msl: PathLiveness::default(),
            lan: PathLiveness::default(),
            stall: StallGuard::default(),
            lease: LeaseState::default(),
            ios: io::IoTable::new(),
            counters: Counters::default(),
            timers: TimerTable::new(),
            switchover: SwitchoverState {
                running: None,
                unconfirmed: false,
                hb_floor: (0, 0),
            },
            writes: WritePath {
                next_wid: 1,
                waiting: VecDeque::new(),
                flush_waiters: VecDeque::new(),
                local_flush_done: BTreeSet::new(),
                inflight_wids: SeqMap::new(),
                local_stable_wid: 0,
                peer_stable_wid: 0,
                session_start_wid: 0,
                last_write_us: 0,
                batch: Vec::new(),
                released: Vec::new(),
            },
            actlog: ActivityLog {
                slots: Vec::new(),
                clock: 0,
                last_stabilize_us: now,
                pressure: false,
                counted_us: now,
                blocked: false,
            },
            online: OnlineVerify {
                run: VerifyRun::default(),
                notified: 0,
                resync: false,
            },
            progress: ResyncProgress {
                unpersisted: false,
                persisted_us: now,
            },
            hs: Handshake {
                my_session,
                peer_hello_seen: None,
                last_session_end: None,
                crashed_primary,
                admin_disconnected: false,
                last_hello_us: 0,
            },
            peer: PeerView {
                msl_lost_pending: false,
                last_hb: None,
                role: None,
                was_in_sync: false,
                newest: (0, 0),
                fresh_msl: (0, 0),
                fresh_lan: (0, 0),
                epoch: 0,
            },
            local: LocalLinks {
                msl_carrier: true,
                hb_counter: 0,
                adapters: [AdapterHealth {
                    link_up: true,
                    carrier: true,
                    reachable: false,
                }; MAX_ADAPTERS],
                adapter_count: 1,
                adapter_last_rx: [None; MAX_ADAPTERS],
            },
        };
        node.timers.set(Timer::Heartbeat, now);
        node.timers.set(Timer::Hello, now);
        node.persist();
        node
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Change the resync rate cap at run time (bytes/s, 0 = none; DRBD's
    /// `resync-rate` set on a running resource). The floor under load is
    /// kept at or below the cap.
    pub fn set_resync_max_rate(&mut self, bytes_per_s: u64) {
        self.cfg.resync_max_bytes_per_s = bytes_per_s;
        if bytes_per_s > 0 {
            self.cfg.resync_min_bytes_per_s = self.cfg.resync_min_bytes_per_s.min(bytes_per_s);
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// Whether this node may serve client reads and writes now. Not while
    /// it holds after a stall: the peer may have taken over and written
    /// since (writes then wait in the core; reads are refused by the host).
    /// Nor while it lost its peer and lacks the witness lease.
    pub fn serving(&self) -> bool {
        self.accepting() && !self.stall_hold() && !self.lease_hold()
    }

    /// Whether this node takes client writes and flushes in (it may still
    /// hold them, see `serving`).
    fn accepting(&self) -> bool {
        self.role == Role::Primary
            && !self.failed
            && self.meta.disk == DiskState::UpToDate
            && self.switchover.running.is_none()
    }

    /// A primary that stalled and does not yet know whether the peer took
    /// over meanwhile: it holds writes and serves no reads (see
    /// [`Notice::Stalled`]).
    pub fn holding_after_stall(&self) -> bool {
        self.stall_hold()
    }

    /// A primary that lost its peer and lacks the witness lease: it holds
    /// writes and serves no reads until it holds it (or the peer is back).
    pub fn holding_for_lease(&self) -> bool {
        self.lease_hold()
    }

    /// Connected to the peer, pair in sync.
    pub fn in_sync(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| s.phase == Phase::InSync)
    }

    pub fn set_adapter_count(&mut self, n: u8) {
        self.local.adapter_count = n.clamp(1, MAX_ADAPTERS as u8);
    }

    pub fn status(&self) -> Status {
        let (resync_remaining, resync_total, resync_source) = match &self.session {
            Some(s) if s.phase == Phase::Source => (self.meta.dirty.count(), s.resync.total, true),
            Some(s) if s.phase == Phase::Target => (self.meta.dirty.count(), s.resync.total, false),
            _ => (0, 0, false),
        };
        let mut counters = self.counters;
        if let Some(s) = &self.session {
            counters.retransmits += s.send.tx.stats.retransmits;
        }
        Status {
            node_id: self.cfg.node_id,
            role: self.role,
            disk: self.meta.disk,
            generation: self.meta.gens.current,
            connected: self.session.is_some(),
            in_sync: self.in_sync(),
            msl_alive: self.msl.alive(),
            lan_alive: self.lan.alive(),
            peer_role: self.peer.role,
            dirty_blocks: self.meta.dirty.count(),
            resync_remaining,
            resync_total,
            resync_source,
            pending_writes: self.ios.count(io::Kind::ClientWrite) + self.writes.waiting.len(),
            pending_flushes: self.writes.flush_waiters.len(),
            switching: self.switchover.running.is_some(),
            last_session_end: self.hs.last_session_end,
            counters,
            peer_id: self.cfg.peer_id,
            write_mode: self.cfg.write_mode,
            msl_link_up: self.local.msl_carrier,
            adapters: self.local.adapters,
            adapter_count: self.local.adapter_count,
            gens: self.meta.gens,
            failed: self.failed,
            verify: self.online.run.status,
            lease_until: self.lease.until.filter(|_| self.lease_valid()),
            lease_wanted: self.lease.wanted,
            witness_unreachable: self.lease.unreachable,
        }
    }

    /// Hand the MSL round-trip samples taken since the last call to `f`
    /// (microseconds, oldest first).
    pub fn drain_rtt_samples(&mut self, f: impl FnMut(u64)) {
        if let Some(s) = self.session.as_mut() {
            s.send.tx.take_rtt_samples(f);
        }
    }

    /// Next queued action.
    pub fn poll_action(&mut self) -> Option<Action<H>> {
        self.out.pop()
    }

    /// When the node next needs `handle(now, Event::Tick)`. The host feeds
    /// every input that arrived by then first: the peer's silence is judged
    /// on the Tick only.
    pub fn poll_timeout(&self) -> Micros {
        // `handle` just ran every timer due at `now`; a deadline at or before
        // `now` that is still pending waits on a condition, not on time.
        let now = self.now;
        let mut t = now + self.cfg.heartbeat_interval_us;
        let mut at = |d: Micros| {
            if d > now {
                t = t.min(d);
            }
        };
        let dead = self.cfg.dead_after_us();
        at(self.timers.deadline(Timer::Heartbeat));
        if self.session.is_none() && !self.hs.admin_disconnected && self.local.msl_carrier {
            at(self.timers.deadline(Timer::Hello));
        }
        for d in [self.msl.deadline(dead), self.lan.deadline(dead)]
            .into_iter()
            .flatten()
        {
            at(d);
        }
        if let Some(d) = self.timers.get(Timer::SwitchoverDebounce) {
            at(d);
        }
        if let Some(d) = self.stall.hold_until {
            at(d);
        }
        if let Some(d) = self.lease.until {
            at(d);
        }
        if self.role == Role::Primary && !self.actlog.slots.is_empty() {
            at(self.stabilize_due_us());
            if !self.actlog.pressure {
                at(self.actlog.counted_us + self.cfg.stabilize_interval_us);
            }
        }
        if let Some(s) = &self.session {
            if let Some(r) = s.send.tx.poll_timeout() {
                at(r.max(now + 1));
            }
            if let (true, Some(i)) = (s.recv.applied > s.recv.stable, self.target_flush_interval())
            {
                at(s.recv.last_flush_us + i);
            }
            if s.phase == Phase::Source {
                at(self.writes.last_write_us + self.cfg.resync_idle_us);
                if self.cfg.resync_max_bytes_per_s > 0 {
                    at(self.timers.deadline(Timer::ResyncPace));
                }
                if self.cfg.resync_min_bytes_per_s > 0 {
                    at(self.timers.deadline(Timer::ResyncFloor));
                }
            }
        }
        t
    }

    /// Feed one event at time `now`.
    pub fn handle(&mut self, now: Micros, ev: Event<H>) {
        let before = self.now;
        self.now = self.now.max(now);
        // Before anything else, and before any timer: a node that did not
        // run cannot judge the peer by the silence it measured meanwhile.
        let gap = self.now - before;
        let stalled = gap > self.cfg.stall_threshold_us;
        if stalled {
            self.on_stall(gap);
        } else if matches!(ev, Event::InputOverrun) {
            self.on_input_lost();
        }
        let session_before = match (&self.session, self.role) {
            (Some(_), Role::Primary) => Some(self.meta.gens),
            _ => None,
        };
        self.lease.session_at_start = session_before.is_some();
        // The peer is judged dead only on a Tick: the host feeds every
        // input that arrived before it acts on a timer, so a frame still
        // queued behind this event cannot be missed.
        let judge = matches!(ev, Event::Tick);
        match ev {
            Event::Tick | Event::InputOverrun => {}
            Event::MslLink { up } => self.on_msl_link(up),
            Event::LanAdapter {
                adapter,
                link_up,
                carrier,
            } => self.on_lan_adapter(adapter, link_up, carrier),
            Event::MslFrame {
                header,
                msg,
                payload,
                arrived,
            } => self.on_msl_frame(header, msg, payload, arrived.min(self.now)),
            Event::LanFrame {
                adapter,
                header,
                hb,
                arrived,
            } => self.on_lan_frame(adapter, header, hb, arrived.min(self.now)),
            Event::MslUnknownType {
                must_understand, ..
            } => self.on_unknown_type(must_understand),
            Event::ClientWrite {
                req,
                block,
                count,
                kind,
                fua,
                payload,
            } => {
                self.counters.client_writes += 1;
                self.on_client_write(QueuedWrite {
                    req,
                    block,
                    count,
                    kind,
                    fua,
                    payload,
                });
            }
            Event::ClientFlush { req } => self.on_client_flush(req),
            Event::IoDone { io, ok } => self.on_io_done(io, ok),
            Event::ReadDone { io, ok, payload } => self.on_read_done(io, ok, payload),
            Event::ReadHole { io, blocks } => self.on_read_hole(io, blocks),
            Event::MetaFailed => self.fail("metadata"),
            Event::Admin(cmd) => self.on_admin(cmd),
            // A lease reported on the event that revealed a stall was
            // judged before it: void until a report made after it.
            Event::Lease { held, until } => self.on_lease(held && !stalled, until),
            Event::WitnessUnreachable { unreachable } => self.on_witness_unreachable(unreachable),
        }
        self.on_timers(judge);
        self.pump();
        self.lease_after(session_before);
    }

    // ----------------------------------------------------------------
    // Helpers

    /// Every action leaves here: a client acknowledgement from a primary
    /// that lost its peer and lacks the witness lease is withheld (see
    /// `lease_gate`).
    fn emit(&mut self, a: Action<H>) {
        if let Action::Reply {
            req,
            result: Ok(()),
        } = a
        {
            if !self.lease_gate(req) {
                return;
            }
        }
        self.out.push(a);
    }

    fn notify(&mut self, n: Notice) {
        self.emit(Action::Notify(n));
    }

    fn persist(&mut self) {
        self.persist_al(false);
    }

    fn header(&self, seq: u64, ack: u64) -> Header {
        Header {
            cluster_id: self.cfg.cluster_id,
            sender: self.cfg.node_id,
            generation: self.meta.gens.current,
            seq,
            ack,
            flags: 0,
            frag_index: 0,
            frag_count: 1,
        }
    }

    // ----------------------------------------------------------------
    // Liveness and timers

    // ----------------------------------------------------------------
    // Switchover (scenario 4)

    // ----------------------------------------------------------------
    // LAN

    // ----------------------------------------------------------------
    // MSL

    // ----------------------------------------------------------------
    // Client writes (primary)

    // ----------------------------------------------------------------
    // Failure latch and admin

    /// A clean shutdown: flush first, then call this; it persists a clean
    /// marker so that the next start does not count as a crash.
    pub fn shutdown(&mut self) {
        if self.role == Role::Primary {
            // Stop being primary BEFORE the session ends: a node that will
            // not write again must not start a generation (that would look
            // like a split brain to a peer that took over meanwhile; found
            // by the daemon's pair test). Blocks whose writes may not be
            // stable on the peer yet stay marked, as after a crash.
            for slot in &self.actlog.slots {
                self.meta
                    .dirty
                    .set_range(slot.extent * self.cfg.extent_blocks, self.cfg.extent_blocks);
            }
            self.transition(Reason::Shutdown);
            self.emit(Action::ServiceAddress { hold: false });
        }
        self.end_session("shutdown");
        self.meta.clean = true;
        self.persist();
    }
}
