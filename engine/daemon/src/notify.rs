//! Administrator notifications: every state change the core reports goes to
//! the daemon's log (through `tracing`, at the event's level: the systemd
//! journal when msld runs as a service whose stderr is the journal, stderr
//! otherwise), the optional event log file (one timestamped,
//! machine-parsable line per event) and an optional notification command
//! (event in environment variables).
//!
//! The data path never waits for any of it: `Notifier::notify` is a
//! non-blocking push into a bounded queue drained by a worker thread; when
//! the queue is full the event is counted as dropped (and the drop itself is
//! reported once the queue drains).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use msl_control::Event;
use msl_core::Notice;
use serde_json::{json, Map, Value};

/// One event as delivered to administrators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    /// Wall clock, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    pub node_id: u16,
    /// Stable machine name (`takeover`, `degraded`, ...).
    pub kind: &'static str,
    /// Human-readable text.
    pub message: String,
    /// Structured fields beside the text (`role`, `generation`, `peer`,
    /// `reason`, `path`, `strategy`, `rule`, `remaining`, `total`, ...).
    pub fields: Map<String, Value>,
}

impl EventRecord {
    pub fn new(node_id: u16, notice: &Notice) -> Self {
        let mut rec = Self::now(node_id, notice.kind(), notice.to_string());
        rec.fields = notice_fields(notice);
        rec
    }

    /// Name the peer (`peer` field) of the event.
    pub fn with_peer(mut self, peer: u16) -> Self {
        self.fields.insert("peer".into(), peer.into());
        self
    }

    /// The event as it goes over the control socket.
    pub fn to_event(&self) -> Event {
        Event {
            ts_ms: self.unix_ms,
            node: self.node_id,
            event: self.kind.into(),
            message: self.message.clone(),
            fields: self.fields.clone(),
        }
    }

    /// A daemon event that is not a core notice (for example `bad_auth`).
    pub fn now(node_id: u16, kind: &'static str, message: String) -> Self {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        EventRecord {
            unix_ms,
            node_id,
            kind,
            message,
            fields: Map::new(),
        }
    }

    /// The log-file line: `ts=<ms> node=<id> event=<kind> msg="<text>"`
    /// (quotes and backslashes in the text escaped, newlines as `\n`).
    pub fn log_line(&self) -> String {
        let mut msg = String::with_capacity(self.message.len());
        for c in self.message.chars() {
            match c {
                '"' => msg.push_str("\\\""),
                '\\' => msg.push_str("\\\\"),
                '\n' => msg.push_str("\\n"),
                c => msg.push(c),
            }
        }
        format!(
            "ts={} node={} event={} msg=\"{}\"",
            self.unix_ms, self.node_id, self.kind, msg
        )
    }

    /// How much the event matters to an administrator: the level it is
    /// logged at (journal priority `err`, `warning`, `info`). See
    /// [`event_level`].
    pub fn level(&self) -> tracing::Level {
        event_level(self.kind, &self.fields)
    }

    /// The console line (the log message; the level is beside it).
    pub fn console_line(&self) -> String {
        format!(
            "msld[node {}] {}: {}",
            self.node_id,
            self.kind.replace('_', " "),
            self.message
        )
    }
}

/// The level an event is logged at, from its name and fields.
///
/// * error: the node or the pair can no longer protect the data by
///   itself: `disk_failed` (volume or metadata I/O failed), a split brain
///   (`split_brain_refused`), `cannot_take_over` (the peer is gone and
///   this node's data may not serve).
/// * warning: redundancy is lost or something needs a look: the peer or a
///   path lost (`peer_lost`, `peer_down`, `msl_link_down`), `degraded`,
///   `mirror_shut_down`, a stall, a LAN adapter that stopped working, an
///   online verify that found differences or was aborted, refused
///   connections and bad authentication, dropped events, a failed reload,
///   running without a cluster key, and the core's own `warning`.
/// * info: everything else (role changes, takeover, resync progress,
///   links and peer found again, ...).
pub fn event_level(kind: &str, fields: &Map<String, Value>) -> tracing::Level {
    use tracing::Level;
    match kind {
        "disk_failed" | "split_brain_refused" | "cannot_take_over" => Level::ERROR,
        "peer_lost"
        | "peer_down"
        | "msl_link_down"
        | "degraded"
        | "mirror_shut_down"
        | "connection_refused"
        | "verify_aborted"
        | "warning"
        | "events_dropped"
        | "bad_auth"
        | "config_reload_failed"
        | "insecure_no_auth" => Level::WARN,
        "lan_adapter_health" if fields.get("working") == Some(&Value::Bool(false)) => Level::WARN,
        "verify_finished" if fields.get("differing").and_then(Value::as_u64) > Some(0) => {
            Level::WARN
        }
        k if k.contains("stall") => Level::WARN,
        _ => Level::INFO,
    }
}

/// Log an event through `tracing` at its level, with its name and node as
/// fields (`EVENT=`, `NODE=` in the journal).
fn log_event(rec: &EventRecord) {
    let msg = rec.console_line();
    macro_rules! at {
        ($lvl:expr) => {
            tracing::event!(target: "msld", $lvl, event = rec.kind, node = rec.node_id, "{msg}")
        };
    }
    match rec.level() {
        tracing::Level::ERROR => at!(tracing::Level::ERROR),
        tracing::Level::WARN => at!(tracing::Level::WARN),
        tracing::Level::INFO => at!(tracing::Level::INFO),
        tracing::Level::DEBUG => at!(tracing::Level::DEBUG),
        _ => at!(tracing::Level::TRACE),
    }
}

/// Where events go.
#[derive(Clone, Debug)]
pub struct Sinks {
    /// Log every event through `tracing` (see [`init_logging`]).
    pub console: bool,
    /// The event log file; `None` or an empty path: none.
    pub log_file: Option<PathBuf>,
    pub command: Option<PathBuf>,
    /// A notification command running longer than this is killed.
    pub command_timeout: Duration,
    /// `mslctl events` subscribers.
    pub hub: Option<EventHub>,
}

/// Subscribers of the event stream (`mslctl events`).
#[derive(Clone, Debug, Default)]
pub struct EventHub {
    subs: Arc<Mutex<Vec<SyncSender<String>>>>,
}

impl EventHub {
    /// Send an event to every subscriber; slow or gone ones are dropped.
    pub fn publish(&self, rec: &EventRecord) {
        let line = event_json(rec).to_string();
        if let Ok(mut subs) = self.subs.lock() {
            subs.retain(|s| s.try_send(line.clone()).is_ok());
        }
    }

    pub(crate) fn subscribe(&self) -> std::sync::mpsc::Receiver<String> {
        let (tx, rx) = sync_channel(1024);
        if let Ok(mut subs) = self.subs.lock() {
            subs.push(tx);
        }
        rx
    }
}

/// An event as JSON (the control socket's [`Event`]).
pub fn event_json(rec: &EventRecord) -> Value {
    serde_json::to_value(rec.to_event()).unwrap_or(Value::Null)
}

fn lower<T: std::fmt::Debug>(v: T) -> String {
    format!("{v:?}").to_lowercase()
}

fn snake<T: std::fmt::Debug>(v: T) -> String {
    let mut out = String::new();
    for (i, c) in format!("{v:?}").chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// The structured fields of a core notice.
pub fn notice_fields(n: &Notice) -> Map<String, Value> {
    let gen = |g: &u64| Value::from(format!("{g:016x}"));
    let v = match n {
        Notice::RoleChanged {
            role,
            generation,
            reason,
        } => json!({"role": lower(role), "generation": gen(generation), "reason": reason}),
        Notice::PeerLost { path } | Notice::PeerFound { path } => json!({"path": lower(path)}),
        Notice::MslLinkDown | Notice::MslLinkUp => json!({"path": "msl"}),
        Notice::PeerDown { peer_was } => json!({"peer_role": lower(peer_was)}),
        Notice::Degraded { reason }
        | Notice::CannotTakeOver { reason }
        | Notice::SwitchoverStarted { reason }
        | Notice::VerifyAborted { reason } => json!({"reason": reason}),
        Notice::Takeover { generation, reason } => {
            json!({"role": "primary", "generation": gen(generation), "reason": reason})
        }
        Notice::MirrorShutDown => json!({"disk": "outdated"}),
        Notice::Connected { strategy, rule } | Notice::Refused { strategy, rule } => {
            json!({"strategy": snake(strategy), "rule": snake(rule)})
        }
        Notice::ResyncStarted {
            source,
            blocks,
            full,
        } => json!({"source": source, "remaining": blocks, "total": blocks, "full": full}),
        Notice::ResyncProgress {
            source,
            remaining,
            total,
        } => json!({"source": source, "remaining": remaining, "total": total}),
        Notice::ResyncFinished { source, blocks } => {
            json!({"source": source, "remaining": 0, "total": blocks})
        }
        Notice::SwitchoverDone { new_primary } => json!({"new_primary": new_primary}),
        Notice::AdapterHealth { adapter, working } => {
            json!({"adapter": adapter, "working": working})
        }
        Notice::VerifyStarted {
            start_block,
            blocks,
        } => json!({"start_block": start_block, "total": blocks}),
        Notice::VerifyFinished {
            checked,
            differing,
            first,
        } => json!({"checked": checked, "differing": differing, "first": first}),
        Notice::DiskFailed { what } | Notice::Warning { what } => json!({"reason": what}),
        Notice::Stalled { for_us } => json!({"stalled_ms": for_us / 1000}),
        Notice::LeaseGained { until } => json!({"until_ms": until / 1000}),
        Notice::LeaseLost { reason } => json!({"reason": reason}),
        Notice::WitnessReachable { reachable } => json!({"reachable": reachable}),
    };
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct NotifyCounters {
    pub delivered: AtomicU64,
    pub dropped: AtomicU64,
    pub log_errors: AtomicU64,
    pub command_failures: AtomicU64,
}

/// Which events run the notification command. Console, log file and
/// `mslctl events` get every event regardless.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandPolicy {
    /// Event names (`takeover`, `peer_down`, ...) that run the command;
    /// `None` runs it for every event (config key `notify_events`).
    pub events: Option<Vec<String>>,
    /// Progress events (`resync_progress`) run the command at most once
    /// per this long (config key `notify_progress_interval_s`); the start
    /// and end of a resync always do.
    pub progress_interval: Duration,
}

/// Default for [`CommandPolicy::progress_interval`].
pub const PROGRESS_NOTIFY_INTERVAL: Duration = Duration::from_secs(60);

/// Event names that report progress (rate-limited for the command).
pub const PROGRESS_EVENTS: [&str; 1] = ["resync_progress"];

impl Default for CommandPolicy {
    fn default() -> Self {
        CommandPolicy {
            events: None,
            progress_interval: PROGRESS_NOTIFY_INTERVAL,
        }
    }
}

/// The command's gate: the policy and when a progress event last ran it.
struct CommandGate {
    policy: CommandPolicy,
    last_progress: Option<Instant>,
}

impl CommandGate {
    fn admits(&mut self, kind: &str, now: Instant) -> bool {
        if let Some(events) = &self.policy.events {
            if !events.iter().any(|e| e == kind) {
                return false;
            }
        }
        if PROGRESS_EVENTS.contains(&kind) {
            if self
                .last_progress
                .is_some_and(|t| now.duration_since(t) < self.policy.progress_interval)
            {
                return false;
            }
            self.last_progress = Some(now);
        }
        true
    }
}

/// Handle the daemon's threads use to report events.
pub struct Notifier {
    tx: Option<SyncSender<EventRecord>>,
    worker: Option<JoinHandle<()>>,
    pub counters: Arc<NotifyCounters>,
    /// New command settings for the worker (a reload), taken before the
    /// next event is delivered.
    next: Arc<Mutex<Option<Reconfig>>>,
}

/// What a reload changes in the notifier.
struct Reconfig {
    command: Option<PathBuf>,
    policy: CommandPolicy,
    log_file: PathBuf,
}

impl Notifier {
    /// Start the worker; `capacity` bounds the queue. The command runs
    /// under the default [`CommandPolicy`] (every event, progress at most
    /// once a minute).
    pub fn start(sinks: Sinks, capacity: usize) -> Self {
        Self::start_with(sinks, capacity, CommandPolicy::default())
    }

    /// As [`Notifier::start`], with the command's event filter and
    /// progress rate limit.
    pub fn start_with(sinks: Sinks, capacity: usize, policy: CommandPolicy) -> Self {
        let (tx, rx) = sync_channel(capacity.max(1));
        let counters = Arc::new(NotifyCounters::default());
        let c = counters.clone();
        let gate = CommandGate {
            policy,
            last_progress: None,
        };
        let next = Arc::new(Mutex::new(None));
        let n = next.clone();
        let worker = std::thread::Builder::new()
            .name("msl-notify".into())
            .spawn(move || run(rx, sinks, c, gate, n))
            .ok();
        Notifier {
            tx: Some(tx),
            worker,
            counters,
            next,
        }
    }

    /// Change the notification command, its filter and the log file (a
    /// reload); events queued from now on are delivered under them. An
    /// empty `log_file` stops the log file. A notifier started without a
    /// log file sink (`Sinks::log_file` None) keeps none.
    pub fn reconfigure(&self, command: Option<PathBuf>, policy: CommandPolicy, log_file: PathBuf) {
        *self.next.lock().unwrap_or_else(|e| e.into_inner()) = Some(Reconfig {
            command,
            policy,
            log_file,
        });
    }

    /// Queue an event; never blocks.
    pub fn notify(&self, rec: EventRecord) {
        let Some(tx) = &self.tx else {
            return;
        };
        match tx.try_send(rec) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Deliver everything queued, then stop the worker.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.tx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    rx: Receiver<EventRecord>,
    mut sinks: Sinks,
    counters: Arc<NotifyCounters>,
    mut gate: CommandGate,
    next: Arc<Mutex<Option<Reconfig>>>,
) {
    let mut reported_drops = 0;
    while let Ok(rec) = rx.recv() {
        if let Some(r) = next.lock().unwrap_or_else(|e| e.into_inner()).take() {
            sinks.command = r.command;
            if sinks.log_file.is_some() {
                sinks.log_file = Some(r.log_file);
            }
            gate = CommandGate {
                policy: r.policy,
                last_progress: None,
            };
        }
        deliver(&rec, &sinks, &counters, &mut gate);
        let dropped = counters.dropped.load(Ordering::Relaxed);
        if dropped > reported_drops {
            reported_drops = dropped;
            let note = EventRecord {
                unix_ms: rec.unix_ms,
                node_id: rec.node_id,
                kind: "events_dropped",
                message: format!(
                    "{dropped} events were dropped because the notification queue was full"
                ),
                fields: Map::new(),
            };
            deliver(&note, &sinks, &counters, &mut gate);
        }
    }
}

fn deliver(rec: &EventRecord, sinks: &Sinks, counters: &NotifyCounters, gate: &mut CommandGate) {
    if let Some(hub) = &sinks.hub {
        hub.publish(rec);
    }
    if sinks.console {
        log_event(rec);
    }
    if let Some(path) = sinks
        .log_file
        .as_ref()
        .filter(|p| !p.as_os_str().is_empty())
    {
        let ok = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| writeln!(f, "{}", rec.log_line()));
        if ok.is_err() {
            counters.log_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    if let Some(cmd) = sinks
        .command
        .as_ref()
        .filter(|_| gate.admits(rec.kind, Instant::now()))
    {
        if !run_command(cmd, rec, sinks.command_timeout) {
            counters.command_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
    counters.delivered.fetch_add(1, Ordering::Relaxed);
}

/// Run the notification command with the event in its environment:
/// `MSL_EVENT`, `MSL_MESSAGE`, `MSL_NODE`, `MSL_TIME_MS`, and each
/// structured field as `MSL_<FIELD>` (`MSL_ROLE`, `MSL_PEER`,
/// `MSL_REMAINING`, ...).
fn run_command(cmd: &PathBuf, rec: &EventRecord, timeout: Duration) -> bool {
    let mut c = Command::new(cmd);
    for (k, v) in &rec.fields {
        let v = match v {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            v => v.to_string(),
        };
        c.env(format!("MSL_{}", k.to_uppercase()), v);
    }
    let child = c
        .env("MSL_EVENT", rec.kind)
        .env("MSL_MESSAGE", &rec.message)
        .env("MSL_NODE", rec.node_id.to_string())
        .env("MSL_TIME_MS", rec.unix_ms.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// The service manager (systemd `Type=notify`): `READY=1` once the core
/// runs, `STATUS=` with the role and sync state when they change,
/// `WATCHDOG=1` while the core thread keeps running, `STOPPING=1`. Without
/// `NOTIFY_SOCKET` in the environment every call does nothing.
#[derive(Debug)]
pub struct ServiceManager {
    enabled: bool,
    ready: bool,
    status: String,
    /// Feed the watchdog this often (half of `WATCHDOG_USEC`).
    watchdog: Option<Duration>,
    next_watchdog: Instant,
}

impl ServiceManager {
    /// From the environment systemd gives the service.
    pub fn from_env() -> Self {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let var = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
        // As sd_watchdog_enabled(3): WATCHDOG_USEC, for this process if
        // WATCHDOG_PID names one.
        let usec = var("WATCHDOG_USEC").filter(|&u| u > 0);
        let ours = var("WATCHDOG_PID").is_none_or(|p| p == u64::from(std::process::id()));
        let watchdog = usec
            .filter(|_| enabled && ours)
            .map(|u| Duration::from_micros(u / 2));
        ServiceManager {
            enabled,
            ready: false,
            status: String::new(),
            watchdog,
            next_watchdog: Instant::now(),
        }
    }

    /// A manager that never sends (tests, no systemd).
    pub fn disabled() -> Self {
        ServiceManager {
            enabled: false,
            ready: false,
            status: String::new(),
            watchdog: None,
            next_watchdog: Instant::now(),
        }
    }

    /// The watchdog interval systemd asked for, halved (None: no watchdog).
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Called from the loop that runs the core: feeds the watchdog when
    /// due. Cheap when nothing is due.
    pub fn alive(&mut self, now: Instant) {
        if let Some(every) = self.watchdog {
            if now >= self.next_watchdog {
                self.next_watchdog = now + every;
                self.send(&[sd_notify::NotifyState::Watchdog]);
            }
        }
    }

    /// Called with the core's status (about once a second): `READY=1` the
    /// first time, `STATUS=` whenever the text changes.
    pub fn state(&mut self, st: &msl_core::node::Status) {
        let text = status_line(st);
        if !self.ready {
            self.ready = true;
            self.status = text;
            self.send(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&self.status.clone()),
            ]);
        } else if text != self.status {
            self.status = text;
            self.send(&[sd_notify::NotifyState::Status(&self.status.clone())]);
        }
    }

    /// The daemon is stopping.
    pub fn stopping(&self) {
        self.send(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("stopping"),
        ]);
    }

    fn send(&self, state: &[sd_notify::NotifyState]) {
        if self.enabled {
            let _ = sd_notify::notify(false, state);
        }
    }
}

/// The one-line `STATUS=` text: role, disk and sync state.
pub fn status_line(st: &msl_core::node::Status) -> String {
    let role = lower(st.role);
    let mut s = format!("{role}, disk {}", lower(st.disk));
    if st.failed {
        s.push_str(", FAILED");
    }
    if st.resync_total > 0 && st.resync_remaining > 0 {
        let done = st.resync_total - st.resync_remaining.min(st.resync_total);
        s.push_str(&format!(
            ", resync {} {}% ({} of {} blocks left)",
            if st.resync_source { "to" } else { "from" },
            done * 100 / st.resync_total,
            st.resync_remaining,
            st.resync_total
        ));
    } else if st.in_sync {
        s.push_str(&format!(", in sync with node {}", st.peer_id));
    } else if st.connected {
        s.push_str(&format!(", connected to node {}, not in sync", st.peer_id));
    } else {
        s.push_str(&format!(", node {} not connected", st.peer_id));
    }
    if st.switching {
        s.push_str(", switchover under way");
    }
    s
}

/// Where the daemon's log goes (see [`init_logging`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogTarget {
    /// The systemd journal, natively: priorities from the levels, the
    /// event's name and node as the fields `EVENT` and `NODE`.
    Journal,
    /// stderr, one line per message with its time and level.
    Stderr,
}

/// The installed logger: its target, and the level filter a reload
/// changes.
pub struct LogControl {
    pub target: LogTarget,
    handle: tracing_subscriber::reload::Handle<
        tracing::level_filters::LevelFilter,
        tracing_subscriber::Registry,
    >,
}

impl LogControl {
    /// Log messages at `level` and above from now on (SIGHUP).
    pub fn set_level(&self, level: tracing::level_filters::LevelFilter) {
        let _ = self.handle.modify(|f| *f = level);
    }
}

/// Whether stderr is the journal: systemd sets `JOURNAL_STREAM` to the
/// device and inode (`DEV:INODE`) of the stream it connected stderr to
/// (systemd.exec(5)); it only counts if fd 2 is still that stream (a
/// service whose stderr goes to a file, or a child started from a shell
/// that inherited the variable, logs to stderr).
pub fn stderr_is_journal() -> bool {
    std::env::var("JOURNAL_STREAM").is_ok_and(|v| journal_stream_is(&v, 2))
}

/// Whether `var` (`DEV:INODE`, decimal) names the file open as `fd`.
fn journal_stream_is(var: &str, fd: std::os::fd::RawFd) -> bool {
    let Some((dev, ino)) = var.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat writes only into `st`, a plain-data struct for which
    // all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    st.st_dev as u64 == dev && st.st_ino as u64 == ino
}

/// Install the process's logger (once, in `main`): the journal when
/// stderr is the journal (msld run by systemd) and its socket answers,
/// stderr otherwise; messages below `level` are dropped.
pub fn init_logging(level: tracing::level_filters::LevelFilter) -> LogControl {
    use std::io::IsTerminal;
    use tracing_subscriber::prelude::*;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(level);
    let journal = stderr_is_journal()
        .then(tracing_journald::layer)
        .and_then(Result::ok)
        .map(|l| {
            // `info` is the journal's informational (6), not notice (5):
            // routine events stay out of `journalctl -p notice`.
            let mut prio = tracing_journald::PriorityMappings::new();
            prio.info = tracing_journald::Priority::Informational;
            prio.debug = tracing_journald::Priority::Debug;
            l.with_field_prefix(None)
                .with_syslog_identifier("msld".into())
                .with_priority_mappings(prio)
        });
    let target = if journal.is_some() {
        LogTarget::Journal
    } else {
        LogTarget::Stderr
    };
    let stderr = journal.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
    });
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(journal)
        .with(stderr);
    let _ = tracing::subscriber::set_global_default(subscriber);
    LogControl { target, handle }
}

#[cfg(test)]
mod tests {
    use super::*;
    use msl_core::node::Path;

    /// Each class of event at its level; a LAN adapter and a verify are
    /// warnings only when something is wrong; unknown names are info.
    #[test]
    fn test_event_levels() {
        use tracing::Level;
        let none = Map::new();
        for k in ["disk_failed", "split_brain_refused", "cannot_take_over"] {
            assert_eq!(event_level(k, &none), Level::ERROR, "{k}");
        }
        for k in [
            "peer_lost",
            "peer_down",
            "degraded",
            "msl_link_down",
            "mirror_shut_down",
            "warning",
            "bad_auth",
            "config_reload_failed",
            "core_stall",
        ] {
            assert_eq!(event_level(k, &none), Level::WARN, "{k}");
        }
        for k in [
            "takeover",
            "role_changed",
            "peer_found",
            "resync_progress",
            "config_reloaded",
            "something_new",
        ] {
            assert_eq!(event_level(k, &none), Level::INFO, "{k}");
        }
        // Every name the daemon reports has a deliberate level: the
        // errors are exactly these three.
        let errors: Vec<&str> = crate::config::EVENT_NAMES
            .iter()
            .copied()
            .filter(|k| event_level(k, &none) == Level::ERROR)
            .collect();
        assert_eq!(
            errors,
            ["cannot_take_over", "split_brain_refused", "disk_failed"]
        );
        let rec = |n: &Notice| EventRecord::new(1, n);
        let down = Notice::AdapterHealth {
            adapter: 1,
            working: false,
        };
        let up = Notice::AdapterHealth {
            adapter: 1,
            working: true,
        };
        assert_eq!(rec(&down).level(), Level::WARN);
        assert_eq!(rec(&up).level(), Level::INFO);
        let verify = |differing| Notice::VerifyFinished {
            checked: 10,
            differing,
            first: None,
        };
        assert_eq!(rec(&verify(0)).level(), Level::INFO);
        assert_eq!(rec(&verify(3)).level(), Level::WARN);
        let failed = Notice::DiskFailed {
            what: "metadata write failed",
        };
        assert_eq!(rec(&failed).level(), Level::ERROR);
    }

    /// `JOURNAL_STREAM` counts only when it names the very file open on
    /// the descriptor.
    #[test]
    fn test_journal_stream_must_name_the_descriptor() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let f = tempfile::tempfile().unwrap();
        let m = f.metadata().unwrap();
        let fd = f.as_raw_fd();
        assert!(journal_stream_is(&format!("{}:{}", m.dev(), m.ino()), fd));
        assert!(!journal_stream_is(
            &format!("{}:{}", m.dev(), m.ino() + 1),
            fd
        ));
        assert!(!journal_stream_is(&format!("{}", m.ino()), fd));
        assert!(!journal_stream_is("x:y", fd));
    }

    fn sinks(dir: &std::path::Path, command: Option<PathBuf>) -> Sinks {
        Sinks {
            console: false,
            log_file: Some(dir.join("msld.log")),
            command,
            command_timeout: Duration::from_secs(5),
            hub: None,
        }
    }

    /// An executable shell script `name` in `dir` with `body` after the
    /// `#!/bin/sh` line.
    fn script(dir: &std::path::Path, name: &str, body: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        path
    }

    #[test]
    fn test_event_log_line_is_parsable() {
        let r = EventRecord {
            unix_ms: 42,
            node_id: 2,
            kind: "takeover",
            message: "took over \"now\"\nreally".into(),
            fields: Map::new(),
        };
        assert_eq!(
            r.log_line(),
            r#"ts=42 node=2 event=takeover msg="took over \"now\"\nreally""#
        );
    }

    #[test]
    fn test_notices_reach_log_file_and_command() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("cmd.out");
        let script = script(
            dir.path(),
            "notify.sh",
            &format!(
                "echo \"$MSL_NODE $MSL_EVENT $MSL_MESSAGE\" >> {}\n",
                out.display()
            ),
        );
        let n = Notifier::start(sinks(dir.path(), Some(script)), 16);
        n.notify(EventRecord::new(1, &Notice::PeerLost { path: Path::Msl }));
        n.notify(EventRecord::new(
            1,
            &Notice::Takeover {
                generation: 0xab,
                reason: "primary silent",
            },
        ));
        let counters = n.counters.clone();
        n.shutdown();
        let log = std::fs::read_to_string(dir.path().join("msld.log")).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 2, "{log}");
        assert!(lines[0].contains("node=1 event=peer_lost"), "{log}");
        assert!(
            lines[1].contains("event=takeover") && lines[1].contains("00000000000000ab"),
            "{log}"
        );
        let cmd = std::fs::read_to_string(&out).unwrap();
        assert!(
            cmd.contains("1 peer_lost peer silent on the Msl path"),
            "{cmd}"
        );
        assert!(cmd.contains("1 takeover took over"), "{cmd}");
        assert_eq!(counters.delivered.load(Ordering::Relaxed), 2);
        assert_eq!(counters.command_failures.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn test_slow_command_never_blocks_notify_and_drops_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let script = script(dir.path(), "slow.sh", "sleep 1\n");
        let mut s = sinks(dir.path(), Some(script));
        s.command_timeout = Duration::from_millis(50);
        let n = Notifier::start(s, 2);
        let t = Instant::now();
        for _ in 0..50 {
            n.notify(EventRecord::new(1, &Notice::MslLinkDown));
        }
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "notify blocked: {:?}",
            t.elapsed()
        );
        let counters = n.counters.clone();
        n.shutdown();
        assert!(counters.dropped.load(Ordering::Relaxed) > 0);
        assert!(
            counters.command_failures.load(Ordering::Relaxed) > 0,
            "timed-out command counted"
        );
        let log = std::fs::read_to_string(dir.path().join("msld.log")).unwrap();
        assert!(log.contains("event=events_dropped"), "{log}");
    }

    #[test]
    fn test_command_filtered_and_progress_rate_limited() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("cmd.out");
        let script = script(
            dir.path(),
            "notify.sh",
            &format!("echo \"$MSL_EVENT $MSL_REMAINING\" >> {}\n", out.display()),
        );
        let policy = CommandPolicy {
            events: Some(vec![
                "resync_started".into(),
                "resync_progress".into(),
                "resync_finished".into(),
            ]),
            progress_interval: Duration::from_secs(3600),
        };
        let n = Notifier::start_with(sinks(dir.path(), Some(script)), 64, policy);
        n.notify(EventRecord::new(1, &Notice::PeerLost { path: Path::Msl }));
        n.notify(EventRecord::new(
            1,
            &Notice::ResyncStarted {
                source: true,
                blocks: 100,
                full: false,
            },
        ));
        for remaining in [90, 80, 70, 60] {
            n.notify(EventRecord::new(
                1,
                &Notice::ResyncProgress {
                    source: true,
                    remaining,
                    total: 100,
                },
            ));
        }
        n.notify(EventRecord::new(
            1,
            &Notice::ResyncFinished {
                source: true,
                blocks: 100,
            },
        ));
        n.shutdown();
        let cmd = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            cmd, "resync_started 100\nresync_progress 90\nresync_finished 0\n",
            "filtered (no peer_lost), one progress run per interval"
        );
        // The log file still has every event.
        let log = std::fs::read_to_string(dir.path().join("msld.log")).unwrap();
        assert_eq!(log.lines().count(), 7, "{log}");
    }
}
