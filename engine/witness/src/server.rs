//! The `msl-witness` process: one UDP socket, the [`Witness`] state
//! machine, and a status file rewritten every second.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use msl_wire::Key;

use crate::config::WitnessConfig;
use crate::witness::{Remembered, Settings, Witness};

/// How often the loop wakes with nothing received (stop and SIGHUP checks).
const TICK: Duration = Duration::from_millis(100);
/// How often the status file is rewritten.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// Flags the signal handlers set.
#[derive(Clone, Default)]
pub struct Signals {
    /// SIGTERM or SIGINT: stop after the current packet.
    pub stop: Arc<AtomicBool>,
    /// SIGHUP: logged and ignored (no reload).
    pub hup: Arc<AtomicBool>,
}

/// A random witness epoch (from the OS's random source).
pub fn random_epoch() -> Result<u64, String> {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).map_err(|e| format!("cannot read random bytes: {e}"))?;
    Ok(u64::from_ne_bytes(b))
}

/// A bound witness, ready to run.
pub struct Server {
    sock: UdpSocket,
    witness: Witness,
    start: Instant,
    cfg: WitnessConfig,
}

impl Server {
    /// Bind the configured address and set the witness up; nothing is
    /// granted until `startup_ms` after this call.
    pub fn bind(cfg: WitnessConfig, keys: Vec<(u64, Key)>, epoch: u64) -> Result<Server, String> {
        let sock = UdpSocket::bind(cfg.listen)
            .map_err(|e| format!("listen = \"{}\": cannot bind: {e}", cfg.listen))?;
        sock.set_read_timeout(Some(TICK))
            .map_err(|e| format!("socket timeout: {e}"))?;
        let mut witness = Witness::new(
            Settings {
                lease_us: u32::try_from(cfg.lease_ms * 1000).unwrap_or(u32::MAX),
                startup_us: cfg.startup_ms * 1000,
                witness_epoch: epoch,
            },
            0,
        );
        for (id, k) in keys {
            witness.add_cluster(id, k);
        }
        if let Some(path) = &cfg.state_file {
            witness.restore(&read_state(path)?);
        }
        Ok(Server {
            sock,
            witness,
            start: Instant::now(),
            cfg,
        })
    }

    /// The address actually bound (the port, if the configuration said 0).
    pub fn local_addr(&self) -> Result<SocketAddr, String> {
        self.sock.local_addr().map_err(|e| e.to_string())
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Serve until `signals.stop` is set.
    pub fn run(mut self, signals: &Signals) -> Result<(), String> {
        let mut buf = [0u8; 2048];
        let mut next_status = Instant::now();
        let mut send_errors = 0u64;
        let mut state_errors = 0u64;
        let mut saved = self.witness.memory_changes();
        while !signals.stop.load(Ordering::Relaxed) {
            if signals.hup.swap(false, Ordering::Relaxed) {
                eprintln!(
                    "msl-witness: SIGHUP ignored: the configuration is not reloaded; \
                     restart the witness to apply changes"
                );
            }
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let now = self.now_us();
                    if let Ok(a) = self.witness.handle(now, &buf[..n]) {
                        // What a restart must not forget is on disk before
                        // the reply that depends on it leaves; if it cannot
                        // be written, no reply leaves (the node asks again).
                        if self.witness.memory_changes() != saved {
                            match self.save_state() {
                                Ok(()) => saved = self.witness.memory_changes(),
                                Err(e) => {
                                    state_errors += 1;
                                    if state_errors.is_power_of_two() {
                                        eprintln!(
                                            "msl-witness: state_file: {e}: reply withheld                                              ({state_errors} state write errors)"
                                        );
                                    }
                                    continue;
                                }
                            }
                        }
                        if let Err(e) = self.sock.send_to(&a.bytes, from) {
                            send_errors += 1;
                            if send_errors.is_power_of_two() {
                                eprintln!(
                                    "msl-witness: reply to {from}: {e} ({send_errors} send errors)"
                                );
                            }
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(format!("receive: {e}")),
            }
            if Instant::now() >= next_status {
                next_status += STATUS_EVERY;
                self.write_status();
            }
        }
        self.write_status();
        Ok(())
    }

    /// Write [`Witness::memory`] to the state file durably (a temporary
    /// file, fsync, rename, fsync of the directory).
    fn save_state(&self) -> std::io::Result<()> {
        let Some(path) = &self.cfg.state_file else {
            return Ok(());
        };
        let v = serde_json::json!({ "remembered": self.witness.memory() });
        let mut bytes = serde_json::to_vec_pretty(&v).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()
    }

    fn write_status(&self) {
        let Some(path) = &self.cfg.status_file else {
            return;
        };
        let mut v = match serde_json::to_value(self.witness.status(self.now_us())) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("msl-witness: status: {e}");
                return;
            }
        };
        v["listen"] = self.cfg.listen.to_string().into();
        v["written_at_unix_ms"] = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
            .into();
        if let Err(e) = write_atomic(path, &v) {
            eprintln!("msl-witness: status_file {}: {e}", path.display());
        }
    }
}

/// Write JSON to `path` through a temporary file and a rename, so a reader
/// sees the old file or the new one, never half of one.
fn write_atomic(path: &Path, v: &serde_json::Value) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut bytes = serde_json::to_vec_pretty(v).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// What an earlier run remembered, from the state file (none if the file
/// does not exist yet). A file that exists but does not parse is an
/// error: starting without the memory could hand the lease to a node that
/// lacks acknowledged writes.
pub fn read_state(path: &Path) -> Result<Vec<Remembered>, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct State {
        remembered: Vec<Remembered>,
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("state_file {}: {e}", path.display())),
    };
    serde_json::from_str::<State>(&text)
        .map(|s| s.remembered)
        .map_err(|e| {
            format!(
                "state_file {}: not a witness state ({e}); it holds the generation of each \
                 cluster's last lease holder, which a restart must not forget: restore it, or \
                 delete it only once both nodes of every pair are in sync",
                path.display()
            )
        })
}
