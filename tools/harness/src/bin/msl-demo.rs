//! msl-demo: the SFT III failure scenarios on a real msld pair in network
//! namespaces, narrated live, with a client-latency histogram and a summary
//! table. Run by scripts/demo.sh (as root).
//!
//! Exit status: 0 when every scenario passed; 1 when any lost an
//! acknowledged write, ended with different volumes where it should not,
//! or failed a check; 2 on bad usage (not root, unknown scenario).

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::Instant;

use clap::Parser;
use hdrhistogram::Histogram;
use msl_harness::pair::Event;
use msl_harness::scenario::{run, Observer, ScenarioOptions, ScenarioResult, SCENARIOS};

#[derive(Parser)]
#[command(
    name = "msl-demo",
    about = "the SFT III failure scenarios on a real msld pair, narrated"
)]
struct Args {
    /// Also print one JSON object per scenario per line on stdout (the
    /// narrative then goes to stderr).
    #[arg(long)]
    json: bool,
    /// Scenarios to run, comma-separated (1, 1b, 2, 3, 4, 5, 6; with a
    /// witness on the client host: 5w, 7, 8, 8s, 9).
    #[arg(
        long,
        default_value = "1,1b,2,3,4,5,6,5w,7,8,8s,9",
        value_delimiter = ','
    )]
    scenarios: Vec<String>,
    /// Volume size of each node, MiB.
    #[arg(long, default_value_t = 64)]
    volume_mib: u64,
    /// Client writes per second (0 = as fast as the pair acknowledges).
    #[arg(long, default_value_t = 1000)]
    client_rate: u32,
    /// The client gives a silent server up after this long and reconnects
    /// (a power loss or a dead LAN adapter sends no reset).
    #[arg(long, default_value_t = 500)]
    client_timeout_ms: u64,
}

/// Prints the narrative: steps, daemon events, a resync progress bar.
struct Narrator {
    start: Instant,
    json: bool,
    tty: bool,
    bar_open: Mutex<Option<u64>>,
}

impl Narrator {
    fn out(&self) -> Box<dyn Write> {
        if self.json {
            Box::new(std::io::stderr())
        } else {
            Box::new(std::io::stdout())
        }
    }

    fn line(&self, text: &str) {
        let mut bar = self.bar_open.lock().unwrap_or_else(|e| e.into_inner());
        let mut o = self.out();
        if bar.take().is_some() && self.tty {
            let _ = writeln!(o);
        }
        let _ = writeln!(o, "[{:6.1}s] {text}", self.start.elapsed().as_secs_f64());
    }
}

impl Observer for Narrator {
    fn step(&self, s: &str, msg: &str) {
        self.line(&format!("[{s:>2}] {msg}"));
    }

    fn event(&self, s: &str, e: &Event) {
        self.line(&format!(
            "[{s:>2}]     node {} | {:<20} {}",
            e.node, e.kind, e.message
        ));
    }

    fn resync_progress(&self, s: &str, done: u64, total: u64) {
        let pct = (done * 100).checked_div(total).unwrap_or(100);
        let mut bar = self.bar_open.lock().unwrap_or_else(|e| e.into_inner());
        let mut o = self.out();
        let filled = (pct / 4) as usize;
        let text = format!(
            "[{s:>2}]     resync [{}{}] {pct:3}%  {done}/{total} blocks",
            "#".repeat(filled),
            ".".repeat(25 - filled.min(25))
        );
        if self.tty {
            let _ = write!(o, "\r{:8} {text}", "");
            let _ = o.flush();
            *bar = Some(pct);
        } else if bar.is_none_or(|p| pct >= p + 25 || (pct == 100 && p != 100)) {
            let _ = writeln!(o, "{:9} {text}", "");
            *bar = Some(pct);
        }
    }
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.0}"))
}

fn summary(results: &[ScenarioResult]) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "{:<4} {:<42} {:>9} {:>9} {:>8} {:>8} {:>8} {:>6} {:>9} {:>6}\n",
        "id",
        "scenario",
        "detect ms",
        "takeov ms",
        "pause ms",
        "resync s",
        "MiB/s",
        "lost",
        "identical",
        "result"
    ));
    for r in results {
        s.push_str(&format!(
            "{:<4} {:<42} {:>9} {:>9} {:>8.0} {:>8} {:>8} {:>6} {:>9} {:>6}\n",
            r.scenario,
            r.title,
            opt_ms(r.detection_ms),
            opt_ms(r.takeover_ms),
            r.client_pause_ms,
            r.resync_s.map_or("-".into(), |x| format!("{x:.2}")),
            r.resync_mib_s.map_or("-".into(), |x| format!("{x:.1}")),
            format!(
                "{}{}",
                r.acked_writes_lost,
                if r.lost_writes_fail { "" } else { "*" }
            ),
            if r.volumes_identical { "yes" } else { "NO" },
            if r.passed() { "pass" } else { "FAIL" },
        ));
    }
    if results.iter().any(|r| !r.lost_writes_fail) {
        s.push_str("  * split brain: writes acknowledged only by the side the administrator discards are lost by design\n");
    }
    s
}

fn histogram_text(h: &Histogram<u64>) -> String {
    let edges_us: [u64; 13] = [
        0, 250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
        1_000_000,
    ];
    let label = |us: u64| {
        if us >= 1000 {
            format!("{}ms", us / 1000)
        } else {
            format!("{us}us")
        }
    };
    let mut rows = Vec::new();
    for w in edges_us.windows(2) {
        rows.push((
            format!("{:>6} - {:<6}", label(w[0]), label(w[1])),
            h.count_between(w[0], w[1].saturating_sub(1)),
        ));
    }
    rows.push((
        format!("{:>6} +       ", label(edges_us[12])),
        h.count_between(edges_us[12], u64::MAX),
    ));
    let max = rows.iter().map(|r| r.1).max().unwrap_or(1).max(1);
    let mut s = format!(
        "client write latency ({} writes): p50 {} us, p99 {} us, p99.9 {} us, max {} us\n",
        h.len(),
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    );
    for (l, c) in rows {
        let n = if c == 0 {
            0
        } else {
            ((c as f64 / max as f64) * 50.0).ceil() as usize
        };
        s.push_str(&format!("  {l} |{:<50}| {c}\n", "#".repeat(n)));
    }
    s
}

fn main() {
    let args = Args::parse();
    if !msl_transport::netns::is_root() {
        eprintln!(
            "msl-demo: must run as root (it creates network namespaces, veth pairs and a bridge, \
             and runs msld with raw sockets): sudo bash scripts/demo.sh"
        );
        std::process::exit(2);
    }
    for s in &args.scenarios {
        if !SCENARIOS.iter().any(|(id, _)| id == s) {
            eprintln!(
                "msl-demo: unknown scenario `{s}` (known: {})",
                SCENARIOS
                    .iter()
                    .map(|(i, _)| *i)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            std::process::exit(2);
        }
    }
    let narrator = Narrator {
        start: Instant::now(),
        json: args.json,
        tty: if args.json {
            std::io::stderr().is_terminal()
        } else {
            std::io::stdout().is_terminal()
        },
        bar_open: Mutex::new(None),
    };
    let mut opts = ScenarioOptions::default();
    opts.pair.volume_bytes = args.volume_mib << 20;
    opts.client_writes_per_s = (args.client_rate > 0).then_some(args.client_rate);
    opts.client_io_timeout = std::time::Duration::from_millis(args.client_timeout_ms.max(10));
    let intro = [
        "msl demo: two servers (network namespaces) mirrored over a dedicated link, one LAN switch",
        "",
        "  server 1 (ns_a)                  LAN switch + client            server 2 (ns_b)",
        "  msla 10.79.0.1 <============== MSL (raw Ethernet) ==============> mslb 10.79.0.2",
        "  a-lan 10.77.1.1 --------------- br0 10.77.1.50 --------------- b-lan 10.77.1.2",
        "  scenarios 5w to 9: msl-witness on the client host (10.77.1.60:7790) grants the lease",
        "  service address 10.77.1.100 (NBD :10809) on the primary; the client writes stamped 4 KiB",
        "  blocks to it and checks every block at the end against what was acknowledged",
        "",
    ];
    for l in intro {
        narrator.line(l);
    }
    let mut results = Vec::new();
    let mut all = msl_harness::workload::latency_histogram();
    for id in &args.scenarios {
        let r = run(id, &opts, &narrator);
        let _ = all.add(&r.latency_us);
        narrator.line(&format!(
            "[{id:>2}] => {}: detection {} ms, takeover {} ms, longest client pause {:.0} ms, resync {} s, {} acknowledged writes lost, volumes {}",
            if r.passed() { "PASS" } else { "FAIL" },
            opt_ms(r.detection_ms),
            opt_ms(r.takeover_ms),
            r.client_pause_ms,
            r.resync_s.map_or("-".into(), |x| format!("{x:.2}")),
            r.acked_writes_lost,
            if r.volumes_identical { "identical" } else { "DIFFERENT" }
        ));
        if !r.passed() {
            for l in r.failures().lines() {
                narrator.line(&format!("[{id:>2}]    {l}"));
            }
        }
        narrator.line("");
        if args.json {
            println!("{}", r.to_json());
        }
        results.push(r);
    }
    for l in histogram_text(&all).lines() {
        narrator.line(l);
    }
    narrator.line("");
    for l in summary(&results).lines() {
        narrator.line(l);
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.scenario.as_str())
        .collect();
    if failed.is_empty() {
        narrator.line("every scenario passed; namespaces and daemons removed");
    } else {
        narrator.line(&format!(
            "FAILED scenarios: {}; namespaces and daemons removed",
            failed.join(", ")
        ));
        std::process::exit(1);
    }
}
