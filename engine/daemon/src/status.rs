//! What `mslctl status --json` shows: the core's status snapshot joined
//! with the daemon's own counters (MSL frames, LAN heartbeat path, NBD
//! server, notifier) and the resync rate; and how a thread asks the core
//! for that snapshot ([`core_status`]).
//!
//! The Prometheus rendering (`metrics`) is built from the same parts, so a
//! counter shown by one is shown by the other. The JSON keys are documented
//! in engine/daemon/README.md; existing keys never change meaning.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use msl_core::config::WriteMode;
use msl_core::node::Status;
use serde_json::{json, Value};

use crate::config::RoleControl;
use crate::counters::Shared;
use crate::inbox::Inbox;
use crate::input::Input;
use crate::lan::LanCounters;
use crate::notify::NotifyCounters;

/// Everything the status report reads besides the core's snapshot.
#[derive(Debug, Default)]
pub struct Telemetry {
    pub shared: Arc<Shared>,
    pub lan: Option<Arc<LanCounters>>,
    pub nbd: Option<Arc<msl_nbd::Counters>>,
    /// The running NBD server: TLS mode, listeners, open connections.
    pub nbd_server: Option<NbdView>,
    pub notify: Option<Arc<NotifyCounters>>,
    /// Names of the MSL interface and of the LAN adapters (config order).
    pub msl_interface: String,
    pub lan_interfaces: Vec<String>,
    pub block_size: u64,
    /// The pair's `cluster_id` (the metrics' `cluster` label).
    pub cluster_id: Option<u64>,
    /// Running without a cluster key (`insecure_no_auth = true`): repeated
    /// by every status report.
    pub insecure_no_auth: bool,
    /// The pair's witness as this node sees it (`witness` configured).
    pub witness: Option<crate::witness::SharedView>,
}

/// Who decides this node's role (`role_control`), as status reports it:
/// set once at start by msld (one daemon per process; a node built
/// without it reports "self").
static ROLE_CONTROL: AtomicU8 = AtomicU8::new(0);

/// Record the node's `role_control` for status reports.
pub fn set_role_control(rc: RoleControl) {
    ROLE_CONTROL.store(u8::from(rc == RoleControl::Cluster), Ordering::Relaxed);
}

/// The node's `role_control`.
pub fn role_control() -> RoleControl {
    if ROLE_CONTROL.load(Ordering::Relaxed) == 1 {
        RoleControl::Cluster
    } else {
        RoleControl::SelfManaged
    }
}

/// The running NBD server as status and metrics read it.
#[derive(Clone)]
pub struct NbdView(pub msl_nbd::ServerHandle);

impl std::fmt::Debug for NbdView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdView")
            .field("listeners", &self.0.listeners())
            .finish_non_exhaustive()
    }
}

/// Connections listed one by one in the status (a flood of hundreds is
/// summed up, not listed).
pub const NBD_CLIENTS_LISTED: usize = 64;

/// Why the NBD server closed connections, by reason, from its counters:
/// `(reason, count)`, the names `mslctl status` and the metrics use.
pub fn nbd_refusals(c: &msl_nbd::CountersSnapshot) -> [(&'static str, u64); 10] {
    [
        ("not_allowed", c.refused_not_allowed),
        ("over_max_connections", c.connections_rejected),
        ("over_max_per_address", c.refused_per_address),
        ("handshake_evicted", c.handshakes_evicted),
        ("handshake_timeout", c.handshake_timeouts),
        ("too_many_options", c.too_many_options),
        ("tls_required", c.tls_required_refusals),
        ("tls_failed", c.tls_failures),
        ("idle_timeout", c.idle_timeouts),
        ("write_timeout", c.write_timeouts),
    ]
}

/// The `nbd_access` part of the status: who may connect and who is
/// connected. `Null` when the node runs no NBD server.
pub fn nbd_access_json(t: &Telemetry) -> Value {
    let Some(NbdView(h)) = &t.nbd_server else {
        return Value::Null;
    };
    let cfg = h.config();
    let mut conns = h.connections();
    conns.sort_by_key(|c| std::cmp::Reverse(c.age));
    let in_transmission = conns
        .iter()
        .filter(|c| c.phase == msl_nbd::ConnPhase::Transmission)
        .count();
    let clients: Vec<Value> = conns
        .iter()
        .take(NBD_CLIENTS_LISTED)
        .map(|c| {
            json!({
                "peer": c.peer.to_string(),
                "phase": lower(c.phase),
                "tls": c.tls,
                "age_s": c.age.as_secs(),
            })
        })
        .collect();
    let snap = h.counters().snapshot();
    let mut refused = serde_json::Map::new();
    for (k, v) in nbd_refusals(&snap) {
        refused.insert(k.into(), v.into());
    }
    json!({
        "tls": cfg.tls.to_string(),
        "tls_verify_peer": cfg.tls_verify_peer,
        "read_only": cfg.read_only,
        "allow": cfg.allow.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        "listeners": h.listeners().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "connections": conns.len(),
        "in_transmission": in_transmission,
        "clients": clients,
        "refused": refused,
    })
}

/// `nbd_access` as lines of text (what `mslctl status` prints).
pub fn nbd_access_text(s: &Value) -> Vec<String> {
    let a = &s["nbd_access"];
    if a.is_null() {
        return Vec::new();
    }
    let list = |v: &Value| -> String {
        let items: Vec<&str> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        items.join(", ")
    };
    let allow = list(&a["allow"]);
    let mut out = vec![format!(
        "NBD on {}: TLS {}{}, {}, clients from {}",
        list(&a["listeners"]),
        a["tls"].as_str().unwrap_or("?"),
        if a["tls_verify_peer"] == true {
            " (client certificates required)"
        } else {
            ""
        },
        if a["read_only"] == true {
            "read-only"
        } else {
            "read-write"
        },
        if allow.is_empty() { "anywhere" } else { &allow },
    )];
    let refused: Vec<String> = a["refused"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    out.push(format!(
        "NBD connections: {} open, {} in transmission; refused: {}",
        a["connections"],
        a["in_transmission"],
        if refused.is_empty() {
            "none".to_string()
        } else {
            refused.join(", ")
        }
    ));
    for c in a["clients"].as_array().into_iter().flatten() {
        out.push(format!(
            "  NBD client {}: {}{}, {} s",
            c["peer"].as_str().unwrap_or("?"),
            c["phase"].as_str().unwrap_or("?"),
            if c["tls"] == true {
                ", TLS"
            } else {
                ", plain text"
            },
            c["age_s"],
        ));
    }
    out
}

/// `witness` as lines of text (what `mslctl status` prints; none without
/// a witness).
pub fn witness_text(s: &Value) -> Vec<String> {
    let w = &s["witness"];
    if w.is_null() {
        return Vec::new();
    }
    let c = &w["counters"];
    let holder = match w["holder"].as_u64() {
        Some(h) => format!("node {h}"),
        None => "none".into(),
    };
    vec![
        format!(
            "witness {} ({}, on_no_quorum {}): lease {}, holder {holder}{}",
            w["address"].as_str().unwrap_or("?"),
            if w["reachable"] == true {
                "reachable"
            } else {
                "UNREACHABLE"
            },
            w["on_no_quorum"].as_str().unwrap_or("?"),
            if w["held"] == true {
                format!("held ({} ms left)", w["remaining_ms"])
            } else if w["wanted"] == true {
                "wanted, not held".to_string()
            } else {
                "not wanted".to_string()
            },
            match w["last_reply_ms_ago"].as_u64() {
                Some(ms) => format!(", last reply {ms} ms ago"),
                None => ", no reply yet".into(),
            },
        ),
        format!(
            "witness requests {}, grants {}, refusals {}, stale {}, bad tag {}, malformed {}, \
             not for us {}, witness restarts {}, stalls {}, send errors {}",
            c["sent"],
            c["granted"],
            c["refused"],
            c["stale"],
            c["bad_tag"],
            c["malformed"],
            c["not_for_us"],
            c["witness_restarts"],
            c["stalls"],
            c["send_errors"],
        ),
    ]
}

fn lower<T: std::fmt::Debug>(v: T) -> String {
    format!("{v:?}").to_lowercase()
}

pub(crate) fn role_code(r: msl_wire::Role) -> u8 {
    r.to_u8()
}

/// Resync progress derived from the snapshot and the measured rate.
pub(crate) struct Resync {
    pub(crate) active: bool,
    pub(crate) done_blocks: u64,
    pub(crate) remaining_blocks: u64,
    pub(crate) total_blocks: u64,
    pub(crate) rate_bytes_s: u64,
    pub(crate) eta_s: Option<u64>,
}

pub(crate) fn resync(s: &Status, t: &Telemetry) -> Resync {
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
pub(crate) fn daemon_counters(t: &Telemetry) -> Vec<(&'static str, u64)> {
    let sh = &t.shared;
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let mut v = vec![
        ("msl_tx_frames", ld(&sh.msl_tx_frames)),
        ("msl_tx_direct", ld(&sh.msl_tx_direct)),
        ("disk_writes_here", ld(&sh.disk_writes_here)),
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
        ("meta_bytes_written", ld(&sh.meta_bytes_written)),
        // Times the core found input lost because it did not run in time.
        ("input_overruns", ld(&sh.input_overruns)),
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
            ("lan_rx_kernel_dropped", ld(&l.kernel_dropped)),
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

pub(crate) fn core_counters(s: &Status) -> [(&'static str, u64); 17] {
    let c = &s.counters;
    [
        ("client_writes", c.client_writes),
        ("client_writes_refused", c.client_writes_refused),
        ("takeovers", c.takeovers),
        ("split_brains", c.split_brains),
        ("resync_blocks_sent", c.resync_blocks_sent),
        ("resync_zero_blocks_sent", c.resync_zero_blocks_sent),
        ("resync_blocks_received", c.resync_blocks_received),
        ("retransmits", c.retransmits),
        ("meta_writes", c.meta_writes),
        ("frames_from_stranger", c.frames_from_stranger),
        ("frames_wrong_generation", c.frames_wrong_generation),
        ("frames_unexpected", c.frames_unexpected),
        ("frames_unknown_ignored", c.frames_unknown_ignored),
        ("frames_unknown_refused", c.frames_unknown_refused),
        ("frames_replayed", c.frames_replayed),
        ("stalls", c.stalls),
        ("deposed", c.deposed),
    ]
}

pub(crate) fn adapters(s: &Status, t: &Telemetry) -> Vec<Value> {
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
        "hole_blocks": v.hole_blocks,
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
            "min_mib_s": t.shared.resync_min_bytes_s.load(Ordering::Relaxed) >> 20,
            "max_mib_s": t.shared.resync_max_bytes_s.load(Ordering::Relaxed) >> 20,
        },
        "insecure_no_auth": t.insecure_no_auth,
        "role_control": role_control().as_str(),
        "pending_writes": s.pending_writes,
        "pending_flushes": s.pending_flushes,
        "switching": s.switching,
        "last_session_end": s.last_session_end,
        "verify": verify_json(s),
        "counters": counters,
        "nbd": nbd,
        "nbd_access": nbd_access_json(t),
        "witness": witness_json(t),
    })
}

/// The `witness` part of the status: `null` without a witness.
pub fn witness_json(t: &Telemetry) -> Value {
    t.witness
        .as_ref()
        .and_then(|v| v.lock().ok().map(|v| json!(*v)))
        .unwrap_or(Value::Null)
}

/// The witness's counters as `(name, value)`, for the metrics.
pub(crate) fn witness_counters(v: &crate::witness::WitnessView) -> [(&'static str, u64); 12] {
    let c = &v.counters;
    [
        ("requests", c.client.sent),
        ("grants", c.client.granted),
        ("refusals", c.client.refused),
        ("stale", c.client.stale),
        ("misaddressed", c.client.not_for_us),
        ("bad_tag", c.client.bad_tag),
        ("malformed", c.client.malformed),
        ("restarts", c.client.witness_restarts),
        ("stalls", c.client.stalls),
        ("send_errors", c.send_errors),
        ("foreign", c.foreign),
        ("long_leases", c.long_leases),
    ]
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> (Status, Telemetry) {
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
            witness: Some(Arc::new(std::sync::Mutex::new(
                crate::witness::WitnessView {
                    address: "10.0.0.9:7790".into(),
                    holder: Some(1),
                    held: true,
                    ..crate::witness::WitnessView::default()
                },
            ))),
            ..Telemetry::default()
        };
        t.shared.msl_rx_bad_auth.store(3, Ordering::Relaxed);
        (n.status(), t)
    }

    #[test]
    fn test_witness_in_status_json_and_text() {
        let (s, mut t) = sample();
        let v = status_json(&s, &t);
        assert_eq!(v["witness"]["address"], "10.0.0.9:7790");
        assert_eq!(v["witness"]["counters"]["granted"], 0);
        let text = witness_text(&v).join("\n");
        assert!(
            text.contains("witness 10.0.0.9:7790") && text.contains("holder node 1"),
            "{text}"
        );
        t.witness = None;
        let v = status_json(&s, &t);
        assert!(v["witness"].is_null());
        assert!(witness_text(&v).is_empty());
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
        assert_eq!(v["role_control"], "self");
        set_role_control(RoleControl::Cluster);
        assert_eq!(status_json(&s, &t)["role_control"], "cluster");
        set_role_control(RoleControl::SelfManaged);
        assert_eq!(status_json(&s, &t)["role_control"], "self");
    }

    /// A real NBD server: a peer outside the allow list is counted by
    /// reason, an open connection is listed with its phase.
    #[test]
    fn test_nbd_access_shows_tls_mode_connections_and_refusals() {
        use std::io::Read;
        let (s, mut t) = sample();
        assert_eq!(status_json(&s, &t)["nbd_access"], Value::Null);
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let backend = Arc::new(msl_nbd::FileBackend::open(file.path(), false).unwrap());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cfg = msl_nbd::ServerConfig {
            allow: vec!["127.0.0.1/32".parse().unwrap()],
            read_only: true,
            ..msl_nbd::ServerConfig::default()
        };
        let addr = "127.0.0.1:0".parse().unwrap();
        let h = crate::service::start_nbd(&[addr], backend, cfg, stop.clone()).unwrap();
        let bound = h.listeners()[0];
        t.nbd_server = Some(NbdView(h.clone()));
        // Allowed: greeted, and listed while it sits in the handshake.
        let mut ok = std::net::TcpStream::connect(bound).unwrap();
        let mut magic = [0u8; 8];
        ok.read_exact(&mut magic).unwrap();
        assert_eq!(&magic, b"NBDMAGIC");
        // A source outside the allow list (127.0.0.2) gets no byte.
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(
            &"127.0.0.2:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
        sock.connect(&bound.into()).unwrap();
        let mut stranger: std::net::TcpStream = sock.into();
        stranger
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(stranger.read(&mut magic).unwrap_or(0), 0);
        let v = status_json(&s, &t);
        let a = &v["nbd_access"];
        assert_eq!(a["tls"], "off");
        assert_eq!(a["read_only"], true);
        assert_eq!(a["allow"][0], "127.0.0.1/32");
        assert_eq!(a["listeners"][0], bound.to_string());
        assert_eq!(a["connections"], 1);
        assert_eq!(a["in_transmission"], 0);
        assert_eq!(a["clients"][0]["phase"], "handshake");
        assert_eq!(a["clients"][0]["tls"], false);
        assert_eq!(a["refused"]["not_allowed"], 1);
        assert_eq!(a["refused"]["tls_failed"], 0);
        let text = nbd_access_text(&v).join("\n");
        assert!(text.contains("TLS off"), "{text}");
        assert!(text.contains("refused: not_allowed 1"), "{text}");
        assert!(text.contains("1 open, 0 in transmission"), "{text}");
        stop.store(true, Ordering::Relaxed);
        drop(ok);
    }
}
