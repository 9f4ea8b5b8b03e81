//! `msl-bench resync`: the "idle cycles" measurement.
//!
//! (a) Clients writing steadily through the service address (msl-harness's
//! NBD workload from the client host): their throughput before a resync,
//! then while the secondary is fully resynced (`invalidate` on it), with the
//! resync's progress. Goal: during / before >= 80 %, and the resync
//! progresses.
//! (b) Clients idle: the same full resync's rate against the MSL link's raw
//! capacity, measured in the same run on the same veth pair before msld
//! starts (`msl-bench link`'s streaming of 4 KiB blocks with reliable
//! delivery). Goal: >= 80 %.

use std::time::{Duration, Instant};

use clap::Args;
use msl_harness::measure::{resync, resync_idle, ResyncRun, ResyncTrigger};
use msl_harness::unix_ms;
use msl_harness::workload::{Workload, WorkloadOptions};
use msl_transport::pair::Ends;
use serde_json::json;

use crate::nbd::{narrator, new_pair, parse_size};
/// Goals: clients keep at least this share of their throughput during a
/// resync, and an idle resync reaches this share of the raw link.
const GOAL_UNDER_LOAD: f64 = 0.9;
const GOAL_IDLE: f64 = 0.8;

#[derive(Args, Debug, Clone)]
pub struct ResyncArgs {
    /// Volume size, e.g. 256M, 1G.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub size: u64,
    /// MSL backend of the pair (auto, afxdp, afpacket); also the backend
    /// whose raw capacity is measured.
    #[arg(long, default_value = "afpacket")]
    pub backend: String,
    /// CPUs both msld processes run on (`cpu_affinity`), comma separated;
    /// "none": unpinned (a resync wants both cores).
    #[arg(long, default_value = "none")]
    pub msl_cpus: String,
    /// Run the pair without a cluster key: MSL frames go unauthenticated
    /// (no keyed MAC), like the raw capacity figure's stream.
    #[arg(long)]
    pub no_key: bool,
    /// Client connections of the steady load (queue depth 1 each).
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Writes per second per connection (0: as fast as the pair answers).
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Seconds of load measured before the resync.
    #[arg(long, default_value_t = 5)]
    pub before: u64,
    /// Seconds of raw link streaming for the capacity figure.
    #[arg(long, default_value_t = 3)]
    pub link_seconds: u64,
    /// Bound on each resync, seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// One JSON object per line (one per measurement).
    #[arg(long)]
    pub json: bool,
}

/// Whether the progress samples show the resync moving forward: at least
/// two samples, never going back, and more done at the end than at the start.
pub fn progressed(run: &ResyncRun) -> bool {
    let p = &run.progress;
    p.len() >= 2
        && p.windows(2).all(|w| w[1].done_blocks >= w[0].done_blocks)
        && p[p.len() - 1].done_blocks > p[0].done_blocks
}

/// The MSL counters that tell where a resync's link time went.
const LINK_COUNTERS: [&str; 5] = [
    "msl_tx_frames",
    "msl_tx_bytes",
    "retransmits",
    "msl_rx_ring_dropped",
    "msl_rx_dropped",
];

/// `LINK_COUNTERS` of both nodes (missing ones read 0).
fn link_counters(pair: &msl_harness::Pair) -> Vec<[u64; LINK_COUNTERS.len()]> {
    [1, 2]
        .iter()
        .map(|&id| {
            let st = pair.status(id).unwrap_or_default();
            LINK_COUNTERS.map(|k| st["counters"][k].as_u64().unwrap_or(0))
        })
        .collect()
}

/// "node 1: msl_tx_frames +n ...; node 2: ..." between two readings.
fn counter_deltas(a: &[[u64; LINK_COUNTERS.len()]], b: &[[u64; LINK_COUNTERS.len()]]) -> String {
    a.iter()
        .zip(b)
        .enumerate()
        .map(|(i, (x, y))| {
            let parts: Vec<String> = LINK_COUNTERS
                .iter()
                .zip(x.iter().zip(y))
                .map(|(k, (x, y))| format!("{k} +{}", y.saturating_sub(*x)))
                .collect();
            format!("node {}: {}", i + 1, parts.join(" "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn mib_s_of_gbit_s(g: f64) -> f64 {
    g * 1e9 / 8.0 / (1u64 << 20) as f64
}

pub fn run(a: ResyncArgs) -> Result<(), String> {
    let say = narrator("resync", a.json);
    let pair = new_pair(a.size, &a.backend, &a.msl_cpus, !a.no_key)?;
    // (b)'s ceiling first, while no msld holds the MSL interfaces.
    let raw_backend = match a.backend.as_str() {
        "auto" => "afxdp",
        b => b,
    };
    say(&format!(
        "raw capacity of the MSL veth ({raw_backend}, {} s)",
        a.link_seconds
    ));
    let ends: Ends = (&pair.topo.veth).into();
    let link_gbit = crate::link::stream_capacity_gbit_s(&ends, raw_backend, a.link_seconds)
        .map_err(|e| format!("link capacity: {e}"))?;
    let link_mib_s = mib_s_of_gbit_s(link_gbit);
    say(&format!(
        "link: {link_gbit:.2} Gbit/s = {link_mib_s:.0} MiB/s"
    ));
    // Data on every block: a volume of zeroes (or holes) resyncs as zero
    // runs, which carry no data and would say nothing of the link.
    say(&format!(
        "filling the primary's volume with {} MiB of data",
        a.size >> 20
    ));
    fill_volume(&pair.volume_path(1), a.size)?;
    say("starting the pair (initial full sync)");
    pair.start_both()?;
    pair.wait_in_sync(1, Duration::from_secs(a.timeout))?;
    let timeout = Duration::from_secs(a.timeout);

    // (b) clients idle: a full resync.
    say("idle: invalidate the secondary, full resync");
    let before = link_counters(&pair);
    let idle = resync_idle(&pair, 1, ResyncTrigger::Invalidate, timeout)?;
    say(&format!(
        "idle resync's MSL traffic: {}",
        counter_deltas(&before, &link_counters(&pair))
    ));
    let idle_ratio = idle.mib_s / link_mib_s;
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    if a.json {
        println!(
            "{}",
            json!({
                "measure": "resync_idle",
                "resync_mib_s": idle.mib_s,
                "resync_s": idle.resync_s,
                "resync_blocks": idle.blocks,
                "link_backend": raw_backend,
                "link_mib_s": link_mib_s,
                "ratio": idle_ratio,
                "goal": GOAL_IDLE,
                "progressed": progressed(&idle),
            })
        );
    } else {
        println!(
            "(b) resync with clients idle: {} blocks in {:.1} s = {:.1} MiB/s; link ({raw_backend}) \
             {:.0} MiB/s; {:.0} % (goal >= {:.0} %) {}",
            idle.blocks,
            idle.resync_s,
            idle.mib_s,
            link_mib_s,
            idle_ratio * 100.0,
            GOAL_IDLE * 100.0,
            verdict(idle_ratio >= GOAL_IDLE)
        );
    }
    pair.wait_in_sync(1, timeout)?;

    // (a) steady load, then the same resync under it.
    let mut wo = WorkloadOptions::new(pair.service_addr());
    wo.first_block = 0;
    wo.blocks = a.size / 4096;
    wo.connections = a.connections.max(1);
    wo.max_writes_per_s = (a.rate > 0).then_some(a.rate);
    let wl = Workload::start(pair.topo.client_ns(), wo)?;
    wl.wait_acks(100, Duration::from_secs(20))?;
    let load = if a.rate > 0 {
        format!("{} connections at {} writes/s each", a.connections, a.rate)
    } else {
        format!("{} connections unpaced", a.connections)
    };
    say(&format!(
        "under load ({load}): {} s before, then invalidate + full resync",
        a.before
    ));
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(a.before));
    let before_mib_s = wl.mib_s_between(t0, Instant::now());
    let since = unix_ms();
    let t1 = Instant::now();
    let run = resync(&pair, 1, ResyncTrigger::Invalidate, timeout);
    let t2 = Instant::now();
    let (during_mib_s, finished) = match &run {
        Ok(r) => (wl.mib_s_between(r.seen_start, r.seen_end), true),
        Err(e) => {
            say(&format!(
                "the resync under load did not finish: {}",
                first_line(e)
            ));
            (wl.mib_s_between(t1, t2), false)
        }
    };
    let report = wl.stop();
    // A resync that restarts (the session dropped) starts again from the top.
    let starts = pair
        .events()
        .iter()
        .filter(|e| e.node == 1 && e.kind == "resync_started" && e.ts_ms >= since)
        .count();
    let ratio = if before_mib_s > 0.0 {
        during_mib_s / before_mib_s
    } else {
        0.0
    };
    let (rs_mib_s, rs_s, rs_blocks, moved) = match &run {
        Ok(r) => (r.mib_s, r.resync_s, r.blocks, progressed(r)),
        Err(_) => (0.0, t2.duration_since(t1).as_secs_f64(), 0, false),
    };
    if a.json {
        println!(
            "{}",
            json!({
                "measure": "resync_under_load",
                "before_mib_s": before_mib_s,
                "during_mib_s": during_mib_s,
                "ratio": ratio,
                "goal": GOAL_UNDER_LOAD,
                "finished": finished,
                "resync_starts": starts,
                "resync_mib_s": rs_mib_s,
                "resync_s": rs_s,
                "resync_blocks": rs_blocks,
                "progressed": moved,
                "load": load,
                "client_errors": report.errors,
            })
        );
    } else {
        println!(
            "(a) resync under load ({load}): clients {before_mib_s:.2} MiB/s before, \
             {during_mib_s:.2} MiB/s during = {:.0} % (goal >= {:.0} %) {}",
            ratio * 100.0,
            GOAL_UNDER_LOAD * 100.0,
            verdict(ratio >= GOAL_UNDER_LOAD && finished)
        );
        if finished {
            println!(
                "    resync meanwhile: {rs_blocks} blocks in {rs_s:.1} s = {rs_mib_s:.1} MiB/s; \
                 progressed: {}; started {starts} time(s)",
                if moved { "yes" } else { "NO" }
            );
        } else {
            println!(
                "    resync did NOT finish within {:.0} s: started {starts} time(s) (each session \
                 drop restarts it); client errors {}",
                rs_s, report.errors
            );
        }
    }
    Ok(())
}

/// Write `size` bytes of non-zero pseudo-random data over the volume
/// file at `path`, durably.
fn fill_volume(path: &std::path::Path, size: u64) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .and_then(|f| f.set_len(size).map(|()| f))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        for w in buf.chunks_exact_mut(8) {
            // xorshift64: never zero.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = (size - off).min(buf.len() as u64) as usize;
        f.write_all_at(&buf[..n], off)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        off += n as u64;
    }
    f.sync_all().map_err(|e| format!("{}: {e}", path.display()))
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use msl_harness::measure::Progress;

    fn run_of(done: &[u64]) -> ResyncRun {
        ResyncRun {
            resync_s: 1.0,
            blocks: 10,
            mib_s: 1.0,
            progress: done
                .iter()
                .enumerate()
                .map(|(i, &d)| Progress {
                    at_s: i as f64 * 0.1,
                    done_blocks: d,
                    total_blocks: 100,
                })
                .collect(),
            seen_start: Instant::now(),
            seen_end: Instant::now(),
        }
    }

    #[test]
    fn test_progress_must_move_forward() {
        assert!(progressed(&run_of(&[0, 10, 10, 40])));
        assert!(!progressed(&run_of(&[5, 5, 5])));
        assert!(!progressed(&run_of(&[0, 30, 20, 40])));
        assert!(!progressed(&run_of(&[7])));
        assert!(!progressed(&run_of(&[])));
    }

    #[test]
    fn test_counter_deltas_name_each_node_and_counter() {
        let a = vec![[10, 100, 0, 0, 0], [1, 2, 3, 4, 5]];
        let b = vec![[15, 900, 2, 0, 0], [1, 2, 3, 4, 9]];
        let s = counter_deltas(&a, &b);
        assert!(
            s.starts_with("node 1: msl_tx_frames +5 msl_tx_bytes +800 retransmits +2 "),
            "{s}"
        );
        assert!(s.ends_with("; node 2: msl_tx_frames +0 msl_tx_bytes +0 retransmits +0 msl_rx_ring_dropped +0 msl_rx_dropped +4"), "{s}");
    }

    #[test]
    fn test_gbit_to_mib() {
        assert!((mib_s_of_gbit_s(8.0) - 953.674).abs() < 0.01);
    }
}
