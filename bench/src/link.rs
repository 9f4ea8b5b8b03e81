//! `msl-bench link`: patterned 4 KiB blocks with reliable delivery over
//! msld's own MSL workers (`msl_transport::worker`: encoder, frame pool,
//! transmit worker behind lock-free queues, direct sends, receive worker),
//! on each backend, beside iperf3 over the same veth pair.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use msl_core::reliable::TxConfig;
use msl_transport::afpacket::{RingConfig, TpVersion};
use msl_transport::afxdp::{XdpConfig, XdpMode};
use msl_transport::netns::{is_root, VethPair};
use msl_transport::pair::{in_ns, open_pair, Ends, LinkKind};
use msl_transport::stream::{run_pair, Cores, StreamConfig, BLOCK_SIZE};
use msl_transport::worker::SendMode;
use msl_transport::{BackendKind, OpenOptions};

#[derive(Args, Debug, Clone)]
pub struct LinkArgs {
    /// Seconds to stream on each backend (and to run iperf3).
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Backends to run, comma separated: afxdp, afpacket, auto, tcp.
    #[arg(long, default_value = "afxdp,afpacket,tcp", value_delimiter = ',')]
    pub backends: Vec<String>,
    /// Split the time into this many rounds, running every backend (and
    /// the baseline) once per round, so load changes on a shared machine
    /// hit all of them alike. Results are merged per backend.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// One JSON object per line instead of the table.
    #[arg(long)]
    pub json: bool,
    /// One block in flight at a time; compare with a kernel-TCP ping-pong.
    #[arg(long)]
    pub qd1: bool,
    /// Skip iperf3 (and the TCP ping-pong in --qd1).
    #[arg(long)]
    pub no_baseline: bool,
    /// Where to write the latency chart (SVG).
    #[arg(long, default_value = "msl-link-latency.svg")]
    pub chart: String,
    /// MTU of the veth pair this command creates.
    #[arg(long, default_value_t = 9000)]
    pub mtu: usize,
    /// Reliable-delivery window in blocks (streaming mode).
    #[arg(long, default_value_t = 1024)]
    pub window: usize,
    /// Consecutive 4 KiB blocks per DATA frame in streaming mode (1 or 2;
    /// 2 needs an MTU of at least 8300). --qd1 always sends 1.
    #[arg(long, default_value_t = 2)]
    pub blocks_per_frame: usize,
    /// Lower bound of the retransmission timeout, microseconds.
    #[arg(long, default_value_t = 20_000)]
    pub rto_min_us: u64,
    /// AF_XDP program mode: generic or native.
    #[arg(long, default_value = "generic")]
    pub xdp_mode: String,
    /// How A's core thread hands frames to its transmit worker, as msld's
    /// does: "direct" (send from the core thread when the link is free and
    /// nothing is queued, msld's default) or "queue" (always through the
    /// transmit worker).
    #[arg(long, default_value = "direct")]
    pub send: SendMode,
    /// Do not pin worker threads to cores.
    #[arg(long)]
    pub no_pin: bool,
    /// Cores for A's core thread, TX, RX workers and B's TX, RX workers
    /// (default 1,0,1,1,1: A's TX worker, which on veth also does B's
    /// kernel receive work, gets core 0 to itself).
    #[arg(long, value_delimiter = ',')]
    pub cores: Option<Vec<usize>>,
    /// Use existing namespaces/interfaces instead of creating a veth pair:
    /// all four of --ns-a, --ns-b (may be ""), --if-a, --if-b.
    #[arg(long)]
    pub ns_a: Option<String>,
    #[arg(long)]
    pub ns_b: Option<String>,
    #[arg(long)]
    pub if_a: Option<String>,
    #[arg(long)]
    pub if_b: Option<String>,
    /// Side B's IPv4 address (TCP backend, iperf3, ping-pong) with given
    /// interfaces.
    #[arg(long)]
    pub ip_b: Option<String>,
}

/// One line of results.
#[derive(Clone, Debug, Default)]
struct Row {
    backend: String,
    payload_gbit_s: f64,
    blocks_per_s: f64,
    /// CPU time per wall second, in cores, on side A (sender) and B.
    cpu_a: f64,
    cpu_b: f64,
    lost_frames: u64,
    retransmits: u64,
    verified_blocks: u64,
    rtt: Option<Histogram<u64>>,
    note: String,
    /// Seconds measured (weights the rates when rounds are merged).
    elapsed_s: f64,
}

impl Row {
    /// Fold another round of the same backend into this one.
    fn merge(&mut self, o: Row) {
        let (t0, t1) = (self.elapsed_s, o.elapsed_s);
        let t = (t0 + t1).max(1e-9);
        let w = |a: f64, b: f64| (a * t0 + b * t1) / t;
        self.payload_gbit_s = w(self.payload_gbit_s, o.payload_gbit_s);
        self.blocks_per_s = w(self.blocks_per_s, o.blocks_per_s);
        self.cpu_a = w(self.cpu_a, o.cpu_a);
        self.cpu_b = w(self.cpu_b, o.cpu_b);
        self.elapsed_s = t0 + t1;
        self.lost_frames += o.lost_frames;
        self.retransmits += o.retransmits;
        self.verified_blocks += o.verified_blocks;
        match (&mut self.rtt, o.rtt) {
            (Some(a), Some(b)) => {
                let _ = a.add(&b);
            }
            (None, b) => self.rtt = b,
            _ => {}
        }
        if !o.note.is_empty() && !self.note.contains(&o.note) {
            if !self.note.is_empty() {
                self.note.push_str("; ");
            }
            self.note.push_str(&o.note);
        }
    }

    fn pct(&self, q: f64) -> Option<u64> {
        self.rtt
            .as_ref()
            .filter(|h| !h.is_empty())
            .map(|h| h.value_at_quantile(q))
    }

    fn json(&self, mode: &str) -> serde_json::Value {
        let p = |q| {
            self.pct(q)
                .map(serde_json::Value::from)
                .unwrap_or(serde_json::Value::Null)
        };
        serde_json::json!({
            "backend": self.backend,
            "mode": mode,
            "payload_gbit_s": round2(self.payload_gbit_s),
            "blocks_per_s": self.blocks_per_s.round(),
            "cpu_a_cores": round2(self.cpu_a),
            "cpu_b_cores": round2(self.cpu_b),
            "rtt_p50_us": p(0.5),
            "rtt_p99_us": p(0.99),
            "rtt_p999_us": p(0.999),
            "rtt_max_us": self.rtt.as_ref().filter(|h| !h.is_empty()).map(|h| h.max()),
            "lost_frames": self.lost_frames,
            "retransmits": self.retransmits,
            "verified_blocks": self.verified_blocks,
            "note": self.note,
        })
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn parse_kind(s: &str) -> io::Result<LinkKind> {
    match s {
        "tcp" => Ok(LinkKind::Tcp),
        o => o
            .parse::<BackendKind>()
            .map(LinkKind::Raw)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e)),
    }
}

/// Cores on this 2-core layout: the sender's TX worker (which on veth also
/// does the receiver's kernel work) on core 0, everything else on core 1.
fn cores(pin: bool, given: Option<&[usize]>) -> (Cores, Cores) {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if !pin || n < 2 {
        return (Cores::default(), Cores::default());
    }
    let c = match given {
        Some(&[a, b, c, d, e]) => [a, b, c, d, e],
        _ => [1, 0, 1, 1, 1],
    };
    (
        Cores {
            capture: Some(c[0]),
            tx: Some(c[1]),
            rx: Some(c[2]),
        },
        Cores {
            capture: None,
            tx: Some(c[3]),
            rx: Some(c[4]),
        },
    )
}

pub fn run(args: LinkArgs) -> io::Result<()> {
    if !is_root() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "link needs root (network namespaces, raw sockets, XDP); run it with sudo",
        ));
    }
    let kinds: Vec<LinkKind> = args
        .backends
        .iter()
        .map(|s| parse_kind(s.trim()))
        .collect::<io::Result<_>>()?;
    let xdp_mode = match args.xdp_mode.as_str() {
        "generic" => XdpMode::Generic,
        "native" => XdpMode::Native,
        o => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("--xdp-mode {o:?}: expected generic or native"),
            ))
        }
    };

    // Topology: ours (deleted on every exit path) or the one given.
    let owned;
    let ends: Ends = match (&args.ns_a, &args.ns_b, &args.if_a, &args.if_b) {
        (Some(na), Some(nb), Some(ia), Some(ib)) => Ends {
            ns_a: na.clone(),
            ns_b: nb.clone(),
            if_a: ia.clone(),
            if_b: ib.clone(),
            ip_b: args.ip_b.clone().unwrap_or_default(),
        },
        (None, None, None, None) => {
            owned = VethPair::create(args.mtu)?;
            (&owned).into()
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "give all of --ns-a, --ns-b, --if-a, --if-b, or none",
            ))
        }
    };

    let mode = if args.qd1 { "qd1" } else { "stream" };
    let secs = args.seconds.max(1);
    let rounds = args.rounds.max(1);
    let round_secs = secs.div_ceil(u64::from(rounds)).max(1);
    let mut rows: Vec<Row> = Vec::new();
    let merge =
        |rows: &mut Vec<Row>, row: Row| match rows.iter_mut().find(|r| r.backend == row.backend) {
            Some(r) => r.merge(row),
            None => rows.push(row),
        };
    for _ in 0..rounds {
        for &kind in &kinds {
            let row = run_backend(&args, &ends, kind, xdp_mode, round_secs).unwrap_or_else(|e| {
                eprintln!("msl-bench: {kind}: {e}");
                Row {
                    backend: kind.to_string(),
                    note: format!("failed: {e}"),
                    ..Row::default()
                }
            });
            merge(&mut rows, row);
        }
        if !args.no_baseline && !ends.ip_b.is_empty() {
            let r = if args.qd1 {
                tcp_pingpong(&ends, round_secs)
            } else {
                iperf3(&ends, round_secs)
            };
            let row = r.unwrap_or_else(|e| {
                eprintln!("msl-bench: baseline: {e}");
                Row {
                    backend: if args.qd1 { "tcp-pingpong" } else { "iperf3" }.into(),
                    note: format!("failed: {e}"),
                    ..Row::default()
                }
            });
            merge(&mut rows, row);
        }
    }
    if args.json {
        for r in &rows {
            println!("{}", r.json(mode));
        }
    }
    if !args.json {
        print_table(&rows, mode, secs, args.mtu);
    }
    let series: Vec<(String, &Histogram<u64>)> = rows
        .iter()
        .filter_map(|r| {
            r.rtt
                .as_ref()
                .filter(|h| !h.is_empty())
                .map(|h| (r.backend.clone(), h))
        })
        .collect();
    if !series.is_empty() {
        let title = format!(
            "msl-bench link{}: block sent -> ack received (4 KiB, {secs} s each)",
            if args.qd1 { " --qd1" } else { "" }
        );
        std::fs::write(&args.chart, crate::chart::svg(&title, &series))?;
        if !args.json {
            println!("latency chart: {}", args.chart);
        }
    }
    Ok(())
}

fn run_backend(
    args: &LinkArgs,
    ends: &Ends,
    kind: LinkKind,
    xdp_mode: XdpMode,
    seconds: u64,
) -> io::Result<Row> {
    let qd1 = args.qd1;
    let opts = OpenOptions {
        afpacket: RingConfig {
            // Per-frame hand-over for latency; blocks for throughput.
            version: if qd1 { TpVersion::V2 } else { TpVersion::V3 },
            ..RingConfig::default()
        },
        afxdp: XdpConfig {
            mode: xdp_mode,
            ..XdpConfig::default()
        },
    };
    let opened = open_pair(ends, kind, &opts, None, None)?;
    let (ca, cb) = cores(!args.no_pin, args.cores.as_deref());
    let cfg = StreamConfig {
        duration: Some(Duration::from_secs(seconds.max(1))),
        sender_mac: opened.mac_a,
        receiver_mac: opened.mac_b,
        reliable: TxConfig {
            window: if qd1 { 1 } else { args.window.max(1) },
            rto_min_us: args.rto_min_us,
            rto_initial_us: args.rto_min_us.max(50_000),
            ..StreamConfig::default().reliable
        },
        sender_cores: ca,
        receiver_cores: cb,
        send_mode: args.send,
        blocks_per_frame: if qd1 { 1 } else { args.blocks_per_frame },
        ..StreamConfig::default()
    };
    let (snd, rcv) = run_pair(opened.a, opened.b, &cfg)?;
    let secs = snd.elapsed.as_secs_f64().max(1e-9);
    if std::env::var_os("MSL_DEBUG").is_some() {
        eprintln!(
            "{kind}: cpu A core/tx/rx {:?}, cpu B tx/rx {:?}, elapsed {secs:.2} s, acks sent {} received {}, receiver duplicates {}, direct frames {}, queue drops {}, pool misses {}",
            snd.cpu, rcv.cpu, rcv.acks_sent, snd.acks_received, rcv.duplicates,
            snd.direct_frames, snd.queue_dropped, snd.pool_misses
        );
    }
    let cpu_a: f64 = snd.cpu.iter().map(Duration::as_secs_f64).sum::<f64>() / secs;
    let cpu_b: f64 = rcv.cpu.iter().map(Duration::as_secs_f64).sum::<f64>() / secs;
    let mut note = String::new();
    if let Some(r) = &opened.fallback_reason {
        note = format!("auto fell back to AF_PACKET: {r}");
    }
    if rcv.bad_pattern + rcv.order_errors + rcv.bad_data > 0 || rcv.verified != snd.blocks_acked {
        note.push_str(&format!(
            " VERIFY FAILED: bad content {}, order errors {}, bad data {}, verified {} of {} acked",
            rcv.bad_pattern, rcv.order_errors, rcv.bad_data, rcv.verified, snd.blocks_acked
        ));
    }
    if !snd.complete {
        note.push_str(" incomplete: not every block was acknowledged");
    }
    Ok(Row {
        backend: match kind {
            LinkKind::Raw(BackendKind::Auto) => format!("auto({})", opened.chosen),
            k => k.to_string(),
        },
        payload_gbit_s: snd.blocks_acked as f64 * BLOCK_SIZE as f64 * 8.0 / secs / 1e9,
        blocks_per_s: snd.blocks_acked as f64 / secs,
        cpu_a,
        cpu_b,
        lost_frames: rcv.kernel_dropped + snd.rx_kernel_dropped,
        retransmits: snd.retransmits,
        verified_blocks: rcv.verified,
        rtt: Some(snd.rtt_us),
        note: note.trim().to_string(),
        elapsed_s: secs,
    })
}

/// Kills and reaps a child process on every exit path.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn netns_cmd(ns: &str, prog: &str) -> Command {
    if ns.is_empty() {
        Command::new(prog)
    } else {
        msl_transport::netns::command_in(ns, prog)
    }
}

fn iperf3(ends: &Ends, secs: u64) -> io::Result<Row> {
    let port = "5211";
    let server = netns_cmd(&ends.ns_b, "iperf3")
        .args(["-s", "-1", "-B", &ends.ip_b, "-p", port])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("starting iperf3 (run scripts/setup.sh): {e}"),
            )
        })?;
    let _server = ChildGuard(server);
    // Give the one-shot server time to listen (a probe connection would
    // use up its single test).
    std::thread::sleep(Duration::from_millis(300));
    let mut out = None;
    for _ in 0..20 {
        let o = netns_cmd(&ends.ns_a, "iperf3")
            .args(["-c", &ends.ip_b, "-p", port, "-t", &secs.to_string(), "-J"])
            .output()?;
        let refused = String::from_utf8_lossy(&o.stdout).contains("Connection refused");
        out = Some(o);
        if !refused {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = out.ok_or_else(|| io::Error::other("iperf3 did not run"))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        io::Error::other(format!(
            "iperf3 output not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    })?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(io::Error::other(format!("iperf3: {err}")));
    }
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    let cpu = &v["end"]["cpu_utilization_percent"];
    let rexmit = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
    Ok(Row {
        backend: "iperf3".into(),
        payload_gbit_s: bps / 1e9,
        blocks_per_s: bps / 8.0 / BLOCK_SIZE as f64,
        cpu_a: cpu["host_total"].as_f64().unwrap_or(0.0) / 100.0,
        cpu_b: cpu["remote_total"].as_f64().unwrap_or(0.0) / 100.0,
        lost_frames: 0,
        retransmits: rexmit,
        verified_blocks: 0,
        rtt: None,
        note: "kernel TCP ceiling (blocks/s = bytes/4096)".into(),
        elapsed_s: secs as f64,
    })
}

/// One 4 KiB request, one 64-byte reply, one at a time, over kernel TCP.
fn tcp_pingpong(ends: &Ends, secs: u64) -> io::Result<Row> {
    let addr: SocketAddr = format!("{}:7790", ends.ip_b)
        .parse()
        .map_err(|e| io::Error::other(format!("{e}")))?;
    let listener = in_ns(&ends.ns_b, || TcpListener::bind(addr))??;
    let mut client = in_ns(&ends.ns_a, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
    })??;
    let (mut server, _) = listener.accept()?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let done = AtomicBool::new(false);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .map_err(|e| io::Error::other(format!("{e}")))?;
    let (cpu_a, cpu_b, n, elapsed) = std::thread::scope(|s| -> io::Result<(f64, f64, u64, f64)> {
        let srv = s.spawn(|| -> io::Result<f64> {
            let mut req = [0u8; BLOCK_SIZE];
            let rep = [0u8; 64];
            let t = msl_cpu_now();
            loop {
                if server.read_exact(&mut req).is_err() {
                    break;
                }
                server.write_all(&rep)?;
                if done.load(Ordering::Relaxed) {
                    break;
                }
            }
            Ok(msl_cpu_now().saturating_sub(t).as_secs_f64())
        });
        let req = [0x5Au8; BLOCK_SIZE];
        let mut rep = [0u8; 64];
        let t_cpu = msl_cpu_now();
        let start = Instant::now();
        let end = start + Duration::from_secs(secs);
        let mut n = 0u64;
        while Instant::now() < end {
            let t = Instant::now();
            client.write_all(&req)?;
            client.read_exact(&mut rep)?;
            let _ = hist.record((t.elapsed().as_micros() as u64).max(1));
            n += 1;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let cpu_a = msl_cpu_now().saturating_sub(t_cpu).as_secs_f64();
        done.store(true, Ordering::Relaxed);
        let _ = client.shutdown(std::net::Shutdown::Both);
        let cpu_b = srv
            .join()
            .map_err(|_| io::Error::other("ping-pong server panicked"))??;
        Ok((cpu_a / elapsed, cpu_b / elapsed, n, elapsed))
    })?;
    Ok(Row {
        backend: "tcp-pingpong".into(),
        payload_gbit_s: n as f64 * BLOCK_SIZE as f64 * 8.0 / elapsed / 1e9,
        blocks_per_s: n as f64 / elapsed,
        cpu_a,
        cpu_b,
        lost_frames: 0,
        retransmits: 0,
        verified_blocks: 0,
        rtt: Some(hist),
        note: "kernel TCP, 4 KiB request / 64 B reply, one in flight".into(),
        elapsed_s: elapsed,
    })
}

fn msl_cpu_now() -> Duration {
    msl_transport::thread_cpu_time()
}

fn print_table(rows: &[Row], mode: &str, secs: u64, mtu: usize) {
    println!(
        "msl-bench link ({mode}, 4 KiB blocks, {secs} s per backend, MTU {mtu}; CPU in cores per side A/B; RTT = block sent -> ack received)"
    );
    println!(
        "{:<14} {:>8} {:>10} {:>6} {:>6} {:>7} {:>8} {:>10} {:>8} {:>8} {:>8} {:>8}  note",
        "backend",
        "Gbit/s",
        "blocks/s",
        "CPU A",
        "CPU B",
        "lost",
        "rexmit",
        "verified",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "max us"
    );
    for r in rows {
        let p = |q| {
            r.pct(q)
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into())
        };
        let max = r
            .rtt
            .as_ref()
            .filter(|h| !h.is_empty())
            .map(|h| h.max().to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<14} {:>8.2} {:>10.0} {:>6.2} {:>6.2} {:>7} {:>8} {:>10} {:>8} {:>8} {:>8} {:>8}  {}",
            r.backend,
            r.payload_gbit_s,
            r.blocks_per_s,
            r.cpu_a,
            r.cpu_b,
            r.lost_frames,
            r.retransmits,
            r.verified_blocks,
            p(0.5),
            p(0.99),
            p(0.999),
            max,
            r.note
        );
    }
}

/// Streaming payload capacity of an existing link on one backend (4 KiB
/// blocks with reliable delivery, `msl-bench link`'s defaults): the ceiling
/// a resync over that link could reach. In Gbit/s of block payload.
pub fn stream_capacity_gbit_s(ends: &Ends, backend: &str, seconds: u64) -> io::Result<f64> {
    #[derive(clap::Parser)]
    struct Defaults {
        #[command(flatten)]
        a: LinkArgs,
    }
    let args = <Defaults as clap::Parser>::parse_from(["link"]).a;
    let kind = parse_kind(backend)?;
    let row = run_backend(&args, ends, kind, XdpMode::Generic, seconds.max(1))?;
    if row.verified_blocks == 0 {
        return Err(io::Error::other(format!(
            "{backend}: no block verified ({})",
            row.note
        )));
    }
    Ok(row.payload_gbit_s)
}
