//! `msl-witness --config FILE`: the witness's configuration (TOML).
//!
//! ```toml
//! listen = "0.0.0.0:7790"          # any IPv4 or IPv6 address and port
//! lease_ms = 400                   # 200..=10000
//! startup_ms = 10000               # lease_ms..=600000
//! status_file = "/run/msl-witness/status.json"   # optional
//! state_file = "/var/lib/msl-witness/state.json"  # what a restart must not forget
//!
//! [[cluster]]
//! id = 1
//! key_file = "/etc/msl/cluster.key"   # the cluster's master key, mode 0600
//! ```
//!
//! Every value is checked at start; an error names the key, the value and
//! what is allowed. Unknown keys are errors (a typo must not silently fall
//! back to a default).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use msl_wire::{Domain, Key};
use serde::Deserialize;
use thiserror::Error;

/// Default lease: msld's default dead interval (`heartbeat_interval_ms x
/// miss_count` = 50 ms x 8 = 400 ms). The rule: `lease_ms` at most the
/// dead interval of the pairs the witness serves. A primary renews every
/// quarter of its dead interval, so a killed primary's lease ends at the
/// witness within one lease of its death, no later than the secondary
/// finds it dead and asks: the takeover then waits for failure detection
/// alone, not for the lease. Two lost renewals in a row still leave the
/// holder its lease.
pub const DEFAULT_LEASE_MS: u64 = 400;
/// Shortest lease accepted: below it a renewal's round trip and a node's
/// scheduling hiccups eat most of the lease.
pub const MIN_LEASE_MS: u64 = 200;
/// Longest lease accepted: failover waits up to one lease.
pub const MAX_LEASE_MS: u64 = 10_000;
/// Default start-up window: the longest lease any configuration grants,
/// so a witness restarted with a shorter `lease_ms` than its previous run
/// still waits out every lease that run may have granted.
pub const DEFAULT_STARTUP_MS: u64 = MAX_LEASE_MS;
/// Longest start-up window accepted.
pub const MAX_STARTUP_MS: u64 = 600_000;

/// Why a configuration was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value is out of range or does not fit the others.
    #[error("config key `{key}` = {value}: {why}")]
    Invalid {
        /// The key, e.g. `cluster[1].id`.
        key: String,
        /// The value as written.
        value: String,
        /// What is allowed.
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: String,
    #[serde(default = "default_lease_ms")]
    lease_ms: u64,
    #[serde(default = "default_startup_ms")]
    startup_ms: u64,
    status_file: Option<PathBuf>,
    state_file: Option<PathBuf>,
    #[serde(default)]
    cluster: Vec<ClusterFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    id: u64,
    key_file: PathBuf,
}

fn default_lease_ms() -> u64 {
    DEFAULT_LEASE_MS
}
fn default_startup_ms() -> u64 {
    DEFAULT_STARTUP_MS
}

/// One cluster the witness serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Its `cluster_id`.
    pub id: u64,
    /// File holding its master key.
    pub key_file: PathBuf,
}

/// A validated configuration (key files not yet read: see [`load_keys`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WitnessConfig {
    /// Address and port to receive requests on.
    pub listen: SocketAddr,
    /// Lease granted per request.
    pub lease_ms: u64,
    /// Nothing is granted this long after the start.
    pub startup_ms: u64,
    /// Where to write the status JSON every second.
    pub status_file: Option<PathBuf>,
    /// Where the last lease holder's generation per cluster is kept
    /// durably across restarts (none: a restart forgets it).
    pub state_file: Option<PathBuf>,
    /// Clusters served.
    pub clusters: Vec<ClusterConfig>,
}

/// Parse and validate a configuration text (reads no other file).
pub fn parse(text: &str, path: &Path) -> Result<WitnessConfig, ConfigError> {
    let f: File = toml::from_str(text).map_err(|e| ConfigError::Syntax {
        path: path.into(),
        message: e.to_string(),
    })?;
    let listen: SocketAddr = f.listen.parse().map_err(|_| {
        invalid(
            "listen",
            format!("{:?}", f.listen),
            "must be IP:PORT, e.g. \"0.0.0.0:7790\" or \"[::]:7790\"",
        )
    })?;
    if !(MIN_LEASE_MS..=MAX_LEASE_MS).contains(&f.lease_ms) {
        return Err(invalid(
            "lease_ms",
            f.lease_ms,
            format!("must be between {MIN_LEASE_MS} and {MAX_LEASE_MS}"),
        ));
    }
    if !(f.lease_ms..=MAX_STARTUP_MS).contains(&f.startup_ms) {
        return Err(invalid(
            "startup_ms",
            f.startup_ms,
            format!(
                "must be between lease_ms ({}) and {MAX_STARTUP_MS}: a restarted witness \
                 must wait out every lease it may have granted before",
                f.lease_ms
            ),
        ));
    }
    if f.cluster.is_empty() {
        return Err(invalid(
            "cluster",
            "[]",
            "at least one [[cluster]] with id and key_file is required",
        ));
    }
    let mut clusters: Vec<ClusterConfig> = Vec::new();
    for (i, c) in f.cluster.into_iter().enumerate() {
        if let Some(j) = clusters.iter().position(|o| o.id == c.id) {
            return Err(invalid(
                &format!("cluster[{i}].id"),
                c.id,
                format!("already used by cluster[{j}]"),
            ));
        }
        clusters.push(ClusterConfig {
            id: c.id,
            key_file: c.key_file,
        });
    }
    Ok(WitnessConfig {
        listen,
        lease_ms: f.lease_ms,
        startup_ms: f.startup_ms,
        status_file: f.status_file,
        state_file: f.state_file,
        clusters,
    })
}

/// Read and validate a configuration file (key files not yet read).
pub fn load(path: &Path) -> Result<WitnessConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    parse(&text, path)
}

/// Refuse a key file that group or others may read or write.
fn check_private(what: &str, path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let m = std::fs::metadata(path).map_err(|e| invalid(what, path.display(), e.to_string()))?;
    let mode = m.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(invalid(
            what,
            path.display(),
            format!(
                "mode {mode:04o} lets group or others read or write it; run `chmod 600 {}` \
                 (owner only)",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Read a master key file: 32 raw bytes or 64 hex digits (as msld does).
fn read_master(what: &str, path: &Path) -> Result<[u8; 32], ConfigError> {
    let raw = std::fs::read(path).map_err(|e| invalid(what, path.display(), e.to_string()))?;
    let mut k = [0u8; 32];
    if raw.len() == 32 {
        k.copy_from_slice(&raw);
        return Ok(k);
    }
    let text = String::from_utf8_lossy(&raw);
    let t = text.trim();
    if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16)
                .map_err(|e| invalid(what, path.display(), e.to_string()))?;
        }
        return Ok(k);
    }
    Err(invalid(
        what,
        path.display(),
        "must hold 32 bytes or 64 hex digits (the cluster key msld uses)",
    ))
}

/// Read every cluster's key file (owner-only, well-formed) and derive its
/// witness key.
pub fn load_keys(cfg: &WitnessConfig) -> Result<Vec<(u64, Key)>, ConfigError> {
    cfg.clusters
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let what = format!("cluster[{i}].key_file");
            check_private(&what, &c.key_file)?;
            let master = read_master(&what, &c.key_file)?;
            Ok((c.id, Key::derive(&master, Domain::Witness)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const GOOD: &str = "listen = \"127.0.0.1:7790\"\n\
                        [[cluster]]\nid = 1\nkey_file = \"/k1\"\n";

    fn key_of(e: ConfigError) -> String {
        match e {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("expected an invalid key, got {other}"),
        }
    }

    #[test]
    fn test_defaults() {
        let c = parse(GOOD, Path::new("w.toml")).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7790".parse().unwrap());
        assert_eq!((c.lease_ms, c.startup_ms), (400, 10_000));
        assert_eq!(c.status_file, None);
        assert_eq!(
            c.clusters,
            [ClusterConfig {
                id: 1,
                key_file: "/k1".into()
            }]
        );
    }

    #[test]
    fn test_ipv6_and_all_keys() {
        let t = "listen = \"[::1]:9\"\nlease_ms = 200\nstartup_ms = 200\n\
                 status_file = \"/s.json\"\n\
                 [[cluster]]\nid = 1\nkey_file = \"/k1\"\n\
                 [[cluster]]\nid = 2\nkey_file = \"/k2\"\n";
        let c = parse(t, Path::new("w.toml")).unwrap();
        assert!(c.listen.is_ipv6());
        assert_eq!((c.lease_ms, c.startup_ms), (200, 200));
        assert_eq!(c.status_file, Some(PathBuf::from("/s.json")));
        assert_eq!(c.clusters.len(), 2);
    }

    #[test]
    fn test_bad_values_name_the_key_and_value() {
        let cases = [
            (
                "listen = \"127.0.0.1:7790\"",
                "listen = \"localhost\"",
                "listen",
            ),
            (
                "listen = \"127.0.0.1:7790\"",
                "listen = \"127.0.0.1:7790\"\nlease_ms = 199",
                "lease_ms",
            ),
            (
                "listen = \"127.0.0.1:7790\"",
                "listen = \"127.0.0.1:7790\"\nlease_ms = 10001",
                "lease_ms",
            ),
            (
                "listen = \"127.0.0.1:7790\"",
                "listen = \"127.0.0.1:7790\"\nlease_ms = 1000\nstartup_ms = 999",
                "startup_ms",
            ),
            (
                "key_file = \"/k1\"\n",
                "key_file = \"/k1\"\n[[cluster]]\nid = 1\nkey_file = \"/k2\"\n",
                "cluster[1].id",
            ),
        ];
        for (from, to, key) in cases {
            let t = GOOD.replacen(from, to, 1);
            assert_ne!(t, GOOD, "case {key} did not change the text");
            let e = parse(&t, Path::new("w.toml")).unwrap_err();
            let msg = e.to_string();
            assert_eq!(key_of(e), key, "case {to}");
            assert!(msg.contains(key), "{msg}");
        }
        let e = parse(
            "listen = \"127.0.0.1:7790\"\nlease_ms = 5\n[[cluster]]\nid = 1\nkey_file = \"/k\"",
            Path::new("w"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("= 5"), "{e}");
        let e = parse("listen = \"127.0.0.1:1\"\n", Path::new("w")).unwrap_err();
        assert_eq!(key_of(e), "cluster");
    }

    #[test]
    fn test_unknown_key_refused_with_its_name() {
        let e = parse(&format!("leas_ms = 800\n{GOOD}"), Path::new("w.toml")).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }));
        assert!(e.to_string().contains("leas_ms"), "{e}");
        let e = parse(&format!("{GOOD}keyfile = \"/x\"\n"), Path::new("w.toml")).unwrap_err();
        assert!(e.to_string().contains("keyfile"), "{e}");
    }

    fn cfg_with_key(path: &Path) -> WitnessConfig {
        WitnessConfig {
            listen: "127.0.0.1:1".parse().unwrap(),
            lease_ms: 800,
            startup_ms: 800,
            status_file: None,
            state_file: None,
            clusters: vec![ClusterConfig {
                id: 9,
                key_file: path.into(),
            }],
        }
    }

    #[test]
    fn test_keys_raw_or_hex_derived_for_the_witness_domain() {
        let d = tempfile::tempdir().unwrap();
        let raw = d.path().join("raw");
        let hex = d.path().join("hex");
        let master = [0xABu8; 32];
        std::fs::write(&raw, master).unwrap();
        std::fs::write(&hex, format!("{}\n", "ab".repeat(32))).unwrap();
        for p in [&raw, &hex] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
            let keys = load_keys(&cfg_with_key(p)).unwrap();
            assert_eq!(keys[0].0, 9);
            assert_eq!(keys[0].1 .0, Key::derive(&master, Domain::Witness).0);
            assert_ne!(keys[0].1 .0, master, "the master key itself is never used");
        }
    }

    #[test]
    fn test_bad_key_files_refused_naming_the_key() {
        let d = tempfile::tempdir().unwrap();
        let open = d.path().join("open");
        std::fs::write(&open, [1u8; 32]).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = load_keys(&cfg_with_key(&open)).unwrap_err().to_string();
        assert!(
            e.contains("cluster[0].key_file") && e.contains("0640"),
            "{e}"
        );
        assert!(e.contains("chmod 600"), "{e}");

        let short = d.path().join("short");
        std::fs::write(&short, b"abc").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = load_keys(&cfg_with_key(&short)).unwrap_err().to_string();
        assert!(e.contains("32 bytes or 64 hex digits"), "{e}");

        let missing = d.path().join("missing");
        let e = load_keys(&cfg_with_key(&missing)).unwrap_err().to_string();
        assert!(
            e.contains("cluster[0].key_file") && e.contains("missing"),
            "{e}"
        );
    }
}
