//! Reloading the configuration of a running node (SIGHUP, `systemctl
//! reload`): what can change without a restart changes, the node never
//! stops, and a configuration that does not load leaves the old one in
//! force and says why.
//!
//! Reloadable: the resync rate limits (`resync_min_mib_s`,
//! `resync_max_mib_s`), the notification command and its filter
//! (`notify_command`, `notify_events`, `notify_progress_interval_s`), the
//! event log file (`log_file`; it is opened for each event, so a file
//! that logrotate moved away is replaced at the next event; set it to
//! start one, empty it to stop it) and the log level (`log_level`, applied
//! by the signal thread as soon as the file loaded). Any other key
//! that changed takes effect at the next start; the reload event says so.
//!
//! The signal thread loads and validates the file ([`request`]); the core
//! thread applies it (the driver takes it from the [`ReloadSlot`] before
//! its next input) and reports the outcome as an event (`config_reloaded`
//! or `config_reload_failed`) on the console, in the log file and to the
//! notification command.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::config::{DaemonConfig, FileConfig};
use crate::notify::CommandPolicy;

/// What a reload changes at run time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeSettings {
    /// Resync floor under client load (bytes/s).
    pub resync_min_bytes_s: u64,
    /// Resync ceiling (bytes/s, 0: the link's speed).
    pub resync_max_bytes_s: u64,
    pub notify_command: Option<PathBuf>,
    pub notify_policy: CommandPolicy,
    pub log_file: PathBuf,
    pub log_level: crate::config::LogLevel,
}

impl RuntimeSettings {
    pub fn of(cfg: &DaemonConfig) -> Self {
        let f = &cfg.file;
        RuntimeSettings {
            resync_min_bytes_s: f.resync_min_mib_s << 20,
            resync_max_bytes_s: f.resync_max_mib_s << 20,
            notify_command: f.notify_command.clone(),
            notify_policy: cfg.command_policy(),
            log_file: f.log_file.clone(),
            log_level: f.log_level,
        }
    }
}

/// A reload's outcome, waiting for the core thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reload {
    /// Apply these settings; `restart_keys` names keys that changed but
    /// take effect only at the next start.
    Apply {
        settings: RuntimeSettings,
        restart_keys: Vec<String>,
    },
    /// The file did not load: the old configuration stays, for this reason.
    Failed(String),
}

/// Hands a reload from the signal thread to the core thread.
#[derive(Debug, Default)]
pub struct ReloadSlot {
    pending: AtomicBool,
    next: Mutex<Option<Reload>>,
}

impl ReloadSlot {
    /// Leave a reload for the core thread (a newer one replaces an older
    /// one not yet taken).
    pub fn put(&self, r: Reload) {
        *self.next.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        self.pending.store(true, Ordering::Release);
    }

    /// The waiting reload, if any (cheap when there is none).
    pub fn take(&self) -> Option<Reload> {
        if !self.pending.swap(false, Ordering::Acquire) {
            return None;
        }
        self.next.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Load `path` again and compare it with the configuration in force
/// (`current`, the last one that loaded): the reload to apply, or why it
/// failed. On success `current` becomes the new configuration.
pub fn request(path: &Path, current: &mut DaemonConfig) -> Reload {
    let new = match DaemonConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            return Reload::Failed(format!(
                "{e}; the running configuration is unchanged (fix the file and reload again)"
            ))
        }
    };
    let restart_keys = restart_only_changes(&current.file, &new.file);
    let settings = RuntimeSettings::of(&new);
    *current = new;
    Reload::Apply {
        settings,
        restart_keys,
    }
}

/// The keys that differ between `old` and `new` besides the reloadable
/// ones (top-level key names, or the section for `[msl]`, `[[lan]]`,
/// `[volume]`).
pub fn restart_only_changes(old: &FileConfig, new: &FileConfig) -> Vec<String> {
    // Serialised through TOML's own table so every key is compared
    // without listing them here by hand (a new key cannot be forgotten).
    let table = |f: &FileConfig| -> toml::Table {
        let mut f = f.clone();
        f.resync_min_mib_s = 0;
        f.resync_max_mib_s = 0;
        f.notify_command = None;
        f.notify_events = None;
        f.notify_progress_interval_s = 0;
        f.log_file = PathBuf::new();
        f.log_level = crate::config::LogLevel::default();
        toml::Table::try_from(&f).unwrap_or_default()
    };
    let (a, b) = (table(old), table(new));
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_slot_hands_over_the_newest_reload_once() {
        let s = ReloadSlot::default();
        assert_eq!(s.take(), None);
        s.put(Reload::Failed("one".into()));
        s.put(Reload::Failed("two".into()));
        assert_eq!(s.take(), Some(Reload::Failed("two".into())));
        assert_eq!(s.take(), None);
    }

    fn cfg(extra: &str) -> DaemonConfig {
        crate::config::tests::parse(&crate::config::tests::with(extra)).unwrap()
    }

    /// Reloadable keys are not reported; others are, by name (sections
    /// by their table's name).
    #[test]
    fn test_restart_only_changes_name_the_keys() {
        let a = cfg("resync_min_mib_s = 5");
        let b = cfg("resync_min_mib_s = 50\nresync_max_mib_s = 80\nnotify_command = \"/bin/true\"\nnotify_events = [\"takeover\"]\nlog_level = \"debug\"");
        assert!(restart_only_changes(&a.file, &b.file).is_empty());
        assert_eq!(
            RuntimeSettings::of(&b).log_level,
            crate::config::LogLevel::Debug
        );
        // Who decides the role is fixed while the node runs.
        let mut r = a.clone();
        r.file.role_control = crate::config::RoleControl::Cluster;
        assert_eq!(restart_only_changes(&a.file, &r.file), ["role_control"]);
        let c = cfg("heartbeat_interval_ms = 20\nnbd_port = 10900");
        assert_eq!(
            restart_only_changes(&a.file, &c.file),
            ["heartbeat_interval_ms", "nbd_port"]
        );
        let mut d = a.clone();
        d.file.volume.size_bytes *= 2;
        assert_eq!(restart_only_changes(&a.file, &d.file), ["volume"]);
        let s = RuntimeSettings::of(&b);
        assert_eq!(
            (s.resync_min_bytes_s, s.resync_max_bytes_s),
            (50 << 20, 80 << 20)
        );
        assert_eq!(
            s.notify_policy.events.as_deref(),
            Some(&["takeover".to_string()][..])
        );
    }
}
