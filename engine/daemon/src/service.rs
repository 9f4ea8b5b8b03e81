//! What msld does around the core: watch link state of the LAN adapters
//! and the MSL NIC, run the NBD front end, and hold or release the service
//! address.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use msl_nbd::{Backend, Server, ServerConfig, ServerHandle};

use crate::driver::Host;
use crate::inbox::Inbox;
use crate::input::Input;

/// An interface's `carrier` and `operstate` files in sysfs, for polling
/// without allocating (`ip netns exec` mounts the namespace's own sysfs,
/// so this sees the daemon's namespace).
struct LinkFiles {
    carrier: PathBuf,
    operstate: PathBuf,
}

impl LinkFiles {
    fn new(ifname: &str) -> LinkFiles {
        let base = Path::new("/sys/class/net").join(ifname);
        LinkFiles {
            carrier: base.join("carrier"),
            operstate: base.join("operstate"),
        }
    }

    /// Carrier present and operationally up.
    fn up(&self) -> bool {
        read_small(&self.carrier).is_some_and(|(b, n)| b[..n].trim_ascii() == b"1")
            && read_small(&self.operstate).is_some_and(|(b, n)| b[..n].trim_ascii() == b"up")
    }
}

/// The first bytes of a small file, into a stack buffer.
fn read_small(path: &Path) -> Option<([u8; 32], usize)> {
    let mut buf = [0u8; 32];
    let n = std::fs::File::open(path).ok()?.read(&mut buf).ok()?;
    Some((buf, n))
}

/// Poll link state every 50 ms and report changes: LAN adapters as
/// `Input::LanAdapter`, the MSL NIC (adapter `None`) as `Input::MslLink`.
pub fn watch_links(ifaces: Vec<(String, Option<u8>)>, inputs: Inbox, stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let files: Vec<LinkFiles> = ifaces.iter().map(|(n, _)| LinkFiles::new(n)).collect();
        let mut last: Vec<Option<bool>> = vec![None; ifaces.len()];
        while !stop.load(Ordering::Relaxed) {
            for (i, (_, adapter)) in ifaces.iter().enumerate() {
                let up = files[i].up();
                if last[i] != Some(up) {
                    last[i] = Some(up);
                    let input = match adapter {
                        Some(a) => Input::LanAdapter { adapter: *a, up },
                        None => Input::MslLink { up },
                    };
                    if inputs.send(input).is_err() {
                        return;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

/// Serve NBD on `addrs` until `stop`; returns a handle to the running
/// server (its counters, connections and listeners). msld passes the
/// service address alone, bound with IP_FREEBIND on both nodes: only the
/// node holding the address receives connections, and no other address
/// of the node (its own LAN address) answers on the NBD port. TLS files
/// are loaded here; a file that fails names itself.
pub fn start_nbd(
    addrs: &[SocketAddr],
    backend: Arc<dyn Backend>,
    cfg: ServerConfig,
    stop: Arc<AtomicBool>,
) -> std::io::Result<ServerHandle> {
    let server = Server::with_listeners(addrs, String::new(), backend, cfg, stop)?;
    let handle = server.handle();
    std::thread::Builder::new()
        .name("msl-nbd".into())
        .spawn(move || {
            if let Err(e) = server.run() {
                tracing::error!("msld: NBD server stopped: {e}");
            }
        })?;
    Ok(handle)
}

/// How often the holder re-announces the service address. A client whose
/// ARP entry still points at the other server (a split brain resolved on
/// reconnect, a lost announcement) is corrected within this interval.
pub const GARP_REFRESH: Duration = Duration::from_secs(1);

/// Holds the service address on the primary: add + gratuitous ARP when
/// the core says hold (and again every [`GARP_REFRESH`] while held), remove
/// when it says release. Every announcement checks `held` under the same
/// lock the release takes, so none goes out after the address is released.
pub struct ServiceHost {
    ifname: String,
    ip: IpAddr,
    prefix: u8,
    held: Arc<Mutex<bool>>,
    /// The core holds client writes: no re-announcements (see
    /// [`Host::quiet`]).
    quiet: Arc<AtomicBool>,
    /// The NBD server, whose connections are closed when the address is
    /// released: a client then reconnects to the new holder at once
    /// instead of getting errors from a node that no longer serves.
    nbd: Option<ServerHandle>,
}

/// Send `rounds` announcements (gratuitous ARP for IPv4, unsolicited
/// neighbour advertisements for IPv6), `gap` apart, each only while the
/// address is still held.
fn announce(ifname: &str, ip: IpAddr, held: &Mutex<bool>, rounds: u32, gap: Duration) {
    for i in 0..rounds {
        if i > 0 {
            std::thread::sleep(gap);
        }
        let held = held.lock().unwrap_or_else(|p| p.into_inner());
        if !*held {
            return;
        }
        if let Err(e) = msl_netcfg::announce_address(ifname, ip, 1) {
            tracing::warn!("msld: announcing {ip} on {ifname} failed: {e}");
        }
    }
}

impl ServiceHost {
    /// A starting msld holds nothing until its core says so: an address left
    /// on the interface by a killed predecessor (the kernel keeps it) is
    /// removed here, or a restarted secondary would answer ARP for it.
    pub fn new(ifname: &str, ip: IpAddr, prefix: u8) -> Self {
        if msl_netcfg::has_address(ifname, ip).unwrap_or(false) {
            match msl_netcfg::remove_address(ifname, ip, prefix) {
                Ok(()) => tracing::info!(
                    "msld: removed the service address {ip}/{prefix} from {ifname}, left by an earlier run"
                ),
                Err(e) => tracing::warn!(
                    "msld: service address {ip}/{prefix} on {ifname} left by an earlier run; removing it failed: {e}"
                ),
            }
        }
        let held = Arc::new(Mutex::new(false));
        let quiet = Arc::new(AtomicBool::new(false));
        {
            let (ifname, held, quiet) = (ifname.to_string(), held.clone(), quiet.clone());
            let _ = std::thread::Builder::new()
                .name("msl-garp".into())
                .spawn(move || loop {
                    std::thread::sleep(GARP_REFRESH);
                    // A node holding client writes must not pull clients
                    // back from a peer that took over (it re-announces
                    // every second, and the newest announcement wins).
                    if !quiet.load(Ordering::Relaxed) {
                        announce(&ifname, ip, &held, 1, Duration::ZERO);
                    }
                });
        }
        ServiceHost {
            ifname: ifname.to_string(),
            ip,
            prefix,
            held,
            quiet,
            nbd: None,
        }
    }

    /// Close the NBD server's connections whenever the address is
    /// released.
    pub fn with_nbd(mut self, nbd: ServerHandle) -> Self {
        self.nbd = Some(nbd);
        self
    }
}

impl Host for ServiceHost {
    fn quiet(&mut self, quiet: bool) {
        self.quiet.store(quiet, Ordering::Relaxed);
    }

    fn service_address(&mut self, hold: bool) {
        let r = if hold {
            let r = msl_netcfg::add_address(&self.ifname, self.ip, self.prefix);
            if r.is_ok() {
                *self.held.lock().unwrap_or_else(|p| p.into_inner()) = true;
                // Announce off the core thread, three rounds 100 ms apart.
                let (ifname, held, ip) = (self.ifname.clone(), self.held.clone(), self.ip);
                std::thread::spawn(move || {
                    announce(&ifname, ip, &held, 3, Duration::from_millis(100))
                });
            }
            r
        } else {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            *held = false;
            let r = msl_netcfg::remove_address(&self.ifname, self.ip, self.prefix);
            if let Some(nbd) = &self.nbd {
                let n = nbd.connections().len();
                nbd.close_connections();
                if n > 0 {
                    tracing::info!("msld: service address released: closed {n} NBD connection(s)");
                }
            }
            r
        };
        if let Err(e) = r {
            tracing::error!(
                "msld: service address {}/{} on {}: {} failed: {e}",
                self.ip,
                self.prefix,
                self.ifname,
                if hold { "claim" } else { "release" }
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The service address is bound before this node holds it (IPv4 and
    /// IPv6 alike): neither is on any interface here, and both bind.
    #[test]
    fn test_nbd_binds_service_addresses_not_on_any_interface() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let backend = Arc::new(msl_nbd::FileBackend::open(file.path(), false).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let addrs: [SocketAddr; 2] = [
            "192.0.2.77:0".parse().unwrap(),
            "[2001:db8:77::10]:0".parse().unwrap(),
        ];
        let h = start_nbd(&addrs, backend, ServerConfig::default(), stop.clone())
            .expect("bind with IP_FREEBIND");
        let bound = h.listeners();
        assert_eq!(bound.len(), 2, "{bound:?}");
        assert_eq!(bound[0].ip(), addrs[0].ip());
        assert_eq!(bound[1].ip(), addrs[1].ip());
        stop.store(true, Ordering::Relaxed);
    }

    #[test]
    fn test_link_files_up_only_with_carrier_and_operstate_up() {
        let d = tempfile::tempdir().unwrap();
        let f = LinkFiles {
            carrier: d.path().join("carrier"),
            operstate: d.path().join("operstate"),
        };
        assert!(!f.up(), "missing files: down");
        std::fs::write(&f.carrier, "1\n").unwrap();
        std::fs::write(&f.operstate, "up\n").unwrap();
        assert!(f.up());
        std::fs::write(&f.operstate, "lowerlayerdown\n").unwrap();
        assert!(!f.up());
        std::fs::write(&f.operstate, "up\n").unwrap();
        std::fs::write(&f.carrier, "0\n").unwrap();
        assert!(!f.up());
    }
}
