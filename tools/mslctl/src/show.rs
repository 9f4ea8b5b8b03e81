//! What `mslctl` prints: the status text, events as text, and the current
//! state as `exists` events (`events --now`).

use msl_control::Event;
use serde_json::{json, Map, Value};

fn yes_no(v: &Value, yes: &'static str, no: &'static str) -> &'static str {
    if v == true {
        yes
    } else {
        no
    }
}

pub fn print_status(s: &Value) {
    let r = &s["resync"];
    let g = &s["generations"];
    if s["insecure_no_auth"] == true {
        println!(
            "WARNING: insecure_no_auth = true: MSL and LAN packets are NOT authenticated \
             (anyone on those networks can forge a takeover); set key_file"
        );
    }
    println!(
        "node {}: {} (disk {}{}), write mode {}",
        s["node"],
        s["role"].as_str().unwrap_or("?"),
        s["disk"].as_str().unwrap_or("?"),
        yes_no(&s["failed"], ", FAILED: fail-closed", ""),
        s["write_mode"].as_str().unwrap_or("?"),
    );
    println!(
        "peer: node {} ({}) | connected {} | in sync {}",
        s["peer"],
        s["peer_role"].as_str().unwrap_or("unknown"),
        s["connected"],
        s["in_sync"]
    );
    if s["role_control"] == "cluster" {
        println!(
            "role control: cluster (msld never becomes primary by itself; \
             the cluster manager promotes and demotes it)"
        );
    }
    let m = &s["msl"];
    println!(
        "MSL {}: link {}, peer {}",
        m["interface"].as_str().unwrap_or("?"),
        yes_no(&m["link_up"], "up", "DOWN"),
        yes_no(&m["peer_heard"], "heard", "NOT HEARD"),
    );
    for a in s["lan"].as_array().into_iter().flatten() {
        println!(
            "LAN adapter {} {}: link {}, carrier {}, peer heartbeats {}",
            a["index"],
            a["name"].as_str().unwrap_or("?"),
            yes_no(&a["link_up"], "up", "DOWN"),
            yes_no(&a["carrier"], "yes", "NO"),
            yes_no(&a["peer_reachable"], "arriving", "MISSING"),
        );
    }
    println!(
        "generations: current {} bitmap {} history {}",
        g["current"].as_str().unwrap_or("?"),
        g["bitmap"].as_str().unwrap_or("?"),
        g["history"]
    );
    println!(
        "dirty: {} blocks ({:.1} MiB)",
        s["dirty_blocks"],
        s["dirty_bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0
    );
    if r["min_mib_s"].is_u64() {
        let max = r["max_mib_s"].as_u64().unwrap_or(0);
        println!(
            "resync limits: at least {} MiB/s under client load, at most {}",
            r["min_mib_s"],
            if max == 0 {
                "the link's speed".to_string()
            } else {
                format!("{max} MiB/s")
            }
        );
    }
    if r["active"] == true {
        let total = r["total_blocks"].as_u64().unwrap_or(0);
        let left = r["remaining_blocks"].as_u64().unwrap_or(0);
        let pct = if total == 0 {
            100.0
        } else {
            100.0 * (total - left.min(total)) as f64 / total as f64
        };
        let eta = r["eta_s"]
            .as_u64()
            .map_or("unknown".to_string(), |e| format!("{e} s"));
        println!(
            "resync ({}): {pct:.1} % done, {left} of {total} blocks remaining, {:.1} MiB/s, ETA {eta}",
            yes_no(&r["source"], "source", "target"),
            r["rate_mib_s"].as_f64().unwrap_or(0.0),
        );
    }
    if let Some(e) = s["last_session_end"].as_str() {
        println!("last session ended: {e}");
    }
    println!(
        "pending writes {}, flushes {}",
        s["pending_writes"], s["pending_flushes"]
    );
    for line in msl_daemon::status::witness_text(s) {
        println!("{line}");
    }
    for line in msl_daemon::status::nbd_access_text(s) {
        println!("{line}");
    }
    for (title, key) in [("counters", "counters"), ("NBD", "nbd")] {
        if let Some(c) = s[key].as_object() {
            let line: Vec<String> = c.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("{title}: {}", line.join(" "));
        }
    }
}

/// An event as one line of text.
pub fn event_line(e: &Event) -> String {
    format!("node {} {}: {}", e.node, e.event, e.message)
}

fn exists(node: u16, ts_ms: u64, object: &str, message: String, fields: Value) -> Event {
    let mut f = Map::new();
    f.insert("object".into(), object.into());
    if let Value::Object(m) = fields {
        f.extend(m);
    }
    Event {
        ts_ms,
        node,
        event: "exists".into(),
        message: format!("{object}: {message}"),
        fields: f,
    }
}

/// The current state as events (`mslctl events --now`), one per object
/// as `drbdsetup events2 --now` has it: node, peer, MSL, each LAN adapter,
/// then resync and verify while they run.
pub fn state_events(s: &Value, ts_ms: u64) -> Vec<Event> {
    let node = s["node"].as_u64().unwrap_or(0) as u16;
    let st = |k: &str| s[k].as_str().unwrap_or("?").to_string();
    let mut out = vec![
        exists(
            node,
            ts_ms,
            "node",
            format!(
                "role {}, disk {}{}, generation {}, write mode {}",
                st("role"),
                st("disk"),
                yes_no(&s["failed"], ", FAILED (fail-closed)", ""),
                st("generation"),
                st("write_mode")
            ),
            json!({
                "role": s["role"], "disk": s["disk"], "failed": s["failed"],
                "generation": s["generation"], "write_mode": s["write_mode"],
            }),
        ),
        exists(
            node,
            ts_ms,
            "peer",
            format!(
                "node {} ({}), {}, {}",
                s["peer"],
                s["peer_role"].as_str().unwrap_or("role unknown"),
                yes_no(&s["connected"], "connected", "not connected"),
                yes_no(&s["in_sync"], "in sync", "not in sync"),
            ),
            json!({
                "peer": s["peer"], "peer_role": s["peer_role"], "connected": s["connected"],
                "in_sync": s["in_sync"], "msl_alive": s["msl_alive"], "lan_alive": s["lan_alive"],
                "dirty_bytes": s["dirty_bytes"],
            }),
        ),
        exists(
            node,
            ts_ms,
            "msl",
            format!(
                "{}: link {}, peer {}",
                s["msl"]["interface"].as_str().unwrap_or("?"),
                yes_no(&s["msl"]["link_up"], "up", "DOWN"),
                yes_no(&s["msl"]["peer_heard"], "heard", "NOT HEARD"),
            ),
            s["msl"].clone(),
        ),
    ];
    for a in s["lan"].as_array().into_iter().flatten() {
        out.push(exists(
            node,
            ts_ms,
            "lan_adapter",
            format!(
                "{} {}: link {}, carrier {}, peer heartbeats {}",
                a["index"],
                a["name"].as_str().unwrap_or("?"),
                yes_no(&a["link_up"], "up", "DOWN"),
                yes_no(&a["carrier"], "yes", "NO"),
                yes_no(&a["peer_reachable"], "arriving", "MISSING"),
            ),
            a.clone(),
        ));
    }
    let r = &s["resync"];
    if r["active"] == true {
        out.push(exists(
            node,
            ts_ms,
            "resync",
            format!(
                "as {}, {} of {} blocks remaining",
                yes_no(&r["source"], "source", "target"),
                r["remaining_blocks"],
                r["total_blocks"]
            ),
            r.clone(),
        ));
    }
    let v = &s["verify"];
    if v["active"] == true {
        out.push(exists(
            node,
            ts_ms,
            "verify",
            format!(
                "{} of {} blocks compared, {} differ",
                v["checked_blocks"], v["total_blocks"], v["differing_blocks"]
            ),
            v.clone(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_state_events_one_per_object_with_fields() {
        let s = json!({
            "node": 1, "peer": 2, "role": "primary", "disk": "uptodate", "failed": false,
            "generation": "00000000000000ff", "write_mode": "sync",
            "connected": true, "in_sync": false, "peer_role": "secondary",
            "msl": {"interface": "msl0", "link_up": true, "peer_heard": true},
            "lan": [{"index": 0, "name": "eth0", "link_up": true, "carrier": true,
                     "peer_reachable": false}],
            "resync": {"active": true, "source": true, "remaining_blocks": 5, "total_blocks": 9},
            "verify": {"active": false},
        });
        let ev = state_events(&s, 7);
        let objects: Vec<&str> = ev
            .iter()
            .map(|e| e.fields["object"].as_str().unwrap())
            .collect();
        assert_eq!(objects, ["node", "peer", "msl", "lan_adapter", "resync"]);
        assert!(ev
            .iter()
            .all(|e| e.event == "exists" && e.node == 1 && e.ts_ms == 7));
        assert_eq!(ev[0].fields["role"], "primary");
        assert_eq!(ev[0].fields["generation"], "00000000000000ff");
        assert_eq!(ev[1].fields["peer"], 2);
        assert_eq!(ev[1].fields["in_sync"], false);
        assert!(ev[3].message.contains("eth0") && ev[3].message.contains("MISSING"));
        assert!(ev[4].message.contains("5 of 9"));
        assert_eq!(
            event_line(&ev[0]),
            "node 1 exists: node: role primary, disk uptodate, generation 00000000000000ff, write mode sync"
        );
    }
}
