//! `msld --config FILE`: the msl mirroring daemon of one node.
//!
//! Wires the protocol core (through the driver) to the MSL transport, the
//! LAN heartbeat path, the volume and metadata store, the NBD front end,
//! the service address, the control socket and the notifier. Exit codes:
//! 0 after a clean stop (SIGTERM/SIGINT), 75 when the core asks to restart
//! as secondary (the supervisor starts it again), 1 on a start-up error.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use msl_daemon::config::{Backend, DaemonConfig};
use msl_daemon::control::{ControlServer, EventHub};
use msl_daemon::driver::{self, Client, Driver, Exit, FrameEncoder, Input, Shared};
use msl_daemon::frontend::MirrorBackend;
use msl_daemon::lan::{LanEndpoint, LanPath};
use msl_daemon::notify::{Notifier, Sinks};
use msl_daemon::service::ServiceHost;
use msl_daemon::telemetry::{MetricsServer, Telemetry};
use msl_store::{MetaStore, Volume};
use msl_transport::afpacket::{RingConfig, TpVersion};
use msl_transport::{BackendKind, IfaceInfo, OpenOptions};
use msl_wire::Key;

#[derive(Parser)]
#[command(name = "msld", about = "msl mirroring daemon (one node of a pair)")]
struct Args {
    /// The node's configuration file (TOML).
    #[arg(long)]
    config: PathBuf,
    /// On first start (no metadata yet): declare this node's volume the
    /// authoritative data of the pair. Give it on exactly one node.
    #[arg(long)]
    initial_primary: bool,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

/// Exit code asking the supervisor to start msld again.
const EXIT_RESTART: u8 = 75;

fn load_key(path: &Path) -> Result<Key, String> {
    let raw = std::fs::read(path).map_err(|e| format!("key_file {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&raw);
    let t = text.trim();
    let mut k = [0u8; 32];
    if raw.len() == 32 {
        k.copy_from_slice(&raw);
        return Ok(Key(k));
    }
    if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        return Ok(Key(k));
    }
    Err(format!(
        "key_file {}: must hold 32 bytes or 64 hex digits",
        path.display()
    ))
}

fn run(args: Args) -> Result<Exit, String> {
    let cfg = DaemonConfig::load(&args.config).map_err(|e| e.to_string())?;
    for w in &cfg.warnings {
        eprintln!("msld: warning: {w}");
    }
    if args.check {
        println!("msld: configuration {} is valid", args.config.display());
        return Ok(Exit::Stopped);
    }
    let f = &cfg.file;
    let core_cfg = cfg.core_config();
    let key = f.key_file.as_deref().map(load_key).transpose()?;
    // Before any thread starts: they all inherit it.
    set_cpu_affinity(&f.cpu_affinity)?;

    // Volume and metadata (created on first start).
    let volume =
        Arc::new(Volume::open(&f.volume.path, f.volume.size_bytes).map_err(|e| e.to_string())?);
    let (store, meta) = if f.volume.metadata.exists() {
        MetaStore::open_checked(&f.volume.metadata, &core_cfg).map_err(|e| e.to_string())?
    } else {
        let (store, meta) = msl_daemon::md::create(&cfg, args.initial_primary, false)?;
        eprintln!(
            "msld: created metadata {} ({})",
            f.volume.metadata.display(),
            if args.initial_primary {
                "this node's data is authoritative"
            } else {
                "waiting for a full sync"
            }
        );
        (store, meta)
    };

    // Notifications, control socket.
    let hub = EventHub::default();
    let notifier = Notifier::start(
        Sinks {
            console: true,
            log_file: Some(f.log_file.clone()),
            command: f.notify_command.clone(),
            command_timeout: Duration::from_secs(10),
            hub: Some(hub.clone()),
        },
        4096,
    );
    let notify_counters = notifier.counters.clone();
    let (inputs, input_rx) = msl_daemon::inbox::inbox(16_384);

    // MSL transport.
    let iface = IfaceInfo::lookup(&f.msl.interface).map_err(|e| format!("msl.interface: {e}"))?;
    for (i, a) in f.lan.iter().enumerate() {
        IfaceInfo::lookup(&a.interface).map_err(|e| format!("lan[{i}].interface: {e}"))?;
    }
    IfaceInfo::lookup(&f.service_interface).map_err(|e| format!("service_interface: {e}"))?;
    let kind = match f.msl.backend {
        Backend::Afxdp => BackendKind::AfXdp,
        Backend::Afpacket => BackendKind::AfPacket,
        Backend::Auto => BackendKind::Auto,
    };
    // TPACKET_V2: each frame reaches the core at once. V3 hands over whole
    // blocks, a partly filled one after its 1 ms timeout: up to 1 ms per
    // hop on a lightly loaded link (QD1 write p50 963 us on V3 vs 412 us
    // on AF_XDP, msl-bench nbd).
    let opts = OpenOptions {
        afpacket: RingConfig {
            version: TpVersion::V2,
            ..RingConfig::default()
        },
        ..OpenOptions::default()
    };
    let opened = msl_transport::open(kind, &iface, &opts)
        .map_err(|e| format!("msl: cannot open the {kind} backend on {}: {e}", iface.name))?;
    eprintln!(
        "msld: MSL on {} via {}{}",
        iface.name,
        opened.backend,
        opened
            .fallback_reason
            .as_deref()
            .map(|r| format!(" (AF_XDP unavailable: {r})"))
            .unwrap_or_default()
    );
    let shared = Arc::new(Shared::default());
    let stop = Arc::new(AtomicBool::new(false));
    let max_frame = iface
        .max_frame_len()
        .min(f.msl.mtu as usize + msl_wire::ETH_HEADER_LEN);
    let (msl_tx, _tx_thread) = driver::start_msl_tx(opened.tx, shared.clone(), max_frame);
    let _rx_thread = driver::start_msl_rx(
        opened.rx,
        f.cluster_id,
        key.clone(),
        64 << 20,
        inputs.clone(),
        stop.clone(),
        shared.clone(),
    );

    // LAN heartbeats and link health.
    let endpoints: Vec<LanEndpoint> = f
        .lan
        .iter()
        .enumerate()
        .map(|(i, a)| LanEndpoint {
            adapter: i as u8,
            local: SocketAddr::new(a.address, f.heartbeat_port),
            peer: SocketAddr::new(a.peer_address, f.heartbeat_port),
        })
        .collect();
    let (lan_tx, lan_rx) = sync_channel(1024);
    let lan =
        LanPath::start(&endpoints, f.cluster_id, key.clone(), lan_tx).map_err(|e| e.to_string())?;
    let fwd = inputs.clone();
    std::thread::spawn(move || {
        while let Ok(p) = lan_rx.recv() {
            if fwd.send(Input::Lan(p)).is_err() {
                return;
            }
        }
    });
    let mut watched: Vec<(String, Option<u8>)> = f
        .lan
        .iter()
        .enumerate()
        .map(|(i, a)| (a.interface.clone(), Some(i as u8)))
        .collect();
    watched.push((f.msl.interface.clone(), None));
    msl_daemon::service::watch_links(watched, inputs.clone(), stop.clone());

    // NBD front end: every node listens; only the primary serves (clients
    // reach it through the service address, which only the primary holds).
    let client = Client {
        inputs: inputs.clone(),
        shared: shared.clone(),
        block_size: u64::from(f.volume.block_size),
    };
    let max_write = (200 * (max_frame - 200) as u64).min(1 << 20);
    let backend = Arc::new(MirrorBackend::new(client, volume.clone(), max_write));
    let listener = TcpListener::bind(SocketAddr::new([0, 0, 0, 0].into(), f.nbd_port))
        .map_err(|e| format!("nbd_port {}: {e}", f.nbd_port))?;
    let busy_poll = Duration::from_micros(f.nbd_busy_poll_us);
    let nbd_counters = msl_daemon::service::start_nbd(listener, backend, busy_poll, stop.clone())
        .map_err(|e| e.to_string())?;

    // Status (control socket) and metrics read the same counters.
    let telemetry = Arc::new(Telemetry {
        shared: shared.clone(),
        lan: Some(lan.counters.clone()),
        nbd: Some(nbd_counters),
        notify: Some(notify_counters),
        msl_interface: f.msl.interface.clone(),
        lan_interfaces: f.lan.iter().map(|a| a.interface.clone()).collect(),
        block_size: u64::from(f.volume.block_size),
    });
    let _control = ControlServer::start(&f.control_socket, inputs.clone(), hub, telemetry.clone())
        .map_err(|e| format!("control_socket {}: {e}", f.control_socket.display()))?;
    let _metrics = match f.metrics_address {
        Some(addr) => {
            let m = MetricsServer::start(addr, inputs.clone(), telemetry)?;
            eprintln!("msld: Prometheus metrics on http://{}/metrics", m.addr);
            Some(m)
        }
        None => None,
    };

    // Signals: a clean stop.
    let sig_inputs = inputs.clone();
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let _ = sig_inputs.send(Input::Stop);
        }
    });

    let encoder = FrameEncoder {
        src_mac: iface.mac,
        dst_mac: [0xff; 6],
        key,
        max_frame,
    };
    let host = ServiceHost::new(&f.service_interface, cfg.service_ip, cfg.service_prefix);
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(7, |d| d.as_nanos() as u64);
    let d = Driver::new(
        core_cfg,
        meta,
        store,
        volume,
        encoder,
        msl_tx,
        Some(lan),
        notifier,
        host,
        shared,
        seed,
    )
    .flush_off_thread(inputs.clone())
    .map_err(|e| format!("msld: cannot start the flush thread: {e}"))?;
    let exit = d.run(input_rx);
    stop.store(true, Ordering::Relaxed);
    Ok(exit)
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

/// Restrict this process (and every thread it starts later) to `cpus`
/// (`cpu_affinity`; empty leaves it alone).
fn set_cpu_affinity(cpus: &[usize]) -> Result<(), String> {
    if cpus.is_empty() {
        return Ok(());
    }
    // SAFETY: cpu_set_t is plain data (all-zero is the empty set); CPU_SET
    // writes inside it for numbers below CPU_SETSIZE (checked at config
    // load); sched_setaffinity reads it for this thread (pid 0).
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        return Err(format!(
            "cpu_affinity {cpus:?}: {} (no such CPU online?)",
            std::io::Error::last_os_error()
        ));
    }
    eprintln!("msld: threads run on CPUs {cpus:?} (cpu_affinity)");
    Ok(())
}

fn main() -> ExitCode {
    tune_malloc();
    match run(Args::parse()) {
        Ok(Exit::Stopped) => ExitCode::SUCCESS,
        Ok(Exit::Restart) => {
            eprintln!("msld: restarting as secondary (exit {EXIT_RESTART}: the supervisor starts msld again)");
            ExitCode::from(EXIT_RESTART)
        }
        Err(e) => {
            eprintln!("msld: {e}");
            ExitCode::FAILURE
        }
    }
}
