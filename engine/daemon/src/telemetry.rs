//! What `mslctl status --json` and the Prometheus endpoint show: the core's
//! status snapshot joined with the daemon's own counters (MSL frames, LAN
//! heartbeat path, NBD server, notifier) and the resync rate.
//!
//! Both renderings are built from the same [`Report`], so a counter shown by
//! one is shown by the other. The JSON keys are documented in
//! engine/daemon/README.md; existing keys never change meaning.
//!
//! The metrics endpoint is served by `tiny_http` (a small, well-kept HTTP/1.1
//! server) on its own thread. The Prometheus text format is a handful of
//! `name value` lines, written here directly (the NBD server's counters
//! already render themselves in it), so no encoding crate is needed. A
//! scrape asks the core thread for a status snapshot over the same channel
//! as `mslctl status` and waits at most two seconds: the core never waits
//! for a scraper.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use msl_core::config::WriteMode;
use msl_core::node::Status;
use serde_json::{json, Value};

use crate::driver::{Input, Shared};
use crate::inbox::Inbox;
use crate::lan::LanCounters;
use crate::notify::NotifyCounters;

/// Everything the status report reads besides the core's snapshot.
#[derive(Debug, Default)]
pub struct Telemetry {
    pub shared: Arc<Shared>,
    pub lan: Option<Arc<LanCounters>>,
    pub nbd: Option<Arc<msl_nbd::Counters>>,
    pub notify: Option<Arc<NotifyCounters>>,
    /// Names of the MSL interface and of the LAN adapters (config order).
    pub msl_interface: String,
    pub lan_interfaces: Vec<String>,
    pub block_size: u64,
}

fn lower<T: std::fmt::Debug>(v: T) -> String {
    format!("{v:?}").to_lowercase()
}

fn role_code(r: msl_wire::Role) -> u8 {
    r.to_u8()
}

/// Resync progress derived from the snapshot and the measured rate.
struct Resync {
    active: bool,
    done_blocks: u64,
    remaining_blocks: u64,
    total_blocks: u64,
    rate_bytes_s: u64,
    eta_s: Option<u64>,
}

fn resync(s: &Status, t: &Telemetry) -> Resync {
    let active = s.resync_total > 0;
    let rate = if active {
        t.shared.resync_rate_bytes_s.load(Ordering::Relaxed)
    } else {
        0
    };
    let left_bytes = s.resync_remaining * t.block_size.max(1);
    Resync {
        active,
        done_blocks: s.resync_total.saturating_sub(s.resync_remaining),
        remaining_blocks: s.resync_remaining,
        total_blocks: s.resync_total,
        rate_bytes_s: rate,
        eta_s: (active && rate > 0).then(|| left_bytes.div_ceil(rate)),
    }
}

/// Daemon-side counters as `(name, value)` pairs, shared by both renderings.
fn daemon_counters(t: &Telemetry) -> Vec<(&'static str, u64)> {
    let sh = &t.shared;
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut v = vec![
        ("msl_tx_frames", ld(&sh.msl_tx_frames)),
        ("msl_tx_direct", ld(&sh.msl_tx_direct)),
        ("msl_tx_bytes", ld(&sh.msl_tx_bytes)),
        ("msl_tx_dropped", ld(&sh.msl_tx_dropped)),
        ("msl_tx_errors", ld(&sh.msl_tx_errors)),
        ("msl_tx_encode_errors", ld(&sh.msl_tx_encode_errors)),
        ("msl_rx_frames", ld(&sh.msl_rx_frames)),
        ("msl_rx_bytes", ld(&sh.msl_rx_bytes)),
        ("msl_rx_dropped", ld(&sh.msl_rx_dropped)),
        ("msl_rx_bad_auth", ld(&sh.msl_rx_bad_auth)),
        ("msl_rx_ring_dropped", ld(&sh.msl_rx_ring_dropped)),
        ("client_bytes_written", ld(&sh.client_bytes_written)),
    ];
    if let Some(l) = &t.lan {
        let rx = l.rx.lock().map(|r| *r).unwrap_or_default();
        v.extend([
            ("lan_tx_packets", ld(&l.sent)),
            ("lan_tx_errors", ld(&l.send_errors)),
            ("lan_rx_delivered", ld(&l.delivered)),
            ("lan_rx_dropped", rx.dropped()),
            ("lan_rx_bad_auth", rx.bad_auth),
            ("lan_rx_queue_full", ld(&l.queue_full)),
        ]);
    }
    if let Some(n) = &t.notify {
        v.extend([
            ("notify_delivered", ld(&n.delivered)),
            ("notify_dropped", ld(&n.dropped)),
        ]);
    }
    v
}

fn core_counters(s: &Status) -> [(&'static str, u64); 13] {
    let c = &s.counters;
    [
        ("client_writes", c.client_writes),
        ("client_writes_refused", c.client_writes_refused),
        ("takeovers", c.takeovers),
        ("split_brains", c.split_brains),
        ("resync_blocks_sent", c.resync_blocks_sent),
        ("resync_blocks_received", c.resync_blocks_received),
        ("retransmits", c.retransmits),
        ("meta_writes", c.meta_writes),
        ("frames_from_stranger", c.frames_from_stranger),
        ("frames_wrong_generation", c.frames_wrong_generation),
        ("frames_unexpected", c.frames_unexpected),
        ("frames_unknown_ignored", c.frames_unknown_ignored),
        ("frames_unknown_refused", c.frames_unknown_refused),
    ]
}

fn adapters(s: &Status, t: &Telemetry) -> Vec<Value> {
    let n = usize::from(s.adapter_count)
        .max(t.lan_interfaces.len())
        .min(s.adapters.len());
    (0..n)
        .map(|i| {
            let a = s.adapters[i];
            json!({
                "index": i,
                "name": t.lan_interfaces.get(i).cloned().unwrap_or_default(),
                "link_up": a.link_up,
                "carrier": a.carrier,
                "working": a.working(),
                "peer_reachable": a.reachable,
            })
        })
        .collect()
}

fn verify_json(s: &Status) -> Value {
    let v = &s.verify;
    json!({
        "active": v.active,
        "start_block": v.start_block,
        "total_blocks": v.total_blocks,
        "checked_blocks": v.checked_blocks,
        "differing_blocks": v.differing_blocks,
        "first_differing": &v.first_differing[..usize::from(v.first_len)],
        "aborted": v.aborted,
        "runs": v.runs,
    })
}

/// A status snapshot as JSON (the `mslctl status --json` document).
pub fn status_json(s: &Status, t: &Telemetry) -> Value {
    let r = resync(s, t);
    let mut counters = serde_json::Map::new();
    for (k, v) in core_counters(s).into_iter().chain(daemon_counters(t)) {
        counters.insert(k.into(), v.into());
    }
    let nbd = t
        .nbd
        .as_ref()
        .map(|n| {
            let snap = n.snapshot();
            // Reuse the snapshot's own rendering: one `name value` per line.
            let mut m = serde_json::Map::new();
            for line in snap.prometheus("").lines() {
                if let Some((k, v)) = line.split_once(' ') {
                    m.insert(k.into(), v.parse::<u64>().unwrap_or(0).into());
                }
            }
            Value::Object(m)
        })
        .unwrap_or(Value::Null);
    let g = &s.gens;
    json!({
        "node": s.node_id,
        "peer": s.peer_id,
        "role": lower(s.role),
        "disk": lower(s.disk),
        "failed": s.failed,
        "write_mode": match s.write_mode { WriteMode::Sync => "sync", WriteMode::Async => "async" },
        "generation": format!("{:016x}", s.generation),
        "generations": {
            "current": format!("{:016x}", g.current),
            "bitmap": format!("{:016x}", g.bitmap),
            "history": g.history.iter().map(|h| format!("{h:016x}")).collect::<Vec<_>>(),
        },
        "connected": s.connected,
        "in_sync": s.in_sync,
        "msl_alive": s.msl_alive,
        "lan_alive": s.lan_alive,
        "msl": {
            "interface": t.msl_interface,
            "link_up": s.msl_link_up,
            "peer_heard": s.msl_alive,
        },
        "lan": adapters(s, t),
        "peer_role": s.peer_role.map(lower),
        "dirty_blocks": s.dirty_blocks,
        "dirty_bytes": s.dirty_blocks * t.block_size,
        "resync": {
            "active": r.active,
            "source": s.resync_source,
            "remaining_blocks": r.remaining_blocks,
            "total_blocks": r.total_blocks,
            "done_blocks": r.done_blocks,
            "remaining_bytes": r.remaining_blocks * t.block_size,
            "rate_mib_s": r.rate_bytes_s as f64 / f64::from(1u32 << 20),
            "eta_s": r.eta_s,
        },
        "pending_writes": s.pending_writes,
        "pending_flushes": s.pending_flushes,
        "switching": s.switching,
        "last_session_end": s.last_session_end,
        "verify": verify_json(s),
        "counters": counters,
        "nbd": nbd,
    })
}

/// The same report in Prometheus text exposition format (version 0.0.4).
pub fn prometheus(s: &Status, t: &Telemetry) -> String {
    let mut o = String::new();
    let r = resync(s, t);
    let gauges: [(&str, &str, u64); 14] = [
        (
            "role",
            "Role of this node (0 = secondary, 1 = primary).",
            u64::from(role_code(s.role)),
        ),
        (
            "in_sync",
            "1 when connected and in sync.",
            u64::from(s.in_sync),
        ),
        (
            "connected",
            "1 when the MSL session is up.",
            u64::from(s.connected),
        ),
        (
            "msl_alive",
            "1 when the peer is heard on the MSL.",
            u64::from(s.msl_alive),
        ),
        (
            "lan_alive",
            "1 when the peer is heard on the LAN.",
            u64::from(s.lan_alive),
        ),
        (
            "failed",
            "1 after an I/O failure latched the node fail-closed.",
            u64::from(s.failed),
        ),
        (
            "dirty_bytes",
            "Bytes out of sync with the peer.",
            s.dirty_blocks * t.block_size,
        ),
        (
            "resync_active",
            "1 while a resync runs.",
            u64::from(r.active),
        ),
        (
            "resync_remaining_blocks",
            "Blocks left to resync.",
            r.remaining_blocks,
        ),
        (
            "resync_total_blocks",
            "Blocks of the current resync.",
            r.total_blocks,
        ),
        (
            "resync_rate_bytes_per_second",
            "Measured resync rate.",
            r.rate_bytes_s,
        ),
        (
            "verify_checked_blocks",
            "Blocks compared by the current or last online verify.",
            s.verify.checked_blocks,
        ),
        (
            "verify_differing_blocks",
            "Blocks the current or last online verify found different.",
            s.verify.differing_blocks,
        ),
        (
            "pending_writes",
            "Client writes in flight in the core.",
            s.pending_writes as u64,
        ),
    ];
    for (name, help, v) in gauges {
        let _ = writeln!(
            o,
            "# HELP msl_{name} {help}\n# TYPE msl_{name} gauge\nmsl_{name} {v}"
        );
    }
    // One family at a time (the text format wants each family's samples
    // together).
    let ads = adapters(s, t);
    for family in ["working", "peer_reachable"] {
        let _ = writeln!(o, "# TYPE msl_lan_adapter_{family} gauge");
        for (i, a) in ads.iter().enumerate() {
            let _ = writeln!(
                o,
                "msl_lan_adapter_{family}{{adapter=\"{i}\",name=\"{}\"}} {}",
                a["name"].as_str().unwrap_or(""),
                u8::from(a[family] == true)
            );
        }
    }
    for (k, v) in core_counters(s).into_iter().chain(daemon_counters(t)) {
        let _ = writeln!(o, "# TYPE msl_{k}_total counter\nmsl_{k}_total {v}");
    }
    if let Some(n) = &t.nbd {
        o.push_str(&n.snapshot().prometheus("msl_nbd_"));
    }
    o
}

/// Ask the core for a status snapshot (never blocks the core: it answers on
/// a channel; a busy or stopped core makes this return `None` after 2 s).
pub fn core_status(inputs: &Inbox) -> Option<Status> {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let (tx, rx) = sync_channel(1);
    // The input queue may be momentarily full under heavy client load:
    // retry until the deadline rather than fail at once or block forever.
    let mut req = Input::Status(tx);
    loop {
        match inputs.try_send(req) {
            Ok(()) => break,
            Err(TrySendError::Full(back)) if std::time::Instant::now() < deadline => {
                req = back;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => return None,
        }
    }
    rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
        .ok()
}

/// The Prometheus endpoint: GET /metrics on `addr`.
pub struct MetricsServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    pub fn start(
        addr: SocketAddr,
        inputs: Inbox,
        telemetry: Arc<Telemetry>,
    ) -> Result<Self, String> {
        let server = tiny_http::Server::http(addr)
            .map_err(|e| format!("metrics_address {addr}: cannot listen: {e}"))?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| format!("metrics_address {addr}: not an IP listener"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("msl-metrics".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    let Ok(Some(req)) = server.recv_timeout(Duration::from_millis(100)) else {
                        continue;
                    };
                    let resp = if req.method() != &tiny_http::Method::Get {
                        tiny_http::Response::from_string("only GET\n").with_status_code(405)
                    } else if req.url() != "/metrics" {
                        tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                    } else {
                        match core_status(&inputs) {
                            Some(s) => tiny_http::Response::from_string(prometheus(&s, &telemetry))
                                .with_header(
                                    "Content-Type: text/plain; version=0.0.4"
                                        .parse::<tiny_http::Header>()
                                        .unwrap_or_else(|_| unreachable!()),
                                ),
                            None => tiny_http::Response::from_string(
                                "the daemon's core did not answer\n",
                            )
                            .with_status_code(503),
                        }
                    };
                    let _ = req.respond(resp);
                }
            })
            .map_err(|e| e.to_string())?;
        Ok(MetricsServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn sample() -> (Status, Telemetry) {
        let cfg = msl_core::Config::new(1, 2, 7, 64, 4096);
        let meta = msl_core::meta::Meta::create(7, 1, 64, 4096, Some(3));
        let mut n: msl_core::Node<Vec<u8>> = msl_core::Node::new(cfg, meta, 1, 0);
        for adapter in 0..2 {
            n.handle(
                0,
                msl_core::Event::LanAdapter {
                    adapter,
                    link_up: adapter == 0,
                    carrier: adapter == 0,
                },
            );
        }
        let t = Telemetry {
            nbd: Some(Arc::default()),
            lan: Some(Arc::default()),
            lan_interfaces: vec!["eth0".into(), "eth1".into()],
            msl_interface: "msl0".into(),
            block_size: 4096,
            ..Telemetry::default()
        };
        t.shared.msl_rx_bad_auth.store(3, Ordering::Relaxed);
        (n.status(), t)
    }

    #[test]
    fn test_prometheus_families_contiguous_typed_once_values_numeric() {
        let (s, t) = sample();
        let text = prometheus(&s, &t);
        let mut typed = HashSet::new();
        let mut finished = HashSet::new();
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(typed.insert(name), "TYPE twice: {line}");
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (name_labels, value) = line.rsplit_once(' ').unwrap();
            value
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("value: {line}"));
            let name = name_labels.split('{').next().unwrap().to_string();
            assert!(
                name.starts_with("msl_")
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
            if name != current {
                assert!(
                    finished.insert(current.clone()),
                    "family {name} split: {line}"
                );
                current = name;
            }
        }
        assert!(text.contains("msl_role 0\n"), "a fresh node is secondary");
        assert!(text.contains("msl_msl_rx_bad_auth_total 3\n"));
        assert!(text.contains("msl_lan_adapter_working{adapter=\"1\",name=\"eth1\"} 0\n"));
        assert!(text.contains("msl_nbd_req_write 0\n"));
    }

    #[test]
    fn test_status_json_adapters_named_and_counters_present() {
        let (s, t) = sample();
        let v = status_json(&s, &t);
        assert_eq!(v["lan"][0]["name"], "eth0");
        assert_eq!(v["lan"][0]["working"], true);
        assert_eq!(v["lan"][1]["working"], false);
        assert_eq!(v["msl"]["interface"], "msl0");
        assert_eq!(v["counters"]["msl_rx_bad_auth"], 3);
        assert_eq!(v["peer"], 2);
        assert_eq!(v["write_mode"], "sync");
        assert_eq!(v["resync"]["eta_s"], Value::Null);
        assert!(v["nbd"]["req_write"].is_u64());
    }
}
