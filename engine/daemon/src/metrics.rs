//! The Prometheus endpoint: the status report (`status`) rendered in the
//! Prometheus text format.
//!
//! The endpoint is served by `tiny_http` (a small, well-kept HTTP/1.1
//! server) on its own thread. The Prometheus text format is a handful of
//! `name value` lines, written here directly (the NBD server's counters
//! already render themselves in it), so no encoding crate is needed. A
//! scrape asks the core thread for a status snapshot over the same channel
//! as `mslctl status` and waits at most two seconds: the core never waits
//! for a scraper.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use msl_core::node::Status;

use crate::inbox::Inbox;
use crate::status::{
    adapters, core_counters, core_status, daemon_counters, resync, role_code, Telemetry,
};

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
}
