//! "Idle cycles" measurement hooks for benchmarks: how much client
//! throughput a resync costs, and how fast a resync runs when clients are
//! quiet. The benchmark (bench/) composes these with its own reporting.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::pair::{unix_ms, Pair};
use crate::scenario::in_sync;
use crate::workload::Workload;

/// How to make the secondary need a resync.
#[derive(Clone, Copy, Debug)]
pub enum ResyncTrigger {
    /// `invalidate` on the secondary: a full resync of the volume.
    Invalidate,
    /// kill -9 the secondary, let clients write for this long, restart it:
    /// a resync of what changed meanwhile.
    Outage(Duration),
}

/// One resync progress sample (from the source's status).
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub at_s: f64,
    pub done_blocks: u64,
    pub total_blocks: u64,
}

/// A resync, timed from the source's events.
#[derive(Clone, Debug)]
pub struct ResyncRun {
    /// Daemon timestamps: resync_started -> resync_finished on the source.
    pub resync_s: f64,
    pub blocks: u64,
    pub mib_s: f64,
    pub progress: Vec<Progress>,
    /// When the harness saw the resync start and end.
    pub seen_start: Instant,
    pub seen_end: Instant,
}

/// Client throughput before and during a resync.
#[derive(Clone, Debug)]
pub struct ResyncUnderLoad {
    pub before_mib_s: f64,
    pub during_mib_s: f64,
    /// during / before.
    pub ratio: f64,
    pub resync: ResyncRun,
}

impl ResyncRun {
    pub fn to_json(&self) -> Value {
        json!({
            "resync_s": self.resync_s,
            "resync_blocks": self.blocks,
            "resync_mib_s": self.mib_s,
            "progress": self.progress.iter().map(|p| json!([p.at_s, p.done_blocks, p.total_blocks])).collect::<Vec<_>>(),
        })
    }
}

impl ResyncUnderLoad {
    pub fn to_json(&self) -> Value {
        json!({
            "before_mib_s": self.before_mib_s,
            "during_mib_s": self.during_mib_s,
            "ratio": self.ratio,
            "resync": self.resync.to_json(),
        })
    }
}

fn trigger_resync(pair: &Pair, secondary: u16, t: ResyncTrigger) -> Result<(), String> {
    match t {
        ResyncTrigger::Invalidate => pair.admin(secondary, "invalidate").map(|_| ()),
        ResyncTrigger::Outage(d) => {
            pair.kill9(secondary)?;
            std::thread::sleep(d);
            pair.start(secondary)
        }
    }
}

/// Make `primary`'s peer need a resync (`trigger`), then follow it to the
/// end (bounded by `timeout`), sampling progress every 100 ms.
pub fn resync(
    pair: &Pair,
    primary: u16,
    trigger: ResyncTrigger,
    timeout: Duration,
) -> Result<ResyncRun, String> {
    let secondary = 3 - primary;
    let since = unix_ms();
    trigger_resync(pair, secondary, trigger)?;
    crate::pair::wait_for("the resync starts", timeout, || {
        pair.event_after(primary, "resync_started", since).is_some()
    })
    .map_err(|e| format!("{e}\n{}", pair.diagnostics()))?;
    let seen_start = Instant::now();
    let mut progress = Vec::new();
    loop {
        if pair
            .event_after(primary, "resync_finished", since)
            .is_some()
            && in_sync(pair, primary)
        {
            break;
        }
        if seen_start.elapsed() > timeout {
            return Err(format!(
                "the resync did not finish within {timeout:?}\n{}",
                pair.diagnostics()
            ));
        }
        if let Ok(s) = pair.status(primary) {
            let total = s["resync"]["total_blocks"].as_u64().unwrap_or(0);
            let left = s["resync"]["remaining_blocks"].as_u64().unwrap_or(0);
            if total > 0 {
                progress.push(Progress {
                    at_s: seen_start.elapsed().as_secs_f64(),
                    done_blocks: total.saturating_sub(left),
                    total_blocks: total,
                });
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen_end = Instant::now();
    let started = pair.event_after(primary, "resync_started", since);
    let finished = pair.event_after(primary, "resync_finished", since);
    let (Some(s), Some(f)) = (started, finished) else {
        return Err("resync events missing from the source's log".into());
    };
    let resync_s = f.ts_ms.saturating_sub(s.ts_ms) as f64 / 1000.0;
    let blocks = crate::scenario::number_before(&f.message, " blocks").unwrap_or(0);
    let mib = (blocks * pair.block_size()) as f64 / (1 << 20) as f64;
    Ok(ResyncRun {
        resync_s,
        blocks,
        mib_s: if resync_s > 0.0 { mib / resync_s } else { 0.0 },
        progress,
        seen_start,
        seen_end,
    })
}

/// With `wl` writing steadily: client throughput over `before`, then a
/// resync (`trigger`), client throughput while it runs.
pub fn resync_under_load(
    pair: &Pair,
    wl: &Workload,
    primary: u16,
    trigger: ResyncTrigger,
    before: Duration,
    timeout: Duration,
) -> Result<ResyncUnderLoad, String> {
    let t0 = Instant::now();
    std::thread::sleep(before);
    let before_mib_s = wl.mib_s_between(t0, Instant::now());
    let run = resync(pair, primary, trigger, timeout)?;
    let during_mib_s = wl.mib_s_between(run.seen_start, run.seen_end);
    Ok(ResyncUnderLoad {
        before_mib_s,
        during_mib_s,
        ratio: if before_mib_s > 0.0 {
            during_mib_s / before_mib_s
        } else {
            0.0
        },
        resync: run,
    })
}

/// With clients idle: the resync's rate.
pub fn resync_idle(
    pair: &Pair,
    primary: u16,
    trigger: ResyncTrigger,
    timeout: Duration,
) -> Result<ResyncRun, String> {
    resync(pair, primary, trigger, timeout)
}
