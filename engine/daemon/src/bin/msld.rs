//! `msld --config FILE`: the msl mirroring daemon of one node.
//!
//! Wires the protocol core (through the driver) to the MSL transport, the
//! LAN heartbeat path, the volume and metadata store, the NBD front end,
//! the service address, the control socket and the notifier. Exit codes:
//! 0 after a clean stop (SIGTERM/SIGINT; SIGHUP reloads the run-time
//! settings, see `msl_daemon::reload`), 75 when the core asks to restart
//! as secondary (the supervisor starts it again), 1 on a start-up error.
//!
//! Messages and events are logged through `tracing` at their level: to
//! the systemd journal when stderr is the journal (`JOURNAL_STREAM`),
//! else to stderr (`log_level` filters them; see `msl_daemon::notify`).

use std::process::ExitCode;

use clap::Parser;
use msl_daemon::cli::Args;
use msl_daemon::config::DaemonConfig;
use msl_daemon::input::{Exit, Input};

/// Exit code asking the supervisor to start msld again.
const EXIT_RESTART: u8 = 75;

fn run(args: Args) -> Result<Exit, String> {
    let cfg = DaemonConfig::load(&args.config).map_err(|e| e.to_string())?;
    let log = msl_daemon::notify::init_logging(cfg.file.log_level.filter());
    for w in &cfg.warnings {
        tracing::warn!("msld: {w}");
    }
    let create = args.create || args.initial_primary;
    if args.check {
        // Every problem, not just the first: the files, then this host
        // (its network namespace).
        let mut problems = Vec::new();
        if let Err(e) = msl_daemon::assemble::preflight(&cfg, create) {
            problems.push(e);
        }
        problems.extend(cfg.host_problems(&msl_daemon::config::host_interfaces()));
        if !problems.is_empty() {
            for p in &problems {
                tracing::error!("msld: {p}");
            }
            return Err(format!(
                "configuration {} does not fit this host: {} problem{}",
                args.config.display(),
                problems.len(),
                if problems.len() == 1 { "" } else { "s" }
            ));
        }
        println!("msld: configuration {} is valid", args.config.display());
        return Ok(Exit::Stopped);
    }
    msl_daemon::status::set_role_control(cfg.file.role_control);
    let daemon = msl_daemon::assemble(&cfg, args.initial_primary, args.create)?;

    // Signals: SIGTERM/SIGINT are a clean stop; SIGHUP (systemd's
    // ExecReload, logrotate) reloads what can change at run time and never
    // stops the node: a file that does not load keeps the old settings.
    let sig_inputs = daemon.inputs.clone();
    let reloader = daemon.reloader();
    let config_path = args.config.clone();
    let mut in_force = cfg;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        for sig in signals.forever() {
            if sig == signal_hook::consts::SIGHUP {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
                let r = msl_daemon::reload::request(&config_path, &mut in_force);
                if let msl_daemon::reload::Reload::Apply { settings, .. } = &r {
                    log.set_level(settings.log_level.filter());
                }
                reloader.reload(r);
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                continue;
            }
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
            let _ = sig_inputs.send(Input::Stop);
            return;
        }
    });
    Ok(daemon.run())
}

/// Keep block buffers in the heap: message payloads (64 KiB resync runs,
/// 128 KiB write pieces) are allocated and freed at link speed, and glibc's
/// defaults returned them to the kernel (`madvise`, heap trimming) only to
/// fault them back in zeroed: page faults and `clear_page` were 7 % of the
/// machine during a resync. Up to 64 MiB of free heap stays mapped.
fn tune_malloc() {
    // SAFETY: mallopt only changes allocator parameters; called before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

fn main() -> ExitCode {
    tune_malloc();
    match run(Args::parse()) {
        Ok(Exit::Stopped) => ExitCode::SUCCESS,
        Ok(Exit::Restart) => {
            tracing::warn!("msld: restarting as secondary (exit {EXIT_RESTART}: the supervisor starts msld again)");
            ExitCode::from(EXIT_RESTART)
        }
        Err(e) => {
            // Before the configuration loaded there is no logger yet.
            if !tracing::dispatcher::has_been_set() {
                msl_daemon::notify::init_logging(tracing::level_filters::LevelFilter::INFO);
            }
            tracing::error!("msld: {e}");
            ExitCode::FAILURE
        }
    }
}
