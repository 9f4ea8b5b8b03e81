//! `msl-sim`: run the deterministic simulator.
//!
//! * `msl-sim --seed N` replays one run with a readable trace.
//! * `msl-sim --seeds N` runs seeds 1..=N and ends with `N passed, M failed`.
//! * `msl-sim --scenario NAME` runs a named scenario (`--scenario all`).
//! * `--trace DIR` with any of these writes the full trace of each run to
//!   `DIR/seed-N.trace` or `DIR/scenario-NAME.trace` (every node input and
//!   action with virtual time, then the verdict). Traces are deterministic:
//!   `diff -r` of two directories shows whether a change altered behaviour.

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use msl_sim::{record_next_run, run_seed, scenario};

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
    /// Write one full trace file per run into this directory.
    #[arg(long)]
    trace: Option<PathBuf>,
}

/// Arrange for the next run to record into `dir/name.trace`.
fn trace_to(dir: Option<&Path>, name: &str) -> Option<PathBuf> {
    let p = dir?.join(format!("{name}.trace"));
    record_next_run(p.clone());
    Some(p)
}

/// Append the run's verdict to its trace file.
fn verdict(file: Option<PathBuf>, v: &str) {
    let Some(p) = file else { return };
    match OpenOptions::new().append(true).create(true).open(&p) {
        Ok(mut f) => {
            let _ = writeln!(f, "verdict: {v}");
        }
        Err(e) => eprintln!("msl-sim: cannot write {}: {e}", p.display()),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let dir = args.trace.as_deref();
    if let Some(d) = dir {
        if let Err(e) = std::fs::create_dir_all(d) {
            eprintln!("msl-sim: cannot create {}: {e}", d.display());
            return ExitCode::from(2);
        }
    }
    if let Some(name) = args.scenario {
        let mut failed = 0;
        let mut passed = 0;
        for (n, f) in scenario::all() {
            if name != "all" && name != n {
                continue;
            }
            let file = trace_to(dir, &format!("scenario-{n}"));
            let r = f(args.seed.unwrap_or(1));
            verdict(file, &format!("{r:?}"));
            match r {
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
        let file = trace_to(dir, &format!("seed-{seed}"));
        let r = run_seed(seed, true);
        verdict(file, &format!("{r:?}"));
        return match r {
            Ok(r) => {
                println!(
                    "seed {seed}: ok ({} acked writes, {} reads checked, {} takeovers, {} resyncs, {} verifies ({} hole blocks), faults {:?}; attacker: {} injected, {} rejected by the parser, {} replays delivered)",
                    r.acked_writes, r.reads_checked, r.takeovers, r.resyncs, r.verifies,
                    r.verify_hole_blocks, r.faults, r.attacks, r.attacks_rejected, r.replays_delivered
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
    let mut verifies = 0;
    let mut lost = 0;
    for seed in args.first..args.first + n {
        let file = trace_to(dir, &format!("seed-{seed}"));
        let r = run_seed(seed, false);
        verdict(file, &format!("{r:?}"));
        match r {
            Ok(r) => {
                writes += r.acked_writes;
                verifies += r.verifies;
                lost += r.input_lost;
            }
            Err(e) => {
                let first = e.lines().next().unwrap_or("").to_string();
                println!("FAILED {first}\n  replay: msl-sim --seed {seed}");
                failed.push(seed);
            }
        }
    }
    println!(
        "ran {n} seeds in {:.1} s ({writes} acknowledged writes checked, {verifies} online verifies, {lost} frames lost to full receive queues)",
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
