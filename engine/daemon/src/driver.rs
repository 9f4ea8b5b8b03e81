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
//! takes inputs in queue order. Actions are executed in order: metadata is
//! persisted (atomically, fsync'd) before the next action runs, and if that
//! fails the rest of the batch is dropped and the core latches fail-closed.
//! Volume writes are done synchronously by the thread running the core;
//! volume flushes (fdatasync) on a flush thread. MSL frames go out from
//! the thread running the core when the link is free, else through a
//! transmit thread, control ahead of data.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use msl_core::meta::Meta;
use msl_core::node::{Action, ClientError, Event, IoKind, Node};
use msl_core::Config;
use msl_store::{MetaStore, Volume};
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
    store: MetaStore,
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
    /// Flushes (fdatasync) run here, off the core thread, when set: a slow
    /// fdatasync on a busy disk then delays only what waits for it, not
    /// heartbeats and acks (a 400 ms stall made the peer declare us dead).
    flusher: Option<SyncSender<u64>>,
    /// Events caused while handling one (local I/O completions).
    internal: VecDeque<Event<Block>>,
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
}

/// Inputs handled back to back before a held ACK goes out regardless.
const ACK_BATCH: usize = 64;

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

impl<H: Host> Driver<H> {
    /// Build a driver from loaded metadata.
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
    ) -> Self {
        let node_id = cfg.node_id;
        if msl_tx.pool.frame_size() != encoder.max_frame {
            eprintln!(
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
        Driver {
            node,
            volume,
            store,
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
            flusher: None,
            internal: VecDeque::new(),
            exit: None,
            started: false,
            never_clean: false,
            reload: None,
            service: ServiceManager::from_env(),
            house: Housekeeping {
                next: epoch,
                resync_sample: None,
                bad_auth_reported: 0,
                bad_auth_last: None,
            },
        }
    }

    /// Run volume flushes on their own thread; completions come back as
    /// `Input::IoDone` through `inputs` (the core's own input queue). The
    /// core issues a flush only after the writes it must cover completed,
    /// so a flush running beside later writes covers what it promises.
    pub fn flush_off_thread(mut self, inputs: Inbox) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<u64>(1024);
        let volume = self.volume.clone();
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
        self.flusher = Some(tx);
        Ok(self)
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
            Input::Status(tx) => {
                let _ = tx.send(self.node.status());
                return Ok(None);
            }
            Input::Msl {
                header,
                msg,
                payload,
            } => Event::MslFrame {
                header,
                msg,
                payload,
                arrived: self.now(),
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
                arrived: self.now(),
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

    /// Feed one event, then everything it causes (local I/O completions).
    fn step(&mut self, ev: Event<Block>, internal: &mut VecDeque<Event<Block>>) -> Option<Exit> {
        internal.push_back(ev);
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
            self.send_msl(&header, &msg, &[]);
        }
    }

    /// Encode one MSL message into frames and queue them for the link.
    fn send_msl(&mut self, header: &Header, msg: &Message, payload: &[u8]) {
        self.frames.clear();
        if self.encoder.encode_counted(
            header,
            msg,
            payload,
            &self.msl_tx.pool,
            &mut self.frames,
            &self.shared,
        ) {
            let control = msg.is_control();
            self.out.extend(self.frames.drain(..).map(|f| (control, f)));
        }
    }

    fn execute(&mut self, a: Action<Block>, internal: &mut VecDeque<Event<Block>>) -> Option<Exit> {
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
            } => self.send_msl(&header, &msg, payload.as_deref().unwrap_or(&[])),
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
                let (off, len) = (block * bs, count * bs);
                let ok = match (kind, &payload) {
                    (IoKind::Write, Some(p)) if p.len() as u64 == len => {
                        self.volume.write_at(p, off, fua).is_ok()
                    }
                    // A write whose payload does not cover it is refused
                    // (counted by the core as an I/O failure).
                    (IoKind::Write, _) => false,
                    (IoKind::Trim, _) => self.volume.trim(off, len).is_ok(),
                    (IoKind::Zeroes, _) => self.volume.write_zeroes(off, len).is_ok(),
                };
                internal.push_back(Event::IoDone { io, ok });
            }
            Action::Read { io, block, count } => {
                let r = self.volume.read_vec(block * bs, (count * bs) as usize);
                internal.push_back(Event::ReadDone {
                    io,
                    ok: r.is_ok(),
                    payload: r.ok().map(Block::from),
                });
            }
            Action::Flush { io } => {
                let queued = self
                    .flusher
                    .as_ref()
                    .is_some_and(|f| f.try_send(io).is_ok());
                if !queued {
                    let r = self.volume.flush();
                    internal.push_back(Event::IoDone { io, ok: r.is_ok() });
                }
            }
            Action::PersistMeta(mut m) => {
                if self.never_clean {
                    m.clean = false;
                }
                if self.store.persist(&m).is_err() {
                    // Drop the rest of this batch: nothing after a failed
                    // metadata write may happen.
                    while self.node.poll_action().is_some() {}
                    internal.push_back(Event::MetaFailed);
                }
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
        }
        None
    }

    fn finish_core(&mut self, exit: Exit) -> Exit {
        self.service.stopping();
        if exit == Exit::Stopped {
            // The core's shutdown persists `clean`; after a disk failure
            // the daemon withholds it (see `never_clean`).
            let flushed = self.volume.flush().is_ok();
            self.never_clean |= !flushed
                || self.volume.is_failed()
                || self.node.meta().disk == msl_wire::DiskState::Failed;
            self.node.shutdown();
            let mut internal = VecDeque::new();
            while let Some(a) = self.node.poll_action() {
                let _ = self.execute(a, &mut internal);
            }
        }
        // Whatever the core said last (a restart's handover) goes out.
        self.send_held_ack();
        self.msl_tx.send(&mut self.out, SendMode::Queue);
        for (_, (to, _, _)) in self.replies.drain() {
            to.send(Err(ClientError::NotPrimary));
        }
        exit
    }
}

impl<H: Host> Runner for Driver<H> {
    /// Queued inputs are handled back to back (frames produced meanwhile
    /// go to the transmit thread); the newest ACK goes out once the queue
    /// is empty or after `ACK_BATCH` inputs, and what is left to send goes
    /// from this thread (`SendMode::Direct`) before it returns.
    fn drain(&mut self, rx: &Receiver<Input>, budget: usize) -> Drained {
        if let Some(r) = self.reload.as_ref().and_then(|s| s.take()) {
            self.apply_reload(r);
        }
        let mut internal = std::mem::take(&mut self.internal);
        // Once stopped, stopped for every thread (the core thread finishes).
        let mut exit = self.exit;
        // A tick on the first run (the core's first hello and heartbeat),
        // then whenever a deadline has passed.
        if exit.is_none() && (!self.started || self.now() >= self.node.poll_timeout()) {
            self.started = true;
            exit = self.step(Event::Tick, &mut internal);
        }
        let mut handled = 0;
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
            match self.event_for(input) {
                Ok(Some(ev)) => exit = self.step(ev, &mut internal),
                Ok(None) => {}
                Err(e) => exit = Some(e),
            }
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
            deadline_us: self.node.poll_timeout(),
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
