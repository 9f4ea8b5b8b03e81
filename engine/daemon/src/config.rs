//! `msld --config FILE`: the node's configuration (TOML).
//!
//! Every tunable has a default and bounds, checked at start; an error names
//! the key, the value and what is allowed. Unknown keys are errors (a typo
//! must not silently fall back to a default).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why a configuration was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}` = {value}: {why}")]
    Invalid {
        key: String,
        value: String,
        why: String,
    },
}

fn invalid(key: &str, value: impl std::fmt::Display, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        value: value.to_string(),
        why: why.into(),
    }
}

/// MSL transport backend.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Afxdp,
    Afpacket,
    Auto,
}

/// Write acknowledgement mode.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    Sync,
    Async,
}

/// `log_level`: the least important messages logged.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    #[serde(alias = "warning")]
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The `tracing` filter of this level.
    pub fn filter(self) -> tracing::level_filters::LevelFilter {
        use tracing::level_filters::LevelFilter;
        match self {
            LogLevel::Error => LevelFilter::ERROR,
            LogLevel::Warn => LevelFilter::WARN,
            LogLevel::Info => LevelFilter::INFO,
            LogLevel::Debug => LevelFilter::DEBUG,
            LogLevel::Trace => LevelFilter::TRACE,
        }
    }
}

/// `role_control`: who decides the node's role.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum RoleControl {
    /// msld itself (takeover, cold start of the pair).
    #[default]
    #[serde(rename = "self")]
    SelfManaged,
    /// A cluster manager, through `mslctl promote` and `mslctl demote`.
    #[serde(rename = "cluster")]
    Cluster,
}

impl RoleControl {
    /// The name as written in the configuration and shown by status.
    pub fn as_str(self) -> &'static str {
        match self {
            RoleControl::SelfManaged => "self",
            RoleControl::Cluster => "cluster",
        }
    }
}

/// `[msl]`: the dedicated mirroring link.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MslSection {
    /// Interface name of the MSL NIC.
    pub interface: String,
    #[serde(default = "default_backend")]
    pub backend: Backend,
    /// MTU the frames are sized for (fragments below 4 KiB + header).
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    /// CPU the MSL transmit worker is pinned to (none: it runs where
    /// `cpu_affinity` lets every thread run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_cpu: Option<usize>,
    /// CPU the MSL receive worker is pinned to (none: likewise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_cpu: Option<usize>,
}

/// `[[lan]]`: one client-facing adapter.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LanAdapter {
    pub interface: String,
    /// This node's own address on the adapter (heartbeats are sent from it).
    pub address: IpAddr,
    /// The peer's address on the same LAN (heartbeats are sent to it).
    pub peer_address: IpAddr,
}

/// `[volume]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VolumeSection {
    /// Backing file or block device.
    pub path: PathBuf,
    /// Size in bytes (a file is created or extended to it; a device must
    /// be at least this large).
    pub size_bytes: u64,
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// Metadata file (two atomic slots).
    pub metadata: PathBuf,
    /// Allocate the whole volume file when it is created or extended
    /// (`fallocate`), so a full filesystem shows at creation. `false`
    /// makes a thin (sparse) file: space is taken as clients and resyncs
    /// write, and a filesystem that fills up later fails those writes
    /// (ENOSPC: the node's disk fails and its peer takes over or the pair
    /// runs degraded). Block devices are not affected.
    #[serde(default = "default_true")]
    pub preallocate: bool,
}

/// The whole file as written.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_id: u16,
    pub peer_id: u16,
    pub cluster_id: u64,
    /// File holding the shared cluster key (32 bytes, or 64 hex digits;
    /// mode 0600: refused if group or others may read or write it).
    /// Required unless `insecure_no_auth = true`.
    pub key_file: Option<PathBuf>,
    /// Run without a cluster key: MSL and LAN packets are not
    /// authenticated, so anyone on those networks can forge a peer's
    /// heartbeat or a disk failure and make a secondary take over a live
    /// primary. For lab use only; every start and `mslctl status` say so.
    #[serde(default)]
    pub insecure_no_auth: bool,
    pub msl: MslSection,
    pub lan: Vec<LanAdapter>,
    /// Service address with prefix, e.g. "10.77.1.100/24".
    pub service_address: String,
    /// LAN adapter (interface name) that carries the service address.
    pub service_interface: String,
    #[serde(default = "default_nbd_port")]
    pub nbd_port: u16,
    #[serde(default = "default_heartbeat_port")]
    pub heartbeat_port: u16,
    pub volume: VolumeSection,
    #[serde(default = "default_write_mode")]
    pub write_mode: WriteMode,
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    #[serde(default = "default_miss_count")]
    pub miss_count: u32,
    /// Resync rate floor while clients write (MiB/s).
    #[serde(default = "default_resync_min_mib_s")]
    pub resync_min_mib_s: u64,
    /// Resync rate ceiling when clients are idle (MiB/s, 0 = the link).
    #[serde(default)]
    pub resync_max_mib_s: u64,
    /// Activity-log extents (4 MiB each with 4 KiB blocks): the region
    /// kept hot without a flush of both sides, and what a crashed primary
    /// resyncs. DRBD's default, 1237 (about 4.8 GiB).
    #[serde(default = "default_al_extents")]
    pub al_extents: u32,
    /// CPUs msld's threads may run on (empty: any). On a dedicated server
    /// this keeps msld off the cores its clients use; for a demo pair
    /// sharing one machine, both daemons on one CPU keep their thread
    /// hand-offs on one core.
    #[serde(default)]
    pub cpu_affinity: Vec<usize>,
    /// How long an NBD connection's reader polls for the client's next
    /// request before it sleeps (microseconds; 0: sleep at once). A client
    /// that waits for each reply sends its next request tens of
    /// microseconds later; a reader asleep by then costs a scheduler
    /// wake-up (about 35 us on a virtual machine whose CPU went idle).
    /// The reader yields the CPU to any other thread while it polls.
    #[serde(default = "default_nbd_busy_poll_us")]
    pub nbd_busy_poll_us: u64,
    /// NBD over TLS (NBD_OPT_STARTTLS): "off" (STARTTLS refused), "on"
    /// (a client may upgrade or stay in plain text) or "require" (every
    /// option but STARTTLS is refused before TLS is up).
    #[serde(default = "default_nbd_tls")]
    pub nbd_tls: String,
    /// Directory of the TLS files, in the layout nbdkit and qemu use:
    /// `server-cert.pem` (chain, leaf first), `server-key.pem`, and with
    /// `nbd_tls_verify_peer` `ca-cert.pem`. Needed unless `nbd_tls` is off;
    /// read at load, so `msld --check` reports a missing or bad file.
    pub nbd_tls_dir: Option<PathBuf>,
    /// Clients must present a certificate signed by `ca-cert.pem` (mutual
    /// TLS: the clients' authentication). Needs `nbd_tls` on or require.
    #[serde(default)]
    pub nbd_tls_verify_peer: bool,
    /// Networks whose clients may connect (IPv4/IPv6 CIDRs, or single
    /// addresses); anyone else is closed before the NBD greeting. Empty:
    /// anyone who reaches the service address.
    #[serde(default)]
    pub nbd_allow: Vec<String>,
    /// Export the volume read-only (writes get EPERM).
    #[serde(default)]
    pub nbd_read_only: bool,
    /// Open NBD connections in all; more are closed at once.
    #[serde(default = "default_nbd_max_connections")]
    pub nbd_max_connections: u64,
    /// Open NBD connections from one client address.
    #[serde(default = "default_nbd_max_per_address")]
    pub nbd_max_per_address: u64,
    /// Seconds a client may take from the greeting to the end of the
    /// handshake (TLS included).
    #[serde(default = "default_nbd_handshake_timeout_s")]
    pub nbd_handshake_timeout_s: u64,
    /// Close a connection with nothing in flight that sends no request for
    /// this many seconds (0: never; the kernel's NBD client is silent while
    /// its device is idle).
    #[serde(default)]
    pub nbd_idle_timeout_s: u64,
    /// Close a connection whose client does not take a reply within this
    /// many seconds (its buffers are freed).
    #[serde(default = "default_nbd_write_timeout_s")]
    pub nbd_write_timeout_s: u64,
    /// Lower bound of the MSL retransmission timeout (milliseconds). Lost
    /// frames with later traffic behind them are resent at once (selective
    /// acks); this timer only covers a lost tail and acks held up on the
    /// peer. Below the peer's occasional stalls (a throttled write, a
    /// flush) it resends what was never lost: at 20 ms, a 1 GiB full sync
    /// resent 849 to 11750 of its 16384 messages; at 200 ms none.
    #[serde(default = "default_msl_rto_min_ms")]
    pub msl_rto_min_ms: u64,
    /// Stable points (both volumes flushed, so the activity log's extents
    /// can cool) while the activity log has room, milliseconds. Under
    /// pressure (3/4 of its extents not yet stable) they come every
    /// 200 ms. A power loss of the secondary makes the primary resync the
    /// extents written since the last one; flushing less often writes back
    /// a page rewritten meanwhile once instead of at every stable point.
    #[serde(default = "default_stable_interval_ms")]
    pub stable_interval_ms: u64,
    /// The event log file: one `ts=... node=... event=... msg="..."` line
    /// per event. Absent (or empty): no file; events go to the journal
    /// (or stderr) and `mslctl events` only.
    #[serde(default)]
    pub log_file: PathBuf,
    /// The least important messages logged (journal or stderr): "error",
    /// "warn", "info" (every event), "debug" or "trace". Reloadable.
    #[serde(default)]
    pub log_level: LogLevel,
    /// Who decides this node's role: "self" (msld takes over from a
    /// failed peer and becomes primary on a cold start of the pair by
    /// itself) or "cluster" (a cluster manager decides: msld never becomes
    /// primary or takes the service address by itself, only on `mslctl
    /// promote`, e.g. from the OCF agent under Pacemaker).
    #[serde(default)]
    pub role_control: RoleControl,
    /// Run for every state change, event in the environment.
    pub notify_command: Option<PathBuf>,
    /// Events that run `notify_command` (names as `mslctl events` prints
    /// them, e.g. `["takeover", "peer_down", "disk_failed"]`); absent: all.
    /// The console, the log file and `mslctl events` get every event.
    pub notify_events: Option<Vec<String>>,
    /// `resync_progress` runs `notify_command` at most once per this many
    /// seconds (start and end of a resync always do).
    #[serde(default = "default_notify_progress_interval_s")]
    pub notify_progress_interval_s: u64,
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// Prometheus text metrics (e.g. "127.0.0.1:9477"); off when absent.
    pub metrics_address: Option<SocketAddr>,
    /// The pair's witness (`msl-witness` on a third host), "address:port"
    /// or "host:port": this node takes over, or keeps acknowledging writes
    /// without its peer, only while it holds the witness's lease. Absent:
    /// no witness (a node that lost both links to its peer serves alone).
    pub witness: Option<String>,
    /// With `witness`: what this node does while the witness does not
    /// answer: "suspend" (the default: no takeover, and a primary without
    /// its peer acknowledges nothing until it holds the lease again) or
    /// "sft3" (behave as without a witness).
    pub on_no_quorum: Option<OnNoQuorum>,
    /// Taken off every lease on this node's clock for the clocks' rate
    /// difference over one lease (milliseconds).
    #[serde(default = "default_witness_margin_ms")]
    pub witness_margin_ms: u64,
}

/// `on_no_quorum`: what a node with a witness does while it is unreachable.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum OnNoQuorum {
    /// Wait for the witness (never two nodes acknowledging at once).
    #[default]
    #[serde(rename = "suspend")]
    Suspend,
    /// Act as without a witness (NetWare SFT III).
    #[serde(rename = "sft3")]
    Sft3,
}

impl OnNoQuorum {
    /// The name as written in the configuration and shown by status.
    pub fn as_str(self) -> &'static str {
        match self {
            OnNoQuorum::Suspend => "suspend",
            OnNoQuorum::Sft3 => "sft3",
        }
    }
}

fn default_witness_margin_ms() -> u64 {
    10
}

fn default_true() -> bool {
    true
}
fn default_notify_progress_interval_s() -> u64 {
    crate::notify::PROGRESS_NOTIFY_INTERVAL.as_secs()
}

/// Every event name the daemon reports (`notify_events` accepts these).
pub const EVENT_NAMES: &[&str] = &[
    "role_changed",
    "peer_lost",
    "peer_found",
    "msl_link_down",
    "msl_link_up",
    "peer_down",
    "degraded",
    "takeover",
    "mirror_shut_down",
    "cannot_take_over",
    "connected",
    "split_brain_refused",
    "connection_refused",
    "resync_started",
    "resync_progress",
    "resync_finished",
    "switchover_started",
    "switchover_done",
    "lan_adapter_health",
    "verify_started",
    "verify_finished",
    "verify_aborted",
    "disk_failed",
    "warning",
    "events_dropped",
    "bad_auth",
    "config_reloaded",
    "config_reload_failed",
    "insecure_no_auth",
];

fn default_backend() -> Backend {
    Backend::Auto
}
/// An idle resync's bytes in flight at this MSL MTU: three quarters of
/// what the peer's receive ring holds. AF_XDP's is the smaller (4096 chunks
/// of 4 KiB, a frame taking as many as it spans: 1365 frames, 11.7 MiB, at
/// 9000 bytes); AF_PACKET's holds 32 MiB at any MTU.
fn resync_in_flight_bytes(mtu: usize) -> u64 {
    let frames =
        msl_transport::afxdp::XdpConfig::default().rx_ring_frames(mtu + msl_wire::ETH_HEADER_LEN);
    (frames * mtu) as u64 * 3 / 4
}

fn default_mtu() -> u32 {
    9000
}
fn default_block_size() -> u32 {
    4096
}
fn default_nbd_port() -> u16 {
    10809
}
fn default_heartbeat_port() -> u16 {
    7789
}
fn default_write_mode() -> WriteMode {
    WriteMode::Sync
}
fn default_heartbeat_interval_ms() -> u64 {
    50
}
fn default_miss_count() -> u32 {
    8
}
/// CPUs a `cpu_set_t` can name.
pub const CPU_SETSIZE: usize = libc::CPU_SETSIZE as usize;

fn default_nbd_busy_poll_us() -> u64 {
    200
}
fn default_nbd_tls() -> String {
    "off".into()
}
fn default_nbd_max_connections() -> u64 {
    1024
}
fn default_nbd_max_per_address() -> u64 {
    16
}
fn default_nbd_handshake_timeout_s() -> u64 {
    10
}
fn default_nbd_write_timeout_s() -> u64 {
    30
}
fn default_msl_rto_min_ms() -> u64 {
    200
}
fn default_stable_interval_ms() -> u64 {
    5000
}
/// The longest `nbd_busy_poll_us` allowed.
pub const MAX_NBD_BUSY_POLL_US: u64 = 10_000;
fn default_al_extents() -> u32 {
    1237
}
fn default_resync_min_mib_s() -> u64 {
    10
}
fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/msl/msld.sock")
}

/// What every start and status report repeat while `insecure_no_auth`.
pub const INSECURE_NO_AUTH_WARNING: &str =
    "insecure_no_auth = true: MSL and LAN packets are NOT authenticated; anyone on \
     those networks can forge heartbeats or a disk failure and make the secondary take \
     over a live primary (set key_file to a 0600 cluster key)";

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DaemonConfig {
    pub file: FileConfig,
    pub service_ip: IpAddr,
    pub service_prefix: u8,
    /// The NBD server's settings (TLS files checked, allow list parsed).
    pub nbd: NbdSettings,
    /// Warnings to show at start (e.g. async write mode).
    pub warnings: Vec<String>,
    /// The witness's address (`witness`, resolved at load).
    pub witness: Option<SocketAddr>,
}

/// The NBD keys, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdSettings {
    pub tls: msl_nbd::TlsMode,
    pub tls_dir: PathBuf,
    pub tls_verify_peer: bool,
    pub allow: Vec<msl_nbd::IpNet>,
    pub read_only: bool,
    pub max_connections: usize,
    pub max_per_address: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub write_timeout: Duration,
}

/// Validate the `nbd_*` keys; the TLS files are loaded (as msld will) so
/// a missing or unreadable file is refused here, naming the file.
fn nbd_settings(f: &FileConfig) -> Result<NbdSettings, ConfigError> {
    let tls: msl_nbd::TlsMode = f.nbd_tls.parse().map_err(|_| {
        invalid(
            "nbd_tls",
            format!("{:?}", f.nbd_tls),
            "must be \"off\", \"on\" or \"require\"",
        )
    })?;
    let mut allow = Vec::with_capacity(f.nbd_allow.len());
    for (i, a) in f.nbd_allow.iter().enumerate() {
        let net = match a.parse::<msl_nbd::IpNet>() {
            Ok(n) => n.trunc(),
            Err(_) => match a.parse::<IpAddr>() {
                Ok(ip) => msl_nbd::IpNet::from(ip),
                Err(_) => {
                    return Err(invalid(
                        &format!("nbd_allow[{i}]"),
                        format!("{a:?}"),
                        "not an IPv4/IPv6 network (ADDRESS/PREFIX) or address",
                    ))
                }
            },
        };
        allow.push(net);
    }
    let range = |key: &str, v: u64, lo: u64, hi: u64| {
        if v < lo || v > hi {
            Err(invalid(key, v, format!("must be between {lo} and {hi}")))
        } else {
            Ok(v)
        }
    };
    let max_connections = range("nbd_max_connections", f.nbd_max_connections, 1, 65_536)?;
    let max_per_address = range(
        "nbd_max_per_address",
        f.nbd_max_per_address,
        1,
        max_connections,
    )?;
    let handshake = range("nbd_handshake_timeout_s", f.nbd_handshake_timeout_s, 1, 300)?;
    let idle = range("nbd_idle_timeout_s", f.nbd_idle_timeout_s, 0, 7 * 86_400)?;
    let write = range("nbd_write_timeout_s", f.nbd_write_timeout_s, 1, 3600)?;
    let tls_dir = match (&f.nbd_tls_dir, tls) {
        (_, msl_nbd::TlsMode::Off) => {
            if f.nbd_tls_verify_peer {
                return Err(invalid(
                    "nbd_tls_verify_peer",
                    true,
                    "client certificates need nbd_tls = \"on\" or \"require\"",
                ));
            }
            f.nbd_tls_dir.clone().unwrap_or_default()
        }
        (None, _) => {
            let ca = if f.nbd_tls_verify_peer {
                " and ca-cert.pem"
            } else {
                ""
            };
            let why = format!(
                "nbd_tls = \"{tls}\" needs the directory of server-cert.pem and server-key.pem{ca}"
            );
            return Err(invalid("nbd_tls_dir", "(absent)", why));
        }
        (Some(dir), _) => {
            msl_nbd::tls::load_server_config(dir, f.nbd_tls_verify_peer)
                .map_err(|e| invalid("nbd_tls_dir", dir.display(), e.to_string()))?;
            dir.clone()
        }
    };
    Ok(NbdSettings {
        tls,
        tls_dir,
        tls_verify_peer: f.nbd_tls_verify_peer,
        allow,
        read_only: f.nbd_read_only,
        max_connections: max_connections as usize,
        max_per_address: max_per_address as usize,
        handshake_timeout: Duration::from_secs(handshake),
        idle_timeout: (idle > 0).then(|| Duration::from_secs(idle)),
        write_timeout: Duration::from_secs(write),
    })
}

impl DaemonConfig {
    /// Read and validate a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parse and validate TOML text (`origin` names it in errors).
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: origin.into(),
            message: e.to_string(),
        })?;
        Self::validate(file)
    }

    fn validate(file: FileConfig) -> Result<Self, ConfigError> {
        fn range(key: &str, v: u64, lo: u64, hi: u64) -> Result<(), ConfigError> {
            if v < lo || v > hi {
                return Err(invalid(key, v, format!("must be between {lo} and {hi}")));
            }
            Ok(())
        }
        range("node_id", file.node_id.into(), 1, u16::MAX.into())?;
        range("peer_id", file.peer_id.into(), 1, u16::MAX.into())?;
        if file.peer_id == file.node_id {
            return Err(invalid("peer_id", file.peer_id, "must differ from node_id"));
        }
        if file.cluster_id == 0 {
            return Err(invalid(
                "cluster_id",
                0,
                "must be non-zero (pick a random 64-bit number for the pair)",
            ));
        }
        if file.msl.interface.is_empty() {
            return Err(invalid(
                "msl.interface",
                "\"\"",
                "name the MSL network interface",
            ));
        }
        range("msl.mtu", file.msl.mtu.into(), 1280, 9216)?;
        if file.lan.is_empty() || file.lan.len() > msl_core::node::MAX_LAN_ADAPTERS {
            return Err(invalid(
                "lan",
                file.lan.len(),
                format!(
                    "configure 1 to {} LAN adapters",
                    msl_core::node::MAX_LAN_ADAPTERS
                ),
            ));
        }
        for (i, a) in file.lan.iter().enumerate() {
            if a.interface.is_empty() {
                return Err(invalid(
                    &format!("lan[{i}].interface"),
                    "\"\"",
                    "name the interface",
                ));
            }
            if a.interface == file.msl.interface {
                return Err(invalid(
                    &format!("lan[{i}].interface"),
                    &a.interface,
                    "the LAN adapter must not be the MSL interface",
                ));
            }
        }
        if !file
            .lan
            .iter()
            .any(|a| a.interface == file.service_interface)
        {
            return Err(invalid(
                "service_interface",
                &file.service_interface,
                "must be one of the [[lan]] interfaces",
            ));
        }
        let (ip, prefix) = file.service_address.split_once('/').ok_or_else(|| {
            invalid(
                "service_address",
                &file.service_address,
                "write it as ADDRESS/PREFIX",
            )
        })?;
        let service_ip: IpAddr = ip.parse().map_err(|_| {
            invalid(
                "service_address",
                &file.service_address,
                "not an IP address",
            )
        })?;
        let service_prefix: u8 = prefix.parse().map_err(|_| {
            invalid(
                "service_address",
                &file.service_address,
                "prefix is not a number",
            )
        })?;
        let max_prefix = if service_ip.is_ipv4() { 32 } else { 128 };
        range(
            "service_address prefix",
            service_prefix.into(),
            1,
            max_prefix,
        )?;
        range("nbd_port", file.nbd_port.into(), 1, u16::MAX.into())?;
        range(
            "heartbeat_port",
            file.heartbeat_port.into(),
            1,
            u16::MAX.into(),
        )?;
        if file.heartbeat_port == file.nbd_port {
            return Err(invalid(
                "heartbeat_port",
                file.heartbeat_port,
                "must differ from nbd_port",
            ));
        }
        let bs = file.volume.block_size;
        if !(512..=65536).contains(&bs) || !bs.is_power_of_two() {
            return Err(invalid(
                "volume.block_size",
                bs,
                "must be a power of two from 512 to 65536",
            ));
        }
        if file.volume.size_bytes == 0 || !file.volume.size_bytes.is_multiple_of(u64::from(bs)) {
            return Err(invalid(
                "volume.size_bytes",
                file.volume.size_bytes,
                format!("must be a non-zero multiple of volume.block_size ({bs})"),
            ));
        }
        range(
            "volume.size_bytes",
            file.volume.size_bytes,
            u64::from(bs),
            1 << 50,
        )?;
        if file.volume.metadata == file.volume.path {
            return Err(invalid(
                "volume.metadata",
                file.volume.metadata.display(),
                "must not be the volume itself",
            ));
        }
        range("heartbeat_interval_ms", file.heartbeat_interval_ms, 1, 1000)?;
        range("miss_count", file.miss_count.into(), 2, 100)?;
        let dead_ms = file.heartbeat_interval_ms * u64::from(file.miss_count);
        if dead_ms > 10_000 {
            return Err(invalid(
                "miss_count",
                file.miss_count,
                format!("heartbeat_interval_ms x miss_count = {dead_ms} ms; keep failure detection under 10 s"),
            ));
        }
        range("resync_min_mib_s", file.resync_min_mib_s, 1, 100_000)?;
        range(
            "nbd_busy_poll_us",
            file.nbd_busy_poll_us,
            0,
            MAX_NBD_BUSY_POLL_US,
        )?;
        range("msl_rto_min_ms", file.msl_rto_min_ms, 1, 1000)?;
        range("stable_interval_ms", file.stable_interval_ms, 200, 600_000)?;
        if let Some(&c) = file.cpu_affinity.iter().find(|&&c| c >= CPU_SETSIZE) {
            return Err(invalid(
                "cpu_affinity",
                c,
                format!("CPU numbers are 0..{}", CPU_SETSIZE - 1),
            ));
        }
        for (key, cpu) in [
            ("msl.tx_cpu", file.msl.tx_cpu),
            ("msl.rx_cpu", file.msl.rx_cpu),
        ] {
            let Some(c) = cpu else { continue };
            if c >= CPU_SETSIZE {
                return Err(invalid(
                    key,
                    c,
                    format!("CPU numbers are 0..{}", CPU_SETSIZE - 1),
                ));
            }
            if !file.cpu_affinity.is_empty() && !file.cpu_affinity.contains(&c) {
                return Err(invalid(
                    key,
                    c,
                    format!("not one of cpu_affinity {:?}", file.cpu_affinity),
                ));
            }
        }
        // The metadata slots hold at most DEFAULT_AL_CAPACITY extents.
        range(
            "al_extents",
            u64::from(file.al_extents),
            1,
            u64::from(msl_store::DEFAULT_AL_CAPACITY),
        )?;
        if file.resync_max_mib_s != 0 && file.resync_max_mib_s < file.resync_min_mib_s {
            return Err(invalid(
                "resync_max_mib_s",
                file.resync_max_mib_s,
                "must be 0 (no limit) or >= resync_min_mib_s",
            ));
        }
        if let Some(events) = &file.notify_events {
            for (i, e) in events.iter().enumerate() {
                if !EVENT_NAMES.contains(&e.as_str()) {
                    return Err(invalid(
                        &format!("notify_events[{i}]"),
                        format!("{e:?}"),
                        format!("unknown event; known events: {}", EVENT_NAMES.join(", ")),
                    ));
                }
            }
        }
        range(
            "notify_progress_interval_s",
            file.notify_progress_interval_s,
            0,
            86_400,
        )?;
        let nbd = nbd_settings(&file)?;
        let mut warnings = Vec::new();
        if file.write_mode == WriteMode::Async {
            warnings.push(
                "write_mode = \"async\": writes are acknowledged before the peer has them; \
                 an acknowledged write can be lost if the primary dies"
                    .to_string(),
            );
        }
        match (&file.key_file, file.insecure_no_auth) {
            (None, false) => {
                return Err(invalid(
                    "key_file",
                    "(absent)",
                    "a cluster key is required: create one with \
                     `head -c 32 /dev/urandom > /etc/msl/cluster.key && chmod 600 /etc/msl/cluster.key`, \
                     copy it to both nodes and set key_file = \"/etc/msl/cluster.key\" \
                     (or, for a lab only, insecure_no_auth = true)",
                ))
            }
            (Some(k), true) => {
                return Err(invalid(
                    "insecure_no_auth",
                    true,
                    format!(
                        "contradicts key_file = {:?}: remove insecure_no_auth (the key is used) \
                         or key_file",
                        k.display()
                    ),
                ))
            }
            (None, true) => warnings.push(INSECURE_NO_AUTH_WARNING.to_string()),
            (Some(_), false) => {}
        }
        let witness = witness_settings(&file)?;
        let cfg = DaemonConfig {
            file,
            service_ip,
            service_prefix,
            nbd,
            warnings,
            witness,
        };
        cfg.core_config()
            .validate()
            .map_err(|e| invalid(e.key, e.value, e.to_string()))?;
        Ok(cfg)
    }

    /// The NBD server's configuration (`busy_poll` from
    /// `nbd_busy_poll_us`).
    pub fn nbd_server_config(&self) -> msl_nbd::ServerConfig {
        let n = &self.nbd;
        msl_nbd::ServerConfig {
            busy_poll: Duration::from_micros(self.file.nbd_busy_poll_us),
            tls: n.tls,
            tls_dir: n.tls_dir.clone(),
            tls_verify_peer: n.tls_verify_peer,
            allow: n.allow.clone(),
            read_only: n.read_only,
            max_connections: n.max_connections,
            max_per_address: n.max_per_address,
            handshake_timeout: n.handshake_timeout,
            idle_timeout: n.idle_timeout,
            write_timeout: n.write_timeout,
            ..msl_nbd::ServerConfig::default()
        }
    }

    /// Which events run the notification command.
    pub fn command_policy(&self) -> crate::notify::CommandPolicy {
        crate::notify::CommandPolicy {
            events: self.file.notify_events.clone(),
            progress_interval: Duration::from_secs(self.file.notify_progress_interval_s),
        }
    }

    /// Where msld listens for NBD: the service address only.
    pub fn nbd_listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.service_ip, self.file.nbd_port)
    }

    /// The protocol core's configuration.
    pub fn core_config(&self) -> msl_core::Config {
        let f = &self.file;
        let blocks = f.volume.size_bytes / u64::from(f.volume.block_size);
        let mut c = msl_core::Config::new(
            f.node_id,
            f.peer_id,
            f.cluster_id,
            blocks,
            f.volume.block_size,
        );
        c.write_mode = match f.write_mode {
            WriteMode::Sync => msl_core::WriteMode::Sync,
            WriteMode::Async => msl_core::WriteMode::Async,
        };
        c.heartbeat_interval_us = f.heartbeat_interval_ms * 1000;
        c.miss_count = f.miss_count;
        // With a cluster manager deciding, the core never changes its role
        // by itself: one decider per role.
        c.auto_takeover = f.role_control == RoleControl::SelfManaged;
        // A gap of three heartbeat intervals between two core runs means
        // this node did not run (the core is called at least once per
        // interval); never more than the dead interval minus two intervals,
        // so a stall the peer notices is one this node notices too.
        let hb = c.heartbeat_interval_us;
        c.stall_threshold_us = (3 * hb).clamp(hb, c.dead_after_us().saturating_sub(2 * hb).max(hb));
        c.resync_max_bytes_per_s = f.resync_max_mib_s << 20;
        c.resync_min_bytes_per_s = f.resync_min_mib_s << 20;
        c.al_extents = f.al_extents as usize;
        c.resync_max_in_flight_bytes = resync_in_flight_bytes(f.msl.mtu as usize);
        // The core thread can be milliseconds behind its input queue during
        // bulk traffic, and the peer's core stalls now and then (a
        // throttled write): acks wait while retransmit timers expire. Real
        // losses are repaired at once by SACK fast retransmit.
        c.rto_min_us = f.msl_rto_min_ms * 1000;
        c.rto_initial_us = c.rto_initial_us.max(c.rto_min_us);
        c.rto_max_us = c.rto_max_us.max(c.rto_min_us);
        c.stabilize_relaxed_us = (f.stable_interval_ms * 1000).max(c.stabilize_interval_us);
        c.witness = self.witness.is_some();
        c.on_no_quorum = match f.on_no_quorum.unwrap_or_default() {
            OnNoQuorum::Suspend => msl_core::config::NoQuorum::Suspend,
            OnNoQuorum::Sft3 => msl_core::config::NoQuorum::Sft3,
        };
        c
    }

    /// The dead interval: the peer is dead on a path after this long
    /// without a heartbeat (`heartbeat_interval_ms` x `miss_count`).
    pub fn dead_interval(&self) -> Duration {
        Duration::from_millis(self.file.heartbeat_interval_ms * u64::from(self.file.miss_count))
    }
}

/// The witness keys, checked: its address resolved (a name must resolve
/// now: `msld --check` reports it), a cluster key to sign its packets with,
/// a margin well under the dead interval, `on_no_quorum` only with a
/// witness.
fn witness_settings(file: &FileConfig) -> Result<Option<SocketAddr>, ConfigError> {
    let Some(w) = &file.witness else {
        if let Some(p) = file.on_no_quorum {
            return Err(invalid(
                "on_no_quorum",
                p.as_str(),
                "applies only with a witness: set witness = \"host:port\" or remove it",
            ));
        }
        return Ok(None);
    };
    use std::net::ToSocketAddrs;
    let addr = w
        .to_socket_addrs()
        .map_err(|e| {
            invalid(
                "witness",
                format!("{w:?}"),
                format!("not an address:port that resolves: {e}"),
            )
        })?
        .next()
        .ok_or_else(|| invalid("witness", format!("{w:?}"), "resolves to no address"))?;
    if addr.port() == 0 || addr.ip().is_unspecified() {
        return Err(invalid(
            "witness",
            format!("{w:?}"),
            "needs the witness host's address and UDP port (e.g. \"10.0.0.9:7790\")",
        ));
    }
    if file.key_file.is_none() {
        return Err(invalid(
            "witness",
            format!("{w:?}"),
            "needs key_file: the witness authenticates every packet with the cluster key",
        ));
    }
    if !file
        .lan
        .iter()
        .any(|a| a.address.is_ipv4() == addr.is_ipv4())
    {
        return Err(invalid(
            "witness",
            format!("{w:?}"),
            "no LAN adapter address of the same IP family to reach it from",
        ));
    }
    let dead_ms = file.heartbeat_interval_ms * u64::from(file.miss_count);
    if file.witness_margin_ms == 0 || file.witness_margin_ms * 4 > dead_ms {
        return Err(invalid(
            "witness_margin_ms",
            file.witness_margin_ms,
            format!("must be between 1 and a quarter of the dead interval ({dead_ms} ms)"),
        ));
    }
    Ok(Some(addr))
}

/// A network interface as `msld --check` sees it: its name and its
/// addresses with their prefix lengths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInterface {
    pub name: String,
    pub addrs: Vec<(IpAddr, u8)>,
}

/// The interfaces of the current network namespace.
pub fn host_interfaces() -> Vec<HostInterface> {
    pnet_datalink::interfaces()
        .into_iter()
        .map(|i| HostInterface {
            name: i.name,
            addrs: i.ips.iter().map(|n| (n.ip(), n.prefix())).collect(),
        })
        .collect()
}

impl DaemonConfig {
    /// What in this host (its network namespace) does not fit the
    /// configuration: every problem, each naming the key and what is
    /// wrong. Checked: the MSL interface and each LAN adapter exist; each
    /// adapter's `address` is on its interface (heartbeats are sent from
    /// it); the service address lies in a network of `service_interface`
    /// with the same prefix length (a host route, /32 or /128, may lie
    /// outside).
    pub fn host_problems(&self, ifs: &[HostInterface]) -> Vec<String> {
        let f = &self.file;
        let mut out = Vec::new();
        let names = || {
            let mut n: Vec<&str> = ifs.iter().map(|i| i.name.as_str()).collect();
            n.sort_unstable();
            n.join(", ")
        };
        let find = |key: &str, name: &str, out: &mut Vec<String>| {
            let i = ifs.iter().find(|i| i.name == name);
            if i.is_none() {
                out.push(format!(
                    "{key} = {name:?}: no such interface here (have: {})",
                    names()
                ));
            }
            i
        };
        let shown = |i: &HostInterface| {
            let a: Vec<String> = i.addrs.iter().map(|(a, p)| format!("{a}/{p}")).collect();
            if a.is_empty() {
                "no address".to_string()
            } else {
                a.join(", ")
            }
        };
        find("msl.interface", &f.msl.interface, &mut out);
        for (n, a) in f.lan.iter().enumerate() {
            let Some(i) = find(&format!("lan[{n}].interface"), &a.interface, &mut out) else {
                continue;
            };
            if !i.addrs.iter().any(|(ip, _)| *ip == a.address) {
                out.push(format!(
                    "lan[{n}].address = {}: not an address of {} (it has {}); heartbeats are sent from it",
                    a.address,
                    a.interface,
                    shown(i)
                ));
            }
        }
        let host_route = self.service_prefix == if self.service_ip.is_ipv4() { 32 } else { 128 };
        if let Some(i) = ifs.iter().find(|i| i.name == f.service_interface) {
            let own: Vec<&(IpAddr, u8)> = i
                .addrs
                .iter()
                .filter(|(ip, _)| *ip != self.service_ip)
                .collect();
            let net = own.iter().find(|(ip, p)| {
                ipnet::IpNet::new(*ip, *p).is_ok_and(|n| n.contains(&self.service_ip))
            });
            match net {
                Some((ip, p)) if *p != self.service_prefix => out.push(format!(
                    "service_address = {}: {} has {ip}/{p}, the same network with prefix /{p}; \
                     write the service address as {}/{p}",
                    f.service_address, f.service_interface, self.service_ip
                )),
                None if !host_route => out.push(format!(
                    "service_address = {}: outside every network of {} (it has {}); clients \
                     on that LAN could not reach it",
                    f.service_address,
                    f.service_interface,
                    shown(i)
                )),
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const GOOD: &str = r#"
node_id = 1
peer_id = 2
cluster_id = 0x6d736c00
key_file = "/etc/msl/cluster.key"
msl = { interface = "a-msl" }
service_address = "10.77.1.100/24"
service_interface = "a-lan"
log_file = "/var/log/msl/msld.log"
[[lan]]
interface = "a-lan"
address = "10.77.1.1"
peer_address = "10.77.1.2"
[volume]
path = "/var/lib/msl/volume.img"
size_bytes = 1073741824
metadata = "/var/lib/msl/meta"
"#;

    pub(crate) fn parse(t: &str) -> Result<DaemonConfig, ConfigError> {
        DaemonConfig::parse(t, Path::new("test.toml"))
    }

    /// The good configuration with `extra` lines among its top-level keys.
    pub(crate) fn with(extra: &str) -> String {
        GOOD.replacen("node_id = 1", &format!("node_id = 1\n{extra}"), 1)
    }

    fn key_of(e: ConfigError) -> String {
        match e {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("expected an invalid key, got {other}"),
        }
    }

    #[test]
    fn test_stall_threshold_fits_every_heartbeat_tuning() {
        for (hb, miss) in [(1, 2), (1, 3), (50, 8), (10, 100), (1000, 4), (1000, 10)] {
            let t = with(&format!(
                "heartbeat_interval_ms = {hb}\nmiss_count = {miss}"
            ));
            let core = parse(&t)
                .unwrap_or_else(|e| panic!("hb {hb} ms x {miss}: {e}"))
                .core_config();
            assert!(core.validate().is_ok(), "hb {hb} ms x {miss}");
            assert!(core.stall_threshold_us >= core.heartbeat_interval_us);
        }
        let core = parse(GOOD).unwrap().core_config();
        assert_eq!(core.stall_threshold_us, 150_000, "three 50 ms intervals");
    }

    #[test]
    fn test_minimal_config_gets_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.file.nbd_port, 10809);
        assert_eq!(c.file.msl.backend, Backend::Auto);
        assert_eq!(c.file.write_mode, WriteMode::Sync);
        assert_eq!(c.service_prefix, 24);
        assert_eq!(c.file.nbd_busy_poll_us, 200);
        let core = c.core_config();
        assert_eq!(core.rto_min_us, 200_000);
        assert!(core.rto_initial_us >= core.rto_min_us);
        assert!(core.validate().is_ok());
        let t = with("msl_rto_min_ms = 5");
        assert_eq!(parse(&t).unwrap().core_config().rto_min_us, 5_000);
        assert_eq!(core.stabilize_relaxed_us, 5_000_000);
        let t = with("stable_interval_ms = 1000");
        assert_eq!(
            parse(&t).unwrap().core_config().stabilize_relaxed_us,
            1_000_000
        );
        assert_eq!(core.volume_blocks, 262_144);
        assert!(core.dead_after_us() <= 500_000);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        assert!(!c.file.insecure_no_auth);
    }

    #[test]
    fn test_examples_parse() {
        for f in ["node1.toml", "node2.toml"] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../examples")
                .join(f);
            let c = DaemonConfig::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            assert!(c.warnings.is_empty(), "{f}: {:?}", c.warnings);
        }
    }

    #[test]
    fn test_unknown_key_refused_with_its_name() {
        let e = parse(&format!("{GOOD}\nhearbeat_interval_ms = 10\n")).unwrap_err();
        // The extra key lands in [volume] (the last table): still refused.
        assert!(e.to_string().contains("hearbeat_interval_ms"), "{e}");
    }

    #[test]
    fn test_bad_values_name_the_key() {
        let cases = [
            ("peer_id = 2", "peer_id = 1", "peer_id"),
            ("cluster_id = 0x6d736c00", "cluster_id = 0", "cluster_id"),
            ("\"10.77.1.100/24\"", "\"10.77.1.100\"", "service_address"),
            (
                "\"10.77.1.100/24\"",
                "\"10.77.1.100/40\"",
                "service_address prefix",
            ),
            (
                "service_interface = \"a-lan\"",
                "service_interface = \"eth9\"",
                "service_interface",
            ),
            (
                "size_bytes = 1073741824",
                "size_bytes = 1000",
                "volume.size_bytes",
            ),
            ("node_id = 1", "node_id = 1\nmiss_count = 1", "miss_count"),
            (
                "node_id = 1",
                "node_id = 1\nheartbeat_interval_ms = 0",
                "heartbeat_interval_ms",
            ),
            (
                "node_id = 1",
                "node_id = 1\nnbd_port = 7789",
                "heartbeat_port",
            ),
            (
                "node_id = 1",
                "node_id = 1\nnbd_busy_poll_us = 10001",
                "nbd_busy_poll_us",
            ),
            (
                "node_id = 1",
                "node_id = 1\nmsl_rto_min_ms = 0",
                "msl_rto_min_ms",
            ),
            (
                "node_id = 1",
                "node_id = 1\nmsl_rto_min_ms = 1001",
                "msl_rto_min_ms",
            ),
            (
                "node_id = 1",
                "node_id = 1\nstable_interval_ms = 100",
                "stable_interval_ms",
            ),
        ];
        for (from, to, key) in cases {
            let t = GOOD.replacen(from, to, 1);
            assert_ne!(t, GOOD, "case {key} did not change the text");
            assert_eq!(key_of(parse(&t).unwrap_err()), key, "case {to}");
        }
    }

    /// An idle resync keeps fewer bytes in flight than the peer's AF_XDP
    /// receive ring holds at the configured MTU (its frames of
    /// `mtu + 14` bytes, each taking whole 4 KiB chunks), and more than the
    /// 4 MiB of 64 messages of 64 KiB at a 9000-byte MTU.
    #[test]
    fn test_resync_in_flight_fits_the_receive_ring_at_every_mtu() {
        let ring = msl_transport::afxdp::XdpConfig::default();
        for mtu in [1280usize, 1500, 4000, 4096, 9000, 9216] {
            let frames = ring.rx_ring_frames(mtu + msl_wire::ETH_HEADER_LEN);
            let chunks = (mtu + msl_wire::ETH_HEADER_LEN).div_ceil(ring.chunk as usize);
            assert_eq!(frames * chunks, ring.rx_frames as usize / chunks * chunks);
            let bytes = resync_in_flight_bytes(mtu);
            assert!(bytes < (frames * mtu) as u64, "MTU {mtu}: {bytes}");
            assert!(bytes >= 1 << 20, "MTU {mtu}: {bytes}");
        }
        assert!(resync_in_flight_bytes(9000) > 8 << 20);
        let t = GOOD.replacen(
            "msl = { interface = \"a-msl\" }",
            "msl = { interface = \"a-msl\", mtu = 1500 }",
            1,
        );
        let c = parse(&t).unwrap();
        assert_eq!(
            c.core_config().resync_max_in_flight_bytes,
            resync_in_flight_bytes(1500)
        );
    }

    /// The MSL workers run unpinned unless `[msl] tx_cpu` / `rx_cpu` say
    /// otherwise; a CPU outside `cpu_affinity` (when set) is refused.
    #[test]
    fn test_msl_worker_cpus_default_unpinned_and_stay_in_cpu_affinity() {
        let c = parse(GOOD).unwrap();
        assert_eq!((c.file.msl.tx_cpu, c.file.msl.rx_cpu), (None, None));
        let pinned = |extra: &str, top: &str| {
            let t = with(top).replacen(
                "msl = { interface = \"a-msl\" }",
                &format!("msl = {{ interface = \"a-msl\"{extra} }}"),
                1,
            );
            assert!(t.contains("a-msl\","), "{t}");
            parse(&t)
        };
        let c = pinned(", tx_cpu = 1, rx_cpu = 0", "").unwrap();
        assert_eq!((c.file.msl.tx_cpu, c.file.msl.rx_cpu), (Some(1), Some(0)));
        assert!(pinned(", rx_cpu = 1", "cpu_affinity = [0, 1]").is_ok());
        let e = pinned(", rx_cpu = 1", "cpu_affinity = [0]").unwrap_err();
        assert_eq!(key_of(e), "msl.rx_cpu");
        let e = pinned(&format!(", tx_cpu = {CPU_SETSIZE}"), "").unwrap_err();
        assert_eq!(key_of(e), "msl.tx_cpu");
    }

    #[test]
    fn test_nbd_keys_defaults_and_values() {
        let c = parse(GOOD).unwrap();
        let n = c.nbd_server_config();
        assert_eq!(n.tls, msl_nbd::TlsMode::Off);
        assert!(n.allow.is_empty() && !n.read_only && !n.tls_verify_peer);
        assert_eq!((n.max_connections, n.max_per_address), (1024, 16));
        assert_eq!(n.handshake_timeout, Duration::from_secs(10));
        assert_eq!(n.idle_timeout, None);
        assert_eq!(n.write_timeout, Duration::from_secs(30));
        assert_eq!(n.busy_poll, Duration::from_micros(200));
        assert_eq!(c.nbd_listen_addr(), "10.77.1.100:10809".parse().unwrap());
        let t = GOOD.replacen(
            "node_id = 1",
            "node_id = 1\nnbd_allow = [\"10.77.1.7/24\", \"2001:db8::/32\", \"192.0.2.9\"]\n\
             nbd_read_only = true\nnbd_max_connections = 50\nnbd_max_per_address = 5\n\
             nbd_idle_timeout_s = 600\nnbd_write_timeout_s = 5\nnbd_handshake_timeout_s = 3",
            1,
        );
        let n = parse(&t).unwrap().nbd_server_config();
        let allow: Vec<String> = n.allow.iter().map(|a| a.to_string()).collect();
        // A host address inside a network is reduced to the network.
        assert_eq!(allow, ["10.77.1.0/24", "2001:db8::/32", "192.0.2.9/32"]);
        assert!(n.read_only);
        assert_eq!((n.max_connections, n.max_per_address), (50, 5));
        assert_eq!(n.idle_timeout, Some(Duration::from_secs(600)));
        assert_eq!(n.write_timeout, Duration::from_secs(5));
        assert_eq!(n.handshake_timeout, Duration::from_secs(3));
    }

    #[test]
    fn test_bad_nbd_keys_name_the_key() {
        let cases = [
            ("nbd_tls = \"maybe\"", "nbd_tls"),
            ("nbd_allow = [\"10.77.1.0/33\"]", "nbd_allow[0]"),
            ("nbd_allow = [\"10.0.0.0/8\", \"lan\"]", "nbd_allow[1]"),
            ("nbd_tls = \"require\"", "nbd_tls_dir"),
            ("nbd_tls_verify_peer = true", "nbd_tls_verify_peer"),
            ("nbd_max_connections = 0", "nbd_max_connections"),
            ("nbd_max_per_address = 2000", "nbd_max_per_address"),
            ("nbd_write_timeout_s = 0", "nbd_write_timeout_s"),
            ("nbd_handshake_timeout_s = 0", "nbd_handshake_timeout_s"),
        ];
        for (line, key) in cases {
            let t = with(line);
            assert_eq!(key_of(parse(&t).unwrap_err()), key, "case {line}");
        }
    }

    /// The TLS files are read at load: a missing directory or file is
    /// refused naming nbd_tls_dir and the file.
    #[test]
    fn test_nbd_tls_files_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let tls = |mode: &str, verify: bool| {
            with(&format!(
                "nbd_tls = \"{mode}\"\nnbd_tls_dir = \"{}\"\nnbd_tls_verify_peer = {verify}",
                d.display()
            ))
        };
        let e = parse(&tls("require", false)).unwrap_err();
        assert!(e.to_string().contains("server-cert.pem"), "{e}");
        assert_eq!(key_of(e), "nbd_tls_dir");
        let run = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("openssl (apt-get install openssl)");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server-key.pem",
            "-out",
            "server-cert.pem",
            "-days",
            "30",
            "-subj",
            "/CN=nbd.example",
        ]);
        let c = parse(&tls("require", false)).unwrap();
        assert_eq!(c.nbd_server_config().tls, msl_nbd::TlsMode::Require);
        assert_eq!(c.nbd_server_config().tls_dir, d);
        // Client certificates need the CA file.
        let e = parse(&tls("on", true)).unwrap_err();
        assert!(e.to_string().contains("ca-cert.pem"), "{e}");
        std::fs::copy(d.join("server-cert.pem"), d.join("ca-cert.pem")).unwrap();
        assert!(parse(&tls("on", true)).unwrap().nbd.tls_verify_peer);
        std::fs::write(d.join("server-key.pem"), "not a key").unwrap();
        let e = parse(&tls("on", true)).unwrap_err();
        assert!(e.to_string().contains("server-key.pem"), "{e}");
    }

    #[test]
    fn test_notify_filter_and_thin_volume_keys() {
        let c = parse(GOOD).unwrap();
        assert!(
            c.file.volume.preallocate,
            "volumes are allocated ahead by default"
        );
        assert_eq!(c.command_policy(), crate::notify::CommandPolicy::default());
        let t = GOOD.replacen(
            "node_id = 1",
            "node_id = 1\nnotify_events = [\"takeover\", \"disk_failed\"]\nnotify_progress_interval_s = 5",
            1,
        ) + "preallocate = false\n";
        let c = parse(&t).unwrap();
        assert!(!c.file.volume.preallocate);
        let p = c.command_policy();
        assert_eq!(
            p.events.as_deref(),
            Some(&["takeover".to_string(), "disk_failed".into()][..])
        );
        assert_eq!(p.progress_interval, Duration::from_secs(5));
        let t = GOOD.replacen(
            "node_id = 1",
            "node_id = 1\nnotify_events = [\"takeover\", \"take_over\"]",
            1,
        );
        let e = parse(&t).unwrap_err();
        assert!(
            e.to_string().contains("take_over") && e.to_string().contains("peer_down"),
            "{e}"
        );
        assert_eq!(key_of(e), "notify_events[1]");
    }

    /// No key: refused, naming key_file and how to make one; an explicit
    /// `insecure_no_auth = true` runs, with a warning; both together are
    /// a contradiction.
    #[test]
    fn test_cluster_key_required_unless_insecure_no_auth() {
        let no_key = GOOD.replacen("key_file = \"/etc/msl/cluster.key\"\n", "", 1);
        assert_ne!(no_key, GOOD);
        let e = parse(&no_key).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("chmod 600") && text.contains("insecure_no_auth"),
            "{text}"
        );
        assert_eq!(key_of(e), "key_file");
        let c = parse(&no_key.replacen("node_id = 1", "node_id = 1\ninsecure_no_auth = true", 1))
            .unwrap();
        assert!(c.file.insecure_no_auth);
        assert_eq!(c.warnings, [INSECURE_NO_AUTH_WARNING]);
        let e = parse(&with("insecure_no_auth = true")).unwrap_err();
        assert_eq!(key_of(e), "insecure_no_auth");
    }

    fn iface(name: &str, addrs: &[&str]) -> HostInterface {
        HostInterface {
            name: name.into(),
            addrs: addrs
                .iter()
                .map(|a| {
                    let (ip, p) = a.split_once('/').unwrap();
                    (ip.parse().unwrap(), p.parse().unwrap())
                })
                .collect(),
        }
    }

    /// Every problem is reported, each naming its key; a host that fits
    /// has none.
    #[test]
    fn test_host_problems_name_the_keys() {
        let c = parse(GOOD).unwrap();
        let good = [
            iface("lo", &["127.0.0.1/8"]),
            iface("a-msl", &[]),
            iface("a-lan", &["10.77.1.1/24"]),
        ];
        assert_eq!(c.host_problems(&good), Vec::<String>::new());
        // The service address on its interface (this node is primary).
        let mut holding = good.clone();
        holding[2] = iface("a-lan", &["10.77.1.1/24", "10.77.1.100/24"]);
        assert!(c.host_problems(&holding).is_empty());
        let p = c.host_problems(&good[..1]);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("msl.interface = \"a-msl\": no such interface here (have: lo)"));
        assert!(p[1].starts_with("lan[0].interface = \"a-lan\": no such interface"));
        let wrong = [iface("a-msl", &[]), iface("a-lan", &["10.77.1.9/24"])];
        let p = c.host_problems(&wrong);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with(
                "lan[0].address = 10.77.1.1: not an address of a-lan (it has 10.77.1.9/24)"
            ),
            "{p:?}"
        );
        let c16 = parse(&GOOD.replacen("10.77.1.100/24", "10.77.1.100/16", 1)).unwrap();
        let p = c16.host_problems(&good);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("write the service address as 10.77.1.100/24"),
            "{p:?}"
        );
        let other = parse(&GOOD.replacen("10.77.1.100/24", "10.99.0.1/24", 1)).unwrap();
        let p = other.host_problems(&good);
        assert!(
            p[0].starts_with("service_address = 10.99.0.1/24: outside every network of a-lan"),
            "{p:?}"
        );
        // A host route may lie outside the LAN's networks.
        let route = parse(&GOOD.replacen("10.77.1.100/24", "10.99.0.1/32", 1)).unwrap();
        assert!(route.host_problems(&good).is_empty());
    }

    /// `role_control` defaults to "self"; "cluster" turns the core's own
    /// role decisions off; other values are syntax errors naming the
    /// accepted ones.
    #[test]
    fn test_role_control_key() {
        assert_eq!(
            parse(GOOD).unwrap().file.role_control,
            RoleControl::SelfManaged
        );
        let c = parse(&with("role_control = \"self\"")).unwrap();
        assert_eq!(c.file.role_control.as_str(), "self");
        assert!(c.core_config().auto_takeover);
        let c = parse(&with("role_control = \"cluster\"")).unwrap();
        assert!(
            !c.core_config().auto_takeover,
            "the core must not decide too"
        );
        let e = parse(&with("role_control = \"pacemaker\"")).unwrap_err();
        assert!(
            e.to_string().contains("`self`") && e.to_string().contains("`cluster`"),
            "{e}"
        );
    }

    /// No witness: the core runs without one. With one: the address is
    /// resolved, `on_no_quorum` defaults to suspend, and every bad value
    /// names its key.
    #[test]
    fn test_witness_keys() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.witness, None);
        assert!(!c.core_config().witness);
        let c = parse(&with("witness = \"10.77.1.50:7790\"")).unwrap();
        assert_eq!(c.witness, Some("10.77.1.50:7790".parse().unwrap()));
        let core = c.core_config();
        assert!(core.witness);
        assert_eq!(core.on_no_quorum, msl_core::config::NoQuorum::Suspend);
        let c = parse(&with(
            "witness = \"10.77.1.50:7790\"\non_no_quorum = \"sft3\"",
        ))
        .unwrap();
        assert_eq!(
            c.core_config().on_no_quorum,
            msl_core::config::NoQuorum::Sft3
        );
        for (extra, key) in [
            ("witness = \"10.77.1.50\"", "witness"),
            ("witness = \"10.77.1.50:0\"", "witness"),
            ("witness = \"0.0.0.0:7790\"", "witness"),
            ("witness = \"[fd00::9]:7790\"", "witness"),
            ("on_no_quorum = \"suspend\"", "on_no_quorum"),
            (
                "witness = \"10.77.1.50:7790\"\nwitness_margin_ms = 0",
                "witness_margin_ms",
            ),
            (
                "witness = \"10.77.1.50:7790\"\nwitness_margin_ms = 101",
                "witness_margin_ms",
            ),
        ] {
            let e = parse(&with(extra)).unwrap_err().to_string();
            assert!(e.contains(key), "{extra}: {e}");
        }
        let e = parse(&with(
            "witness = \"10.77.1.50:7790\"\non_no_quorum = \"vote\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("suspend") && e.contains("sft3"), "{e}");
    }

    #[test]
    fn test_log_keys() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.file.log_level, LogLevel::Info);
        assert_eq!(
            c.file.log_level.filter(),
            tracing::level_filters::LevelFilter::INFO
        );
        let no_file = GOOD.replacen("log_file = \"/var/log/msl/msld.log\"\n", "", 1);
        assert_ne!(no_file, GOOD);
        assert_eq!(parse(&no_file).unwrap().file.log_file, PathBuf::new());
        let c = parse(&with("log_level = \"warning\"")).unwrap();
        assert_eq!(
            c.file.log_level.filter(),
            tracing::level_filters::LevelFilter::WARN
        );
        assert!(parse(&with("log_level = \"loud\"")).is_err());
    }

    #[test]
    fn test_async_mode_warns() {
        let t = with("write_mode = \"async\"");
        let c = parse(&t).unwrap();
        assert!(c.warnings.iter().any(|w| w.contains("async")));
    }

    #[test]
    fn test_syntax_error_names_file() {
        let e = parse("node_id = ").unwrap_err();
        assert!(e.to_string().starts_with("config file test.toml"), "{e}");
    }
}
