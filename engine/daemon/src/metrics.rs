//! The Prometheus endpoint: the status report (`status`) rendered in the
//! Prometheus text format.
//!
//! The endpoint is served by `tiny_http` (a small, well-kept HTTP/1.1
//! server) on its own thread. The text is written here directly in the
//! Prometheus conventions (`promtool check metrics` clean): every family
//! has HELP and TYPE, counters end in `_total`, units are base units
//! (bytes, seconds), every sample carries `node` and `peer` labels (and
//! `cluster` when the caller knows it), states are labelled gauges
//! (`msl_role{role=...}`, `msl_disk_state{state=...}`), the MSL's counters
//! are `msl_link_*`, `msl_build_info` carries the version, and client
//! write latency and the MSL round trip (`msl_link_rtt_seconds`) are
//! histograms. A
//! scrape asks the core thread for a status snapshot over the same channel
//! as `mslctl status` and waits at most two seconds: the core never waits
//! for a scraper.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use msl_core::node::Status;

use crate::inbox::Inbox;
use crate::status::{
    adapters, core_counters, core_status, daemon_counters, resync, role_code, Telemetry,
};

/// Latency histogram with fixed buckets (seconds), lock-free to record.
#[derive(Debug)]
pub struct Histogram {
    bounds_us: &'static [u64],
    buckets: Vec<AtomicU64>,
    count: AtomicU64,
    sum_us: AtomicU64,
}

/// Bucket bounds for client write latency: 50 µs to 10 s.
pub const WRITE_LATENCY_BOUNDS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 10_000_000,
];

impl Histogram {
    pub fn new(bounds_us: &'static [u64]) -> Self {
        Histogram {
            bounds_us,
            buckets: bounds_us.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn record(&self, d: Duration) {
        self.record_us(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// Record one sample of `us` microseconds.
    pub fn record_us(&self, us: u64) {
        if let Some(i) = self.bounds_us.iter().position(|&b| us <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The `_bucket` (cumulative), `_sum` and `_count` samples.
    fn render(&self, o: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, n) in self.bounds_us.iter().zip(&self.buckets) {
            cum += n.load(Ordering::Relaxed);
            let le = *b as f64 / 1e6;
            let _ = writeln!(o, "{name}_bucket{{{labels},le=\"{le}\"}} {cum}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(o, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(o, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(o, "{name}_count{{{labels}}} {count}");
    }
}

/// Client write latency (request queued to the core until its reply),
/// recorded by the driver. One msld per process: process-wide.
pub fn client_write_latency() -> &'static Histogram {
    static H: OnceLock<Histogram> = OnceLock::new();
    H.get_or_init(|| Histogram::new(&WRITE_LATENCY_BOUNDS_US))
}

/// Bucket bounds for the MSL round trip: 10 µs (a direct link) to 1 s
/// (retransmission territory).
pub const MSL_RTT_BOUNDS_US: [u64; 15] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000,
];

/// MSL round trips: one sample per acknowledged message whose first
/// transmission was acknowledged (the reliable layer's RTT samples, which
/// also drive its retransmission timeout). Process-wide, as
/// [`client_write_latency`]; the core thread records each sample the core
/// hands over.
pub fn msl_rtt() -> &'static Histogram {
    static H: OnceLock<Histogram> = OnceLock::new();
    H.get_or_init(|| Histogram::new(&MSL_RTT_BOUNDS_US))
}

/// Labels on every sample: which node of which pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Labels {
    pub node: u16,
    pub peer: u16,
    /// The pair's `cluster_id` (None: not known to the caller).
    pub cluster: Option<u64>,
}

impl Labels {
    fn render(&self) -> String {
        let mut l = format!("node=\"{}\",peer=\"{}\"", self.node, self.peer);
        if let Some(c) = self.cluster {
            let _ = write!(l, ",cluster=\"{c:016x}\"");
        }
        l
    }
}

struct Out {
    o: String,
    labels: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.o, "# HELP msl_{name} {help}\n# TYPE msl_{name} {kind}");
    }

    fn sample(&mut self, name: &str, extra: &str, v: impl std::fmt::Display) {
        let sep = if extra.is_empty() { "" } else { "," };
        let _ = writeln!(self.o, "msl_{name}{{{}{sep}{extra}}} {v}", self.labels);
    }

    /// One family whose samples differ by the one label `label`.
    fn labelled<K: std::fmt::Display, V: std::fmt::Display>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        label: &str,
        samples: impl IntoIterator<Item = (K, V)>,
    ) {
        self.family(name, kind, help);
        for (k, v) in samples {
            self.sample(name, &format!("{label}=\"{k}\""), v);
        }
    }

    fn gauge(&mut self, name: &str, help: &str, v: u64) {
        self.family(name, "gauge", help);
        self.sample(name, "", v);
    }

    fn counter(&mut self, name: &str, help: &str, v: u64) {
        let name = format!("{name}_total");
        self.family(&name, "counter", help);
        self.sample(&name, "", v);
    }
}

/// The daemon counter's metric name: the MSL's counters are `link_*`.
fn daemon_metric(k: &str) -> String {
    match k.strip_prefix("msl_") {
        Some(rest) => format!("link_{rest}"),
        None => k.to_string(),
    }
}

/// The same report in the Prometheus text exposition format (0.0.4),
/// node and peer labels from the snapshot.
pub fn prometheus(s: &Status, t: &Telemetry) -> String {
    prometheus_labelled(
        s,
        t,
        Labels {
            node: s.node_id,
            peer: s.peer_id,
            cluster: t.cluster_id,
        },
    )
}

/// The report with the given labels on every sample.
pub fn prometheus_labelled(s: &Status, t: &Telemetry, labels: Labels) -> String {
    let mut o = Out {
        o: String::new(),
        labels: labels.render(),
    };
    let r = resync(s, t);
    o.family("build_info", "gauge", "msld's version (always 1).");
    o.sample(
        "build_info",
        &format!("version=\"{}\"", env!("CARGO_PKG_VERSION")),
        1,
    );
    o.labelled(
        "role",
        "gauge",
        "1 for the role this node has (label role).",
        "role",
        [msl_wire::Role::Primary, msl_wire::Role::Secondary].map(|role| {
            // By wire code, as the status document compares roles.
            let has = role_code(s.role) == role_code(role);
            (format!("{role:?}").to_lowercase(), u8::from(has))
        }),
    );
    o.labelled(
        "disk_state",
        "gauge",
        "1 for the state of this node's copy of the volume (label state).",
        "state",
        [
            msl_wire::DiskState::UpToDate,
            msl_wire::DiskState::Outdated,
            msl_wire::DiskState::Inconsistent,
            msl_wire::DiskState::Failed,
        ]
        .map(|d| (format!("{d:?}").to_lowercase(), u8::from(s.disk == d))),
    );
    let gauges: [(&str, &str, u64); 14] = [
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
            "link_alive",
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
            "verify_hole_blocks",
            "Blocks the current or last online verify found a hole on both sides (compared without reading them).",
            s.verify.hole_blocks,
        ),
        (
            "pending_writes",
            "Client writes in flight in the core.",
            s.pending_writes as u64,
        ),
    ];
    for (name, help, v) in gauges {
        o.gauge(name, help, v);
    }
    let ads = adapters(s, t);
    for (family, help) in [
        ("working", "1 when the LAN adapter has link and carrier."),
        (
            "peer_reachable",
            "1 when the peer is heard on this LAN adapter.",
        ),
    ] {
        let name = format!("lan_adapter_{family}");
        o.family(&name, "gauge", help);
        for (i, a) in ads.iter().enumerate() {
            let l = format!(
                "adapter=\"{i}\",name=\"{}\"",
                a["name"].as_str().unwrap_or("")
            );
            o.sample(&name, &l, u8::from(a[family] == true));
        }
    }
    for (k, v) in core_counters(s) {
        o.counter(k, &format!("Core counter {k}."), v);
    }
    for (k, v) in daemon_counters(t) {
        o.counter(&daemon_metric(k), &format!("Daemon counter {k}."), v);
    }
    if let Some(v) = t
        .witness
        .as_ref()
        .and_then(|v| v.lock().ok().map(|v| v.clone()))
    {
        witness(&mut o, &v);
    }
    if let Some(n) = &t.nbd {
        nbd(&mut o, &n.snapshot());
    }
    if let Some(crate::status::NbdView(h)) = &t.nbd_server {
        nbd_access(&mut o, h);
    }
    client_write_latency().render(
        &mut o.o,
        "msl_client_write_latency_seconds",
        "Client write latency: from the request reaching the core to its acknowledgement.",
        &o.labels.clone(),
    );
    msl_rtt().render(
        &mut o.o,
        "msl_link_rtt_seconds",
        "MSL round trip: from a message's first transmission to the acknowledgement that covers it.",
        &o.labels.clone(),
    );
    o.o
}

/// The witness as this node sees it: reachable, lease held, the lease
/// client's counters.
fn witness(o: &mut Out, v: &crate::witness::WitnessView) {
    o.gauge(
        "witness_reachable",
        "1 unless the witness gave no reply for a dead interval while the lease was wanted.",
        u64::from(v.reachable),
    );
    o.gauge(
        "witness_lease_held",
        "1 while this node holds the witness lease.",
        u64::from(v.held),
    );
    o.gauge(
        "witness_lease_wanted",
        "1 while this node asks for the witness lease.",
        u64::from(v.wanted),
    );
    for (k, n) in crate::status::witness_counters(v) {
        o.counter(
            &format!("witness_{k}"),
            &format!("Witness lease client counter {k}."),
            n,
        );
    }
}

/// Who may reach the NBD server and who was turned away: refusals by
/// reason (the names `mslctl status` prints), open connections, TLS mode.
fn nbd_access(o: &mut Out, h: &msl_nbd::ServerHandle) {
    o.labelled(
        "nbd_refused_total",
        "counter",
        "NBD connections closed by the access rules, by reason.",
        "reason",
        crate::status::nbd_refusals(&h.counters().snapshot()),
    );
    o.gauge(
        "nbd_connections",
        "NBD connections open now (handshake or transmission).",
        h.connections().len() as u64,
    );
    let mode = h.config().tls;
    o.labelled(
        "nbd_tls_mode",
        "gauge",
        "1 for the NBD server's TLS mode (label mode: off, on, require).",
        "mode",
        [
            msl_nbd::TlsMode::Off,
            msl_nbd::TlsMode::On,
            msl_nbd::TlsMode::Require,
        ]
        .map(|m| (m, u8::from(m == mode))),
    );
}

fn nbd(o: &mut Out, n: &msl_nbd::CountersSnapshot) {
    o.labelled(
        "nbd_requests_total",
        "counter",
        "NBD requests by command.",
        "op",
        [
            ("read", n.req_read),
            ("write", n.req_write),
            ("flush", n.req_flush),
            ("trim", n.req_trim),
            ("write_zeroes", n.req_write_zeroes),
            ("block_status", n.req_block_status),
            ("disc", n.req_disc),
            ("unknown", n.req_unknown),
        ],
    );
    o.labelled(
        "nbd_errors_total",
        "counter",
        "NBD replies with an error, by errno.",
        "errno",
        [
            ("einval", n.err_einval),
            ("enospc", n.err_enospc),
            ("eperm", n.err_eperm),
            ("eio", n.err_eio),
            ("other", n.err_other),
        ],
    );
    o.labelled(
        "nbd_busy_polls_total",
        "counter",
        "Busy polls for the next request, by result.",
        "result",
        [("hit", n.busy_poll_hits), ("miss", n.busy_poll_misses)],
    );
    o.counter("nbd_read_bytes", "Bytes read by NBD clients.", n.bytes_read);
    o.counter(
        "nbd_written_bytes",
        "Bytes written by NBD clients.",
        n.bytes_written,
    );
    o.gauge(
        "nbd_connections_active",
        "NBD connections open now.",
        n.connections_active,
    );
    for (k, v) in [
        ("connections_accepted", n.connections_accepted),
        ("connections_rejected", n.connections_rejected),
        ("refused_not_allowed", n.refused_not_allowed),
        ("refused_per_address", n.refused_per_address),
        ("handshakes_evicted", n.handshakes_evicted),
        ("handshake_timeouts", n.handshake_timeouts),
        ("handshake_failures", n.handshake_failures),
        ("handshakes_completed", n.handshakes_completed),
        ("too_many_options", n.too_many_options),
        ("options_unsupported", n.options_unsupported),
        ("tls_required_refusals", n.tls_required_refusals),
        ("starttls_refused", n.starttls_refused),
        ("tls_handshakes", n.tls_handshakes),
        ("tls_failures", n.tls_failures),
        ("idle_timeouts", n.idle_timeouts),
        ("write_timeouts", n.write_timeouts),
        ("bad_flags", n.bad_flags),
        ("bad_magic", n.bad_magic),
        ("oversized_writes", n.oversized_writes),
        ("reply_send_failures", n.reply_send_failures),
    ] {
        o.counter(&format!("nbd_{k}"), &format!("NBD server counter {k}."), v);
    }
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
    use crate::status::tests::sample;
    use std::collections::HashSet;
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    #[test]
    fn test_prometheus_families_contiguous_typed_once_values_numeric() {
        let (s, t) = sample();
        client_write_latency().record(Duration::from_micros(700));
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
            assert!(name_labels.contains("node=\"1\",peer=\"2\""), "{line}");
            let name = name_labels.split('{').next().unwrap().to_string();
            assert!(
                name.starts_with("msl_")
                    && !name.starts_with("msl_msl_")
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count")
                .to_string();
            if family != current {
                assert!(
                    finished.insert(current.clone()),
                    "family {family} split: {line}"
                );
                current = family;
            }
        }
        let l = "node=\"1\",peer=\"2\"";
        assert!(text.contains(&format!("msl_role{{{l},role=\"secondary\"}} 1\n")));
        assert!(text.contains(&format!("msl_role{{{l},role=\"primary\"}} 0\n")));
        assert!(text.contains(&format!("msl_disk_state{{{l},state=\"uptodate\"}} 1\n")));
        assert!(text.contains(&format!("msl_link_rx_bad_auth_total{{{l}}} 3\n")));
        assert!(text.contains(&format!(
            "msl_lan_adapter_working{{{l},adapter=\"1\",name=\"eth1\"}} 0\n"
        )));
        assert!(text.contains(&format!("msl_nbd_requests_total{{{l},op=\"write\"}} 0\n")));
        assert!(text.contains(&format!(
            "msl_build_info{{{l},version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        )));
        // 700 µs falls in the 1 ms bucket, not the 500 µs one (cumulative).
        let bucket = |le: &str| -> u64 {
            let key = format!("msl_client_write_latency_seconds_bucket{{{l},le=\"{le}\"}} ");
            let at = text.find(&key).unwrap_or_else(|| panic!("{key}\n{text}"));
            text[at + key.len()..]
                .lines()
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        assert!(bucket("0.001") > bucket("0.0005"), "{text}");
        assert_eq!(bucket("+Inf"), bucket("10"));
    }

    /// Round-trip samples land in their buckets (cumulative), with sum
    /// and count; the family is a histogram in seconds.
    #[test]
    fn test_verify_hole_blocks_in_metrics_and_status() {
        let (mut s, t) = sample();
        s.verify.checked_blocks = 1 << 30;
        s.verify.hole_blocks = (1 << 30) - 1024;
        let text = prometheus(&s, &t);
        let line = text
            .lines()
            .find(|l| l.starts_with("msl_verify_hole_blocks{"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            line.ends_with(&format!(" {}", (1u64 << 30) - 1024)),
            "{line}"
        );
        let j = crate::status::status_json(&s, &t);
        assert_eq!(j["verify"]["hole_blocks"], (1u64 << 30) - 1024, "{j}");
    }

    #[test]
    fn test_msl_rtt_histogram() {
        let h = Histogram::new(&MSL_RTT_BOUNDS_US);
        for us in [8, 40, 40, 900, 3_000_000] {
            h.record_us(us);
        }
        let mut text = String::new();
        h.render(&mut text, "msl_link_rtt_seconds", "RTT.", "node=\"1\"");
        let v = |s: &str| -> f64 {
            let line = text
                .lines()
                .find(|l| l.starts_with(s))
                .unwrap_or_else(|| panic!("{s}\n{text}"));
            line.rsplit_once(' ').unwrap().1.parse().unwrap()
        };
        assert!(text.contains("# TYPE msl_link_rtt_seconds histogram"));
        assert_eq!(
            v("msl_link_rtt_seconds_bucket{node=\"1\",le=\"0.00001\"}"),
            1.0
        );
        assert_eq!(
            v("msl_link_rtt_seconds_bucket{node=\"1\",le=\"0.00005\"}"),
            3.0
        );
        assert_eq!(
            v("msl_link_rtt_seconds_bucket{node=\"1\",le=\"0.001\"}"),
            4.0
        );
        assert_eq!(v("msl_link_rtt_seconds_bucket{node=\"1\",le=\"1\"}"), 4.0);
        assert_eq!(
            v("msl_link_rtt_seconds_bucket{node=\"1\",le=\"+Inf\"}"),
            5.0
        );
        assert_eq!(v("msl_link_rtt_seconds_count{"), 5.0);
        assert!((v("msl_link_rtt_seconds_sum{") - 3.000988).abs() < 1e-9);
        // The daemon's endpoint carries the process-wide histogram.
        msl_rtt().record_us(120);
        let (s, t) = sample();
        let all = prometheus(&s, &t);
        assert!(
            all.contains("# TYPE msl_link_rtt_seconds histogram"),
            "{all}"
        );
        assert!(all.contains("msl_link_rtt_seconds_bucket{node=\"1\",peer=\"2\",le=\"0.00025\"} "));
    }

    #[test]
    fn test_cluster_label_when_known() {
        let (s, t) = sample();
        let text = prometheus_labelled(
            &s,
            &t,
            Labels {
                node: 1,
                peer: 2,
                cluster: Some(0x6d73),
            },
        );
        assert!(text.contains("msl_in_sync{node=\"1\",peer=\"2\",cluster=\"0000000000006d73\"} "));
    }

    #[test]
    fn test_promtool_check_metrics_passes_without_warnings() {
        let (s, mut t) = sample();
        // With the NBD access families and the cluster label, as msld
        // serves them.
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        let backend = Arc::new(msl_nbd::FileBackend::open(f.path(), false).unwrap());
        let server = msl_nbd::Server::with_listeners(
            &[],
            "msl".into(),
            backend,
            msl_nbd::ServerConfig {
                tls: msl_nbd::TlsMode::Off,
                ..msl_nbd::ServerConfig::default()
            },
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
        t.nbd_server = Some(crate::status::NbdView(server.handle()));
        t.cluster_id = Some(0x6d73);
        let text = prometheus(&s, &t);
        assert!(
            text.contains("msl_nbd_tls_mode{node=\"1\",peer=\"2\",cluster=\"0000000000006d73\",mode=\"off\"} 1"),
            "{text}"
        );
        assert!(text.contains("mode=\"require\"} 0"), "{text}");
        assert!(
            text.contains("msl_nbd_refused_total{") && text.contains("reason=\"tls_required\"} 0")
        );
        assert!(text.contains("# TYPE msl_nbd_connections gauge"));
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool (apt-get install prometheus; scripts/setup.sh)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{said}\n{text}");
        assert!(said.trim().is_empty(), "promtool warns:\n{said}");
    }
}
