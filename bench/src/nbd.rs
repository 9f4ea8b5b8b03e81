//! `msl-bench nbd`: the mirrored NBD export against nbdkit and qemu-nbd,
//! end to end, in one run.
//!
//! Every server is reached the same way: fio (nbd engine) on the client
//! host of msl-harness's topology (the LAN namespace, 10.77.1.50), through
//! the bridge, to a server in the primary's namespace (ns_a). The anchors
//! listen on the primary's LAN address 10.77.1.1; msl serves on the service
//! address 10.77.1.100 with its peer mirroring synchronously over the MSL
//! veth pair; msl-degraded is the same primary with the peer stopped. Backing
//! files of the same size on the same file system (the pair's run
//! directory), all through the page cache, FLUSH = fdatasync (see README).

use std::collections::HashMap;
use std::time::Duration;

use clap::Args;
use msl_harness::{Pair, PairOptions, SERVICE_IP};

use crate::fio::{self, command_in, JobSpec, Proc, Sample};

/// The anchors listen on the primary's LAN address.
const ANCHOR_IP: &str = msl_harness::topology::LAN_A;
pub const MSL_PORT: u16 = 10809;
const NBDKIT_PORT: u16 = 10810;
const QEMU_PORT: u16 = 10811;
const MSL_NBD_FILE_PORT: u16 = 10812;
const QEMU_MIRROR_PORT: u16 = 10814;

#[derive(Args, Debug, Clone)]
pub struct ServeFileArgs {
    /// Address to listen on.
    #[arg(long)]
    pub listen: std::net::SocketAddr,
    /// The file to serve (its size is the export's).
    #[arg(long)]
    pub file: std::path::PathBuf,
}

/// `msl-bench serve-file`: msl-nbd's server with its default settings over
/// a plain file, until killed.
pub fn serve_file(a: ServeFileArgs) -> Result<(), String> {
    let backend = msl_nbd::FileBackend::open(&a.file, false)
        .map_err(|e| format!("{}: {e}", a.file.display()))?;
    let listener =
        std::net::TcpListener::bind(a.listen).map_err(|e| format!("{}: {e}", a.listen))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    msl_nbd::serve(
        listener,
        String::new(),
        std::sync::Arc::new(backend),
        msl_nbd::ServerConfig::default(),
        stop,
    )
    .map_err(|e| e.to_string())
}

#[derive(Args, Debug, Clone)]
pub struct NbdArgs {
    /// Runs of every job on every server (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Measured seconds per fio run.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Warm-up seconds per fio run (not measured).
    #[arg(long, default_value_t = 1)]
    pub ramp: u64,
    /// Jobs to run, comma separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub jobs: Vec<String>,
    /// Servers, comma separated: msl, msl-degraded, nbdkit-file, qemu-nbd,
    /// msl-nbd-file, qemu-mirror.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "nbdkit-file,qemu-nbd,msl-nbd-file,qemu-mirror,msl,msl-degraded"
    )]
    pub servers: Vec<String>,
    /// Volume (export) size, e.g. 256M, 1G (bytes without a suffix).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub size: u64,
    /// One JSON object per line (server, job) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Where to write the latency chart (SVG).
    #[arg(long, default_value = "msl-nbd-latency.svg")]
    pub chart: String,
    /// MSL backend of the pair (auto, afxdp, afpacket); msld's default
    /// is auto (AF_XDP, else AF_PACKET).
    #[arg(long, default_value = "auto")]
    pub backend: String,
    /// Skip writing every byte of each export before the jobs.
    #[arg(long)]
    pub no_fill: bool,
    /// CPUs both msld processes run on (their `cpu_affinity`), comma
    /// separated; "none" leaves them unpinned. Both nodes of this demo pair
    /// share one machine: on one CPU their thread hand-offs stay on one
    /// core and the other core is the client's (on 2 cores: QD1 p50 206 us
    /// pinned vs ~300 us unpinned). "A/B" pins node 1 (the primary) to
    /// CPUs A and node 2 to B, e.g. "1/0": each server on a CPU of its
    /// own, as on two machines.
    #[arg(long, default_value = "0")]
    pub msl_cpus: String,
    /// Run the pair without a cluster key: MSL frames and LAN packets go
    /// unauthenticated (no keyed MAC), to show what authentication costs.
    #[arg(long)]
    pub no_key: bool,
    /// TCP congestion control of the client's and both servers' network
    /// namespaces, for every server alike ("host": the machine's default).
    /// Linux's default is cubic; a host that defaults to BBR paces a
    /// client's 64 KiB writes over the microsecond-RTT veth by a model of
    /// the flow's bandwidth that a server answering in a millisecond keeps
    /// low: writes then wait 20-40 ms in the client's kernel (bench/README.md,
    /// "The client's TCP congestion control").
    #[arg(long, default_value = "cubic")]
    pub tcp_cc: String,
    /// Profile: during each fio run against `msl` in the first round,
    /// `perf record -g` the primary's msld into DIR/<job>.perf.data
    /// (needs linux-perf: MSL_SETUP_PERF=1 bash scripts/setup.sh).
    #[arg(long, value_name = "DIR")]
    pub perf: Option<String>,
}

/// Set the TCP congestion control of network namespace `ns` (for the
/// sockets made there afterwards).
fn set_tcp_cc(ns: &str, cc: &str) -> Result<(), String> {
    // /proc/sys/net is the namespace of the process that opens it.
    let mut c = command_in(ns, "sh");
    c.args([
        "-c",
        "echo \"$1\" > /proc/sys/net/ipv4/tcp_congestion_control",
        "sh",
        cc,
    ]);
    let what = format!(
        "setting TCP congestion control {cc:?} in {ns} (see net.ipv4.tcp_available_congestion_control)"
    );
    fio::run_bounded(c, Duration::from_secs(10), &what).map(drop)
}

/// `256M`, `1G`, `1T`, `4096`, `64K` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mul) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("size {s}: unknown unit {c} (K, M, G, T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("size {s}: not a number"))?;
    n.checked_mul(mul)
        .filter(|&b| b >= 1 << 20 && b.is_multiple_of(4096))
        .ok_or(format!(
            "size {s}: must be at least 1M and a multiple of 4K"
        ))
}

/// The servers compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Server {
    Msl,
    MslDegraded,
    NbdkitFile,
    QemuNbd,
    /// msl's NBD server over a plain file (no mirroring): separates the
    /// NBD server's cost from the mirror's.
    MslNbdFile,
    /// QEMU's synchronous mirror (qemu-storage-daemon, `blockdev-mirror`
    /// write-blocking to qemu-nbd in the peer's namespace over the MSL
    /// veth): the other synchronous mirror a user could run.
    QemuMirror,
}

impl Server {
    pub const ALL: [Server; 6] = [
        Server::NbdkitFile,
        Server::QemuNbd,
        Server::MslNbdFile,
        Server::QemuMirror,
        Server::Msl,
        Server::MslDegraded,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Server::Msl => "msl",
            Server::MslDegraded => "msl-degraded",
            Server::NbdkitFile => "nbdkit-file",
            Server::QemuNbd => "qemu-nbd",
            Server::MslNbdFile => "msl-nbd-file",
            Server::QemuMirror => "qemu-mirror",
        }
    }

    pub fn parse(s: &str) -> Result<Server, String> {
        Server::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or(format!(
                "unknown server `{s}` (msl, msl-degraded, nbdkit-file, qemu-nbd, msl-nbd-file, qemu-mirror)"
            ))
    }

    fn uri(self) -> String {
        let (ip, port) = match self {
            Server::Msl | Server::MslDegraded => (SERVICE_IP, MSL_PORT),
            Server::NbdkitFile => (ANCHOR_IP, NBDKIT_PORT),
            Server::QemuNbd => (ANCHOR_IP, QEMU_PORT),
            Server::MslNbdFile => (ANCHOR_IP, MSL_NBD_FILE_PORT),
            // qemu-storage-daemon's export is named after its node.
            Server::QemuMirror => return format!("nbd://{ANCHOR_IP}:{QEMU_MIRROR_PORT}/src"),
        };
        format!("nbd://{ip}:{port}/")
    }
}

/// Progress lines on stderr (`msl-bench CMD: ...`), silent with --json.
pub fn narrator(cmd: &'static str, quiet: bool) -> impl Fn(&str) {
    move |m: &str| {
        if !quiet {
            eprintln!("msl-bench {cmd}: {m}");
        }
    }
}

/// An msl pair (not started) serving NBD on the service address, port
/// 10809. It owns the topology and the run directory: removed on drop, and
/// the namespaces on SIGINT/SIGTERM too.
/// `cpus`: msld's `cpu_affinity` for both nodes (e.g. "0" or "0,1"; empty
/// or "none": not pinned).
pub fn new_pair(
    volume_bytes: u64,
    backend: &str,
    cpus: &str,
    authenticate: bool,
) -> Result<Pair, String> {
    let mut o = PairOptions {
        volume_bytes,
        nbd_port: MSL_PORT,
        backend: backend.to_string(),
        authenticate,
        ..PairOptions::default()
    };
    match cpus.split_once('/') {
        Some((one, two)) => {
            for (id, list) in [(1, one), (2, two)] {
                if let Some(l) = cpu_list(list)? {
                    o = o.node_tunable(id, "cpu_affinity", format!("{l:?}"));
                }
            }
        }
        None => {
            if let Some(l) = cpu_list(cpus)? {
                o = o.tunable("cpu_affinity", format!("{l:?}"));
            }
        }
    }
    Pair::new(o)
}

/// `"0,1"` -> Some([0, 1]); `""` or `"none"` -> None (not pinned).
fn cpu_list(cpus: &str) -> Result<Option<Vec<usize>>, String> {
    if cpus.is_empty() || cpus == "none" {
        return Ok(None);
    }
    cpus.split(',')
        .map(|c| c.trim().parse())
        .collect::<Result<Vec<usize>, _>>()
        .map(Some)
        .map_err(|e| format!("--msl-cpus {cpus}: {e}"))
}

/// Start an anchor in namespace `ns` serving `file` on the LAN address.
fn start_anchor(s: Server, ns: &str, file: &str) -> Result<Proc, String> {
    let mut c = match s {
        // file plugin, page cache (cache=default): like msld's volume,
        // writes land in the page cache and FLUSH is fdatasync. -f: stay in
        // the foreground (a child we can kill); 16 threads (nbdkit's default).
        Server::NbdkitFile => {
            let mut c = command_in(ns, "nbdkit");
            c.args(["-f", "-t", "16", "-i", ANCHOR_IP, "-p"])
                .arg(NBDKIT_PORT.to_string())
                .args(["file", file, "cache=default"]);
            c
        }
        // raw, cache=writeback (page cache, FLUSH = fdatasync) with the
        // thread pool, up to 16 clients (-e 16), persistent (-t).
        Server::QemuNbd => {
            let mut c = command_in(ns, "qemu-nbd");
            c.args([
                "-t",
                "-e",
                "16",
                "-f",
                "raw",
                "--cache=writeback",
                "--aio=threads",
            ])
            .args(["-b", ANCHOR_IP, "-p"])
            .arg(QEMU_PORT.to_string())
            .arg(file);
            c
        }
        // This binary's hidden `serve-file` subcommand.
        Server::MslNbdFile => {
            let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
            let mut c = command_in(ns, &exe.to_string_lossy());
            c.args(["serve-file", "--listen"])
                .arg(format!("{ANCHOR_IP}:{MSL_NBD_FILE_PORT}"))
                .arg("--file")
                .arg(file);
            c
        }
        _ => return Err(format!("{} is not an anchor", s.name())),
    };
    let child = c
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting {}: {e} (bash scripts/setup.sh)", s.name()))?;
    Ok(Proc(child))
}

/// Wait until `uri`'s server completes an NBD handshake (nbdinfo from the
/// client namespace).
fn wait_serving(client_ns: &str, uri: &str, timeout: Duration) -> Result<(), String> {
    let t = std::time::Instant::now();
    loop {
        let mut c = command_in(client_ns, "nbdinfo");
        c.args(["--size", uri]);
        match fio::run_bounded(c, Duration::from_secs(5), &format!("nbdinfo {uri}")) {
            Ok(_) => return Ok(()),
            Err(e) if t.elapsed() > timeout => {
                return Err(format!("{uri} not serving after {timeout:?}: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// `perf record -g -p PID` until dropped (SIGINT, so perf writes its file).
struct PerfRecord(fio::Proc);

impl Drop for PerfRecord {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0 .0.id() as libc::pid_t, libc::SIGINT) };
        let t = std::time::Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.0 .0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn start_perf(dir: &str, job: &str, pid: u32) -> Result<PerfRecord, String> {
    let out = format!("{dir}/{job}.perf.data");
    let child = std::process::Command::new("perf")
        .args(["record", "-F", "999", "-g", "-q", "-o", &out, "-p"])
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("perf: {e}"))?;
    Ok(PerfRecord(fio::Proc(child)))
}

/// Total CPU time (user + system, all threads) of `pids`, microseconds;
/// None if any is gone or `pids` is empty.
fn cpu_us(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut ticks = 0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces): state is
        // field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        ticks += f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    }
    Some(ticks * 1_000_000 / hz)
}

fn need_tool(name: &str, pkg: &str) -> Result<(), String> {
    let ok = std::process::Command::new(name)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` not found: apt-get install {pkg} (bash scripts/setup.sh)"
        ))
    }
}

/// The median result of one server on one job.
#[derive(Debug, Clone)]
pub struct Row {
    pub server: Server,
    pub job: &'static str,
    pub runs: usize,
    pub m: Sample,
    /// msl only: times the primary went degraded (lost its peer) during
    /// this job's runs.
    pub session_drops: Option<usize>,
    /// msl and qemu-mirror, write jobs: CPU time of both halves of the
    /// mirror per client write, microseconds (median of runs).
    pub cpu_us_per_write: Option<f64>,
}

impl Row {
    pub fn json(&self, vs_nbdkit: Option<f64>, vs_degraded: Option<f64>) -> serde_json::Value {
        serde_json::json!({
            "server": self.server.name(),
            "job": self.job,
            "iops": round(self.m.iops, 1),
            "mib_s": round(self.m.mib_s, 2),
            "p50_us": round(self.m.p50_us, 1),
            "p99_us": round(self.m.p99_us, 1),
            "p999_us": round(self.m.p999_us, 1),
            "runs": self.runs,
            "session_drops": self.session_drops,
            "cpu_us_per_write": self.cpu_us_per_write.map(|x| round(x, 1)),
            "iops_vs_nbdkit": vs_nbdkit.map(|r| round(r, 3)),
            "iops_vs_degraded": vs_degraded.map(|r| round(r, 3)),
        })
    }
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// The goals: (job, minimum msl/nbdkit IOPS ratio). On one 2-core
/// machine a mirror does at least twice nbdkit's copying, so about 0.5 is
/// the sequential limit.
pub const GOALS: [(&str, f64); 4] = [
    ("randwrite-4k-qd32", 1.0),
    ("randwrite-4k-qd1", 0.8),
    ("seqwrite-1m-qd1", 0.4),
    ("seqwrite-64k-qd8", 0.4),
];

/// The goal against QEMU's synchronous mirror, on every job.
pub const MIRROR_GOAL: f64 = 2.0;

pub fn run(args: NbdArgs) -> Result<(), String> {
    let jobs: Vec<JobSpec> = if args.jobs.is_empty() {
        fio::JOBS.to_vec()
    } else {
        args.jobs
            .iter()
            .map(|n| fio::job(n).ok_or(format!("unknown job `{n}`")))
            .collect::<Result<_, _>>()?
    };
    let servers: Vec<Server> = args
        .servers
        .iter()
        .map(|s| Server::parse(s))
        .collect::<Result<_, _>>()?;
    if args.runs == 0 || args.seconds == 0 {
        return Err("--runs and --seconds must be at least 1".into());
    }
    need_tool("fio", "fio")?;
    need_tool("nbdinfo", "libnbd-bin")?;
    if servers.contains(&Server::NbdkitFile) {
        need_tool("nbdkit", "nbdkit")?;
    }
    if servers.contains(&Server::QemuNbd) || servers.contains(&Server::QemuMirror) {
        need_tool("qemu-nbd", "qemu-utils")?;
    }
    if servers.contains(&Server::QemuMirror) {
        need_tool("qemu-storage-daemon", "qemu-utils")?;
    }
    let with_msl = servers
        .iter()
        .any(|s| matches!(s, Server::Msl | Server::MslDegraded));
    let say = narrator("nbd", args.json);
    let pair = new_pair(args.size, &args.backend, &args.msl_cpus, !args.no_key)?;
    let server_ns = pair.topo.server_ns(1).to_string();
    let client_ns = pair.topo.client_ns().to_string();
    if args.tcp_cc != "host" {
        for ns in [client_ns.as_str(), &server_ns, pair.topo.server_ns(2)] {
            set_tcp_cc(ns, &args.tcp_cc)?;
        }
        say(&format!(
            "TCP congestion control in the bench's namespaces: {}",
            args.tcp_cc
        ));
    }
    let mut anchors: Vec<Proc> = Vec::new();
    let mut mirror = None;
    if servers.contains(&Server::QemuMirror) {
        say("starting qemu-mirror (waiting for the mirror job to be ready)");
        mirror = Some(crate::qemu_mirror::QemuMirror::start(
            &server_ns,
            ANCHOR_IP,
            QEMU_MIRROR_PORT,
            pair.topo.server_ns(2),
            msl_transport::netns::IP_B,
            pair.dir(),
            args.size,
        )?);
        wait_serving(
            &client_ns,
            &Server::QemuMirror.uri(),
            Duration::from_secs(20),
        )?;
    }
    for &s in &servers {
        if matches!(s, Server::NbdkitFile | Server::QemuNbd | Server::MslNbdFile) {
            let file = pair.dir().join(format!("{}.img", s.name()));
            let f = std::fs::File::create(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            f.set_len(args.size)
                .map_err(|e| format!("{}: {e}", file.display()))?;
            anchors.push(start_anchor(s, &server_ns, &file.to_string_lossy())?);
            wait_serving(&client_ns, &s.uri(), Duration::from_secs(20))?;
        }
    }
    if with_msl {
        say("starting the msl pair");
        pair.start_both()?;
        pair.wait_in_sync(1, Duration::from_secs(60))?;
        wait_serving(&client_ns, &Server::Msl.uri(), Duration::from_secs(20))?;
        say(&format!(
            "msld pids: primary {:?}, secondary {:?}; run directory {}",
            pair.pid(1),
            pair.pid(2),
            pair.dir().display()
        ));
    }
    if let Some(d) = &args.perf {
        need_tool("perf", "linux-perf")?;
        std::fs::create_dir_all(d).map_err(|e| format!("{d}: {e}"))?;
    }
    // Fill each export once, so reads hit written data everywhere.
    if !args.no_fill {
        for &s in &servers {
            if s != Server::MslDegraded {
                say(&format!("filling {} ({} MiB)", s.name(), args.size >> 20));
                fio::fill(&client_ns, &s.uri(), args.size)?;
            }
        }
    }
    let live: Vec<Server> = servers
        .iter()
        .copied()
        .filter(|&s| s != Server::MslDegraded)
        .collect();
    let mut samples: HashMap<(Server, &'static str), Vec<Sample>> = HashMap::new();
    let mut drops: HashMap<&'static str, usize> = HashMap::new();
    // Both halves' CPU time (user + system) per write, microseconds.
    let mut cpu: HashMap<(Server, &'static str), Vec<f64>> = HashMap::new();
    for round in 0..args.runs {
        for job in &jobs {
            // Rotate the order each round so no server always runs first.
            for i in 0..live.len() {
                let s = live[(i + round) % live.len()];
                say(&format!(
                    "run {}/{}: {} on {}",
                    round + 1,
                    args.runs,
                    job.name,
                    s.name()
                ));
                if s == Server::Msl {
                    // Every msl job starts from a pair in sync (a job that
                    // broke the session must not spill into the next).
                    let t = pair.wait_in_sync(1, Duration::from_secs(300))?;
                    if t > Duration::from_millis(100) {
                        say(&format!(
                            "waited {:.1} s for the pair to be in sync",
                            t.as_secs_f64()
                        ));
                    }
                }
                let since = msl_harness::unix_ms();
                let _perf = match (&args.perf, pair.pid(1)) {
                    (Some(d), Some(pid)) if s == Server::Msl && round == 0 => {
                        Some(start_perf(d, job.name, pid)?)
                    }
                    _ => None,
                };
                let pids: Vec<u32> = match (s, &mirror) {
                    (Server::Msl, _) => [pair.pid(1), pair.pid(2)].into_iter().flatten().collect(),
                    (Server::QemuMirror, Some(m)) => m.pids().to_vec(),
                    _ => Vec::new(),
                };
                let cpu0 = cpu_us(&pids);
                let r = fio::run_job(&client_ns, &s.uri(), job, args.seconds, args.ramp)?;
                if let (Some(a), Some(b), false) = (cpu0, cpu_us(&pids), job.is_read()) {
                    // fio's rate over the ramp and the run alike.
                    let writes = r.iops * (args.seconds + args.ramp) as f64;
                    if writes > 0.0 {
                        cpu.entry((s, job.name))
                            .or_default()
                            .push(b.saturating_sub(a) as f64 / writes);
                    }
                }
                samples.entry((s, job.name)).or_default().push(r);
                if s == Server::Msl {
                    // Sessions the primary lost during the job.
                    let n = pair
                        .events()
                        .iter()
                        .filter(|e| e.node == 1 && e.kind == "degraded" && e.ts_ms >= since)
                        .count();
                    *drops.entry(job.name).or_default() += n;
                }
            }
        }
        if servers.contains(&Server::MslDegraded) {
            say("stopping the secondary (msl-degraded)");
            pair.stop(2)?;
            pair.wait_status(
                1,
                "primary degraded (peer gone)",
                Duration::from_secs(20),
                |s| s["role"] == "primary" && s["connected"] == false,
            )?;
            for job in &jobs {
                say(&format!(
                    "run {}/{}: {} on msl-degraded",
                    round + 1,
                    args.runs,
                    job.name
                ));
                let r = fio::run_job(
                    &client_ns,
                    &Server::MslDegraded.uri(),
                    job,
                    args.seconds,
                    args.ramp,
                )?;
                samples
                    .entry((Server::MslDegraded, job.name))
                    .or_default()
                    .push(r);
            }
            say("restarting the secondary; waiting for the resync");
            pair.start(2)?;
            let t = pair.wait_in_sync(1, Duration::from_secs(300))?;
            say(&format!("in sync again after {:.1} s", t.as_secs_f64()));
        }
    }
    drop(anchors);
    drop(mirror);
    if with_msl {
        for id in [1, 2] {
            if let Ok(st) = pair.status(id) {
                say(&format!("node {id} counters: {}", st["counters"]));
            }
        }
    }
    let mut rows = Vec::new();
    for job in &jobs {
        for &s in &servers {
            if let Some(v) = samples.get(&(s, job.name)) {
                if let Some(m) = fio::median_sample(v) {
                    rows.push(Row {
                        server: s,
                        job: job.name,
                        runs: v.len(),
                        m,
                        session_drops: (s == Server::Msl)
                            .then(|| drops.get(job.name).copied().unwrap_or(0)),
                        cpu_us_per_write: cpu.get(&(s, job.name)).map(|v| fio::median(v)),
                    });
                }
            }
        }
    }
    report(&args, &jobs, &rows)
}

fn find<'a>(rows: &'a [Row], s: Server, job: &str) -> Option<&'a Row> {
    rows.iter().find(|r| r.server == s && r.job == job)
}

fn ratio(rows: &[Row], a: Server, b: Server, job: &str) -> Option<f64> {
    let (x, y) = (find(rows, a, job)?, find(rows, b, job)?);
    (y.m.iops > 0.0).then(|| x.m.iops / y.m.iops)
}

fn report(args: &NbdArgs, jobs: &[JobSpec], rows: &[Row]) -> Result<(), String> {
    let vs = |r: &Row| ratio(rows, r.server, Server::NbdkitFile, r.job);
    let vs_deg = |r: &Row| {
        (r.server == Server::Msl)
            .then(|| ratio(rows, Server::Msl, Server::MslDegraded, r.job))
            .flatten()
    };
    if args.json {
        for r in rows {
            println!("{}", r.json(vs(r), vs_deg(r)));
        }
    } else {
        println!(
            "{:<24} {:<13} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10}",
            "job",
            "server",
            "IOPS",
            "MiB/s",
            "p50 us",
            "p99 us",
            "p99.9 us",
            "x nbdkit",
            "CPU us/wr"
        );
        let mut dropped = Vec::new();
        for job in jobs {
            for r in rows.iter().filter(|r| r.job == job.name) {
                println!(
                    "{:<24} {:<13} {:>9.0} {:>8.1} {:>8.0} {:>8.0} {:>9.0} {:>9} {:>10}",
                    r.job,
                    r.server.name(),
                    r.m.iops,
                    r.m.mib_s,
                    r.m.p50_us,
                    r.m.p99_us,
                    r.m.p999_us,
                    vs(r).map_or("-".into(), |x| format!("{x:.2}")),
                    r.cpu_us_per_write.map_or("-".into(), |x| format!("{x:.1}")),
                );
                if let Some(n) = r.session_drops.filter(|&n| n > 0) {
                    dropped.push(format!("{} {n}", r.job));
                }
            }
        }
        if !dropped.is_empty() {
            println!(
                "\nmsl sessions lost during the jobs (primary went degraded; each \
                 reconnect resyncs): {}",
                dropped.join(", ")
            );
        }
        println!("\nmirroring cost (msl IOPS / msl-degraded IOPS):");
        for job in jobs {
            if let Some(x) = ratio(rows, Server::Msl, Server::MslDegraded, job.name) {
                println!("  {:<24} {x:.2}", job.name);
            }
        }
        println!("\ngoals (msl IOPS / nbdkit-file IOPS, msl mirroring synchronously):");
        for (job, goal) in GOALS {
            if let Some(x) = ratio(rows, Server::Msl, Server::NbdkitFile, job) {
                let ok = if x >= goal { "met" } else { "NOT met" };
                println!("  {job:<24} {x:.2} (goal >= {goal:.1}) {ok}");
            }
        }
        let mut head = false;
        for job in jobs {
            if let Some(x) = ratio(rows, Server::Msl, Server::QemuMirror, job.name) {
                if !head {
                    println!("\ngoals (msl IOPS / qemu-mirror IOPS, both synchronous mirrors):");
                    head = true;
                }
                let ok = if x >= MIRROR_GOAL { "met" } else { "NOT met" };
                println!("  {:<24} {x:.2} (goal >= {MIRROR_GOAL:.1}) {ok}", job.name);
            }
        }
        println!(
            "\n{} run(s) of {} s (+{} s ramp) per job and server, medians; volume {} MiB",
            args.runs,
            args.seconds,
            args.ramp,
            args.size >> 20
        );
    }
    let charts: Vec<String> = jobs
        .iter()
        .filter_map(|job| {
            let curves: Vec<crate::chart::Curve> = rows
                .iter()
                .filter(|r| r.job == job.name)
                .map(|r| (r.server.name().to_string(), r.m.curve.clone()))
                .collect();
            (!curves.is_empty()).then(|| {
                crate::chart::svg_points(
                    &format!(
                        "{}: completion latency by percentile (fio, median of runs)",
                        job.name
                    ),
                    "completion latency",
                    &curves,
                )
            })
        })
        .collect();
    if !charts.is_empty() {
        std::fs::write(&args.chart, crate::chart::stack(&charts))
            .map_err(|e| format!("{}: {e}", args.chart))?;
        if !args.json {
            println!("latency chart: {}", args.chart);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_size_units_and_bounds() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert_eq!(parse_size("2097152").unwrap(), 2 << 20);
        assert!(parse_size("12K").is_err());
        assert_eq!(parse_size("8T").unwrap(), 8 << 40);
        assert!(parse_size("3P").unwrap_err().contains("unit"));
        assert!(parse_size("abcM").unwrap_err().contains("not a number"));
        assert!(parse_size("1048577").is_err());
    }

    /// The setting lands in the namespace given (its own /proc/sys/net),
    /// not in the host's; an unknown algorithm is refused with the hint.
    #[test]
    fn test_tcp_congestion_control_set_per_namespace() {
        if !msl_transport::netns::is_root() {
            panic!("needs root (network namespaces)");
        }
        let read = |ns: Option<&str>| {
            let mut c = match ns {
                Some(n) => command_in(n, "cat"),
                None => std::process::Command::new("cat"),
            };
            let out = c
                .arg("/proc/sys/net/ipv4/tcp_congestion_control")
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let host = read(None);
        let ns = msl_transport::netns::NetNs::create("cc").unwrap();
        let other = if host == "reno" { "cubic" } else { "reno" };
        set_tcp_cc(&ns.name, other).unwrap();
        assert_eq!(read(Some(&ns.name)), other);
        assert_eq!(read(None), host, "the host's own setting changed");
        let e = set_tcp_cc(&ns.name, "no-such-cc").unwrap_err();
        assert!(e.contains("tcp_available_congestion_control"), "{e}");
        assert_eq!(read(Some(&ns.name)), other);
    }

    #[test]
    fn test_cpu_lists_and_per_node_pinning() {
        assert_eq!(cpu_list("0,1").unwrap(), Some(vec![0, 1]));
        assert_eq!(cpu_list("none").unwrap(), None);
        assert_eq!(cpu_list("").unwrap(), None);
        assert!(cpu_list("0,x").unwrap_err().contains("0,x"));
    }

    #[test]
    fn test_server_names_round_trip_and_uris() {
        for s in Server::ALL {
            assert_eq!(Server::parse(s.name()).unwrap(), s);
        }
        assert!(Server::parse("nbdkit").is_err());
        assert_eq!(Server::Msl.uri(), "nbd://10.77.1.100:10809/");
        assert_eq!(Server::NbdkitFile.uri(), "nbd://10.77.1.1:10810/");
    }

    #[test]
    fn test_cpu_time_of_this_process_grows() {
        let me = [std::process::id()];
        let a = cpu_us(&me).expect("own /proc stat");
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let b = cpu_us(&me).unwrap();
        assert!(
            b >= a + 100_000,
            "300 ms of spinning counted as {} us",
            b - a
        );
        assert_eq!(cpu_us(&[]), None);
        assert_eq!(cpu_us(&[u32::MAX]), None, "a pid that does not exist");
    }

    #[test]
    fn test_ratios_and_json_keys() {
        let s = |iops: f64| Sample {
            iops,
            mib_s: iops / 256.0,
            p50_us: 1.0,
            p99_us: 2.0,
            p999_us: 3.0,
            curve: vec![],
        };
        let rows = vec![
            Row {
                server: Server::NbdkitFile,
                job: "randwrite-4k-qd1",
                runs: 3,
                m: s(1000.0),
                session_drops: None,
                cpu_us_per_write: None,
            },
            Row {
                server: Server::Msl,
                job: "randwrite-4k-qd1",
                runs: 3,
                m: s(700.0),
                session_drops: None,
                cpu_us_per_write: Some(41.5),
            },
            Row {
                server: Server::MslDegraded,
                job: "randwrite-4k-qd1",
                runs: 3,
                m: s(1400.0),
                session_drops: None,
                cpu_us_per_write: None,
            },
        ];
        assert_eq!(
            ratio(&rows, Server::Msl, Server::NbdkitFile, "randwrite-4k-qd1"),
            Some(0.7)
        );
        assert_eq!(
            ratio(&rows, Server::Msl, Server::MslDegraded, "randwrite-4k-qd1"),
            Some(0.5)
        );
        assert_eq!(
            ratio(
                &rows,
                Server::QemuNbd,
                Server::NbdkitFile,
                "randwrite-4k-qd1"
            ),
            None
        );
        let j = rows[1].json(Some(0.7), Some(0.5));
        for k in [
            "server",
            "job",
            "iops",
            "mib_s",
            "p50_us",
            "p99_us",
            "p999_us",
            "cpu_us_per_write",
        ] {
            assert!(!j[k].is_null(), "missing {k}: {j}");
        }
        assert_eq!(j["server"], "msl");
        assert_eq!(j["iops"], 700.0);
    }
}
