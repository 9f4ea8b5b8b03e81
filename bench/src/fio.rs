//! fio as the NBD client of `msl-bench nbd`: the job table, running one job
//! in a namespace with a deadline, parsing `--output-format=json`, and the
//! median over runs.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Percentiles fio reports (fio takes at most 20). 50, 99 and 99.9 are the
/// table's columns; the others draw the chart.
pub const PERCENTILES: &str = "1:5:10:25:50:75:90:95:99:99.5:99.9:99.95:99.99";

/// One fio job of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobSpec {
    pub name: &'static str,
    /// fio `rw=`.
    pub rw: &'static str,
    /// fio `bs=`.
    pub bs: &'static str,
    pub iodepth: u32,
    /// Connections (fio jobs), reported as one group.
    pub numjobs: u32,
    /// A FLUSH after every write (fio `fsync=1`).
    pub flush_each: bool,
}

impl JobSpec {
    const fn new(name: &'static str, rw: &'static str, bs: &'static str, iodepth: u32) -> Self {
        JobSpec {
            name,
            rw,
            bs,
            iodepth,
            numjobs: 1,
            flush_each: false,
        }
    }

    pub fn is_read(&self) -> bool {
        self.rw.contains("read")
    }

    /// fio arguments describing this job's I/O pattern.
    pub fn fio_args(&self) -> Vec<String> {
        let mut a = vec![
            format!("--name={}", self.name),
            format!("--rw={}", self.rw),
            format!("--bs={}", self.bs),
            format!("--iodepth={}", self.iodepth),
        ];
        if self.numjobs > 1 {
            a.push(format!("--numjobs={}", self.numjobs));
            a.push("--group_reporting".into());
        }
        if self.flush_each {
            a.push("--fsync=1".into());
        }
        a
    }
}

/// The benchmark's jobs, in the order they run.
pub const JOBS: [JobSpec; 8] = [
    JobSpec::new("randwrite-4k-qd1", "randwrite", "4k", 1),
    JobSpec::new("randwrite-4k-qd32", "randwrite", "4k", 32),
    JobSpec {
        flush_each: true,
        ..JobSpec::new("randwrite-4k-qd1-flush", "randwrite", "4k", 1)
    },
    JobSpec::new("seqwrite-64k-qd1", "write", "64k", 1),
    JobSpec::new("seqwrite-1m-qd1", "write", "1m", 1),
    JobSpec::new("seqwrite-64k-qd8", "write", "64k", 8),
    JobSpec::new("randread-4k-qd32", "randread", "4k", 32),
    JobSpec {
        numjobs: 4,
        ..JobSpec::new("randwrite-4k-qd8-x4conn", "randwrite", "4k", 8)
    },
];

/// Look a job up by name.
pub fn job(name: &str) -> Option<JobSpec> {
    JOBS.iter().copied().find(|j| j.name == name)
}

/// What one fio run measured (completion latency, microseconds).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub iops: f64,
    pub mib_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// (quantile in [0, 1), microseconds), increasing quantile.
    pub curve: Vec<(f64, f64)>,
}

/// Parse fio's JSON output (anything printed before the first `{`, such as
/// the nbd engine's "connected to NBD server" lines, is skipped). `read`
/// picks the read or the write direction. One job group is expected
/// (`numjobs` > 1 needs `--group_reporting`).
pub fn parse(out: &str, read: bool) -> Result<Sample, String> {
    let start = out
        .find("\n{")
        .map(|i| i + 1)
        .or_else(|| out.starts_with('{').then_some(0))
        .ok_or("fio printed no JSON")?;
    let v: Value = serde_json::from_str(&out[start..]).map_err(|e| format!("fio JSON: {e}"))?;
    let jobs = v["jobs"].as_array().ok_or("fio JSON: no `jobs` array")?;
    let [j] = jobs.as_slice() else {
        return Err(format!(
            "fio JSON: {} job entries, expected one (group_reporting)",
            jobs.len()
        ));
    };
    let err = j["error"].as_i64().unwrap_or(0);
    if err != 0 {
        return Err(format!("fio job {} failed: error {err}", j["jobname"]));
    }
    let d = &j[if read { "read" } else { "write" }];
    let num = |x: &Value, what: &str| x.as_f64().ok_or(format!("fio JSON: no {what}"));
    let iops = num(&d["iops"], "iops")?;
    let bw = num(&d["bw_bytes"], "bw_bytes")?;
    if iops <= 0.0 {
        return Err(format!("fio job {}: no I/O completed", j["jobname"]));
    }
    let pct = d["clat_ns"]["percentile"]
        .as_object()
        .ok_or("fio JSON: no clat_ns.percentile")?;
    let mut curve = Vec::with_capacity(pct.len());
    for (k, ns) in pct {
        let q: f64 = k.parse().map_err(|_| format!("fio JSON: percentile {k}"))?;
        curve.push((q / 100.0, num(ns, "percentile value")? / 1000.0));
    }
    curve.sort_by(|a, b| a.0.total_cmp(&b.0));
    let at = |q: f64| {
        curve
            .iter()
            .find(|p| (p.0 - q).abs() < 1e-9)
            .map(|p| p.1)
            .ok_or(format!("fio JSON: no {} % percentile", q * 100.0))
    };
    Ok(Sample {
        iops,
        mib_s: bw / (1024.0 * 1024.0),
        p50_us: at(0.5)?,
        p99_us: at(0.99)?,
        p999_us: at(0.999)?,
        curve,
    })
}

/// Median of `xs` (mean of the middle two for an even count; NaN if empty).
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Per-figure medians of several runs (each figure, and each point of the
/// latency curve, is the median of its own values). None if empty.
pub fn median_sample(runs: &[Sample]) -> Option<Sample> {
    let first = runs.first()?;
    let m = |f: fn(&Sample) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let curve = (0..first.curve.len())
        .map(|i| {
            let q = first.curve[i].0;
            let vals: Vec<f64> = runs
                .iter()
                .filter_map(|s| s.curve.iter().find(|p| (p.0 - q).abs() < 1e-9))
                .map(|p| p.1)
                .collect();
            (q, median(&vals))
        })
        .collect();
    Some(Sample {
        iops: m(|s| s.iops),
        mib_s: m(|s| s.mib_s),
        p50_us: m(|s| s.p50_us),
        p99_us: m(|s| s.p99_us),
        p999_us: m(|s| s.p999_us),
        curve,
    })
}

/// A child process killed (and reaped) on drop, and sent SIGKILL by the
/// kernel if this process dies first (PR_SET_PDEATHSIG; `ip netns exec`
/// execs the program, which keeps it). A child of [`command_in`] leads a
/// process group of its own, which is killed with it: fio runs each job in
/// a process it forks, which would outlive its parent.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: kill(2) takes no pointers. The group is this child's
            // own (or, if it leads none, there is no such group: ESRCH).
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ip netns exec NS PROGRAM ARGS...` in a process group of its own, with
/// the parent-death signal set.
pub fn command_in(ns: &str, program: &str) -> Command {
    let mut c = msl_transport::netns::command_in(ns, program);
    own_group(&mut c);
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        c.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

/// Start `c` as the leader of a new process group (see [`Proc`]), with no
/// terminal input (a background group reading it would be stopped).
fn own_group(c: &mut Command) {
    use std::os::unix::process::CommandExt;
    c.process_group(0).stdin(Stdio::null());
}

/// Run `cmd` to completion with a deadline; Ok(stdout) if it exits 0.
pub fn run_bounded(mut cmd: Command, limit: Duration, what: &str) -> Result<String, String> {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what}: {e}"))?;
    let mut p = Proc(child);
    // Drain both pipes on threads so a chatty child never blocks.
    let mut so = p.0.stdout.take().ok_or("no stdout pipe")?;
    let mut se = p.0.stderr.take().ok_or("no stderr pipe")?;
    let to = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let te = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let t0 = Instant::now();
    let status = loop {
        match p.0.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if t0.elapsed() < limit => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                drop(p);
                return Err(format!("{what}: still running after {limit:?}, killed"));
            }
            Err(e) => return Err(format!("{what}: {e}")),
        }
    };
    let out = to.join().unwrap_or_default();
    let err = te.join().unwrap_or_default();
    if !status.success() {
        return Err(format!("{what}: {status}: {}{}", err.trim(), tail(&out)));
    }
    Ok(out)
}

fn tail(s: &str) -> String {
    let t: Vec<&str> = s.lines().rev().take(5).collect();
    if t.is_empty() {
        String::new()
    } else {
        format!("\n{}", t.into_iter().rev().collect::<Vec<_>>().join("\n"))
    }
}

/// Run `job` from namespace `ns` against `uri` for `seconds` after
/// `ramp_s` of warm-up, and parse the result.
pub fn run_job(
    ns: &str,
    uri: &str,
    job: &JobSpec,
    seconds: u64,
    ramp_s: u64,
) -> Result<Sample, String> {
    let mut c = command_in(ns, "fio");
    c.args(common_args(uri))
        .args(job.fio_args())
        .arg("--time_based")
        .arg(format!("--runtime={seconds}"))
        .arg(format!("--ramp_time={ramp_s}"))
        .arg("--output-format=json")
        .arg(format!("--percentile_list={PERCENTILES}"));
    let limit = Duration::from_secs(seconds + ramp_s + 30);
    let out = run_bounded(c, limit, &format!("fio {} against {uri}", job.name))?;
    parse(&out, job.is_read())
}

/// Write every byte of the export once (1 MiB sequential writes), so reads
/// hit written data and every server starts from the same state.
pub fn fill(ns: &str, uri: &str, size: u64) -> Result<(), String> {
    let mut c = command_in(ns, "fio");
    c.args(common_args(uri)).args([
        "--name=fill",
        "--rw=write",
        "--bs=1m",
        "--iodepth=4",
        &format!("--size={size}"),
        "--output-format=json",
    ]);
    let out = run_bounded(c, Duration::from_secs(300), &format!("fio fill of {uri}"))?;
    parse(&out, false).map(|_| ())
}

fn common_args(uri: &str) -> [String; 3] {
    [
        "--ioengine=nbd".into(),
        format!("--uri={uri}"),
        "--direct=1".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bounded run that overstays ends its child and what the child
    /// forked: the forked process is gone after the error, not orphaned.
    #[test]
    fn test_overdue_run_kills_the_process_the_child_forked() {
        let dir = std::env::temp_dir().join(format!("msl-bench-pg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pidfile = dir.join("grandchild");
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!("sleep 600 & echo $! > {}; wait", pidfile.display()));
        own_group(&mut c);
        let e = run_bounded(c, Duration::from_millis(300), "sh").unwrap_err();
        assert!(e.contains("still running"), "{e}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        // SAFETY: signal 0 only checks that the process exists.
        let t = Instant::now();
        while unsafe { libc::kill(pid, 0) } == 0 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let outlived = unsafe { libc::kill(pid, 0) } == 0;
        if outlived {
            // SAFETY: as above; the sleep this test started, by pid.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        assert!(!outlived, "the forked sleep {pid} outlived the run");
    }

    const X4CONN: &str = include_str!("../testdata/fio-randwrite-x4conn.json");
    const FLUSH: &str = include_str!("../testdata/fio-randwrite-flush.json");
    const READ: &str = include_str!("../testdata/fio-randread-qd32.json");

    #[test]
    fn test_captured_fio_json_parses_write_side_figures() {
        // Captured from fio 3.33 against nbdkit (numjobs=4, group_reporting,
        // with the engine's "connected" lines before the JSON).
        let s = parse(X4CONN, false).unwrap();
        assert!((s.iops - 45420.737787).abs() < 1e-6, "{s:?}");
        assert!((s.mib_s - 186043341.0 / 1048576.0).abs() < 1e-9);
        assert_eq!(s.p50_us, 354.304);
        assert_eq!(s.p99_us, 5275.648);
        assert_eq!(s.p999_us, 16318.464);
        assert_eq!(s.curve.len(), 3);
        assert!(s
            .curve
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
        let f = parse(FLUSH, false).unwrap();
        assert!((f.iops - 2446.553447).abs() < 1e-6);
        assert_eq!(f.p50_us, 97.792);
    }

    #[test]
    fn test_read_job_uses_read_side_and_write_side_is_rejected() {
        let r = parse(READ, true).unwrap();
        assert!(r.iops > 1000.0, "{r:?}");
        assert!(r.p50_us > 0.0 && r.p50_us <= r.p99_us && r.p99_us <= r.p999_us);
        // The write side of a read job did no I/O: an error, not zeros.
        assert!(parse(READ, false).unwrap_err().contains("no I/O"));
    }

    #[test]
    fn test_bad_fio_output_is_a_clear_error() {
        assert!(parse("fio: connection refused\n", false)
            .unwrap_err()
            .contains("no JSON"));
        assert!(parse("{\"jobs\": []}", false)
            .unwrap_err()
            .contains("0 job entries"));
        let failed = X4CONN.replace("\"error\" : 0", "\"error\" : 5");
        assert!(parse(&failed, false).unwrap_err().contains("error 5"));
        let no_p999 = X4CONN.replace("\"99.900000\"", "\"99.800000\"");
        assert!(parse(&no_p999, false).unwrap_err().contains("99.9"));
    }

    #[test]
    fn test_median_odd_even_and_unsorted() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.0]), 7.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn test_median_sample_takes_each_figure_separately() {
        let s = |iops: f64, p99: f64| Sample {
            iops,
            mib_s: iops / 256.0,
            p50_us: 10.0,
            p99_us: p99,
            p999_us: p99 * 2.0,
            curve: vec![(0.5, 10.0), (0.99, p99)],
        };
        // The run with the median IOPS is not the run with the median p99.
        let m = median_sample(&[s(100.0, 900.0), s(300.0, 100.0), s(200.0, 500.0)]).unwrap();
        assert_eq!(m.iops, 200.0);
        assert_eq!(m.p99_us, 500.0);
        assert_eq!(m.p999_us, 1000.0);
        assert_eq!(m.curve, vec![(0.5, 10.0), (0.99, 500.0)]);
        assert!(median_sample(&[]).is_none());
    }

    #[test]
    fn test_job_table_names_and_fio_args() {
        let names: Vec<&str> = JOBS.iter().map(|j| j.name).collect();
        assert_eq!(
            names,
            [
                "randwrite-4k-qd1",
                "randwrite-4k-qd32",
                "randwrite-4k-qd1-flush",
                "seqwrite-64k-qd1",
                "seqwrite-1m-qd1",
                "seqwrite-64k-qd8",
                "randread-4k-qd32",
                "randwrite-4k-qd8-x4conn"
            ]
        );
        let x4 = job("randwrite-4k-qd8-x4conn").unwrap().fio_args();
        assert!(x4.contains(&"--numjobs=4".into()) && x4.contains(&"--group_reporting".into()));
        assert!(x4.contains(&"--iodepth=8".into()));
        let fl = job("randwrite-4k-qd1-flush").unwrap().fio_args();
        assert!(fl.contains(&"--fsync=1".into()));
        assert!(job("randread-4k-qd32").unwrap().is_read());
        assert!(!job("seqwrite-1m-qd1").unwrap().is_read());
        assert!(job("nope").is_none());
    }
}
