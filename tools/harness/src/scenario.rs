//! The SFT III failure scenarios, end to end, on a real pair: each starts
//! a pair, waits for sync, starts the client workload, injects the fault
//! for real, checks the outcome, recovers, resyncs, stops the workload,
//! reads every block back and compares the two backing files.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::pair::{unix_ms, wait_for, Event, Pair, PairOptions};
use crate::topology::{Topology, SERVICE_IP};
use crate::workload::{Workload, WorkloadOptions, WorkloadReport, BLOCK};

/// What a scenario reports to its audience (the demo narrates; tests stay
/// quiet or print to stderr).
pub trait Observer: Sync {
    /// A step of the scenario, in words.
    fn step(&self, _scenario: &str, _msg: &str) {}
    /// An event from a daemon's event stream.
    fn event(&self, _scenario: &str, _e: &Event) {}
    /// Resync progress on the source.
    fn resync_progress(&self, _scenario: &str, _done: u64, _total: u64) {}
}

/// Says nothing.
pub struct Quiet;
impl Observer for Quiet {}

/// Steps and events on stderr (for tests: visible with --nocapture and on
/// failure).
pub struct Stderr;
impl Observer for Stderr {
    fn step(&self, s: &str, msg: &str) {
        eprintln!("[{s}] {msg}");
    }
    fn event(&self, s: &str, e: &Event) {
        eprintln!("[{s}]   node {} {}: {}", e.node, e.kind, e.message);
    }
}

/// Settings shared by every scenario.
#[derive(Clone, Debug)]
pub struct ScenarioOptions {
    pub pair: PairOptions,
    /// Blocks (4 KiB) the workload writes (from block 0).
    pub workload_blocks: u64,
    pub workload_connections: usize,
    /// The client's I/O timeout (a silent server is given up after it).
    pub client_io_timeout: Duration,
    pub client_writes_per_s: Option<u32>,
    /// Bound on each wait (sync, takeover, resync).
    pub wait: Duration,
}

impl Default for ScenarioOptions {
    fn default() -> Self {
        ScenarioOptions {
            pair: PairOptions::default(),
            workload_blocks: 4096,
            workload_connections: 1,
            client_io_timeout: Duration::from_millis(500),
            client_writes_per_s: Some(1000),
            wait: Duration::from_secs(20),
        }
    }
}

/// One assertion of a scenario.
#[derive(Clone, Debug)]
pub struct Check {
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

/// A scenario's figures and checks.
#[derive(Clone, Debug)]
pub struct ScenarioResult {
    /// An id of [`SCENARIOS`].
    pub scenario: String,
    pub title: String,
    /// Fault -> the survivor's first event about it (daemon timestamps).
    pub detection_ms: Option<f64>,
    /// Fault -> first write acknowledged on a new connection.
    pub takeover_ms: Option<f64>,
    /// Longest time between two acknowledged client writes.
    pub client_pause_ms: f64,
    pub resync_s: Option<f64>,
    pub resync_mib_s: Option<f64>,
    pub resync_blocks: Option<u64>,
    pub acked_writes: u64,
    pub acked_writes_lost: u64,
    pub in_flight_landed: u64,
    pub client_errors: usize,
    pub volumes_identical: bool,
    /// Whether byte-identical volumes are required at the end.
    pub identical_required: bool,
    /// Whether a lost acknowledged write fails the scenario (not for a
    /// split brain, where the administrator discards one side's writes).
    pub lost_writes_fail: bool,
    pub checks: Vec<Check>,
    pub latency_us: Histogram<u64>,
    /// Set when the scenario could not run to its end.
    pub error: Option<String>,
}

impl ScenarioResult {
    fn new(scenario: &str, title: &str) -> Self {
        ScenarioResult {
            scenario: scenario.into(),
            title: title.into(),
            detection_ms: None,
            takeover_ms: None,
            client_pause_ms: 0.0,
            resync_s: None,
            resync_mib_s: None,
            resync_blocks: None,
            acked_writes: 0,
            acked_writes_lost: 0,
            in_flight_landed: 0,
            client_errors: 0,
            volumes_identical: false,
            identical_required: true,
            lost_writes_fail: true,
            checks: Vec::new(),
            latency_us: crate::workload::latency_histogram(),
            error: None,
        }
    }

    /// Every check held, nothing acknowledged was lost (where that
    /// counts), the volumes are identical (where required), no error.
    pub fn passed(&self) -> bool {
        self.error.is_none()
            && self.checks.iter().all(|c| c.ok)
            && (!self.lost_writes_fail || self.acked_writes_lost == 0)
            && (!self.identical_required || self.volumes_identical)
    }

    /// The failed checks and the error, for a message.
    pub fn failures(&self) -> String {
        let mut v: Vec<String> = self
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("FAILED: {} ({})", c.what, c.detail))
            .collect();
        if self.lost_writes_fail && self.acked_writes_lost > 0 {
            v.push(format!(
                "FAILED: {} acknowledged writes lost",
                self.acked_writes_lost
            ));
        }
        if self.identical_required && !self.volumes_identical {
            v.push("FAILED: volumes differ".into());
        }
        if let Some(e) = &self.error {
            v.push(format!("ERROR: {e}"));
        }
        v.join("\n")
    }

    /// One JSON object (the `msl-demo --json` line).
    pub fn to_json(&self) -> Value {
        json!({
            "scenario": self.scenario,
            "title": self.title,
            "passed": self.passed(),
            "detection_ms": self.detection_ms,
            "takeover_ms": self.takeover_ms,
            "client_pause_ms": self.client_pause_ms,
            "resync_s": self.resync_s,
            "resync_mib_s": self.resync_mib_s,
            "resync_blocks": self.resync_blocks,
            "acked_writes": self.acked_writes,
            "acked_writes_lost": self.acked_writes_lost,
            "in_flight_landed": self.in_flight_landed,
            "client_errors": self.client_errors,
            "volumes_identical": self.volumes_identical,
            "identical_required": self.identical_required,
            "write_latency_us": {
                "p50": self.latency_us.value_at_quantile(0.5),
                "p99": self.latency_us.value_at_quantile(0.99),
                "max": self.latency_us.max(),
            },
            "checks": self.checks.iter().map(|c| json!({"what": c.what, "ok": c.ok, "detail": c.detail})).collect::<Vec<_>>(),
            "error": self.error,
        })
    }
}

/// Every scenario: id, title.
pub const SCENARIOS: &[(&str, &str)] = &[
    ("1", "primary fails (kill -9)"),
    ("1b", "primary loses power (links down + kill)"),
    ("2", "secondary fails (kill -9)"),
    ("3", "MSL fails (link down)"),
    ("4", "LAN adapter fails on the primary"),
    ("5", "both links cut (split brain)"),
    ("6", "primary crashes during a resync"),
    (
        "5w",
        "both links cut, with a witness (only the lease holder serves)",
    ),
    ("7", "witness down while in sync"),
    (
        "8",
        "witness down, then the primary killed (on_no_quorum = suspend)",
    ),
    (
        "8s",
        "witness down, then the primary killed (on_no_quorum = sft3)",
    ),
    (
        "9",
        "primary cut from its peer and the witness, the secondary reaches it",
    ),
];

/// The scenarios run with a witness on the client host, and their
/// `on_no_quorum`.
fn witness_policy(id: &str) -> Option<&'static str> {
    match id {
        "5w" | "7" | "8" | "9" => Some("suspend"),
        "8s" => Some("sft3"),
        _ => None,
    }
}

/// The running state of one scenario.
pub struct Ctx<'a> {
    pub name: String,
    pub pair: Pair,
    pub opts: ScenarioOptions,
    obs: &'a dyn Observer,
    seen: [usize; 2],
    pub res: ScenarioResult,
}

impl<'a> Ctx<'a> {
    /// Start a pair and wait for it to be in sync with node 1 primary.
    pub fn start(
        name: &str,
        title: &str,
        opts: &ScenarioOptions,
        obs: &'a dyn Observer,
    ) -> Result<Ctx<'a>, String> {
        let pair = Pair::new(opts.pair.clone())?;
        let mut c = Ctx {
            name: name.into(),
            pair,
            opts: opts.clone(),
            obs,
            seen: [0; 2],
            res: ScenarioResult::new(name, title),
        };
        c.step(&format!(
            "scenario {name}: {title} (namespaces {}, {}, {})",
            c.pair.topo.server_ns(1),
            c.pair.topo.server_ns(2),
            c.pair.topo.client_ns()
        ));
        c.pair.start_both()?;
        let t = c.wait("node 1 primary, node 2 secondary, in sync", |p| {
            in_sync(p, 1)
        })?;
        c.step(&format!("pair in sync after {:.1} s", t.as_secs_f64()));
        Ok(c)
    }

    pub fn step(&mut self, msg: &str) {
        self.pump();
        self.obs.step(&self.name, msg);
    }

    /// Forward new daemon events to the observer.
    pub fn pump(&mut self) {
        for node in [1u16, 2] {
            let seen = &mut self.seen[usize::from(node - 1)];
            let evs = self.pair.node_events(node);
            for e in evs.get(*seen..).unwrap_or_default() {
                if e.kind != "resync_progress" {
                    self.obs.event(&self.name, e);
                }
            }
            *seen = evs.len().max(*seen);
        }
    }

    /// Wait (bounded by the scenario's wait) until `f` holds, passing
    /// events on meanwhile.
    pub fn wait(
        &mut self,
        what: &str,
        mut f: impl FnMut(&Pair) -> bool,
    ) -> Result<Duration, String> {
        self.wait_up_to(what, self.opts.wait, &mut f)
    }

    pub fn wait_up_to(
        &mut self,
        what: &str,
        timeout: Duration,
        f: &mut dyn FnMut(&Pair) -> bool,
    ) -> Result<Duration, String> {
        let t = Instant::now();
        loop {
            self.pump();
            if f(&self.pair) {
                return Ok(t.elapsed());
            }
            if t.elapsed() >= timeout {
                return Err(format!(
                    "timed out after {timeout:?} waiting for: {what}\n{}",
                    self.pair.diagnostics()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Record an assertion (the scenario goes on either way).
    pub fn check(&mut self, what: &str, ok: bool, detail: impl Into<String>) {
        let detail = detail.into();
        self.obs.step(
            &self.name,
            &format!(
                "{} {what}{}",
                if ok { "ok:" } else { "FAILED:" },
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({detail})")
                }
            ),
        );
        self.res.checks.push(Check {
            what: what.into(),
            ok,
            detail,
        });
    }

    /// Whether `node` told the administrator about `kind` in its log file
    /// AND on its console.
    pub fn notified(&self, node: u16, kind: &str) -> bool {
        self.pair.log(node).contains(&format!("event={kind}"))
            && self
                .pair
                .console(node)
                .contains(&format!("msld[node {node}] {}:", kind.replace('_', " ")))
    }

    /// Check `notified` for each kind.
    pub fn check_notified(&mut self, node: u16, kinds: &[&str]) {
        for k in kinds {
            let ok = self.notified(node, k);
            self.check(
                &format!("node {node} reports `{k}` on its console and in its log file"),
                ok,
                "",
            );
        }
    }

    /// The client workload from the client host.
    pub fn start_workload(&mut self) -> Result<Workload, String> {
        let addr = self.pair.service_addr();
        let mut w = WorkloadOptions::new(addr);
        w.blocks = self.opts.workload_blocks;
        w.connections = self.opts.workload_connections;
        w.io_timeout = self.opts.client_io_timeout;
        w.max_writes_per_s = self.opts.client_writes_per_s;
        let wl = Workload::start(self.pair.topo.client_ns(), w)?;
        wl.wait_acks(100, self.opts.wait)?;
        self.step(&format!(
            "client writing 4 KiB blocks through {addr} from {}",
            crate::CLIENT_IP
        ));
        Ok(wl)
    }

    /// Detection: fault -> the first of `kinds` from `node` (event stamps).
    pub fn detect(&mut self, node: u16, kinds: &[&str], fault_ms: u64) -> Option<f64> {
        self.pump();
        let ev = self
            .pair
            .events()
            .into_iter()
            .filter(|e| e.node == node && e.ts_ms >= fault_ms && kinds.contains(&e.kind.as_str()))
            .min_by_key(|e| e.ts_ms)?;
        let ms = ev.ts_ms.saturating_sub(fault_ms) as f64;
        self.res.detection_ms = Some(ms);
        self.step(&format!(
            "node {node} detected the fault after {ms:.0} ms ({})",
            ev.kind
        ));
        Some(ms)
    }

    /// Wait for `primary` and its peer to be back in sync, reporting
    /// resync progress; record the resync's duration and rate from the
    /// source's events (stamped at or after `since_ms`).
    pub fn resync(&mut self, primary: u16, since_ms: u64) -> Result<(), String> {
        let secondary = 3 - primary;
        let t = Instant::now();
        let mut last_report = Instant::now();
        loop {
            self.pump();
            if in_sync(&self.pair, primary) {
                break;
            }
            if last_report.elapsed() >= Duration::from_millis(200) {
                last_report = Instant::now();
                if let Ok(s) = self.pair.status(primary) {
                    let total = s["resync"]["total_blocks"].as_u64().unwrap_or(0);
                    let left = s["resync"]["remaining_blocks"].as_u64().unwrap_or(0);
                    if total > 0 {
                        self.obs
                            .resync_progress(&self.name, total.saturating_sub(left), total);
                    }
                }
            }
            if t.elapsed() >= self.opts.wait {
                return Err(format!(
                    "timed out after {:?} waiting for the resync of node {secondary}\n{}",
                    self.opts.wait,
                    self.pair.diagnostics()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.pump();
        let evs = self.pair.events();
        let started = evs
            .iter()
            .find(|e| e.node == primary && e.kind == "resync_started" && e.ts_ms >= since_ms);
        let finished = evs
            .iter()
            .rev()
            .find(|e| e.node == primary && e.kind == "resync_finished" && e.ts_ms >= since_ms);
        if let (Some(s), Some(f)) = (started, finished) {
            let secs = (f.ts_ms.saturating_sub(s.ts_ms)) as f64 / 1000.0;
            let blocks = number_before(&f.message, " blocks").unwrap_or(0);
            let mib = (blocks * self.pair.block_size()) as f64 / (1 << 20) as f64;
            self.res.resync_s = Some(secs);
            self.res.resync_blocks = Some(blocks);
            self.res.resync_mib_s = (secs > 0.0).then(|| mib / secs);
            self.obs.resync_progress(&self.name, blocks, blocks);
            self.step(&format!(
                "resync done: {blocks} blocks ({mib:.1} MiB) in {secs:.2} s"
            ));
        }
        // The returning node got the memory image (session up) before the
        // changed blocks.
        let connected = evs
            .iter()
            .find(|e| e.node == secondary && e.kind == "connected" && e.ts_ms >= since_ms)
            .map(|e| e.ts_ms);
        let target_started = evs
            .iter()
            .find(|e| e.node == secondary && e.kind == "resync_started" && e.ts_ms >= since_ms)
            .map(|e| e.ts_ms);
        if let Some(ts) = target_started {
            self.check(
                &format!("node {secondary}: session (memory image) up before the changed blocks"),
                connected.is_some_and(|c| c <= ts),
                format!("connected at {connected:?}, resync started at {ts}"),
            );
        }
        Ok(())
    }

    /// Stop the workload, read everything back, stop both nodes cleanly
    /// (the secondary first), compare the backing files.
    pub fn finish(&mut self, wl: Workload, primary: u16) -> Result<WorkloadReport, String> {
        let resumed = wl.wait_acks(100, self.opts.wait);
        let detail = match &resumed {
            Ok(_) => String::new(),
            Err(e) => format!("{e}; {}", self.lan_view()),
        };
        self.check(
            "client writes go on through the service address after recovery",
            resumed.is_ok(),
            detail,
        );
        let report = wl.stop();
        // Read back from the primary through the service address (msld
        // serves NBD there only): wait until the primary holds it, so the
        // check reads the primary's data, not whatever held it last.
        let primary_holds = wait_for(
            &format!("node {primary} holding the service address for the read-back"),
            Duration::from_secs(10),
            || {
                self.pair
                    .topo
                    .holds_service_address(primary)
                    .unwrap_or(false)
            },
        );
        primary_holds.map_err(|e| format!("{e}; {}", self.lan_view()))?;
        let addr: SocketAddr = format!("{SERVICE_IP}:{}", self.opts.pair.nbd_port)
            .parse()
            .map_err(|e| format!("{e}"))?;
        let v = report.verify_at(self.pair.topo.client_ns(), addr)?;
        self.res.acked_writes = report.acked_writes;
        self.res.acked_writes_lost = v.acked_writes_lost;
        self.res.in_flight_landed = v.in_flight_landed;
        self.res.client_errors = report.errors;
        self.res.client_pause_ms = report.longest_pause().as_secs_f64() * 1000.0;
        self.res.latency_us = report.latency_us.clone();
        self.step(&format!(
            "client: {} writes acknowledged, {} blocks read back, {} acknowledged writes lost, {} in-flight writes landed, {} reconnects",
            report.acked_writes, v.blocks_checked, v.acked_writes_lost, v.in_flight_landed, report.reconnects
        ));
        if !v.problems.is_empty() {
            self.step(&format!("lost writes: {:?}", v.problems));
        }
        self.stop_and_compare(primary)?;
        Ok(report)
    }

    /// `ip link set IF up|down` in node `node`'s namespace.
    pub fn link(&self, node: u16, ifname: &str, up: bool) -> Result<(), String> {
        self.pair
            .topo
            .set_link(node, ifname, up)
            .map_err(|e| e.to_string())
    }

    /// Who holds the service address and the client's ARP entry for it.
    pub fn lan_view(&self) -> String {
        let neigh = crate::topology::ip(&[
            "-n",
            self.pair.topo.client_ns(),
            "neigh",
            "show",
            SERVICE_IP,
        ])
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|e| e.to_string());
        let mac = |n: u16| {
            crate::topology::ip(&[
                "-n",
                self.pair.topo.server_ns(n),
                "-br",
                "link",
                "show",
                Topology::lan_if(n),
            ])
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .nth(2)
                    .unwrap_or("?")
                    .to_string()
            })
            .unwrap_or_default()
        };
        format!(
            "service address on node 1: {:?}, on node 2: {:?}; client ARP: {neigh}; node 1 MAC {}, node 2 MAC {}",
            self.pair.topo.holds_service_address(1).ok(),
            self.pair.topo.holds_service_address(2).ok(),
            mac(1),
            mac(2)
        )
    }

    /// Stop the secondary, then the primary; compare the backing files.
    pub fn stop_and_compare(&mut self, primary: u16) -> Result<(), String> {
        self.pump();
        self.pair.stop(3 - primary)?;
        self.pair.stop(primary)?;
        let (a, b) = (
            self.pair.sha256(1).map_err(|e| e.to_string())?,
            self.pair.sha256(2).map_err(|e| e.to_string())?,
        );
        self.res.volumes_identical = a == b;
        self.step(&format!(
            "sha256 node 1 {}..., node 2 {}...: {}",
            &a[..16],
            &b[..16],
            if a == b { "identical" } else { "DIFFERENT" }
        ));
        Ok(())
    }
}

/// `primary` primary, its peer secondary and up to date, both in sync, no
/// resync running.
pub fn in_sync(p: &Pair, primary: u16) -> bool {
    let (Ok(a), Ok(b)) = (p.status(primary), p.status(3 - primary)) else {
        return false;
    };
    a["role"] == "primary"
        && a["in_sync"] == true
        && b["role"] == "secondary"
        && b["in_sync"] == true
        && b["disk"] == "uptodate"
        && a["resync"]["active"] == false
        && b["resync"]["active"] == false
}

fn role(p: &Pair, node: u16) -> String {
    p.status(node)
        .ok()
        .and_then(|s| s["role"].as_str().map(str::to_string))
        .unwrap_or_else(|| "down".into())
}

/// The integer just before `suffix` in `s` ("... after 123 blocks").
pub fn number_before(s: &str, suffix: &str) -> Option<u64> {
    let i = s.find(suffix)?;
    let head = &s[..i];
    let start = head
        .rfind(|c: char| !c.is_ascii_digit())
        .map_or(0, |j| j + 1);
    head[start..].parse().ok()
}

fn ms_between(a: Instant, b: Option<Instant>) -> Option<f64> {
    b.map(|b| b.saturating_duration_since(a).as_secs_f64() * 1000.0)
}

impl Pair {
    /// The volume's block size (the daemon default unless overridden).
    pub fn block_size(&self) -> u64 {
        BLOCK as u64
    }
}

/// Run scenario `id` (see [`SCENARIOS`]). A scenario that
/// cannot run to its end comes back with `error` set.
pub fn run(id: &str, opts: &ScenarioOptions, obs: &dyn Observer) -> ScenarioResult {
    let title = SCENARIOS
        .iter()
        .find(|(i, _)| *i == id)
        .map_or("unknown scenario", |(_, t)| t);
    let mut partial = ScenarioResult::new(id, title);
    let mut opts = opts.clone();
    if let Some(policy) = witness_policy(id) {
        opts.pair = opts.pair.with_witness(policy);
    }
    let r = (|| -> Result<ScenarioResult, String> {
        let mut c = Ctx::start(id, title, &opts, obs)?;
        let out = match id {
            "1" => primary_fails(&mut c, false),
            "1b" => primary_fails(&mut c, true),
            "2" => secondary_fails(&mut c),
            "3" => msl_fails(&mut c),
            "4" => lan_adapter_fails(&mut c),
            "5" => both_links_cut(&mut c),
            "6" => primary_crash_during_resync(&mut c),
            "5w" => both_links_cut_with_witness(&mut c),
            "7" => witness_down_in_sync(&mut c),
            "8" | "8s" => witness_down_then_primary_killed(&mut c, id == "8s"),
            "9" => primary_cut_from_peer_and_witness(&mut c),
            _ => Err(format!("unknown scenario `{id}`")),
        };
        c.pump();
        match out {
            Ok(()) => Ok(c.res),
            Err(e) => {
                let mut r = c.res;
                r.error = Some(e);
                Ok(r)
            }
        }
    })();
    match r {
        Ok(r) => r,
        Err(e) => {
            partial.error = Some(e);
            partial
        }
    }
}

/// 1 / 1b: the primary fails; node 2 takes over, the client goes on through
/// the same address; node 1 returns as secondary and is resynced.
fn primary_fails(c: &mut Ctx, power_loss: bool) -> Result<(), String> {
    let wl = c.start_workload()?;
    let msl1 = c.pair.topo.msl_if(1);
    let (fault, fault_ms) = (Instant::now(), unix_ms());
    if power_loss {
        c.step("power loss on node 1: msld stops dead (SIGSTOP), its MSL and LAN links go down, msld is killed");
        // A server losing power runs nothing while its links drop: frozen
        // first, msld cannot react to its own MSL carrier loss (going
        // degraded in a new generation, which node 2's takeover would then
        // meet as a split brain: a double failure, not this scenario).
        let pid = c.pair.pid(1).ok_or("node 1's msld is not running")?;
        // SAFETY: kill(2) with a pid of a child this harness started.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) } != 0 {
            return Err(format!(
                "SIGSTOP node 1 ({pid}): {}",
                std::io::Error::last_os_error()
            ));
        }
        c.link(1, msl1, false)?;
        c.link(1, Topology::lan_if(1), false)?;
    } else {
        c.step("kill -9 of node 1's msld (the primary)");
    }
    c.pair.kill9(1)?;
    c.wait("node 2 takes over", |p| role(p, 2) == "primary")?;
    wl.wait_acks(50, c.opts.wait)?;
    c.res.takeover_ms = ms_between(fault, wl.first_ack_on_new_connection_after(fault));
    c.detect(2, &["peer_down", "takeover"], fault_ms);
    c.step(&format!(
        "client writes acknowledged by node 2 {:.0} ms after the fault",
        c.res.takeover_ms.unwrap_or(f64::NAN)
    ));
    let holds = c.pair.topo.holds_service_address(2).unwrap_or(false);
    c.check("node 2 holds the service address", holds, "");
    c.check_notified(2, &["takeover"]);
    c.wait("node 2 tracks changes (dirty blocks)", |p| {
        p.status(2)
            .is_ok_and(|s| s["dirty_blocks"].as_u64().unwrap_or(0) > 0)
    })?;
    if power_loss {
        c.step("power back: node 1's links up");
        c.link(1, msl1, true)?;
        c.link(1, Topology::lan_if(1), true)?;
    }
    let back_ms = unix_ms();
    c.step("restarting node 1's msld");
    c.pair.start(1)?;
    c.resync(2, back_ms)?;
    let r1 = role(&c.pair, 1);
    c.check("node 1 came back as secondary", r1 == "secondary", r1);
    let holds1 = c.pair.topo.holds_service_address(1).unwrap_or(true);
    let view = c.lan_view();
    c.check("node 1 no longer holds the service address", !holds1, view);
    c.finish(wl, 2)?;
    Ok(())
}

/// 2: the secondary fails; the primary says so, stays primary, serves,
/// tracks changes; the secondary returns and is resynced.
fn secondary_fails(c: &mut Ctx) -> Result<(), String> {
    let wl = c.start_workload()?;
    let (fault, fault_ms) = (Instant::now(), unix_ms());
    c.step("kill -9 of node 2's msld (the secondary)");
    c.pair.kill9(2)?;
    c.wait("node 1 reports its peer down", |p| {
        p.event_after(1, "peer_down", fault_ms).is_some()
            || p.event_after(1, "degraded", fault_ms).is_some()
    })?;
    c.detect(1, &["peer_down", "degraded"], fault_ms);
    wl.wait_acks(200, c.opts.wait)?;
    let r = role(&c.pair, 1);
    c.check("node 1 still primary", r == "primary", r);
    c.check(
        "node 1 still holds the service address",
        c.pair.topo.holds_service_address(1).unwrap_or(false),
        "",
    );
    let dirty = c
        .pair
        .status(1)
        .map(|s| s["dirty_blocks"].as_u64().unwrap_or(0))
        .unwrap_or(0);
    c.check(
        "node 1 tracks changes",
        dirty > 0,
        format!("{dirty} dirty blocks = {} KiB", dirty * 4),
    );
    c.check_notified(1, &["degraded"]);
    let msg = c
        .pair
        .event_after(1, "degraded", fault_ms)
        .map(|e| e.message)
        .unwrap_or_default();
    c.check(
        "node 1 says the secondary is down and it is still primary",
        msg.contains("still primary") && msg.contains("secondary"),
        msg.clone(),
    );
    c.step(&format!(
        "client kept writing: longest pause so far {:.0} ms",
        wl.longest_pause_between(fault, Instant::now())
            .as_secs_f64()
            * 1000.0
    ));
    let back_ms = unix_ms();
    c.step("restarting node 2's msld");
    c.pair.start(2)?;
    c.resync(1, back_ms)?;
    c.finish(wl, 1)?;
    Ok(())
}

/// Poll both nodes while `f` runs: every role seen and who held the
/// service address.
struct Watch {
    second_primary: Vec<String>,
    address_on_2: u32,
    address_on_1_missing: u32,
    samples: u32,
}

fn watch_while<T>(p: &Pair, f: impl FnOnce() -> T) -> (T, Watch) {
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            let mut w = Watch {
                second_primary: Vec::new(),
                address_on_2: 0,
                address_on_1_missing: 0,
                samples: 0,
            };
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                w.samples += 1;
                let r2 = role(p, 2);
                if r2 == "primary" {
                    w.second_primary
                        .push(format!("sample {}: node 2 {r2}", w.samples));
                }
                if p.topo.holds_service_address(2).unwrap_or(false) {
                    w.address_on_2 += 1;
                }
                if !p.topo.holds_service_address(1).unwrap_or(true) {
                    w.address_on_1_missing += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            w
        });
        let out = f();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let w = h.join().unwrap_or(Watch {
            second_primary: vec!["watcher panicked".into()],
            address_on_2: 0,
            address_on_1_missing: 0,
            samples: 0,
        });
        (out, w)
    })
}

/// 3: the MSL fails; node 2 still hears node 1 on the LAN, shuts its
/// mirror side down and does NOT take over; node 1 keeps serving and
/// tracks changes; link repaired, node 2 resynced.
fn msl_fails(c: &mut Ctx) -> Result<(), String> {
    let wl = c.start_workload()?;
    let fault_ms = unix_ms();
    let fault = Instant::now();
    c.step("ip link set mslb down (node 2's MSL adapter)");
    let msl2 = c.pair.topo.msl_if(2);
    c.link(2, msl2, false)?;
    let (waited, w) = {
        let pair = &c.pair;
        let wait = c.opts.wait;
        watch_while(pair, || -> Result<(), String> {
            wait_for("node 2 shuts its mirror side down", wait, || {
                pair.event_after(2, "mirror_shut_down", fault_ms).is_some()
            })?;
            wait_for("node 1 tracks changes", wait, || {
                pair.status(1)
                    .is_ok_and(|s| s["dirty_blocks"].as_u64().unwrap_or(0) > 0)
            })?;
            // Well past the detection time: still no takeover.
            wl.wait_acks(1500, wait)?;
            Ok(())
        })
    };
    waited.map_err(|e| format!("{e}\n{}", c.pair.diagnostics()))?;
    c.detect(
        2,
        &["msl_link_down", "peer_lost", "mirror_shut_down"],
        fault_ms,
    );
    c.check(
        "no second primary while the MSL is down (both statuses polled every 20 ms)",
        w.second_primary.is_empty(),
        format!("{} samples; {:?}", w.samples, w.second_primary),
    );
    c.check(
        "the service address stayed on node 1 only (ip -n <ns> addr)",
        w.address_on_2 == 0 && w.address_on_1_missing == 0,
        format!(
            "{} samples: on node 2 {} times, missing from node 1 {} times",
            w.samples, w.address_on_2, w.address_on_1_missing
        ),
    );
    c.check_notified(2, &["mirror_shut_down"]);
    let r = role(&c.pair, 1);
    c.check("node 1 still primary and serving", r == "primary", r);
    c.step(&format!(
        "client kept writing: longest pause since the fault {:.0} ms",
        wl.longest_pause_between(fault, Instant::now())
            .as_secs_f64()
            * 1000.0
    ));
    let back_ms = unix_ms();
    c.step("ip link set mslb up");
    c.link(2, msl2, true)?;
    if !c.pair.is_running(2) {
        c.step("node 2's msld had stopped: starting it");
        c.pair.start(2)?;
    }
    c.resync(1, back_ms)?;
    c.finish(wl, 1)?;
    Ok(())
}

/// 4: the primary's LAN adapter fails while in sync: switchover to node 2
/// without losing an acknowledged write; node 1 restarts itself as
/// secondary (exit 75) and is resynced.
fn lan_adapter_fails(c: &mut Ctx) -> Result<(), String> {
    let wl = c.start_workload()?;
    let (fault, fault_ms) = (Instant::now(), unix_ms());
    c.step("ip link set a-lan down (node 1's LAN adapter)");
    c.link(1, Topology::lan_if(1), false)?;
    c.wait("node 2 takes over", |p| role(p, 2) == "primary")?;
    wl.wait_acks(50, c.opts.wait)?;
    c.res.takeover_ms = ms_between(fault, wl.first_ack_on_new_connection_after(fault));
    c.detect(
        1,
        &["lan_adapter_health", "switchover_started", "role_changed"],
        fault_ms,
    );
    c.check(
        "node 2 holds the service address",
        c.pair.topo.holds_service_address(2).unwrap_or(false),
        "",
    );
    c.wait(
        "node 1's msld exits 75 and is restarted by the supervisor",
        |p| p.restarts(1) >= 1,
    )?;
    let exits = c.pair.exits(1);
    c.check(
        "node 1 restarted itself (exit 75)",
        exits
            .iter()
            .any(|e| e.code == Some(crate::pair::EXIT_RESTART)),
        format!(
            "{:?}",
            exits.iter().map(|e| (e.code, e.signal)).collect::<Vec<_>>()
        ),
    );
    c.check_notified(1, &["lan_adapter_health"]);
    let switch = c.notified(1, "switchover_started") || c.notified(2, "switchover_done");
    c.check("the switchover is reported on console and log", switch, "");
    // Node 1 restarts as secondary over the MSL and its resync may start
    // before its LAN adapter is back: count it from the fault.
    let back_ms = fault_ms;
    c.step("ip link set a-lan up");
    c.link(1, Topology::lan_if(1), true)?;
    c.resync(2, back_ms)?;
    let r1 = role(&c.pair, 1);
    c.check("node 1 is secondary", r1 == "secondary", r1);
    c.finish(wl, 2)?;
    Ok(())
}

/// Cut the LAN between the servers (not the client): bridge port isolation.
fn isolate_servers(p: &Pair, on: bool) -> Result<(), String> {
    for port in ["pa", "pb"] {
        crate::topology::ip(&[
            "-n",
            p.topo.client_ns(),
            "link",
            "set",
            port,
            "type",
            "bridge_slave",
            "isolated",
            if on { "on" } else { "off" },
        ])
        .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// 5: both links between the servers cut (the LAN first, the MSL within
/// half a second; each server still reaches the client): both run as primary during the cut; on reconnect the split
/// brain is detected and refused on both sides, never merged, and the
/// administrator is told; the administrator keeps node 1's data
/// (`invalidate` on node 2), then node 2 is fully resynced.
///
/// Asserted: both primary during the cut; `split_brain_refused` on both,
/// on console and log; no resync starts until the administrator acts;
/// after the decision, identical volumes. Writes acknowledged only by node
/// 2 during the cut are discarded by that decision, by design: they are
/// reported (`acked_writes_lost`) but do not fail the scenario.
fn both_links_cut(c: &mut Ctx) -> Result<(), String> {
    c.res.lost_writes_fail = false;
    let wl = c.start_workload()?;
    // Order matters: an MSL cut drops carrier at once, LAN silence shows
    // only after the miss count. Cut the MSL first (or "at once") and node
    // 2 still has fresh LAN heartbeats when it sees the carrier go: that
    // is scenario 3 (mirror shut down, outdated, no takeover), seen in a
    // demo run. So the LAN between the servers goes first, the MSL as soon
    // as node 2 reports the LAN silent.
    let lan_ms = unix_ms();
    c.step("cutting the LAN between the servers (bridge ports isolated; the client still reaches both)");
    isolate_servers(&c.pair, true)?;
    c.wait("node 2 finds node 1 silent on the LAN", |p| {
        p.node_events(2)
            .iter()
            .any(|e| e.kind == "peer_lost" && e.ts_ms >= lan_ms && e.message.contains("Lan"))
    })?;
    let fault_ms = unix_ms();
    c.step("cutting the MSL (msla down)");
    let msl1 = c.pair.topo.msl_if(1);
    c.link(1, msl1, false)?;
    c.wait("both nodes primary", |p| {
        role(p, 1) == "primary" && role(p, 2) == "primary"
    })?;
    c.detect(2, &["peer_down", "takeover"], fault_ms);
    c.step("both sides are primary (each believes the other dead); client writes go on");
    std::thread::sleep(Duration::from_millis(1000));
    let heal_ms = unix_ms();
    c.step("healing both links");
    c.link(1, msl1, true)?;
    isolate_servers(&c.pair, false)?;
    c.wait("split brain detected on both nodes", |p| {
        p.event_after(1, "split_brain_refused", heal_ms).is_some()
            && p.event_after(2, "split_brain_refused", heal_ms).is_some()
    })?;
    // Give a merge every chance to (wrongly) happen.
    std::thread::sleep(Duration::from_millis(1500));
    c.pump();
    let merged: Vec<Event> = c
        .pair
        .events()
        .into_iter()
        .filter(|e| e.ts_ms >= heal_ms && (e.kind == "resync_started" || e.kind == "connected"))
        .collect();
    c.check(
        "no silent merge: no session and no resync after the heal",
        merged.is_empty(),
        format!(
            "{:?}",
            merged.iter().map(|e| (e.node, &e.kind)).collect::<Vec<_>>()
        ),
    );
    c.check_notified(1, &["split_brain_refused"]);
    c.check_notified(2, &["split_brain_refused"]);
    let roles = (role(&c.pair, 1), role(&c.pair, 2));
    c.step(&format!(
        "after detection: node 1 {}, node 2 {}",
        roles.0, roles.1
    ));
    c.check(
        "the higher node id stepped down",
        roles.1 != "primary",
        format!("node 2 is {}", roles.1),
    );
    c.step("administrator keeps node 1's data: demote + invalidate on node 2");
    let decided_ms = unix_ms();
    let _ = c.pair.admin(2, "demote");
    c.pair.admin(2, "invalidate")?;
    c.resync(1, decided_ms)?;
    c.finish(wl, 1)?;
    Ok(())
}

/// Wait until node 1 holds the witness lease.
fn lease_held(c: &mut Ctx, node: u16) -> Result<(), String> {
    c.wait(&format!("node {node} holds the witness lease"), |p| {
        p.status(node).is_ok_and(|s| s["witness"]["held"] == true)
    })?;
    c.step(&format!("node {node} holds the witness lease"));
    Ok(())
}

/// Assert for `secs` that `node` stays secondary and never holds the
/// service address.
fn stays_secondary(c: &mut Ctx, node: u16, secs: u64, why: &str) {
    let t = Instant::now();
    let mut seen = None;
    while t.elapsed() < Duration::from_secs(secs) {
        c.pump();
        let r = role(&c.pair, node);
        let holds = c.pair.topo.holds_service_address(node).unwrap_or(false);
        if r != "secondary" || holds {
            seen = Some(format!("{r}, service address held: {holds}"));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    c.check(
        &format!("node {node} stays secondary for {secs} s ({why})"),
        seen.is_none(),
        seen.unwrap_or_default(),
    );
}

/// The takeover time: the fault to the first write acknowledged on a
/// connection opened after it (waits for 50 acknowledgements).
fn record_takeover(c: &mut Ctx, wl: &Workload, fault: Instant) -> Result<(), String> {
    wl.wait_acks(50, c.opts.wait)?;
    c.res.takeover_ms = ms_between(fault, wl.first_ack_on_new_connection_after(fault));
    c.step(&format!(
        "client writes acknowledged by node 2 {:.0} ms after the fault",
        c.res.takeover_ms.unwrap_or(f64::NAN)
    ));
    Ok(())
}

/// Cut (or heal) both links between the servers: the LAN (bridge ports
/// isolated from each other), then, once node 2 hears node 1 no more on
/// it, the MSL (the other order is scenario 3 for node 2, see
/// `both_links_cut`).
fn both_links(c: &mut Ctx, up: bool) -> Result<(), String> {
    let msl1 = c.pair.topo.msl_if(1);
    isolate_servers(&c.pair, !up)?;
    if !up {
        c.wait("node 2 hears node 1 no more on the LAN", |p| {
            p.status(2).is_ok_and(|s| s["lan_alive"] == false)
        })?;
    }
    c.link(1, msl1, up)
}

/// 5w: scenario 5 with a witness on the client host. Both links between
/// the servers cut, both still reaching the client and the witness: node
/// 1 keeps the lease and serves, node 2 asks and is refused, so it never
/// takes over; healed, the pair resyncs by itself (no administrator), no
/// acknowledged write lost, volumes identical.
fn both_links_cut_with_witness(c: &mut Ctx) -> Result<(), String> {
    lease_held(c, 1)?;
    let wl = c.start_workload()?;
    let fault_ms = unix_ms();
    c.step("cutting the LAN between the servers and the MSL; both still reach the client and the witness");
    both_links(c, false)?;
    c.wait("node 2 finds node 1 silent on both paths", |p| {
        p.event_after(2, "peer_down", fault_ms).is_some()
    })?;
    c.detect(2, &["peer_down"], fault_ms);
    stays_secondary(c, 2, 3, "the witness refuses it the lease node 1 holds");
    let during = wl.wait_acks(100, c.opts.wait);
    c.check(
        "node 1 serves alone with the lease",
        during.is_ok(),
        during.err().unwrap_or_default(),
    );
    let s2 = c.pair.status(2)?;
    c.check(
        "the witness named node 1 the holder to node 2",
        s2["witness"]["holder"] == 1 && s2["witness"]["counters"]["refused"].as_u64() > Some(0),
        s2["witness"].to_string(),
    );
    let heal_ms = unix_ms();
    c.step("healing both links: no administrator acts");
    both_links(c, true)?;
    c.resync(1, heal_ms)?;
    c.check(
        "no split brain",
        c.pair
            .event_after(1, "split_brain_refused", heal_ms)
            .is_none()
            && c.pair
                .event_after(2, "split_brain_refused", heal_ms)
                .is_none(),
        "",
    );
    c.finish(wl, 1)?;
    Ok(())
}

/// 7: the witness killed while the pair is in sync: nothing changes, the
/// client's writes go on, node 1 reports the witness unreachable.
fn witness_down_in_sync(c: &mut Ctx) -> Result<(), String> {
    lease_held(c, 1)?;
    let wl = c.start_workload()?;
    let fault_ms = unix_ms();
    c.step("kill -9 the witness");
    c.pair.kill_witness();
    c.wait("node 1 reports the witness unreachable", |p| {
        p.event_after(1, "witness_unreachable", fault_ms).is_some()
    })?;
    c.detect(1, &["witness_unreachable"], fault_ms);
    c.check_notified(1, &["witness_unreachable"]);
    let goes_on = wl.wait_acks(200, c.opts.wait);
    c.check(
        "client writes go on without the witness",
        goes_on.is_ok(),
        goes_on.err().unwrap_or_default(),
    );
    c.check("still in sync", in_sync(&c.pair, 1), "");
    c.finish(wl, 1)?;
    Ok(())
}

/// 8 / 8s: the witness down, then the primary killed. `suspend`: node 2
/// waits (3 s checked), then takes over once the witness is back; `sft3`:
/// node 2 takes over without it. Node 1 then returns as secondary.
fn witness_down_then_primary_killed(c: &mut Ctx, sft3: bool) -> Result<(), String> {
    lease_held(c, 1)?;
    let wl = c.start_workload()?;
    let down_ms = unix_ms();
    c.step("kill -9 the witness");
    c.pair.kill_witness();
    c.wait("node 1 reports the witness unreachable", |p| {
        p.event_after(1, "witness_unreachable", down_ms).is_some()
    })?;
    let (fault, fault_ms) = (Instant::now(), unix_ms());
    c.step("kill -9 node 1");
    c.pair.kill9(1)?;
    if sft3 {
        let t = c.wait("node 2 takes over without the witness (sft3)", |p| {
            role(p, 2) == "primary"
        })?;
        c.step(&format!(
            "node 2 took over {:.0} ms after the kill",
            t.as_secs_f64() * 1000.0
        ));
    } else {
        stays_secondary(c, 2, 3, "on_no_quorum = suspend, no witness");
        c.step("restarting the witness");
        c.pair.start_witness()?;
        let t = c.wait("node 2 takes over once the witness is back", |p| {
            role(p, 2) == "primary"
        })?;
        c.step(&format!(
            "node 2 took over {:.0} ms after the witness came back",
            t.as_secs_f64() * 1000.0
        ));
    }
    c.detect(2, &["peer_down"], fault_ms);
    record_takeover(c, &wl, fault)?;
    let back_ms = unix_ms();
    c.step("restarting node 1: it rejoins as secondary");
    c.pair.start(1)?;
    c.resync(2, back_ms)?;
    c.finish(wl, 2)?;
    Ok(())
}

/// 9: node 1 (primary) cut from its peer (LAN and MSL) and from the
/// witness, node 2 still reaching the witness: node 2 takes over once node
/// 1's lease ended; node 1 acknowledges nothing from then on; healed, node
/// 1 rejoins as secondary and is resynced without an administrator.
fn primary_cut_from_peer_and_witness(c: &mut Ctx) -> Result<(), String> {
    lease_held(c, 1)?;
    let wl = c.start_workload()?;
    let (fault, fault_ms) = (Instant::now(), unix_ms());
    c.step("cutting node 1 from node 2 (LAN and MSL) and from the witness (blackhole route)");
    c.pair.cut_witness(1, true)?;
    both_links(c, false)?;
    let t = c.wait("node 2 takes over with the lease", |p| {
        role(p, 2) == "primary"
    })?;
    c.step(&format!(
        "node 2 took over {:.0} ms after the cut",
        t.as_secs_f64() * 1000.0
    ));
    c.detect(2, &["peer_down"], fault_ms);
    record_takeover(c, &wl, fault)?;
    let bytes = |p: &Pair| {
        p.status(1)
            .ok()
            .and_then(|s| s["counters"]["client_bytes_written"].as_u64())
    };
    let before = bytes(&c.pair);
    let goes_on = wl.wait_acks(200, c.opts.wait);
    c.check(
        "the client goes on through node 2",
        goes_on.is_ok(),
        goes_on.err().unwrap_or_default(),
    );
    let after = bytes(&c.pair);
    c.check(
        "node 1 acknowledged nothing after node 2 took over",
        before.is_some() && before == after,
        format!("client bytes written on node 1: {before:?} then {after:?}"),
    );
    let heal_ms = unix_ms();
    c.step("healing: node 1 reaches node 2 and the witness again");
    c.pair.cut_witness(1, false)?;
    both_links(c, true)?;
    c.resync(2, heal_ms)?;
    c.finish(wl, 2)?;
    Ok(())
}

/// Set `resync_max_mib_s` in node `id`'s config file and reload it with
/// SIGHUP; waits until the node's status shows the new cap.
fn throttle_resync(c: &mut Ctx, id: u16, mib_s: u64) -> Result<(), String> {
    let path = c.pair.config_path(id);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("resync_max_mib_s"))
        .collect();
    let new = format!("resync_max_mib_s = {mib_s}\n{}\n", kept.join("\n"));
    std::fs::write(&path, new).map_err(|e| format!("{}: {e}", path.display()))?;
    let pid = c.pair.pid(id).ok_or(format!("node {id} is not running"))?;
    // SAFETY: kill(2) with a pid this harness started and still supervises.
    if unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) } != 0 {
        return Err(format!(
            "SIGHUP to node {id}: {}",
            std::io::Error::last_os_error()
        ));
    }
    c.step(&format!(
        "node {id}: resync capped at {mib_s} MiB/s (config reloaded by SIGHUP)"
    ));
    c.wait_up_to("the reload shows in the status", c.opts.wait, &mut |p| {
        p.status(id)
            .ok()
            .and_then(|s| s["resync"]["max_mib_s"].as_f64())
            .is_some_and(|m| (m - mib_s as f64).abs() < 0.5)
    })?;
    Ok(())
}

/// 6: node 1 (the resync source) crashes during a resync: node 2, not up
/// to date, refuses to take over and says why; node 1 returns, the resync
/// resumes and ends byte-identical.
fn primary_crash_during_resync(c: &mut Ctx) -> Result<(), String> {
    // The client keeps writing to a small region (1 MiB, one activity-log
    // extent); the backlog is 24 MiB elsewhere, so a resync that resumes
    // is told apart from one that starts over. A resync under client load
    // runs at a few MiB/s in a debug build: allow 30 s per wait.
    c.opts.workload_blocks = 256;
    c.opts.client_writes_per_s = Some(200);
    c.opts.wait = c.opts.wait.max(Duration::from_secs(30));
    let wl = c.start_workload()?;
    c.step("kill -9 of node 2, then a 24 MiB backlog written by qemu-io");
    c.pair.kill9(2)?;
    let url = format!("nbd://{SERVICE_IP}:{}", c.opts.pair.nbd_port);
    c.pair.run_in_client_ns(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x77 16M 48M",
            "-c",
            "flush",
            &url,
        ],
    )?;
    let dirty = c.pair.status(1).map(|s| s["dirty_blocks"].clone());
    c.step(&format!(
        "node 1 dirty blocks before node 2 returns: {dirty:?}"
    ));
    // A 52 MiB resync takes well under a second here: cap node 1's rate
    // at run time (SIGHUP reload, as `systemctl reload` does) so that the
    // crash lands mid-resync whatever the machine's speed.
    throttle_resync(c, 1, 16)?;
    let back_ms = unix_ms();
    c.pair.start(2)?;
    c.wait_up_to("node 2's resync starts", c.opts.wait, &mut |p| {
        p.event_after(2, "resync_started", back_ms).is_some()
    })?;
    let first = c
        .pair
        .event_after(2, "resync_started", back_ms)
        .map(|e| number_before(&e.message, " blocks").unwrap_or(0));
    // Crash the source once it is well into the resync.
    let mut remaining_before = None;
    c.wait_up_to("the resync passes 40 %", c.opts.wait, &mut |p| {
        let s = p.status(1).ok();
        let left = s
            .as_ref()
            .and_then(|s| s["resync"]["remaining_blocks"].as_u64());
        let total = s
            .as_ref()
            .and_then(|s| s["resync"]["total_blocks"].as_u64());
        remaining_before = left;
        matches!((left, total), (Some(l), Some(t)) if t > 0 && l * 10 <= t * 6)
    })?;
    // Progress is persisted once a second (up to a second of it is redone
    // after a crash, by design): crash only once a metadata write landed
    // past the 40 % point, so "resumes" is what is tested, not the timing.
    let meta_writes = |p: &Pair| {
        p.status(1)
            .ok()
            .and_then(|s| s["counters"]["meta_writes"].as_u64())
    };
    let m40 = meta_writes(&c.pair);
    c.wait_up_to("node 1 persists its progress", c.opts.wait, &mut |p| {
        let left = p
            .status(1)
            .ok()
            .and_then(|s| s["resync"]["remaining_blocks"].as_u64());
        meta_writes(p) > m40 && left.is_some_and(|l| l > 0)
    })?;
    let fault_ms = unix_ms();
    c.step(&format!(
        "resync running ({first:?} blocks, {remaining_before:?} remaining): kill -9 of node 1"
    ));
    c.pair.kill9(1)?;
    let (_, w) = {
        let pair = &c.pair;
        watch_while(pair, || {
            let _ = wait_for(
                "node 2 says it cannot take over",
                Duration::from_secs(5),
                || pair.event_after(2, "cannot_take_over", fault_ms).is_some(),
            );
            std::thread::sleep(Duration::from_millis(1500));
        })
    };
    c.detect(2, &["peer_down", "cannot_take_over"], fault_ms);
    let why = c
        .pair
        .event_after(2, "cannot_take_over", fault_ms)
        .map(|e| e.message);
    c.check(
        "node 2 (inconsistent) says why it cannot take over",
        why.is_some(),
        why.clone().unwrap_or_default(),
    );
    c.check(
        "node 2 never became primary nor held the service address",
        w.second_primary.is_empty() && w.address_on_2 == 0,
        format!(
            "{:?}, address seen {} times",
            w.second_primary, w.address_on_2
        ),
    );
    c.check_notified(2, &["cannot_take_over"]);
    let again_ms = unix_ms();
    c.step("restarting node 1");
    c.pair.start(1)?;
    c.resync(1, again_ms)?;
    let second = c
        .pair
        .event_after(2, "resync_started", again_ms)
        .map(|e| number_before(&e.message, " blocks").unwrap_or(0));
    c.check(
        "the resync resumed rather than starting over",
        matches!((first, second), (Some(a), Some(b)) if b < a),
        format!(
            "first resync {first:?} blocks, {remaining_before:?} remaining at the crash, after the crash {second:?} blocks"
        ),
    );
    // No takeover here by design: clients wait for node 1 (their pause
    // covers the outage).
    c.finish(wl, 1)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_number_before_parses_event_messages() {
        assert_eq!(
            number_before(
                "resync finished as source after 1234 blocks: volumes in sync",
                " blocks"
            ),
            Some(1234)
        );
        assert_eq!(
            number_before("resync started as target: 7 blocks (full)", " blocks"),
            Some(7)
        );
        assert_eq!(number_before("no number here", " blocks"), None);
    }
}
