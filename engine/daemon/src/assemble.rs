//! The whole daemon of one node, put together in one place: `msld` and the
//! tests build it here, so what they run is the same machine.
//!
//! [`assemble`] does it from a configuration file: it opens the volume and
//! metadata (creating the metadata on first start), the MSL link, the LAN
//! heartbeat sockets, the NBD listener, the control socket and the metrics
//! endpoint, and builds the core. The node-level part, which needs no
//! interface, address or port of its own (an in-memory MSL and loopback
//! LAN sockets do), is [`Wiring`]: the MSL and LAN threads around the
//! core's inbox, then [`Wiring::core`] adds the driver. The core runs once
//! [`Daemon::run`] is called.
//!
//! Start-up order matters where a step has an effect outside the process:
//! the service address left by an earlier run is removed (`ServiceHost`)
//! only after the control socket proved that no other msld runs with this
//! configuration.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::Duration;

use msl_core::meta::Meta;
use msl_core::Config;
use msl_store::{MetaStore, Volume, VolumeOptions};
use msl_transport::afpacket::{RingConfig, TpVersion};
use msl_transport::{BackendKind, IfaceInfo, OpenOptions, RxLink, TxLink};
use msl_wire::{Domain, Key};

use crate::client::Client;
use crate::config::{Backend, DaemonConfig};
use crate::control::ControlServer;
use crate::counters::Shared;
use crate::driver::{Driver, Host};
use crate::frontend::MirrorBackend;
use crate::inbox::{Inbox, InboxRx, Runner};
use crate::input::{Exit, Input};
use crate::lan::{LanEndpoint, LanPath};
use crate::metrics::MetricsServer;
use crate::msl::{start_msl_rx, start_msl_tx, FrameEncoder, MslTx};
use crate::notify::{EventHub, EventRecord, Notifier, Sinks};
use crate::service::ServiceHost;
use crate::status::Telemetry;

/// Inputs the core's queue holds.
pub const INBOX_CAPACITY: usize = 16_384;
/// The largest MSL message the receive thread reassembles.
pub const MAX_MESSAGE: usize = 64 << 20;

/// The MSL link of one node: its two halves, the local MAC address and the
/// largest frame it carries (Ethernet header included).
pub struct MslLink {
    pub tx: Box<dyn TxLink>,
    pub rx: Box<dyn RxLink>,
    pub mac: [u8; 6],
    pub max_frame: usize,
    /// CPUs to pin the transmit and receive workers to (`[msl] tx_cpu`,
    /// `rx_cpu`; `None`: unpinned).
    pub tx_cpu: Option<usize>,
    pub rx_cpu: Option<usize>,
}

/// What a node is made of, opened but not running.
pub struct NodeParts {
    pub core: Config,
    pub meta: Meta,
    pub store: MetaStore,
    pub volume: Arc<Volume>,
    pub msl: MslLink,
    /// The cluster key signing MSL and LAN frames (`None`: unsigned).
    pub key: Option<Key>,
    /// The LAN heartbeat endpoints, one per adapter.
    pub lan: Vec<LanEndpoint>,
    pub notifier: Notifier,
}

/// A node's threads around the core's inbox (MSL transmit and receive, LAN
/// heartbeats), before the core itself exists: what the front end,
/// control socket and metrics attach to.
pub struct Wiring {
    /// The core's input queue.
    pub inputs: Inbox,
    input_rx: InboxRx,
    /// The daemon's counters (read by status and metrics).
    pub shared: Arc<Shared>,
    /// The LAN heartbeat path (its counters are read by status).
    pub lan: LanPath,
    /// Set when the core stopped: the MSL receive thread and the link
    /// watchers end.
    pub stop: Arc<AtomicBool>,
    pub volume: Arc<Volume>,
    /// The largest MSL frame (sizes the front end's write pieces).
    pub max_frame: usize,
    core: Config,
    meta: Meta,
    store: MetaStore,
    encoder: FrameEncoder,
    msl_tx: MslTx,
    notifier: Notifier,
    /// The cluster key (the witness's key is derived from it).
    key: Option<Key>,
    /// The link to the pair's witness, once `with_witness` made it.
    witness: Option<crate::witness::WitnessLink>,
}

impl Wiring {
    /// Start the MSL threads and the LAN heartbeat path of a node. First,
    /// before anything can be sent, the node's start epoch is raised and
    /// made durable in its metadata and handed to the core
    /// (`Config::epoch`).
    pub fn start(mut p: NodeParts) -> Result<Wiring, String> {
        p.core.epoch = p.store.next_epoch(&p.meta).map_err(|e| {
            format!(
                "metadata {}: cannot record this start (start epoch): {e}",
                p.store.path().display()
            )
        })?;
        let (inputs, input_rx) = crate::inbox::inbox(INBOX_CAPACITY);
        let shared = Arc::new(Shared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let max_frame = p.msl.max_frame;
        // One key per domain, derived from the cluster key: a LAN packet
        // never verifies as an MSL frame, nor the reverse.
        let msl_key = p.key.as_ref().map(|k| Key::derive(&k.0, Domain::Msl));
        let lan_key = p.key.as_ref().map(|k| Key::derive(&k.0, Domain::Lan));
        let (msl_tx, _tx_thread) = start_msl_tx(p.msl.tx, shared.clone(), max_frame, p.msl.tx_cpu);
        let _rx_thread = start_msl_rx(
            p.msl.rx,
            p.core.cluster_id,
            msl_key.clone(),
            MAX_MESSAGE,
            inputs.clone(),
            stop.clone(),
            shared.clone(),
            p.msl.rx_cpu,
        );
        let (lan_tx, lan_rx) = sync_channel(1024);
        let lan = LanPath::start(&p.lan, p.core.cluster_id, lan_key, lan_tx)
            .map_err(|e| e.to_string())?;
        let fwd = inputs.clone();
        std::thread::Builder::new()
            .name("msl-lan-fwd".into())
            .spawn(move || {
                while let Ok(p) = lan_rx.recv() {
                    if fwd.send(Input::Lan(p)).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| format!("cannot start the LAN forwarding thread: {e}"))?;
        let encoder = FrameEncoder {
            src_mac: p.msl.mac,
            dst_mac: [0xff; 6],
            key: msl_key,
            max_frame,
        };
        Ok(Wiring {
            inputs,
            input_rx,
            shared,
            lan,
            stop,
            volume: p.volume,
            max_frame,
            core: p.core,
            meta: p.meta,
            store: p.store,
            encoder,
            msl_tx,
            notifier: p.notifier,
            key: p.key,
            witness: None,
        })
    }

    /// Talk to the pair's witness (`setup`): the lease client signs with
    /// the witness domain's key, as this start (its epoch) of this node.
    /// Returns the view status and metrics show.
    pub fn with_witness(
        &mut self,
        setup: crate::witness::WitnessSetup,
    ) -> Result<crate::witness::SharedView, String> {
        let master = self
            .key
            .as_ref()
            .ok_or("witness: needs the cluster key (key_file)")?;
        let client = msl_witness::client::ClientConfig {
            cluster_id: self.core.cluster_id,
            node_id: self.core.node_id,
            epoch: self.core.epoch,
            key: Key::derive(&master.0, Domain::Witness),
            margin_us: setup.margin_us,
        };
        self.core.witness = true;
        let link = crate::witness::WitnessLink::start(
            setup,
            client,
            self.inputs.clone(),
            self.stop.clone(),
        )?;
        let view = link.view();
        self.witness = Some(link);
        Ok(view)
    }

    /// A handle for front ends.
    pub fn client(&self) -> Client {
        Client {
            inputs: self.inputs.clone(),
            shared: self.shared.clone(),
            block_size: u64::from(self.core.block_size),
        }
    }

    /// Build the core and its driver (disk I/O on its own threads);
    /// `host` holds or releases the service address, `seed` seeds the
    /// core's randomness.
    pub fn core<H: Host + 'static>(self, host: H, seed: u64) -> Result<Daemon, String> {
        let client = self.client();
        let d = Driver::new(
            self.core,
            self.meta,
            self.store,
            self.volume,
            self.encoder,
            self.msl_tx,
            Some(self.lan),
            self.notifier,
            host,
            self.shared.clone(),
            seed,
            self.inputs.clone(),
        )
        .map_err(|e| format!("cannot start the I/O worker: {e}"))?;
        let reload = Arc::new(crate::reload::ReloadSlot::default());
        let mut d = d.with_reload(reload.clone());
        if let Some(w) = self.witness {
            d = d.with_witness(w);
        }
        Ok(Daemon {
            reload,
            inputs: self.inputs,
            client,
            shared: self.shared,
            stop: self.stop,
            input_rx: self.input_rx,
            runner: Box::new(d),
            keep: Vec::new(),
        })
    }
}

/// A node ready to run: [`Daemon::run`] makes the calling thread the core
/// thread until the core stops.
pub struct Daemon {
    /// The core's input queue (`Input::Stop` stops it).
    pub inputs: Inbox,
    /// A handle for front ends.
    pub client: Client,
    pub shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    input_rx: InboxRx,
    runner: Box<dyn Runner>,
    /// Servers that live as long as the daemon (control socket, metrics).
    keep: Vec<Box<dyn Send>>,
    /// Where a configuration reload waits for the core thread; see
    /// [`Daemon::reload`].
    reload: Arc<crate::reload::ReloadSlot>,
}

impl Daemon {
    /// The flag `run` sets when the core stopped (the MSL receive thread
    /// and the link watchers end on it).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Hand a reload to the core thread and wake it (it applies the
    /// reload before its next input, then reports it as an event). Called
    /// from any thread; returns once the core took it, or after 2 s.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            slot: self.reload.clone(),
            inputs: self.inputs.clone(),
        }
    }

    /// Run the core on this thread until it stops; returns why. The
    /// daemon's threads are told to stop, its servers are closed.
    pub fn run(self) -> Exit {
        let exit = self.input_rx.run(self.runner);
        self.stop.store(true, Ordering::Relaxed);
        drop(self.keep);
        exit
    }
}

/// Refuse a secret file (cluster key, metadata) that group or others may
/// read or write: `what` names the config key.
pub fn check_private(what: &str, path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{what} {p}: mode {mode:04o} lets group or others read or write it; \
             run `chmod 600 {p}` (owner only)",
            p = path.display()
        ));
    }
    Ok(())
}

/// Create a missing file owner-only (0600) before it is opened to be
/// filled: volumes and metadata are never readable by others.
pub fn create_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("cannot create {}: {e}", path.display())),
    }
}

/// What `create` allows when the volume or metadata file is missing.
fn missing(what: &str, path: &Path) -> String {
    format!(
        "{what} {}: no such file. msld does not create it on its own (an unmounted \
         filesystem must not be replaced by an empty volume): mount the filesystem that \
         holds it, or on a first start create it with `mslctl create-md --config FILE` \
         (add --initial-primary on the node whose data is authoritative) or start msld \
         once with --create",
        path.display()
    )
}

/// The start-up checks that read the files the configuration names (run
/// by `msld --check` too): the cluster key (owner-only, well-formed), the
/// volume and metadata files (present unless `create`; the metadata
/// owner-only). Returns the key.
pub fn preflight(cfg: &DaemonConfig, create: bool) -> Result<Option<Key>, String> {
    let f = &cfg.file;
    let key = match &f.key_file {
        Some(p) => {
            check_private("key_file", p)?;
            Some(load_key(p)?)
        }
        None => None,
    };
    if !create && !f.volume.path.exists() {
        return Err(missing("volume.path", &f.volume.path));
    }
    if f.volume.metadata.exists() {
        check_private("volume.metadata", &f.volume.metadata)?;
    } else if !create {
        return Err(missing("volume.metadata", &f.volume.metadata));
    }
    Ok(key)
}

/// Open (with `create`: create, owner-only) the node's volume.
pub fn open_volume(cfg: &DaemonConfig, create: bool) -> Result<Volume, String> {
    let v = &cfg.file.volume;
    if !v.path.exists() {
        if !create {
            return Err(missing("volume.path", &v.path));
        }
        create_private(&v.path)?;
    }
    Volume::open_with(
        &v.path,
        v.size_bytes,
        &VolumeOptions {
            preallocate: v.preallocate,
        },
    )
    .map_err(|e| e.to_string())
}

/// Hands reloads to a running daemon's core thread ([`Daemon::reloader`]).
#[derive(Clone)]
pub struct Reloader {
    slot: Arc<crate::reload::ReloadSlot>,
    inputs: Inbox,
}

impl Reloader {
    /// Leave `r` for the core thread and wake it: a status request goes
    /// through the core's queue, and the core applies the reload before it
    /// answers (false: the core did not answer within 2 s; it applies the
    /// reload at its next input).
    pub fn reload(&self, r: crate::reload::Reload) -> bool {
        self.slot.put(r);
        crate::status::core_status(&self.inputs).is_some()
    }
}

/// Read a cluster key file: 32 raw bytes or 64 hex digits.
pub fn load_key(path: &Path) -> Result<Key, String> {
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
    tracing::info!("msld: threads run on CPUs {cpus:?} (cpu_affinity)");
    Ok(())
}

/// Open the MSL interface the configuration names, with its backend.
fn open_msl(cfg: &DaemonConfig, iface: &IfaceInfo) -> Result<MslLink, String> {
    let f = &cfg.file;
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
    let opened = msl_transport::open(kind, iface, &opts)
        .map_err(|e| format!("msl: cannot open the {kind} backend on {}: {e}", iface.name))?;
    tracing::info!(
        "msld: MSL on {} via {}{}",
        iface.name,
        opened.backend,
        opened
            .fallback_reason
            .as_deref()
            .map(|r| format!(" (AF_XDP unavailable: {r})"))
            .unwrap_or_default()
    );
    Ok(MslLink {
        tx: opened.tx,
        rx: opened.rx,
        mac: iface.mac,
        max_frame: iface
            .max_frame_len()
            .min(f.msl.mtu as usize + msl_wire::ETH_HEADER_LEN),
        tx_cpu: f.msl.tx_cpu,
        rx_cpu: f.msl.rx_cpu,
    })
}

/// Build the daemon the configuration describes (see the module
/// documentation). `initial_primary`: on first start (no metadata yet),
/// this node's volume is the pair's authoritative data. `create`: a
/// missing volume or metadata file is created (owner-only); otherwise it
/// is an error naming the path (`initial_primary` implies `create`).
pub fn assemble(cfg: &DaemonConfig, initial_primary: bool, create: bool) -> Result<Daemon, String> {
    let f = &cfg.file;
    let core_cfg = cfg.core_config();
    // The first start's explicit creation: --create, or --initial-primary
    // (which only means anything when the metadata is created).
    let create = create || initial_primary;
    let key = preflight(cfg, create)?;
    // Before any thread starts: they all inherit it.
    set_cpu_affinity(&f.cpu_affinity)?;

    // Volume and metadata (created only when asked to).
    let volume = Arc::new(open_volume(cfg, create)?);
    let (store, meta) = if f.volume.metadata.exists() {
        MetaStore::open_checked(&f.volume.metadata, &core_cfg).map_err(|e| e.to_string())?
    } else {
        let (store, meta) = crate::md::create(cfg, initial_primary, false)?;
        tracing::info!(
            "msld: created metadata {} ({})",
            f.volume.metadata.display(),
            if initial_primary {
                "this node's data is authoritative"
            } else {
                "waiting for a full sync"
            }
        );
        (store, meta)
    };

    // Notifications (also to `mslctl events` followers).
    let hub = EventHub::default();
    let notifier = Notifier::start_with(
        Sinks {
            console: true,
            log_file: Some(f.log_file.clone()),
            command: f.notify_command.clone(),
            command_timeout: Duration::from_secs(10),
            hub: Some(hub.clone()),
        },
        4096,
        cfg.command_policy(),
    );
    let notify_counters = notifier.counters.clone();
    if f.insecure_no_auth {
        // Console and log file, at every start.
        notifier.notify(EventRecord::now(
            f.node_id,
            "insecure_no_auth",
            crate::config::INSECURE_NO_AUTH_WARNING.to_string(),
        ));
    }

    // The MSL transport, the LAN heartbeats.
    let iface = IfaceInfo::lookup(&f.msl.interface).map_err(|e| format!("msl.interface: {e}"))?;
    for (i, a) in f.lan.iter().enumerate() {
        IfaceInfo::lookup(&a.interface).map_err(|e| format!("lan[{i}].interface: {e}"))?;
    }
    IfaceInfo::lookup(&f.service_interface).map_err(|e| format!("service_interface: {e}"))?;
    let msl = open_msl(cfg, &iface)?;
    let lan = f
        .lan
        .iter()
        .enumerate()
        .map(|(i, a)| LanEndpoint {
            adapter: i as u8,
            local: SocketAddr::new(a.address, f.heartbeat_port),
            peer: SocketAddr::new(a.peer_address, f.heartbeat_port),
        })
        .collect();
    let mut w = Wiring::start(NodeParts {
        core: core_cfg,
        meta,
        store,
        volume,
        msl,
        key,
        lan,
        notifier,
    })?;

    // The pair's witness, from the first LAN address of its IP family.
    let witness = match cfg.witness {
        Some(addr) => {
            let bind = f
                .lan
                .iter()
                .map(|a| a.address)
                .find(|a| a.is_ipv4() == addr.is_ipv4())
                .ok_or("witness: no LAN address of its IP family")?;
            let view = w.with_witness(crate::witness::WitnessSetup {
                addr,
                bind,
                margin_us: f.witness_margin_ms * 1000,
                dead_us: cfg.dead_interval().as_micros() as u64,
                on_no_quorum: f.on_no_quorum.unwrap_or_default().as_str(),
            })?;
            tracing::info!(
                "msld: witness {addr} (on_no_quorum = {})",
                f.on_no_quorum.unwrap_or_default().as_str()
            );
            Some(view)
        }
        None => None,
    };

    // Link health of the LAN adapters and of the MSL.
    let mut watched: Vec<(String, Option<u8>)> = f
        .lan
        .iter()
        .enumerate()
        .map(|(i, a)| (a.interface.clone(), Some(i as u8)))
        .collect();
    watched.push((f.msl.interface.clone(), None));
    crate::service::watch_links(watched, w.inputs.clone(), w.stop.clone());

    // NBD front end: both nodes listen on the service address alone
    // (IP_FREEBIND: bound before the address is on an interface), so only
    // the node holding it receives connections; only the primary serves
    // I/O, and a node releasing the address closes its connections.
    let max_write = (200 * (w.max_frame - 200) as u64).min(1 << 20);
    let backend = Arc::new(MirrorBackend::new(w.client(), w.volume.clone(), max_write));
    let nbd_addr = cfg.nbd_listen_addr();
    let nbd = crate::service::start_nbd(
        &[nbd_addr],
        backend,
        cfg.nbd_server_config(),
        w.stop.clone(),
    )
    .map_err(|e| format!("NBD on {nbd_addr} (service_address, nbd_port, nbd_tls_dir): {e}"))?;
    tracing::info!(
        "msld: NBD on {nbd_addr} (TLS {}{}{})",
        cfg.nbd.tls,
        if cfg.nbd.tls_verify_peer {
            ", client certificates required"
        } else {
            ""
        },
        if cfg.nbd.allow.is_empty() {
            String::new()
        } else {
            format!(
                ", clients from {:?}",
                cfg.nbd
                    .allow
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
            )
        }
    );

    // Status (control socket) and metrics read the same counters.
    let telemetry = Arc::new(Telemetry {
        shared: w.shared.clone(),
        lan: Some(w.lan.counters.clone()),
        nbd: Some(nbd.counters()),
        nbd_server: Some(crate::status::NbdView(nbd.clone())),
        notify: Some(notify_counters),
        msl_interface: f.msl.interface.clone(),
        lan_interfaces: f.lan.iter().map(|a| a.interface.clone()).collect(),
        block_size: u64::from(f.volume.block_size),
        cluster_id: Some(f.cluster_id),
        insecure_no_auth: f.insecure_no_auth,
        witness,
    });
    let control = ControlServer::start(&f.control_socket, w.inputs.clone(), hub, telemetry.clone())
        .map_err(|e| format!("control_socket {}: {e}", f.control_socket.display()))?;
    let metrics = match f.metrics_address {
        Some(addr) => {
            let m = MetricsServer::start(addr, w.inputs.clone(), telemetry)?;
            tracing::info!("msld: Prometheus metrics on http://{}/metrics", m.addr);
            Some(m)
        }
        None => None,
    };

    let host =
        ServiceHost::new(&f.service_interface, cfg.service_ip, cfg.service_prefix).with_nbd(nbd);
    let seed = std::process::id() as u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(7, |d| d.as_nanos() as u64);
    let mut d = w.core(host, seed)?;
    d.keep.push(Box::new(control));
    d.keep.push(Box::new(metrics));
    Ok(d)
}
