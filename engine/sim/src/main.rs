//! `msl-sim`: run the deterministic simulator.
//!
//! * `msl-sim --seed N` replays one run with a readable trace.
//! * `msl-sim --seeds N` runs seeds 1..=N and ends with `N passed, M failed`.
//! * `msl-sim --scenario NAME` runs a named scenario (`--scenario all`).

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use msl_sim::{run_seed, scenario};

#[derive(Parser)]
#[command(
    name = "msl-sim",
    about = "Deterministic fault simulator for msl's protocol core"
)]
struct Args {
    /// Replay one seed with a readable trace.
    #[arg(long)]
    seed: Option<u64>,
    /// Run this many seeds (starting at --first).
    #[arg(long)]
    seeds: Option<u64>,
    /// First seed of a --seeds run.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// Run a named scenario, or `all`.
    #[arg(long)]
    scenario: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(name) = args.scenario {
        let mut failed = 0;
        let mut passed = 0;
        for (n, f) in scenario::all() {
            if name != "all" && name != n {
                continue;
            }
            match f(args.seed.unwrap_or(1)) {
                Ok(o) => {
                    passed += 1;
                    println!(
                        "{n:<30} ok   detection {:>7} ms  takeover {:>7} ms  client pause {:>7.1} ms  acked writes {}",
                        o.detection_ms.map_or("-".into(), |v| format!("{v:.1}")),
                        o.takeover_ms.map_or("-".into(), |v| format!("{v:.1}")),
                        o.client_pause_ms,
                        o.acked_writes
                    );
                }
                Err(e) => {
                    failed += 1;
                    println!("{n:<30} FAILED\n{e}");
                }
            }
        }
        if passed + failed == 0 {
            eprintln!("msl-sim: no scenario named `{name}`");
            return ExitCode::from(2);
        }
        println!("{passed} passed, {failed} failed");
        return if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    if let Some(seed) = args.seed {
        return match run_seed(seed, true) {
            Ok(r) => {
                println!(
                    "seed {seed}: ok ({} acked writes, {} reads checked, {} takeovers, {} resyncs, faults {:?})",
                    r.acked_writes, r.reads_checked, r.takeovers, r.resyncs, r.faults
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                println!("{e}");
                println!("replay: msl-sim --seed {seed}");
                ExitCode::FAILURE
            }
        };
    }
    let n = args.seeds.unwrap_or(100);
    let started = Instant::now();
    let mut failed = Vec::new();
    let mut writes = 0;
    for seed in args.first..args.first + n {
        match run_seed(seed, false) {
            Ok(r) => writes += r.acked_writes,
            Err(e) => {
                let first = e.lines().next().unwrap_or("").to_string();
                println!("FAILED {first}\n  replay: msl-sim --seed {seed}");
                failed.push(seed);
            }
        }
    }
    println!(
        "ran {n} seeds in {:.1} s ({writes} acknowledged writes checked)",
        started.elapsed().as_secs_f64()
    );
    println!(
        "{} passed, {} failed",
        n - failed.len() as u64,
        failed.len()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
