//! The core driver: owns a node's protocol core (`msl_core::Node`), its
//! volume and its metadata store, and executes the core's actions in
//! order.
//!
//! Inputs arrive on one queue (`inbox`: MSL frames from the receive thread,
//! LAN server-state packets, client writes and flushes from the front end,
//! admin commands), and the thread that queues an input runs the core for
//! it when no other thread is (a lone write runs on its NBD reader, an ack
//! on the MSL receive thread); the core thread handles the rest and the
//! timers. Whoever runs it, the core runs on one thread at a time and
//! takes inputs in queue order: what is queued first, then the timers, so
//! a frame that arrived before a deadline is counted before the deadline
//! is checked (each frame also carries when it arrived).
//!
//! No disk I/O runs on the thread that runs the core: heartbeats and acks
//! leave from that thread, and a slow `fdatasync` there made the peer
//! declare this node dead. Volume writes, reads, flushes and metadata
//! persists go, in the order the core emitted them, to one I/O worker
//! thread ([`DiskOp`]); their completions come back through the inbox.
//! (A volume write an NBD reader's run of the core emits, when no persist
//! is in flight and no read queued, is done by that reader once it lets
//! go of the core: [`writes_here`].) A
//! persist is durable before anything the core emitted after it happens:
//! the worker's queue orders the disk operations behind it, and the other
//! actions (reliable MSL messages, client replies, notices, the service
//! address) wait in the driver ([`PersistGate`]) until the worker reports
//! it done. Heartbeats and acks carry no state the disk must hold first
//! and go out at once. If a persist fails, nothing after it happens: the
//! worker fails every disk operation queued after it without executing
//! it, the waiting actions are dropped (a waiting client gets an I/O
//! error) and the core gets `MetaFailed`. Volume flushes are handed on
//! to a flush thread when the worker reaches them, so later writes do not
//! wait for an `fdatasync`. MSL frames go out from the thread running the
//! core when the link is free, else through a transmit thread, control
//! ahead of data.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use msl_core::meta::Meta;
use msl_core::node::{Action, ClientError, Event, IoKind, Node};
use msl_core::Config;
use msl_store::{MetaIo, MetaStore, Volume};
use msl_wire::{Header, Message};

use crate::counters::Shared;
use crate::inbox::{Drained, Inbox, InboxRx, Runner};
use crate::input::{Block, Exit, Input, ReplyTo};
use crate::lan::{lan_auth_failures, LanPath};
use crate::msl::{Frame, FrameEncoder, MslTx, SendMode};
use crate::notify::{EventRecord, Notifier, ServiceManager};

/// Hooks the driver calls for things outside the node (service address).
pub trait Host: Send {
    /// Hold (add + gratuitous ARP) or release the service address.
    fn service_address(&mut self, hold: bool);
    /// The node holds client writes (it lacks the witness lease, or is
    /// waiting out a stall): a held address is kept but no longer
    /// re-announced, so clients follow a new holder's announcement.
    fn quiet(&mut self, _quiet: bool) {}
}

/// A host that does nothing (tests without a LAN).
pub struct NoHost;

impl Host for NoHost {
    fn service_address(&mut self, _hold: bool) {}
}

/// The driver itself.
pub struct Driver<H: Host> {
    node: Node<Block>,
    volume: Arc<Volume>,
    /// The I/O worker: every disk operation goes there, in order, but
    /// volume writes an NBD reader does itself (see [`writes_here`]).
    disk: DiskQueue,
    /// Volume writes handed to the threads that queued them, not yet done.
    here: Arc<HereDisk>,
    /// A metadata persist failed: no volume write is done anywhere but
    /// the I/O worker, which fails them.
    persist_failed: bool,
    /// Actions waiting for a metadata persist to be durable.
    gate: PersistGate,
    encoder: FrameEncoder,
    msl_tx: MslTx,
    /// Frames encoded and not yet handed to the link or the transmit
    /// thread (see `MslTx::send`).
    out: Vec<(bool, Frame)>,
    lan: Option<LanPath>,
    notifier: Notifier,
    host: H,
    shared: Arc<Shared>,
    /// Waiting client requests: where the answer goes, the bytes a
    /// successful write adds to `client_bytes_written`, and when a write
    /// arrived (its latency goes to the metrics histogram).
    replies: HashMap<u64, (ReplyTo, u64, Option<Instant>)>,
    next_req: u64,
    epoch: Instant,
    node_id: u16,
    frames: Vec<Frame>,
    house: Housekeeping,
    /// The newest ACK the core emitted while more input was queued: acks
    /// are cumulative, so one per burst of input replaces one per frame
    /// (a resync block caused two: on receipt and once written).
    held_ack: Option<(Header, Message)>,
    /// Events caused while handling one (a persist that failed, an I/O
    /// worker that is gone).
    internal: VecDeque<Event<Block>>,
    /// Input drops (receive rings, LAN queues) already reported.
    overruns_seen: u64,
    /// Drops already logged, and when (the log says it at most once per
    /// `OVERRUN_LOG_EVERY`).
    overruns_logged: (u64, Option<Instant>),
    /// Why the core stopped, once it has (whichever thread saw it).
    exit: Option<Exit>,
    /// The first tick has run.
    started: bool,
    /// The node's disk failed (an I/O error latched the volume, the final
    /// flush failed, or the core marked its disk failed): metadata this
    /// node persists from now on never says `clean`, so the next start
    /// counts as a crash and resyncs what the activity log holds.
    never_clean: bool,
    /// Where a configuration reload (SIGHUP) waits for this thread.
    reload: Option<Arc<crate::reload::ReloadSlot>>,
    /// systemd: readiness, status line and watchdog, fed from here (the
    /// core thread), so a hung core stops feeding the watchdog.
    service: ServiceManager,
    /// The link to the pair's witness (with `witness` configured).
    witness: Option<crate::witness::WitnessLink>,
    /// When the core last ran (its clock): a longer gap than the core's
    /// stall threshold is a stall for the witness's lease too.
    last_run: Option<u64>,
}

/// Inputs handled back to back before a held ACK goes out regardless.
const ACK_BATCH: usize = 64;

/// Inputs handled ahead of an overdue timer tick at most (one full inbox:
/// everything queued when the core got to run comes first, and a steady
/// flood of input cannot hold the timers off for long).
const TICK_AFTER: usize = crate::assemble::INBOX_CAPACITY;

/// Once-a-second bookkeeping on the core thread: the resync rate and the
/// rate-limited "wrong cluster key" notice.
struct Housekeeping {
    next: Instant,
    /// Last resync sample: when, blocks remaining.
    resync_sample: Option<(Instant, u64)>,
    /// Authentication failures already reported, and when.
    bad_auth_reported: u64,
    bad_auth_last: Option<Instant>,
}

/// At most one "bad_auth" notice per this long (each carries the count).
pub const BAD_AUTH_NOTICE_INTERVAL: Duration = Duration::from_secs(10);

/// Lost input is logged at most this often (the counters have every drop).
const OVERRUN_LOG_EVERY: Duration = Duration::from_secs(10);

impl<H: Host> Driver<H> {
    /// Build a driver from loaded metadata. Its I/O worker and flush
    /// thread start here; their completions come back through `inputs`
    /// (the core's own input queue).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Config,
        meta: Meta,
        store: MetaStore,
        volume: Arc<Volume>,
        encoder: FrameEncoder,
        msl_tx: MslTx,
        lan: Option<LanPath>,
        notifier: Notifier,
        host: H,
        shared: Arc<Shared>,
        seed: u64,
        inputs: Inbox,
    ) -> std::io::Result<Self> {
        let node_id = cfg.node_id;
        if msl_tx.pool.frame_size() != encoder.max_frame {
            tracing::warn!(
                "msld: frame buffers of {} bytes for frames of up to {}: every frame will be \
                 allocated (start_msl_tx and FrameEncoder disagree)",
                msl_tx.pool.frame_size(),
                encoder.max_frame
            );
        }
        let epoch = Instant::now();
        shared
            .resync_min_bytes_s
            .store(cfg.resync_min_bytes_per_s, Ordering::Relaxed);
        shared
            .resync_max_bytes_s
            .store(cfg.resync_max_bytes_per_s, Ordering::Relaxed);
        let node = Node::new(cfg, meta, seed, 0);
        let here = HereDisk::new(volume.clone());
        let disk = DiskQueue::start(here.clone(), store, inputs, shared.clone())?;
        Ok(Driver {
            node,
            volume,
            disk,
            here,
            persist_failed: false,
            gate: PersistGate::default(),
            encoder,
            msl_tx,
            out: Vec::new(),
            lan,
            notifier,
            host,
            shared,
            replies: HashMap::new(),
            next_req: 1,
            epoch,
            node_id,
            frames: Vec::new(),
            held_ack: None,
            internal: VecDeque::new(),
            overruns_seen: 0,
            overruns_logged: (0, None),
            exit: None,
            started: false,
            never_clean: false,
            reload: None,
            service: ServiceManager::from_env(),
            witness: None,
            last_run: None,
            house: Housekeeping {
                next: epoch,
                resync_sample: None,
                bad_auth_reported: 0,
                bad_auth_last: None,
            },
        })
    }

    /// Talk to the pair's witness through `link` (the core's config must
    /// have `witness` set).
    pub fn with_witness(mut self, link: crate::witness::WitnessLink) -> Self {
        self.witness = Some(link);
        self
    }

    /// Take configuration reloads from `slot` (see [`crate::reload`]).
    pub fn with_reload(mut self, slot: Arc<crate::reload::ReloadSlot>) -> Self {
        self.reload = Some(slot);
        self
    }

    /// Apply a reload on the core thread and report it as an event.
    fn apply_reload(&mut self, r: crate::reload::Reload) {
        use crate::reload::Reload;
        let (kind, message) = match r {
            Reload::Failed(why) => (
                "config_reload_failed",
                format!("configuration not reloaded (SIGHUP): {why}"),
            ),
            Reload::Apply {
                settings: s,
                restart_keys,
            } => {
                // The core lowers its floor along with its cap and has no
                // way to raise it: a higher floor waits for a restart.
                let had_min = self.node.config().resync_min_bytes_per_s;
                if s.resync_min_bytes_s < had_min {
                    self.node.set_resync_max_rate(s.resync_min_bytes_s);
                }
                self.node.set_resync_max_rate(s.resync_max_bytes_s);
                let c = self.node.config();
                let (min, max) = (c.resync_min_bytes_per_s, c.resync_max_bytes_per_s);
                self.shared.resync_min_bytes_s.store(min, Ordering::Relaxed);
                self.shared.resync_max_bytes_s.store(max, Ordering::Relaxed);
                self.notifier.reconfigure(
                    s.notify_command.clone(),
                    s.notify_policy.clone(),
                    s.log_file.clone(),
                );
                let mut m = format!(
                    "configuration reloaded (SIGHUP): resync at least {} MiB/s, at most {}; notify_command {}; notify_events {}",
                    min >> 20,
                    if max == 0 { "the link's speed".to_string() } else { format!("{} MiB/s", max >> 20) },
                    s.notify_command.as_ref().map_or("none".to_string(), |p| p.display().to_string()),
                    s.notify_policy.events.as_ref().map_or("all".to_string(), |e| e.join(",")),
                );
                if min != s.resync_min_bytes_s {
                    m.push_str(&format!(
                        "; resync_min_mib_s = {} takes effect at the next start (a running node can only lower it)",
                        s.resync_min_bytes_s >> 20
                    ));
                }
                if !restart_keys.is_empty() {
                    m.push_str(&format!(
                        "; changed keys that take effect at the next start: {}",
                        restart_keys.join(", ")
                    ));
                }
                ("config_reloaded", m)
            }
        };
        self.notifier
            .notify(EventRecord::now(self.node_id, kind, message));
    }

    /// Authentication failures on the MSL and on the LAN path so far.
    fn auth_failures(&self) -> (u64, u64) {
        let msl = self.shared.msl_rx_bad_auth.load(Ordering::Relaxed);
        let lan = self
            .lan
            .as_ref()
            .and_then(|l| l.counters.rx.lock().ok().map(|r| lan_auth_failures(&r)))
            .unwrap_or(0);
        (msl, lan)
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        self.service.alive(now);
        if now < self.house.next {
            return;
        }
        self.house.next = now + Duration::from_secs(1);
        // Resync rate: blocks done since the last sample, smoothed.
        let st = self.node.status();
        self.service.state(&st);
        let bs = u64::from(self.node.config().block_size);
        if st.resync_total > 0 {
            if let Some((t, left)) = self.house.resync_sample {
                let dt = now.duration_since(t).as_secs_f64();
                let done = left.saturating_sub(st.resync_remaining) * bs;
                if dt > 0.0 {
                    let inst = done as f64 / dt;
                    let old = self.shared.resync_rate_bytes_s.load(Ordering::Relaxed) as f64;
                    let rate = if old == 0.0 {
                        inst
                    } else {
                        0.5 * old + 0.5 * inst
                    };
                    self.shared
                        .resync_rate_bytes_s
                        .store(rate as u64, Ordering::Relaxed);
                }
            }
            self.house.resync_sample = Some((now, st.resync_remaining));
        } else {
            self.house.resync_sample = None;
            self.shared.resync_rate_bytes_s.store(0, Ordering::Relaxed);
        }
        // Wrong cluster key: one notice, then at most one per interval.
        let (msl, lan) = self.auth_failures();
        let total = msl + lan;
        let due = self
            .house
            .bad_auth_last
            .is_none_or(|t| now.duration_since(t) >= BAD_AUTH_NOTICE_INTERVAL);
        if total > self.house.bad_auth_reported && due {
            self.house.bad_auth_reported = total;
            self.house.bad_auth_last = Some(now);
            self.notifier.notify(EventRecord::now(
                self.node_id,
                "bad_auth",
                format!(
                    "{total} frames failed authentication so far (MSL {msl}, LAN {lan}): \
                     the peer signs with a different cluster key; check that key_file \
                     holds the same key on both nodes. Those frames are dropped: \
                     the nodes will not pair."
                ),
            ));
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// A core deadline has passed.
    fn tick_due(&self) -> bool {
        self.now() >= self.node.poll_timeout()
    }

    /// The next deadline: the core's or the witness link's.
    fn deadline(&self) -> u64 {
        let w = self.witness.as_ref().map_or(u64::MAX, |w| w.due());
        self.node.poll_timeout().min(w)
    }

    /// The core did not run for longer than its stall threshold: the
    /// witness's lease, checked before, is void (the core voids its own).
    fn check_stall(&mut self) {
        let now = self.now();
        let gap = self.last_run.map_or(0, |t| now.saturating_sub(t));
        self.last_run = Some(now);
        if gap >= self.node.config().stall_threshold_us {
            if let Some(w) = self.witness.as_mut() {
                w.on_stall(now);
            }
        }
    }

    /// The witness link's timers, if due.
    fn witness_tick(&mut self, internal: &mut VecDeque<Event<Block>>) -> Option<Exit> {
        let now = self.now();
        let (role, gen) = (self.node.role(), self.node.meta().gens.current);
        let w = self.witness.as_mut()?;
        if now < w.due() {
            return None;
        }
        // Every request carries the node's generation as it is now: the
        // witness grants the other node only at its holder's generation.
        w.set_view(role, gen);
        internal.extend(w.tick(now));
        self.step(None, internal)
    }

    /// An arrival time on this driver's clock.
    fn arrival(&self, arrived: Instant) -> u64 {
        arrival_us(self.epoch, arrived, self.now())
    }

    /// Inputs lost so far because the core did not take them in time:
    /// MSL frames the kernel's receive ring dropped, LAN datagrams a
    /// socket's buffer or the hand-off queue dropped.
    fn input_drops(&self) -> u64 {
        let msl = self.shared.msl_rx_ring_dropped.load(Ordering::Relaxed);
        let lan = self.lan.as_ref().map_or(0, |l| {
            l.counters.kernel_dropped.load(Ordering::Relaxed)
                + l.counters.queue_full.load(Ordering::Relaxed)
        });
        msl + lan
    }

    /// Count an overrun once per run of the core that finds new drops.
    /// True (and counted) if input was lost since the last look: the core
    /// then voids whatever silence it measured (the peer's frames may be
    /// among the drops); it is not a stall, the node holds nothing.
    fn check_overrun(&mut self) -> bool {
        let drops = self.input_drops();
        if drops <= self.overruns_seen {
            return false;
        }
        self.overruns_seen = drops;
        self.shared.input_overruns.fetch_add(1, Ordering::Relaxed);
        let (logged, at) = self.overruns_logged;
        if at.is_none_or(|t| t.elapsed() >= OVERRUN_LOG_EVERY) {
            tracing::warn!(
                "msld: {} input frames or datagrams lost (receive ring or queue full; \
                 msl_rx_ring_dropped, lan_rx_kernel_dropped, lan_rx_queue_full): \
                 failure detection restarted",
                drops - logged
            );
            self.overruns_logged = (drops, Some(Instant::now()));
        }
        true
    }

    /// Run until stopped; returns why. This thread becomes the core
    /// thread; threads that send inputs run the core too when it is free
    /// (see `inbox`).
    pub fn run(self, inputs: InboxRx) -> Exit
    where
        H: 'static,
    {
        inputs.run(Box::new(self))
    }

    /// The core's event for an input (`None`: handled here already).
    fn event_for(&mut self, input: Input) -> Result<Option<Event<Block>>, Exit> {
        Ok(Some(match input {
            Input::Stop => return Err(Exit::Stopped),
            Input::IoDone { io, ok } => Event::IoDone { io, ok },
            Input::ReadDone { io, ok, payload } => Event::ReadDone { io, ok, payload },
            Input::ReadHole { io, blocks } => Event::ReadHole { io, blocks },
            // Handled by `input` (the persist gate, the witness link),
            // never here.
            Input::MetaDone { .. } | Input::Witness { .. } => return Ok(None),
            Input::Status(tx) => {
                let _ = tx.send(self.node.status());
                return Ok(None);
            }
            Input::Msl {
                header,
                msg,
                payload,
                arrived,
            } => Event::MslFrame {
                header,
                msg,
                payload,
                arrived: self.arrival(arrived),
            },
            Input::MslUnknown {
                code,
                must_understand,
            } => Event::MslUnknownType {
                code,
                must_understand,
            },
            Input::Lan(p) => Event::LanFrame {
                adapter: p.adapter,
                header: p.header,
                hb: p.hb,
                arrived: self.arrival(p.arrived),
            },
            Input::LanAdapter { adapter, up } => Event::LanAdapter {
                adapter,
                link_up: up,
                carrier: up,
            },
            Input::MslLink { up } => Event::MslLink { up },
            Input::Admin(cmd) => Event::Admin(cmd),
            Input::Write {
                block,
                count,
                kind,
                fua,
                payload,
                reply,
            } => {
                let req = self.next_req;
                self.next_req += 1;
                let bytes = match kind {
                    IoKind::Write => count * u64::from(self.node.config().block_size),
                    _ => 0,
                };
                let since = matches!(kind, IoKind::Write).then(Instant::now);
                self.replies.insert(req, (reply, bytes, since));
                Event::ClientWrite {
                    req,
                    block,
                    count,
                    kind,
                    fua,
                    payload,
                }
            }
            Input::Flush { reply } => {
                let req = self.next_req;
                self.next_req += 1;
                self.replies.insert(req, (ReplyTo::Wait(reply), 0, None));
                Event::ClientFlush { req }
            }
        }))
    }

    /// Handle one input.
    fn input(&mut self, input: Input, internal: &mut VecDeque<Event<Block>>) -> Option<Exit> {
        if let Input::MetaDone { ok } = input {
            let exit = self.persist_done(ok, internal);
            return self.step(None, internal).or(exit);
        }
        if let Input::Witness { bytes, arrived } = input {
            let at = self.arrival(arrived);
            if let Some(w) = self.witness.as_mut() {
                internal.extend(w.on_reply(at, &bytes));
            }
            return self.step(None, internal);
        }
        match self.event_for(input) {
            Ok(Some(ev)) => self.step(Some(ev), internal),
            Ok(None) => None,
            Err(e) => Some(e),
        }
    }

    /// A metadata persist finished: run what waited for it, or (failed)
    /// drop it, answer its waiting clients with an I/O error and tell the
    /// core.
    fn persist_done(&mut self, ok: bool, internal: &mut VecDeque<Event<Block>>) -> Option<Exit> {
        let mut exit = None;
        for a in self.gate.done() {
            if ok {
                exit = self.execute_now(a, internal).or(exit);
            } else if let Action::Reply { req, .. } = a {
                if let Some((to, _, _)) = self.replies.remove(&req) {
                    to.send(Err(ClientError::IoError));
                }
            }
        }
        if !ok {
            self.persist_failed = true;
            internal.push_back(Event::MetaFailed);
        }
        exit
    }

    /// Feed one event (if any), then everything it causes.
    fn step(
        &mut self,
        ev: Option<Event<Block>>,
        internal: &mut VecDeque<Event<Block>>,
    ) -> Option<Exit> {
        internal.extend(ev);
        let mut exit = None;
        while let Some(ev) = internal.pop_front() {
            let now = self.now();
            self.node.handle(now, ev);
            while let Some(a) = self.node.poll_action() {
                if let Some(e) = self.execute(a, internal) {
                    exit = Some(e);
                }
            }
        }
        self.node
            .drain_rtt_samples(|us| crate::metrics::msl_rtt().record_us(us));
        self.shared
            .holding
            .store(self.node.holding_after_stall(), Ordering::Relaxed);
        self.host
            .quiet(self.node.holding_after_stall() || self.node.holding_for_lease());
        self.shared
            .serving
            .store(self.node.serving(), Ordering::Relaxed);
        self.shared
            .in_sync
            .store(self.node.in_sync(), Ordering::Relaxed);
        self.housekeeping();
        exit
    }

    /// Send the held ACK (the newest: it covers every earlier one).
    fn send_held_ack(&mut self) {
        if let Some((header, msg)) = self.held_ack.take() {
            self.send_msl(&header, &msg, None);
        }
    }

    /// Encode one MSL message into frames and queue them for the link.
    fn send_msl(&mut self, header: &Header, msg: &Message, payload: Option<&Block>) {
        self.frames.clear();
        let empty = Bytes::new();
        if self.encoder.encode_counted(
            header,
            msg,
            payload.map_or(&empty, |p| p.shared()),
            &self.msl_tx.pool,
            &mut self.frames,
            &self.shared,
        ) {
            let control = msg.is_control();
            self.out.extend(self.frames.drain(..).map(|f| (control, f)));
        }
    }

    /// Execute an action now, or hold it behind a persist in flight.
    fn execute(&mut self, a: Action<Block>, internal: &mut VecDeque<Event<Block>>) -> Option<Exit> {
        let a = self.gate.admit(a)?;
        self.execute_now(a, internal)
    }

    /// Hand a disk operation to the I/O worker; if the worker is gone, it
    /// fails here.
    fn disk_op(&mut self, op: DiskOp, internal: &mut VecDeque<Event<Block>>) {
        let Err(op) = self.disk.send(op) else {
            return;
        };
        match op {
            DiskOp::Write { io, .. } | DiskOp::Flush { io } => {
                internal.push_back(Event::IoDone { io, ok: false })
            }
            DiskOp::Read { io, .. } => {
                self.here.reads_queued.fetch_sub(1, Ordering::AcqRel);
                internal.push_back(Event::ReadDone {
                    io,
                    ok: false,
                    payload: None,
                })
            }
            DiskOp::Persist(_) => {
                let _ = self.persist_done(false, internal);
            }
            DiskOp::Settle(_) => {}
        }
    }

    fn execute_now(
        &mut self,
        a: Action<Block>,
        internal: &mut VecDeque<Event<Block>>,
    ) -> Option<Exit> {
        let bs = u64::from(self.node.config().block_size);
        match a {
            Action::SendMsl {
                header,
                msg: msg @ Message::Ack(_),
                ..
            } => self.held_ack = Some((header, msg)),
            Action::SendMsl {
                header,
                msg,
                payload,
            } => self.send_msl(&header, &msg, payload.as_ref()),
            Action::SendLan { header, hb } => {
                if let Some(lan) = &self.lan {
                    lan.send(&header, &hb);
                }
            }
            Action::Write {
                io,
                block,
                count,
                kind,
                fua,
                payload,
            } => {
                // The core emits a write's mirror message first: send it
                // before the local write so the peer's half overlaps it.
                self.msl_tx.send(&mut self.out, SendMode::Direct);
                if let (IoKind::Write, Some(p)) = (kind, &payload) {
                    // An NBD reader that ran the core writes it itself if
                    // nothing needs the worker's order (`may_write_here`).
                    if p.len() as u64 == count * bs
                        && may_write_here(&self.gate, self.persist_failed, &self.here)
                        && hand_here(&self.here, io, block * bs, fua, p)
                    {
                        self.shared.disk_writes_here.fetch_add(1, Ordering::Relaxed);
                        return None;
                    }
                }
                let op = DiskOp::Write {
                    io,
                    off: block * bs,
                    len: count * bs,
                    kind,
                    fua,
                    payload,
                };
                self.disk_op(op, internal);
            }
            Action::Read { io, block, count } => {
                self.here.reads_queued.fetch_add(1, Ordering::AcqRel);
                let op = DiskOp::Read {
                    io,
                    off: block * bs,
                    len: (count * bs) as usize,
                    bs,
                };
                self.disk_op(op, internal);
            }
            Action::Flush { io } => self.disk_op(DiskOp::Flush { io }, internal),
            Action::PersistMeta(mut m) => {
                if self.never_clean {
                    m.clean = false;
                }
                self.gate.sent();
                self.disk_op(DiskOp::Persist(Box::new(m)), internal);
            }
            Action::Reply { req, result } => {
                if let Some((to, bytes, since)) = self.replies.remove(&req) {
                    if let (Ok(_), Some(t)) = (&result, since) {
                        crate::metrics::client_write_latency().record(t.elapsed());
                    }
                    if result.is_ok() && bytes > 0 {
                        self.shared
                            .client_bytes_written
                            .fetch_add(bytes, Ordering::Relaxed);
                    }
                    to.send(result);
                }
            }
            Action::Notify(n) => self
                .notifier
                .notify(EventRecord::new(self.node_id, &n).with_peer(self.node.config().peer_id)),
            Action::ServiceAddress { hold } => self.host.service_address(hold),
            Action::Restart => return Some(Exit::Restart),
            // The core asks for the lease only with `Config::witness`,
            // set when the witness link is.
            Action::WantLease(want) => {
                let now = self.now();
                let (role, gen) = (self.node.role(), self.node.meta().gens.current);
                if let Some(w) = self.witness.as_mut() {
                    w.set_view(role, gen);
                    w.want(now, want);
                }
            }
        }
        None
    }

    /// Wait until the I/O worker has done everything queued so far, and
    /// settle what waited for its persists (the completions it queued go
    /// unread: the core has stopped).
    fn settle_disk(&mut self, internal: &mut VecDeque<Event<Block>>) {
        // Writes handed to NBD readers finish on their threads.
        self.here.wait_written(Duration::from_micros(100));
        let (tx, rx) = sync_channel(1);
        let persisted = match self.disk.send(DiskOp::Settle(tx)) {
            Ok(()) => rx.recv().ok(),
            Err(_) => None,
        };
        let ok = persisted.unwrap_or(0);
        while self.gate.in_flight() {
            let _ = self.persist_done(self.gate.done_count() < ok, internal);
        }
    }

    fn finish_core(&mut self, exit: Exit) -> Exit {
        self.service.stopping();
        // The worker must not wait for room in a queue nobody reads now.
        self.disk.closing.store(true, Ordering::Relaxed);
        let mut internal = VecDeque::new();
        self.settle_disk(&mut internal);
        if exit == Exit::Stopped {
            // The core's shutdown persists `clean`; after a disk failure
            // the daemon withholds it (see `never_clean`). Every write the
            // core emitted is done (settled above) before this flush.
            let flushed = self.volume.flush().is_ok();
            self.never_clean |= !flushed
                || self.volume.is_failed()
                || self.node.meta().disk == msl_wire::DiskState::Failed;
            self.node.shutdown();
            while let Some(a) = self.node.poll_action() {
                let _ = self.execute(a, &mut internal);
            }
            self.settle_disk(&mut internal);
        }
        // The worker ends and lets go of the metadata file before this
        // returns (a restart in the same process opens it again).
        self.disk.close();
        // Whatever the core said last (a restart's handover and its
        // leaving notice) goes out from here, before the process ends.
        self.send_held_ack();
        self.msl_tx.send(&mut self.out, SendMode::Direct);
        for (_, (to, _, _)) in self.replies.drain() {
            to.send(Err(ClientError::NotPrimary));
        }
        exit
    }
}

impl<H: Host> Runner for Driver<H> {
    /// Queued inputs are handled back to back (frames produced meanwhile
    /// go to the transmit thread), then the timers: a tick if a deadline
    /// has passed. The newest ACK goes out once the queue is empty or
    /// after `ACK_BATCH` inputs, and what is left to send goes from this
    /// thread (`SendMode::Direct`) before it returns.
    ///
    /// Inputs first: after the core was held up (the process paused, the
    /// CPU starved), the peer's frames that arrived meanwhile are counted
    /// before a timer can find the peer silent. A thread that ran out of
    /// `budget` with input possibly left leaves the tick to the core
    /// thread, which it wakes (see `inbox`).
    fn drain(&mut self, rx: &Receiver<Input>, budget: usize) -> Drained {
        if let Some(r) = self.reload.as_ref().and_then(|s| s.take()) {
            self.apply_reload(r);
        }
        let mut internal = std::mem::take(&mut self.internal);
        // Once stopped, stopped for every thread (the core thread finishes).
        let mut exit = self.exit;
        self.check_stall();
        // The first run starts the core (its first hello and heartbeat)
        // before any input.
        if exit.is_none() && !self.started {
            self.started = true;
            exit = self.step(Some(Event::Tick), &mut internal);
        }
        if exit.is_none() && self.check_overrun() {
            exit = self.step(Some(Event::InputOverrun), &mut internal);
        }
        let mut handled = 0;
        let mut since_tick = 0;
        while exit.is_none() && handled < budget {
            let input = match rx.try_recv() {
                Ok(i) => i,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    exit = Some(Exit::Stopped);
                    break;
                }
            };
            if handled > 0 {
                // More to do: the transmit thread sends meanwhile.
                self.msl_tx.send(&mut self.out, SendMode::Queue);
                if handled % ACK_BATCH == 0 {
                    self.send_held_ack();
                }
            }
            handled += 1;
            since_tick += 1;
            exit = self.input(input, &mut internal);
            if exit.is_none() && since_tick >= TICK_AFTER && self.tick_due() {
                since_tick = 0;
                exit = self.step(Some(Event::Tick), &mut internal);
            }
        }
        if exit.is_none() && handled < budget && self.tick_due() {
            exit = self.step(Some(Event::Tick), &mut internal);
        }
        if exit.is_none() && handled < budget {
            exit = self.witness_tick(&mut internal);
        }
        self.internal = internal;
        self.exit = exit;
        if exit.is_none() {
            self.send_held_ack();
            // About to go back to other work or to wait: send from here.
            self.msl_tx.send(&mut self.out, SendMode::Direct);
        }
        Drained {
            handled,
            deadline_us: self.deadline(),
            exit,
        }
    }

    fn finish(&mut self, exit: Exit) -> Exit {
        self.finish_core(exit)
    }

    fn now_us(&self) -> u64 {
        self.now()
    }
}

/// `arrived` on the clock of a driver started at `epoch` (microseconds),
/// clamped to `[0, now_us]`: the core never sees a frame from before it
/// started or from its future.
fn arrival_us(epoch: Instant, arrived: Instant, now_us: u64) -> u64 {
    let us = arrived.saturating_duration_since(epoch).as_micros();
    u64::try_from(us).unwrap_or(u64::MAX).min(now_us)
}

/// The volume, for writes done by the threads that queued them.
struct HereDisk {
    volume: Arc<Volume>,
    /// Handed to a thread and not yet written (shutdown and reads wait
    /// for them).
    in_flight: AtomicUsize,
    /// Reads queued to the worker and not yet done: none is done
    /// elsewhere meanwhile.
    reads_queued: AtomicUsize,
    /// The worker's: set at shutdown.
    closing: Arc<AtomicBool>,
}

impl HereDisk {
    fn new(volume: Arc<Volume>) -> Arc<Self> {
        Arc::new(HereDisk {
            volume,
            in_flight: AtomicUsize::new(0),
            reads_queued: AtomicUsize::new(0),
            closing: Arc::default(),
        })
    }

    /// Wait, looking every `step`, until every write handed to a thread
    /// is done (they take microseconds).
    fn wait_written(&self, step: Duration) {
        while self.in_flight.load(Ordering::Acquire) > 0 {
            std::thread::sleep(step);
        }
    }
}

/// A volume write a thread does itself once it lets go of the core.
struct HereWrite {
    io: u64,
    off: u64,
    fua: bool,
    payload: Block,
    disk: Arc<HereDisk>,
}

thread_local! {
    /// This thread takes volume writes the core emits (inside
    /// [`writes_here`]).
    static TAKES_WRITES: Cell<bool> = const { Cell::new(false) };
    /// Writes this thread took, done when [`writes_here`] lets go.
    static HERE: RefCell<Vec<HereWrite>> = const { RefCell::new(Vec::new()) };
}

/// Whether a volume write may be done outside the I/O worker's order: no
/// persist in flight (an activity-log mark must be durable before the
/// data it covers is written; the worker's queue orders them), none
/// failed (the worker fails every write after that), and no read queued
/// (a read sees no write emitted after it).
fn may_write_here(gate: &PersistGate, persist_failed: bool, here: &HereDisk) -> bool {
    !gate.in_flight() && !persist_failed && here.reads_queued.load(Ordering::Acquire) == 0
}

/// Take a volume write on this thread if it is inside [`writes_here`].
fn hand_here(disk: &Arc<HereDisk>, io: u64, off: u64, fua: bool, payload: &Block) -> bool {
    if !TAKES_WRITES.get() {
        return false;
    }
    disk.in_flight.fetch_add(1, Ordering::AcqRel);
    HERE.with_borrow_mut(|h| {
        h.push(HereWrite {
            io,
            off,
            fua,
            payload: payload.clone(),
            disk: disk.clone(),
        })
    });
    true
}

/// Run `queue` (an NBD reader queuing a client write, which may run the
/// core on this thread), then do here the volume writes the core emitted
/// meanwhile that nothing in flight had to precede, and report them done.
///
/// The I/O worker would take each of them with a thread wake-up and, on
/// a CPU it shares with the reader, two switches. The reader has let go
/// of the core by then, so a slow write holds up this connection's next
/// request (and any other client's write the core emitted in the same
/// run, as it would in the worker's queue), never the core: heartbeats
/// and acks keep leaving from the other threads. Only threads that call
/// this take writes: never the core thread nor the MSL and LAN
/// receivers, whose silence would look like a failed link.
pub fn writes_here<R>(inputs: &Inbox, queue: impl FnOnce() -> R) -> R {
    let _here = Here(inputs);
    TAKES_WRITES.set(true);
    queue()
}

/// Ends [`writes_here`], also if `queue` panicked: the writes taken are
/// done and answered (shutdown waits for them).
struct Here<'a>(&'a Inbox);

impl Drop for Here<'_> {
    fn drop(&mut self) {
        TAKES_WRITES.set(false);
        let mut writes = HERE.take();
        if writes.is_empty() {
            return HERE.set(writes);
        }
        for w in writes.drain(..) {
            let ok = w.disk.volume.write_at(&w.payload, w.off, w.fua).is_ok();
            drop(w.payload);
            w.disk.in_flight.fetch_sub(1, Ordering::AcqRel);
            deliver(self.0, &w.disk.closing, Input::IoDone { io: w.io, ok });
        }
        // Keeps its room for the next time.
        HERE.set(writes);
        self.0.kick();
    }
}

/// A disk operation for the I/O worker, in the order the core emitted it.
pub(crate) enum DiskOp {
    Write {
        io: u64,
        off: u64,
        len: u64,
        kind: IoKind,
        fua: bool,
        payload: Option<Block>,
    },
    /// `bs`: the block size, to report a hole in blocks.
    Read {
        io: u64,
        off: u64,
        len: usize,
        bs: u64,
    },
    Flush {
        io: u64,
    },
    Persist(Box<Meta>),
    /// Answered, with how many persists succeeded so far, once everything
    /// queued before it is done (shutdown).
    Settle(SyncSender<u64>),
}

/// The driver's end of the I/O worker.
struct DiskQueue {
    tx: Option<msl_buf::queue::Sender<DiskOp>>,
    thread: Option<JoinHandle<()>>,
    /// Set at shutdown: completions nobody will read are dropped rather
    /// than waited for when the inbox is full.
    closing: Arc<AtomicBool>,
    /// The worker thread's id (its scheduling policy is `SCHED_BATCH`).
    #[cfg_attr(not(test), allow(dead_code))]
    tid: libc::pid_t,
}

impl DiskQueue {
    /// Start the I/O worker (and the flush thread it hands flushes to).
    fn start<D: MetaIo + Send + 'static>(
        here: Arc<HereDisk>,
        store: MetaStore<D>,
        inputs: Inbox,
        shared: Arc<Shared>,
    ) -> std::io::Result<DiskQueue> {
        let volume = here.volume.clone();
        let closing = here.closing.clone();
        let flusher = start_flusher(volume.clone(), inputs.clone())?;
        let (tx, rx) = msl_buf::queue::queue();
        let (started_tx, started) = sync_channel(1);
        let w = DiskWorker {
            volume,
            store,
            flusher: Some(flusher),
            inputs,
            closing: closing.clone(),
            failed: false,
            persisted: 0,
            shared,
            here,
        };
        let thread = std::thread::Builder::new()
            .name("msld-disk".into())
            .spawn(move || {
                if let Err(e) = run_as_batch() {
                    tracing::warn!("msld: the I/O worker keeps the normal scheduling policy: {e}");
                }
                // SAFETY: gettid has no preconditions.
                let _ = started_tx.send(unsafe { libc::gettid() });
                w.run(rx)
            })?;
        let tid = started
            .recv()
            .map_err(|_| std::io::Error::other("the I/O worker ended before it started"))?;
        Ok(DiskQueue {
            tx: Some(tx),
            thread: Some(thread),
            closing,
            tid,
        })
    }

    /// Queue an operation (never waits); hands it back if the worker is
    /// gone.
    fn send(&self, op: DiskOp) -> Result<(), DiskOp> {
        match &self.tx {
            Some(tx) => tx.send(op),
            None => Err(op),
        }
    }

    /// End the worker (after what is queued) and wait for it.
    fn close(&mut self) {
        self.closing.store(true, Ordering::Relaxed);
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for DiskQueue {
    fn drop(&mut self) {
        self.close();
    }
}

/// Run volume flushes on their own thread; completions come back as
/// `Input::IoDone`. The core issues a flush only after the writes it must
/// cover completed, so a flush running beside later writes covers what
/// it promises.
fn start_flusher(volume: Arc<Volume>, inputs: Inbox) -> std::io::Result<SyncSender<u64>> {
    let (tx, rx) = sync_channel::<u64>(1024);
    std::thread::Builder::new()
        .name("msld-flush".into())
        .spawn(move || {
            for io in rx {
                let ok = volume.flush().is_ok();
                if inputs.send(Input::IoDone { io, ok }).is_err() {
                    return;
                }
            }
        })?;
    Ok(tx)
}

/// Put the calling thread under `SCHED_BATCH`: the I/O worker then does
/// not preempt the thread that queued work for it. On a CPU it shares
/// with that thread (the core's, an NBD connection's, the MSL receiver's),
/// the queuing thread goes on and queues the rest of what it has (a queue
/// depth's writes, every fragment of a message) before the worker runs and
/// takes them in one batch, instead of one switch there and back per
/// operation. Its CPU share is unchanged (the policy keeps its nice
/// weight); on a CPU of its own it changes nothing. See bench/README.md,
/// "A/B: the I/O worker under SCHED_BATCH".
fn run_as_batch() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param
    // (priority 0, as SCHED_BATCH requires).
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Operations the worker does back to back before it runs the core for
/// their completions.
const DISK_BATCH: usize = 16;

/// The I/O worker: executes disk operations in order, one at a time.
struct DiskWorker<D: MetaIo> {
    volume: Arc<Volume>,
    store: MetaStore<D>,
    flusher: Option<SyncSender<u64>>,
    inputs: Inbox,
    closing: Arc<AtomicBool>,
    /// A persist failed: nothing queued after it is executed.
    failed: bool,
    /// Persists that succeeded.
    persisted: u64,
    /// Where the store's bytes written are published.
    shared: Arc<Shared>,
    /// Volume writes done by the threads that queued them: a read waits
    /// for those emitted before it.
    here: Arc<HereDisk>,
}

impl<D: MetaIo> DiskWorker<D> {
    fn run(mut self, rx: msl_buf::queue::Receiver<DiskOp>) {
        // Takes everything queued at once into a buffer that keeps its
        // room: the queue allocates nothing per operation.
        let mut batch = VecDeque::new();
        while rx.take(&mut batch) {
            let mut done = 0;
            loop {
                while let Some(op) = batch.pop_front() {
                    self.execute(op);
                    done += 1;
                    if done % DISK_BATCH == 0 {
                        self.inputs.kick();
                    }
                }
                if !rx.try_take(&mut batch) {
                    break;
                }
            }
            // The core runs for the completions, here if it is free.
            self.inputs.kick();
        }
    }

    fn execute(&mut self, op: DiskOp) {
        match op {
            DiskOp::Write {
                io,
                off,
                len,
                kind,
                fua,
                payload,
            } => {
                let ok = !self.failed
                    && match (kind, &payload) {
                        (IoKind::Write, Some(p)) if p.len() as u64 == len => {
                            self.volume.write_at(p, off, fua).is_ok()
                        }
                        // A write whose payload does not cover it is
                        // refused (counted by the core as an I/O failure).
                        (IoKind::Write, _) => false,
                        (IoKind::Trim, _) => self.volume.trim(off, len).is_ok(),
                        (IoKind::Zeroes, _) => self.volume.zero_range(off, len).is_ok(),
                    };
                self.deliver(Input::IoDone { io, ok });
            }
            DiskOp::Read { io, off, len, bs } => {
                // A read sees every write emitted before it and none after
                // (online verify digests a point of the mirrored stream):
                // while it is queued no write is done outside this queue
                // (`may_write_here`), and those done before it are waited
                // for here (writes of microseconds; this is the worker).
                self.here.wait_written(Duration::from_micros(20));
                let done = self.read(io, off, len, bs);
                // Done with the volume: writes may leave this queue again
                // (before the core hears of it, so it never sees it queued).
                self.here.reads_queued.fetch_sub(1, Ordering::AcqRel);
                self.deliver(done);
            }
            DiskOp::Flush { io } => {
                if self.failed {
                    return self.deliver(Input::IoDone { io, ok: false });
                }
                let handed = self
                    .flusher
                    .as_ref()
                    .is_some_and(|f| f.try_send(io).is_ok());
                if !handed {
                    let ok = self.volume.flush().is_ok();
                    self.deliver(Input::IoDone { io, ok });
                }
            }
            DiskOp::Persist(m) => {
                let ok = !self.failed && self.store.persist(&m).is_ok();
                self.failed |= !ok;
                self.persisted += u64::from(ok);
                self.shared
                    .meta_bytes_written
                    .store(self.store.stats().bytes_written, Ordering::Relaxed);
                self.deliver(Input::MetaDone { ok });
            }
            DiskOp::Settle(tx) => {
                let _ = tx.send(self.persisted);
            }
        }
    }

    /// A read's completion, or a hole (a file's, found with SEEK_DATA)
    /// reported with its extent instead of read: a resync source sends it
    /// as a zero run and skips the rest of it.
    fn read(&self, io: u64, off: u64, len: usize, bs: u64) -> Input {
        if !self.failed {
            if let Ok(Some(blocks)) = self.volume.hole_blocks(off, len as u64, bs) {
                return Input::ReadHole { io, blocks };
            }
        }
        let r = if self.failed {
            None
        } else {
            self.volume.read_vec(off, len).ok()
        };
        Input::ReadDone {
            io,
            ok: r.is_some(),
            payload: r.map(Block::from),
        }
    }

    /// Queue a completion for the core; while the queue is full, wait for
    /// room, unless the driver is shutting down.
    fn deliver(&self, input: Input) {
        deliver(&self.inputs, &self.closing, input)
    }
}

/// Queue a disk completion for the core; while the queue is full, wait
/// for room, unless the driver is shutting down (`closing`: nobody will
/// read it).
fn deliver(inputs: &Inbox, closing: &AtomicBool, mut input: Input) {
    loop {
        match inputs.try_push(input) {
            Ok(()) => return,
            Err(TrySendError::Full(i)) if !closing.load(Ordering::Relaxed) => {
                input = i;
                inputs.kick();
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(_) => return,
        }
    }
}

/// The actions the core emitted after a metadata persist that is not yet
/// durable, other than disk operations (the worker's queue orders those):
/// they wait here, in order, until it is.
#[derive(Default)]
pub(crate) struct PersistGate {
    /// Persists handed to the worker, and of those, the ones reported done.
    sent: u64,
    done: u64,
    /// Held actions, each with the persist it waits for (`sent` when it
    /// was held).
    held: VecDeque<(u64, Action<Block>)>,
}

impl PersistGate {
    /// A persist was handed to the worker.
    pub(crate) fn sent(&mut self) {
        self.sent += 1;
    }

    /// Some persist is not done yet.
    pub(crate) fn in_flight(&self) -> bool {
        self.done < self.sent
    }

    /// Persists reported done.
    pub(crate) fn done_count(&self) -> u64 {
        self.done
    }

    /// `a` if it may happen now; else it is held until the persists
    /// before it are durable. Disk operations and liveness traffic
    /// (heartbeats, acks, LAN server-state packets) never wait.
    pub(crate) fn admit(&mut self, a: Action<Block>) -> Option<Action<Block>> {
        let waits = match &a {
            Action::Write { .. }
            | Action::Read { .. }
            | Action::Flush { .. }
            | Action::PersistMeta(_)
            | Action::SendLan { .. }
            | Action::WantLease(_) => false,
            Action::SendMsl { msg, .. } => msg.is_reliable(),
            Action::Reply { .. }
            | Action::Notify(_)
            | Action::ServiceAddress { .. }
            | Action::Restart => true,
        };
        if waits && self.in_flight() {
            self.held.push_back((self.sent, a));
            None
        } else {
            Some(a)
        }
    }

    /// The oldest persist in flight finished: the actions that waited for
    /// it, in order (to run if it succeeded, to drop if not).
    pub(crate) fn done(&mut self) -> Vec<Action<Block>> {
        self.done = (self.done + 1).min(self.sent);
        let n = self
            .held
            .iter()
            .take_while(|(wait, _)| *wait <= self.done)
            .count();
        self.held.drain(..n).map(|(_, a)| a).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use msl_store::{CreateOptions, VolumeOptions};
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::AtomicBool;

    /// Frame and packet arrival times land on the driver's clock, never
    /// before its start nor after now.
    #[test]
    fn test_arrival_on_the_drivers_clock_is_clamped_to_its_start_and_now() {
        let epoch = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(arrival_us(epoch, epoch + ms(1500), 2_000_000), 1_500_000);
        // Before the driver started (a packet queued before it): 0.
        let before = epoch.checked_sub(ms(5)).unwrap_or(epoch);
        assert_eq!(arrival_us(epoch, before, 2_000_000), 0);
        // Stamped after the driver's `now` was read: now.
        assert_eq!(arrival_us(epoch, epoch + ms(2500), 2_000_000), 2_000_000);
    }

    fn header() -> Header {
        Header {
            cluster_id: 1,
            sender: 1,
            generation: 2,
            seq: 0,
            ack: 0,
            flags: 0,
            frag_index: 0,
            frag_count: 1,
        }
    }

    fn data(id: u64) -> Action<Block> {
        Action::SendMsl {
            header: header(),
            msg: Message::Data(msl_wire::Data {
                write_id: id,
                offset: 0,
                len: 0,
                flags: 0,
            }),
            payload: None,
        }
    }

    fn reply(req: u64) -> Action<Block> {
        Action::Reply {
            req,
            result: Ok(()),
        }
    }

    fn write(io: u64) -> Action<Block> {
        Action::Write {
            io,
            block: 0,
            count: 1,
            kind: IoKind::Write,
            fua: false,
            payload: None,
        }
    }

    fn ack() -> Action<Block> {
        Action::SendMsl {
            header: header(),
            msg: Message::Ack(msl_wire::Ack::default()),
            payload: None,
        }
    }

    /// What an action is, for comparing orders.
    fn name(a: &Action<Block>) -> String {
        match a {
            Action::SendMsl {
                msg: Message::Data(d),
                ..
            } => format!("data{}", d.write_id),
            Action::SendMsl { .. } => "ack".into(),
            Action::Reply { req, .. } => format!("reply{req}"),
            Action::Write { io, .. } => format!("write{io}"),
            Action::ServiceAddress { .. } => "address".into(),
            _ => "other".into(),
        }
    }

    fn names(v: &[Action<Block>]) -> Vec<String> {
        v.iter().map(name).collect()
    }

    /// Behind a persist in flight, replies, reliable messages and the
    /// service address wait, each for the persists emitted before it, and
    /// come out in order; disk operations (ordered by the worker) and
    /// acks go at once.
    #[test]
    fn test_persist_gate_holds_what_follows_a_persist_until_it_is_durable() {
        let mut g = PersistGate::default();
        // Nothing in flight: everything passes.
        assert!(g.admit(reply(1)).is_some());
        assert!(g.admit(data(1)).is_some());
        g.sent();
        assert!(g.admit(data(2)).is_none());
        assert!(g.admit(write(2)).is_some(), "the worker orders writes");
        assert!(g.admit(ack()).is_some(), "acks are liveness traffic");
        assert!(g.admit(reply(2)).is_none());
        g.sent();
        assert!(g.admit(reply(3)).is_none());
        assert!(g.admit(Action::ServiceAddress { hold: true }).is_none());
        // The first persist is durable: what followed it, not what
        // followed the second.
        assert_eq!(names(&g.done()), ["data2", "reply2"]);
        assert!(g.in_flight());
        assert!(g.admit(data(4)).is_none(), "still behind the second");
        assert_eq!(names(&g.done()), ["reply3", "address", "data4"]);
        assert!(!g.in_flight());
        assert!(g.admit(reply(5)).is_some());
        assert!(g.done().is_empty());
        assert_eq!(g.done_count(), 2);
    }

    /// A metadata file whose fdatasync fails once `fail` is set.
    struct FailingMeta {
        file: File,
        fail: Arc<AtomicBool>,
    }

    impl MetaIo for FailingMeta {
        fn pread_exact(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.file.read_exact_at(buf, offset)
        }
        fn pwrite_all(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.file.write_all_at(buf, offset)
        }
        fn fdatasync(&self) -> std::io::Result<()> {
            if self.fail.load(Ordering::Relaxed) {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            self.file.sync_data()
        }
        fn file_len(&self) -> std::io::Result<u64> {
            Ok(self.file.metadata()?.len())
        }
    }

    const BS: u64 = 4096;

    /// A volume of 16 blocks and its metadata (persists fail once `fail`
    /// is set); the worker's completions arrive on the returned receiver.
    fn worker(
        dir: &tempfile::TempDir,
        fail: &Arc<AtomicBool>,
    ) -> (DiskQueue, Arc<Volume>, Receiver<Input>, Meta) {
        let (q, here, rx, meta) = worker_here(dir, fail);
        (q, here.volume.clone(), rx, meta)
    }

    /// As `worker`, with the record of writes done outside it.
    fn worker_here(
        dir: &tempfile::TempDir,
        fail: &Arc<AtomicBool>,
    ) -> (DiskQueue, Arc<HereDisk>, Receiver<Input>, Meta) {
        let vol = dir.path().join("vol");
        let volume = Arc::new(
            Volume::open_with(&vol, 16 * BS, &VolumeOptions { preallocate: true }).unwrap(),
        );
        let path = dir.path().join("meta");
        let meta = Meta::create(7, 1, 16, BS as u32, Some(3));
        drop(MetaStore::create(&path, &meta, &CreateOptions::default()).unwrap());
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let io = FailingMeta {
            file,
            fail: fail.clone(),
        };
        let (store, meta) = MetaStore::open_io(io, &path).unwrap();
        let (inbox, rx) = crate::inbox::inbox(256);
        let here = HereDisk::new(volume);
        let q = DiskQueue::start(here.clone(), store, inbox, Arc::default()).unwrap();
        (q, here, rx.into_receiver(), meta)
    }

    fn put(q: &DiskQueue, io: u64, block: u64, byte: u8) {
        q.send(DiskOp::Write {
            io,
            off: block * BS,
            len: BS,
            kind: IoKind::Write,
            fua: false,
            payload: Some(Block::from(vec![byte; BS as usize])),
        })
        .ok()
        .unwrap();
    }

    /// Completions, in order, as text, until `n` arrived.
    fn completions(rx: &Receiver<Input>, n: usize) -> Vec<String> {
        (0..n)
            .map(
                |_| match rx.recv_timeout(Duration::from_secs(10)).unwrap() {
                    Input::IoDone { io, ok } => format!("io{io}:{ok}"),
                    Input::ReadDone { io, ok, payload } => {
                        format!("read{io}:{ok}:{}", payload.map_or(0, |p| p[0]))
                    }
                    Input::MetaDone { ok } => format!("meta:{ok}"),
                    _ => "other".into(),
                },
            )
            .collect()
    }

    /// A volume write skips the worker only when no persist is in flight,
    /// none failed and no read is queued.
    #[test]
    fn test_a_write_behind_a_persist_or_a_read_goes_to_the_worker() {
        let dir = tempfile::tempdir().unwrap();
        let fail = Arc::new(AtomicBool::new(false));
        let (_q, here, _rx, _meta) = worker_here(&dir, &fail);
        let mut g = PersistGate::default();
        assert!(may_write_here(&g, false, &here));
        g.sent();
        assert!(
            !may_write_here(&g, false, &here),
            "the persist must be durable first"
        );
        g.done();
        assert!(may_write_here(&g, false, &here));
        assert!(!may_write_here(&g, true, &here), "after a failed persist");
        here.reads_queued.fetch_add(1, Ordering::AcqRel);
        assert!(!may_write_here(&g, false, &here), "behind a queued read");
    }

    /// A read the worker takes waits for the writes done elsewhere that
    /// were emitted before it, and sees them (online verify digests the
    /// same point of the stream on both nodes).
    #[test]
    fn test_a_read_sees_the_writes_done_outside_the_worker_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let fail = Arc::new(AtomicBool::new(false));
        let (q, here, rx, _meta) = worker_here(&dir, &fail);
        // A write handed to an NBD reader, not yet done.
        here.in_flight.fetch_add(1, Ordering::AcqRel);
        here.reads_queued.fetch_add(1, Ordering::AcqRel);
        q.send(DiskOp::Read {
            io: 9,
            off: 3 * BS,
            len: BS as usize,
            bs: BS,
        })
        .ok()
        .unwrap();
        assert!(
            rx.recv_timeout(Duration::from_millis(100)).is_err(),
            "the read went ahead of the write"
        );
        here.volume
            .write_at(&[0x6b; BS as usize], 3 * BS, false)
            .unwrap();
        here.in_flight.fetch_sub(1, Ordering::AcqRel);
        assert_eq!(completions(&rx, 1), ["read9:true:107"]);
        assert_eq!(here.reads_queued.load(Ordering::Acquire), 0);
    }

    /// A write handed to the thread that queued it is done once that
    /// thread's `queue` returned (it let go of the core), and answered
    /// through the inbox; other threads, and this one outside
    /// `writes_here`, do not take writes.
    #[test]
    fn test_writes_here_are_done_after_the_core_is_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let volume = Arc::new(
            Volume::open_with(
                &dir.path().join("vol"),
                16 * BS,
                &VolumeOptions { preallocate: true },
            )
            .unwrap(),
        );
        let disk = HereDisk::new(volume.clone());
        let (inbox, rx) = crate::inbox::inbox(16);
        let rx = rx.into_receiver();
        let payload = Block::from(vec![0x5a; BS as usize]);
        assert!(!hand_here(&disk, 1, 3 * BS, false, &payload), "outside");
        let read = |b: u64| {
            let mut buf = vec![0u8; BS as usize];
            volume.read_at(&mut buf, b * BS).unwrap();
            buf[0]
        };
        let took = writes_here(&inbox, || {
            let took = hand_here(&disk, 1, 3 * BS, false, &payload);
            let other = std::thread::scope(|s| {
                s.spawn(|| hand_here(&disk, 2, 4 * BS, false, &payload))
                    .join()
                    .unwrap()
            });
            assert!(!other, "another thread does not take writes");
            assert_eq!(read(3), 0, "not while the core may be held");
            assert_eq!(disk.in_flight.load(Ordering::Relaxed), 1);
            took
        });
        assert!(took);
        assert_eq!(read(3), 0x5a);
        assert_eq!(disk.in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(completions(&rx, 1), ["io1:true"]);
        assert!(!hand_here(&disk, 3, 5 * BS, false, &payload), "after");
    }

    /// The worker runs under SCHED_BATCH, so waking it does not preempt
    /// the thread that queued the work (see `run_as_batch`).
    #[test]
    fn test_disk_worker_does_not_preempt_the_thread_that_wakes_it() {
        let dir = tempfile::tempdir().unwrap();
        let fail = Arc::new(AtomicBool::new(false));
        let (q, _volume, rx, _meta) = worker(&dir, &fail);
        // SAFETY: sched_getscheduler only reads the policy of a thread id.
        let policy = unsafe { libc::sched_getscheduler(q.tid) };
        assert_eq!(policy, libc::SCHED_BATCH, "policy of the I/O worker");
        // SAFETY: as above, for this (test) thread.
        let own = unsafe { libc::sched_getscheduler(0) };
        assert_eq!(
            own,
            libc::SCHED_OTHER,
            "the queuing thread keeps its policy"
        );
        put(&q, 1, 0, 1);
        assert_eq!(completions(&rx, 1), ["io1:true"]);
    }

    /// The worker executes in the order given: a read sees the write
    /// queued before it, persists report success, settle counts them.
    #[test]
    fn test_disk_worker_runs_operations_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let fail = Arc::new(AtomicBool::new(false));
        let (q, volume, rx, meta) = worker(&dir, &fail);
        put(&q, 1, 2, 0xaa);
        q.send(DiskOp::Persist(Box::new(meta.clone())))
            .ok()
            .unwrap();
        q.send(DiskOp::Read {
            io: 2,
            off: 2 * BS,
            len: BS as usize,
            bs: BS,
        })
        .ok()
        .unwrap();
        q.send(DiskOp::Flush { io: 3 }).ok().unwrap();
        let (tx, settled) = sync_channel(1);
        q.send(DiskOp::Settle(tx)).ok().unwrap();
        assert_eq!(settled.recv().unwrap(), 1);
        let mut got = completions(&rx, 4);
        // The flush's completion comes from the flush thread.
        got.sort();
        assert_eq!(got, ["io1:true", "io3:true", "meta:true", "read2:true:170"]);
        assert_eq!(volume.read_vec(2 * BS, 1).unwrap(), [0xaa]);
    }

    /// Nothing queued after a failed persist is executed: the write after
    /// it does not reach the volume, and every operation after it fails.
    #[test]
    fn test_disk_worker_fails_everything_after_a_failed_persist() {
        let dir = tempfile::tempdir().unwrap();
        let fail = Arc::new(AtomicBool::new(false));
        let (q, volume, rx, meta) = worker(&dir, &fail);
        fail.store(true, Ordering::Relaxed);
        put(&q, 1, 0, 0x11);
        let mut m = meta.clone();
        m.dirty.set(5);
        m.clean = false;
        q.send(DiskOp::Persist(Box::new(m.clone()))).ok().unwrap();
        put(&q, 2, 1, 0x22);
        q.send(DiskOp::Read {
            io: 3,
            off: 0,
            len: BS as usize,
            bs: BS,
        })
        .ok()
        .unwrap();
        q.send(DiskOp::Flush { io: 4 }).ok().unwrap();
        q.send(DiskOp::Persist(Box::new(m))).ok().unwrap();
        let (tx, settled) = sync_channel(1);
        q.send(DiskOp::Settle(tx)).ok().unwrap();
        assert_eq!(settled.recv().unwrap(), 0, "no persist succeeded");
        assert_eq!(
            completions(&rx, 6),
            [
                "io1:true",
                "meta:false",
                "io2:false",
                "read3:false:0",
                "io4:false",
                "meta:false",
            ]
        );
        assert_eq!(volume.read_vec(0, 1).unwrap(), [0x11], "before the persist");
        assert_eq!(
            volume.read_vec(BS, 1).unwrap(),
            [0],
            "a write after a failed persist reached the volume"
        );
    }
}
