//! `msl-witness --config FILE`: the lease arbiter for msl pairs, run on a
//! third host on the client LAN. `--check` validates the configuration
//! and the key files and exits.
//!
//! Exit status: 0 after a clean stop (SIGTERM/SIGINT) or a valid
//! `--check`; 1 if the configuration, a key file or the socket is refused.
//! SIGHUP is logged and ignored (no reload).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use msl_witness::{config, server};

/// Witness for msl pairs: grants one node of a cluster at a time the
/// right to serve without its peer, as a time-bounded lease.
#[derive(Parser)]
#[command(name = "msl-witness", version)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Validate the configuration and key files, then exit.
    #[arg(long)]
    check: bool,
}

fn run(args: Args) -> Result<(), String> {
    let cfg = config::load(&args.config).map_err(|e| e.to_string())?;
    let keys = config::load_keys(&cfg).map_err(|e| e.to_string())?;
    if let Some(path) = &cfg.state_file {
        server::read_state(path)?;
    }
    if args.check {
        println!(
            "msl-witness: configuration {} is valid",
            args.config.display()
        );
        return Ok(());
    }
    let signals = server::Signals::default();
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, signals.stop.clone()).map_err(|e| e.to_string())?;
    }
    signal_hook::flag::register(signal_hook::consts::SIGHUP, signals.hup.clone())
        .map_err(|e| e.to_string())?;
    let ids: Vec<u64> = cfg.clusters.iter().map(|c| c.id).collect();
    let (lease_ms, startup_ms) = (cfg.lease_ms, cfg.startup_ms);
    let stateless = cfg.state_file.is_none();
    let srv = server::Server::bind(cfg, keys, server::random_epoch()?)?;
    eprintln!(
        "msl-witness: listening on {} (lease {lease_ms} ms, no grants for the first \
         {startup_ms} ms, clusters {ids:?})",
        srv.local_addr()?
    );
    if stateless {
        eprintln!(
            "msl-witness: warning: no state_file: a restart forgets which node last held \
             each lease and at what generation, so a node lacking writes acknowledged \
             alone could then be granted the lease"
        );
    }
    srv.run(&signals)?;
    eprintln!("msl-witness: stopped");
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("msl-witness: {e}");
            ExitCode::FAILURE
        }
    }
}
