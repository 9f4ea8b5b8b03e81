//! `msl-bench scale`: what a volume's size costs, degraded (a primary
//! alone: its secondary down, the most common failure) and mirrored.
//!
//! For each size and mode msld runs on real loop devices over sparse files
//! (so a terabyte volume needs no terabyte of disk). A mirrored pair is
//! created blank on both nodes (`mslctl create-md --blank`) and the time it
//! takes to come up in sync is measured; a degraded one is a lone
//! primary. fio (nbd engine, 4 KiB random writes, QD16) writes through the
//! service address, over a hot span (the first `--hot` bytes: the same
//! extents again and again, as a database's working set) and over the
//! whole volume (a new extent for almost every write: one activity-log
//! transaction each). Rounds rotate the sizes so each runs first in turn;
//! the table shows medians, msld's resident memory after the runs and its
//! metadata writes per client write, so sizes compare side by side. Last,
//! each mirrored pair's secondary stops, `--changes` bytes are written,
//! and the time to resync them is measured; and a new secondary's full
//! sync of a thin volume (a sparse file) holding `--changes` bytes of
//! data is timed: its holes go as zero runs, so it costs the data.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Args;
use msl_harness::{Pair, PairOptions};
use serde_json::json;

use crate::fio::{self, JobSpec, Sample};
use crate::nbd::{narrator, parse_size};

const PORT: u16 = 10809;

#[derive(Args, Debug)]
pub struct ScaleArgs {
    /// Volume sizes, comma separated (K, M, G, T suffixes).
    #[arg(long, value_delimiter = ',', default_value = "1G,1T,8T", value_parser = parse_size)]
    pub sizes: Vec<u64>,
    /// Rounds; each runs every size and span once, in rotated order.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds per fio run (after a 1 s ramp).
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// The hot span: random writes over the first this many bytes.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub hot: u64,
    /// Spans to run: `hot`, `whole`, or both.
    #[arg(long, value_delimiter = ',', default_value = "hot,whole")]
    pub spans: Vec<String>,
    /// Modes to run: `degraded` (a primary alone), `mirrored` (a blank
    /// pair), or both.
    #[arg(long, value_delimiter = ',', default_value = "degraded,mirrored")]
    pub modes: Vec<String>,
    /// Bytes written while a mirrored pair's secondary is down, then
    /// resynced, and held by the thin volume a full sync is timed on (0:
    /// neither is run).
    #[arg(long, default_value = "1G", value_parser = changes_size)]
    pub changes: u64,
    /// Directory for the sparse backing files (default: the run directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// One JSON object per row instead of the table.
    #[arg(long)]
    pub json: bool,
}

const JOB: JobSpec = JobSpec {
    name: "randwrite-4k-qd16",
    rw: "randwrite",
    bs: "4k",
    iodepth: 16,
    numjobs: 1,
    flush_each: false,
};

/// A loop device over a sparse file, detached and removed on drop.
struct LoopDev {
    dev: String,
    backing: PathBuf,
}

impl LoopDev {
    fn new(backing: &Path, size: u64) -> Result<LoopDev, String> {
        let f =
            std::fs::File::create(backing).map_err(|e| format!("{}: {e}", backing.display()))?;
        f.set_len(size).map_err(|e| {
            format!(
                "{}: cannot make a sparse file of {size} bytes: {e}",
                backing.display()
            )
        })?;
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(backing)
            .output()
            .map_err(|e| format!("losetup: {e} (util-linux)"))?;
        if !out.status.success() {
            let _ = std::fs::remove_file(backing);
            return Err(format!(
                "losetup {}: {}",
                backing.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(LoopDev {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            backing: backing.to_path_buf(),
        })
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
        let _ = std::fs::remove_file(&self.backing);
    }
}

/// One size and mode under test: its msld(s) and loop device(s). Fields
/// drop in order: msld stops before the devices go.
struct Subject {
    size: u64,
    mirrored: bool,
    pair: Pair,
    _devs: Vec<LoopDev>,
    /// Mirrored: seconds from starting both nodes to in sync.
    pair_s: Option<f64>,
}

impl Subject {
    fn uri(&self) -> String {
        format!("nbd://{}:{PORT}/", msl_harness::SERVICE_IP)
    }

    fn client_ns(&self) -> String {
        self.pair.topo.client_ns().to_string()
    }

    fn mode(&self) -> &'static str {
        if self.mirrored {
            "mirrored"
        } else {
            "degraded"
        }
    }

    fn rss_mib(&self) -> Option<f64> {
        rss_mib(self.pair.pid(1)?)
    }

    fn counter(&self, name: &str) -> Option<u64> {
        self.pair.status(1).ok()?["counters"][name].as_u64()
    }
}

/// A loop device over a fresh sparse file for node `id`'s volume.
fn volume_device(pair: &Pair, id: u16, size: u64, dir: Option<&Path>) -> Result<LoopDev, String> {
    let backing = dir
        .unwrap_or(pair.dir())
        .join(format!("scale-{}-{size}-n{id}.backing", std::process::id()));
    let dev = LoopDev::new(&backing, size)?;
    std::os::unix::fs::symlink(&dev.dev, pair.volume_path(id))
        .map_err(|e| format!("symlink to {}: {e}", dev.dev))?;
    Ok(dev)
}

fn start(
    size: u64,
    mirrored: bool,
    dir: Option<&Path>,
    say: &impl Fn(&str),
) -> Result<Subject, String> {
    let pair = Pair::new(PairOptions {
        volume_bytes: size,
        nbd_port: PORT,
        ..PairOptions::default()
    })?;
    let mut devs = vec![volume_device(&pair, 1, size, dir)?];
    let pair_s = if mirrored {
        devs.push(volume_device(&pair, 2, size, dir)?);
        let mslctl = msl_harness::bins::binary("mslctl")?;
        for id in [1u16, 2] {
            let mut c = Command::new(&mslctl);
            c.args(["create-md", "--blank", "--config"])
                .arg(pair.config_path(id));
            if id == 1 {
                c.arg("--initial-primary");
            }
            let out = c.output().map_err(|e| format!("mslctl: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "create-md --blank on node {id}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        say(&format!("{}: two blank loop devices, pairing", human(size)));
        pair.start_both()?;
        let took = pair.wait_in_sync(1, Duration::from_secs(600))?;
        Some(took.as_secs_f64())
    } else {
        say(&format!(
            "{}: {} over a sparse file, primary alone",
            human(size),
            devs[0].dev
        ));
        pair.start(1)?;
        // A node never becomes primary on its own before it has seen its
        // peer: the administrator promotes the lone node (as after losing
        // a server).
        pair.wait_status(1, "msld up", Duration::from_secs(60), |_| true)?;
        pair.admin(1, "promote")?;
        pair.wait_status(1, "primary serving alone", Duration::from_secs(120), |s| {
            s["role"] == "primary"
        })?;
        None
    };
    let s = Subject {
        size,
        mirrored,
        pair,
        _devs: devs,
        pair_s,
    };
    wait_serving(&s)?;
    Ok(s)
}

/// A new pair on thin file volumes of `size` bytes, the first holding
/// `bytes` of data (1 MiB pieces spread evenly): the seconds from starting
/// both to in sync (a full sync), and the primary's resident memory then.
fn full_sync(size: u64, bytes: u64, say: &impl Fn(&str)) -> Result<(f64, Option<f64>), String> {
    use std::os::unix::fs::FileExt;
    let pair = Pair::new(PairOptions {
        volume_bytes: size,
        nbd_port: PORT,
        ..PairOptions::default()
    })?;
    for id in [1u16, 2] {
        let p = pair.volume_path(id);
        std::fs::File::create(&p)
            .and_then(|f| f.set_len(size))
            .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let piece = 1u64 << 20;
    let pieces = (bytes / piece).max(1);
    let stride = (size / pieces) / piece * piece;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(pair.volume_path(1))
        .map_err(|e| e.to_string())?;
    let data: Vec<u8> = (0..piece as usize).map(|i| (i % 251) as u8 + 1).collect();
    for k in 0..pieces {
        f.write_all_at(&data, k * stride.max(piece))
            .map_err(|e| format!("writing the data: {e}"))?;
    }
    f.sync_all().map_err(|e| e.to_string())?;
    settle()?;
    say(&format!(
        "{}: thin volumes, {} of data on the first, full sync",
        human(size),
        human(pieces * piece)
    ));
    let t = std::time::Instant::now();
    pair.start(1)?;
    pair.start(2)?;
    pair.wait_in_sync(1, Duration::from_secs(1800))?;
    let took = t.elapsed().as_secs_f64();
    let rss = pair.pid(1).and_then(rss_mib);
    Ok((took, rss))
}

/// Write back what earlier runs left dirty in the page cache (`sync`):
/// random writes to the other sparse backing files are still being
/// written back for minutes, and a timed resync would otherwise measure
/// that writeback (a 1 GiB resync on 8 TiB took 116-131 s after the IOPS
/// runs, 1.4 s alone).
fn settle() -> Result<(), String> {
    let st = std::process::Command::new("sync")
        .status()
        .map_err(|e| format!("sync: {e}"))?;
    st.success()
        .then_some(())
        .ok_or_else(|| format!("sync: {st}"))
}

/// `--changes`: a size, or 0 for none.
fn changes_size(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        Ok(0)
    } else {
        parse_size(s)
    }
}

/// A process's resident memory, MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// A mirrored pair's secondary stops, `bytes` are written sequentially
/// (1 MiB writes, QD8) from the middle of the volume, the secondary
/// returns: the seconds until the pair is in sync again.
fn resync_changes(s: &Subject, bytes: u64) -> Result<f64, String> {
    s.pair.stop(2)?;
    s.pair
        .wait_status(1, "primary alone", Duration::from_secs(30), |st| {
            st["connected"] == false
        })?;
    let mut c = fio::command_in(&s.client_ns(), "fio");
    c.args([
        "--name=changes",
        "--ioengine=nbd",
        &format!("--uri={}", s.uri()),
        "--rw=write",
        "--bs=1m",
        "--iodepth=8",
        &format!("--offset={}", s.size / 2),
        &format!("--size={bytes}"),
        "--output-format=json",
    ]);
    fio::run_bounded(c, Duration::from_secs(600), "fio writing the changes")?;
    settle()?;
    let t = std::time::Instant::now();
    s.pair.start(2)?;
    s.pair.wait_in_sync(1, Duration::from_secs(1200))?;
    Ok(t.elapsed().as_secs_f64())
}

fn wait_serving(s: &Subject) -> Result<(), String> {
    let t = std::time::Instant::now();
    loop {
        let mut c = fio::command_in(&s.client_ns(), "nbdinfo");
        c.args(["--size", &s.uri()]);
        if c.output().is_ok_and(|o| o.status.success()) {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!("{}: not serving NBD after 30 s", s.uri()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 40 && b % (1 << 40) == 0 => format!("{} TiB", b >> 40),
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b => format!("{} MiB", b >> 20),
    }
}

fn run_span(s: &Subject, span: &str, hot: u64, seconds: u64) -> Result<Sample, String> {
    let mut c = fio::command_in(&s.client_ns(), "fio");
    c.args([
        "--ioengine=nbd",
        &format!("--uri={}", s.uri()),
        "--direct=1",
    ])
    .args(JOB.fio_args())
    .arg("--time_based")
    .arg(format!("--runtime={seconds}"))
    .arg("--ramp_time=1")
    .arg("--randrepeat=0")
    .arg("--output-format=json")
    .arg(format!("--percentile_list={}", fio::PERCENTILES));
    if span == "hot" {
        c.arg(format!("--size={}", hot.min(s.size)));
    }
    let out = fio::run_bounded(
        c,
        Duration::from_secs(seconds + 60),
        &format!("fio {span} on {}", human(s.size)),
    )?;
    fio::parse(&out, false)
}

struct Row {
    size: u64,
    mode: &'static str,
    span: String,
    m: Sample,
    runs: usize,
    rss_mib: Option<f64>,
    meta_per_write: Option<f64>,
    /// Metadata bytes written per second of the runs (transactions,
    /// bitmap pages, superblocks).
    meta_kib_s: Option<f64>,
}

/// Client writes, metadata writes and metadata bytes counted over runs,
/// and the seconds they took.
#[derive(Clone, Copy, Default)]
struct MetaCost {
    writes: u64,
    persists: u64,
    bytes: u64,
    secs: f64,
}

pub fn run(args: ScaleArgs) -> Result<(), String> {
    if args.rounds == 0 || args.seconds == 0 || args.sizes.is_empty() {
        return Err("--rounds, --seconds and --sizes must not be empty or zero".into());
    }
    for s in &args.spans {
        if s != "hot" && s != "whole" {
            return Err(format!("--spans: unknown span `{s}` (hot, whole)"));
        }
    }
    for (tool, pkg) in [
        ("fio", "fio"),
        ("nbdinfo", "libnbd-bin"),
        ("losetup", "mount"),
    ] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            return Err(format!(
                "{tool} not found: apt-get install {pkg} (bash scripts/setup.sh)"
            ));
        }
    }
    for m in &args.modes {
        if m != "degraded" && m != "mirrored" {
            return Err(format!("--modes: unknown mode `{m}` (degraded, mirrored)"));
        }
    }
    let say = narrator("scale", args.json);
    let mut subjects = Vec::new();
    for mode in &args.modes {
        for &size in &args.sizes {
            subjects.push(start(size, mode == "mirrored", args.dir.as_deref(), &say)?);
        }
    }
    let mut samples: Vec<Vec<Vec<Sample>>> =
        vec![vec![Vec::new(); args.spans.len()]; subjects.len()];
    let mut meta = vec![vec![MetaCost::default(); args.spans.len()]; subjects.len()];
    for round in 0..args.rounds {
        for (k, span) in args.spans.iter().enumerate() {
            for i in 0..subjects.len() {
                let j = (i + round) % subjects.len();
                let s = &subjects[j];
                say(&format!(
                    "round {}/{}: {span} on {}, {}",
                    round + 1,
                    args.rounds,
                    human(s.size),
                    s.mode()
                ));
                let names = ["client_writes", "meta_writes", "meta_bytes_written"];
                let before = names.map(|n| s.counter(n));
                let t = std::time::Instant::now();
                samples[j][k].push(run_span(s, span, args.hot, args.seconds)?);
                let secs = t.elapsed().as_secs_f64();
                let after = names.map(|n| s.counter(n));
                if let ([Some(w0), Some(m0), Some(b0)], [Some(w1), Some(m1), Some(b1)]) =
                    (before, after)
                {
                    let c = &mut meta[j][k];
                    c.writes += w1 - w0;
                    c.persists += m1 - m0;
                    c.bytes += b1 - b0;
                    c.secs += secs;
                }
            }
        }
    }
    let mut rows = Vec::new();
    for (j, s) in subjects.iter().enumerate() {
        for (k, span) in args.spans.iter().enumerate() {
            if let Some(m) = fio::median_sample(&samples[j][k]) {
                let c = meta[j][k];
                rows.push(Row {
                    size: s.size,
                    mode: s.mode(),
                    span: span.clone(),
                    m,
                    runs: samples[j][k].len(),
                    rss_mib: s.rss_mib(),
                    meta_per_write: (c.writes > 0).then(|| c.persists as f64 / c.writes as f64),
                    meta_kib_s: (c.secs > 0.0).then(|| c.bytes as f64 / 1024.0 / c.secs),
                });
            }
        }
    }
    let mut pairs = Vec::new();
    for s in subjects.iter().filter(|s| s.mirrored) {
        let rss = s.rss_mib();
        let resync_s = if args.changes > 0 {
            say(&format!(
                "{}: secondary down, {} written, resync",
                human(s.size),
                human(args.changes)
            ));
            Some(resync_changes(s, args.changes)?)
        } else {
            None
        };
        pairs.push(PairRow {
            size: s.size,
            pair_s: s.pair_s,
            resync_s,
            rss_mib: rss,
            full_s: None,
            full_rss_mib: None,
        });
    }
    // Each size's pairs are gone: one full sync at a time.
    drop(subjects);
    if args.changes > 0 {
        for &size in &args.sizes {
            let (s, rss) = full_sync(size, args.changes, &say)?;
            match pairs.iter_mut().find(|p| p.size == size) {
                Some(p) => {
                    p.full_s = Some(s);
                    p.full_rss_mib = rss;
                }
                None => pairs.push(PairRow {
                    size,
                    pair_s: None,
                    resync_s: None,
                    rss_mib: None,
                    full_s: Some(s),
                    full_rss_mib: rss,
                }),
            }
        }
    }
    report(&args, &rows, &pairs);
    Ok(())
}

/// A mirrored size's pairing and resync times.
struct PairRow {
    size: u64,
    pair_s: Option<f64>,
    resync_s: Option<f64>,
    rss_mib: Option<f64>,
    /// A new secondary's full sync of a thin volume holding `--changes`.
    full_s: Option<f64>,
    full_rss_mib: Option<f64>,
}

fn report(args: &ScaleArgs, rows: &[Row], pairs: &[PairRow]) {
    if args.json {
        for r in rows {
            println!(
                "{}",
                json!({
                    "bench": "scale",
                    "size_bytes": r.size,
                    "mode": r.mode,
                    "span": r.span,
                    "job": JOB.name,
                    "runs": r.runs,
                    "iops": r.m.iops.round(),
                    "p50_us": r.m.p50_us,
                    "p99_us": r.m.p99_us,
                    "p999_us": r.m.p999_us,
                    "rss_mib": r.rss_mib.map(|x| x.round()),
                    "meta_persists_per_write": r.meta_per_write,
                    "meta_kib_per_s": r.meta_kib_s,
                })
            );
        }
        for p in pairs {
            println!(
                "{}",
                json!({
                    "bench": "scale-pair",
                    "size_bytes": p.size,
                    "blank_pair_in_sync_s": p.pair_s,
                    "changes_bytes": args.changes,
                    "resync_changes_s": p.resync_s,
                    "rss_mib": p.rss_mib.map(|x| x.round()),
                    "full_sync_thin_s": p.full_s,
                    "full_sync_rss_mib": p.full_rss_mib.map(|x| x.round()),
                })
            );
        }
        return;
    }
    println!(
        "{:<9} {:<9} {:<6} {:>9} {:>8} {:>8} {:>9} {:>9} {:>12} {:>11}",
        "volume",
        "mode",
        "span",
        "IOPS",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "RSS MiB",
        "meta/write",
        "meta KiB/s"
    );
    for r in rows {
        println!(
            "{:<9} {:<9} {:<6} {:>9.0} {:>8.0} {:>8.0} {:>9.0} {:>9} {:>12} {:>11}",
            human(r.size),
            r.mode,
            r.span,
            r.m.iops,
            r.m.p50_us,
            r.m.p99_us,
            r.m.p999_us,
            r.rss_mib.map_or("-".into(), |x| format!("{x:.0}")),
            r.meta_per_write.map_or("-".into(), |x| format!("{x:.3}")),
            r.meta_kib_s.map_or("-".into(), |x| format!("{x:.0}")),
        );
    }
    println!(
        "\n{}, {} round(s) of {} s per size, mode and span, medians; hot span = first {}",
        JOB.name,
        args.rounds,
        args.seconds,
        human(args.hot)
    );
    if pairs.is_empty() {
        return;
    }
    let changes = human(args.changes);
    println!(
        "\n{:<9} {:>14} {:>18} {:>8} {:>24} {:>8}",
        "volume",
        "blank pair, s",
        &format!("resync {changes}, s"),
        "RSS MiB",
        &format!("full sync, {changes} data, s"),
        "RSS MiB"
    );
    let f = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.1}"));
    let m = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.0}"));
    for p in pairs {
        println!(
            "{:<9} {:>14} {:>18} {:>8} {:>24} {:>8}",
            human(p.size),
            f(p.pair_s),
            f(p.resync_s),
            m(p.rss_mib),
            f(p.full_s),
            m(p.full_rss_mib),
        );
    }
}
