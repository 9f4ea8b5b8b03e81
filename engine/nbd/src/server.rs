//! The accept loop: listeners that can be added and removed while it runs,
//! the allow list, the connection limits (in all, per client address, in
//! the handshake), a thread per connection, and a stop flag that ends the
//! loop and every open connection.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::conn::{serve_conn, ConnCell, Export, PHASE_TLS, PHASE_TRANSMISSION};
use crate::counters::Counters;
use crate::{Backend, ServerConfig};

/// Where a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnPhase {
    Handshake,
    Transmission,
}

/// One open connection, as [`ServerHandle::connections`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub phase: ConnPhase,
    pub tls: bool,
    /// Time since the connection was accepted.
    pub age: Duration,
}

struct Entry {
    peer: SocketAddr,
    stream: TcpStream,
    since: Instant,
    cell: Arc<ConnCell>,
    /// Closed to make room in the handshake; its thread is ending.
    evicted: bool,
}

#[derive(Default)]
struct Table {
    conns: HashMap<u64, Entry>,
    per_addr: HashMap<IpAddr, usize>,
}

impl Table {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.conns.remove(&id)?;
        let ip = e.peer.ip().to_canonical();
        if let Some(n) = self.per_addr.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_addr.remove(&ip);
            }
        }
        Some(e)
    }
}

struct Shared {
    export: Arc<Export>,
    listeners: Mutex<Vec<(SocketAddr, Arc<TcpListener>)>>,
    table: Mutex<Table>,
    stop: Arc<AtomicBool>,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn listeners(&self) -> MutexGuard<'_, Vec<(SocketAddr, Arc<TcpListener>)>> {
        self.listeners.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An NBD server for one export on any number of TCP listeners.
pub struct Server {
    shared: Arc<Shared>,
    /// A TLS configuration that failed to load: `run` returns it.
    init_error: Option<io::Error>,
}

/// Changes a running [`Server`]: listeners, and what it reports. Clone it
/// freely; it outlives `run`.
#[derive(Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
}

/// A listening socket for `addr`: SO_REUSEADDR, IPV6_V6ONLY for IPv6 (so
/// `0.0.0.0` and `[::]` can both be bound), and IP_FREEBIND, so an address
/// that is not (yet) on an interface, or an IPv6 address still in
/// duplicate address detection, can be bound: the daemon binds the service
/// address as it takes it.
pub fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        s.set_freebind_ipv6(true)?;
    } else {
        s.set_freebind(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

impl ServerHandle {
    /// Listen on `addr` too (port 0 picks one); returns the bound address.
    pub fn add_listener(&self, addr: SocketAddr) -> io::Result<SocketAddr> {
        let l = bind_listener(addr)?;
        self.add_bound(l)
    }

    /// Listen on an already bound socket too.
    pub fn add_bound(&self, l: TcpListener) -> io::Result<SocketAddr> {
        l.set_nonblocking(true)?;
        let a = l.local_addr()?;
        self.shared.listeners().push((a, Arc::new(l)));
        Ok(a)
    }

    /// Stop listening on `addr` (its socket closes within 100 ms);
    /// connections already accepted on it go on. False if no listener had
    /// that address.
    pub fn remove_listener(&self, addr: SocketAddr) -> bool {
        let mut ls = self.shared.listeners();
        let n = ls.len();
        ls.retain(|(a, _)| *a != addr);
        ls.len() != n
    }

    /// The addresses listened on.
    pub fn listeners(&self) -> Vec<SocketAddr> {
        self.shared.listeners().iter().map(|(a, _)| *a).collect()
    }

    /// Close every open connection (for example when this node stops
    /// serving); listeners stay.
    pub fn close_connections(&self) {
        for e in self.shared.table().conns.values() {
            let _ = e.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// The open connections.
    pub fn connections(&self) -> Vec<ConnInfo> {
        let now = Instant::now();
        self.shared
            .table()
            .conns
            .values()
            .map(|e| {
                let p = e.cell.phase.load(Ordering::Relaxed);
                ConnInfo {
                    peer: e.peer,
                    phase: if p & PHASE_TRANSMISSION != 0 {
                        ConnPhase::Transmission
                    } else {
                        ConnPhase::Handshake
                    },
                    tls: p & PHASE_TLS != 0,
                    age: now - e.since,
                }
            })
            .collect()
    }

    /// The server's counters (shared; keep the Arc to read them live).
    pub fn counters(&self) -> Arc<Counters> {
        self.shared.export.counters.clone()
    }

    /// The configuration the server runs with.
    pub fn config(&self) -> &ServerConfig {
        &self.shared.export.cfg
    }
}

impl Server {
    /// A server on `listener`. TLS files (when `cfg.tls` is not `Off`) are
    /// loaded here; if that fails, [`Server::run`] returns the error (use
    /// [`Server::with_listeners`] to see it at once).
    pub fn new(
        listener: TcpListener,
        export_name: String,
        backend: Arc<dyn Backend>,
        cfg: ServerConfig,
        stop: Arc<AtomicBool>,
    ) -> Self {
        let (export, init_error) =
            match Export::with_tls(export_name.clone(), backend.clone(), cfg.clone()) {
                Ok(e) => (e, None),
                Err(e) => (Export::new(export_name, backend, cfg), Some(e)),
            };
        let s = Self::from_export(export, stop);
        let init_error = init_error.or_else(|| s.handle().add_bound(listener).err());
        Self { init_error, ..s }
    }

    /// A server listening on each of `addrs` (none is fine: add them later
    /// through [`Server::handle`]). Fails on a TLS file that cannot be
    /// loaded or an address that cannot be bound.
    pub fn with_listeners(
        addrs: &[SocketAddr],
        export_name: String,
        backend: Arc<dyn Backend>,
        cfg: ServerConfig,
        stop: Arc<AtomicBool>,
    ) -> io::Result<Self> {
        let s = Self::from_export(Export::with_tls(export_name, backend, cfg)?, stop);
        for a in addrs {
            s.handle().add_listener(*a)?;
        }
        Ok(s)
    }

    fn from_export(export: Export, stop: Arc<AtomicBool>) -> Self {
        Self {
            shared: Arc::new(Shared {
                export: Arc::new(export),
                listeners: Mutex::default(),
                table: Mutex::default(),
                stop,
            }),
            init_error: None,
        }
    }

    /// A handle to change the listeners and read the state while `run`
    /// runs.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            shared: self.shared.clone(),
        }
    }

    /// The server's counters (shared; keep the Arc to read them live).
    pub fn counters(&self) -> Arc<Counters> {
        self.shared.export.counters.clone()
    }

    /// The first listener's address.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.shared
            .listeners()
            .first()
            .map(|(a, _)| *a)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no listener"))
    }

    /// Accept and serve until `stop` is set; then shut every connection
    /// down, wait for their threads, and return.
    pub fn run(self) -> io::Result<()> {
        if let Some(e) = self.init_error {
            return Err(e);
        }
        let sh = &self.shared;
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut next_id = 0u64;
        while !sh.stop.load(Ordering::Relaxed) {
            threads.retain(|t| !t.is_finished());
            // A snapshot: a listener removed meanwhile closes when this
            // drops, never while poll(2) looks at its descriptor.
            let ls: Vec<Arc<TcpListener>> = sh.listeners().iter().map(|(_, l)| l.clone()).collect();
            for l in wait_readable(&ls, 100) {
                match l.accept() {
                    Ok((s, peer)) => {
                        if let Some(t) = self.admit(s, peer, next_id) {
                            threads.push(t);
                        }
                        next_id += 1;
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) => {}
                    Err(_) => {
                        // EMFILE and the like: back off rather than spin.
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        }
        for e in sh.table().conns.values() {
            let _ = e.stream.shutdown(std::net::Shutdown::Both);
        }
        for t in threads {
            let _ = t.join();
        }
        Ok(())
    }

    /// Apply the allow list and the limits to a new connection; start its
    /// thread if it passes.
    fn admit(&self, stream: TcpStream, peer: SocketAddr, id: u64) -> Option<JoinHandle<()>> {
        let sh = &self.shared;
        let ex = &sh.export;
        let cfg = &ex.cfg;
        let c = &ex.counters;
        Counters::inc(&c.connections_accepted);
        let ip = peer.ip().to_canonical();
        if !cfg.allow.is_empty() && !cfg.allow.iter().any(|n| n.contains(&ip)) {
            Counters::inc(&c.refused_not_allowed);
            return None;
        }
        let mut t = sh.table();
        if t.conns.len() >= cfg.max_connections {
            Counters::inc(&c.connections_rejected);
            return None;
        }
        if t.per_addr.get(&ip).copied().unwrap_or(0) >= cfg.max_per_address.max(1) {
            Counters::inc(&c.refused_per_address);
            return None;
        }
        // Room in the handshake: evict the oldest connection still
        // negotiating.
        let negotiating = t.conns.values_mut().filter(|e| {
            !e.evicted && e.cell.phase.load(Ordering::Relaxed) & PHASE_TRANSMISSION == 0
        });
        let mut oldest: Option<&mut Entry> = None;
        let mut n = 0;
        for e in negotiating {
            n += 1;
            if oldest.as_ref().is_none_or(|o| e.since < o.since) {
                oldest = Some(e);
            }
        }
        if n >= cfg.max_handshakes.max(1) {
            if let Some(old) = oldest {
                let _ = old.stream.shutdown(std::net::Shutdown::Both);
                old.evicted = true;
                Counters::inc(&c.handshakes_evicted);
            }
        }
        stream.set_nonblocking(false).ok()?;
        let _ = stream.set_nodelay(true);
        let clone = stream.try_clone().ok()?;
        let cell = Arc::new(ConnCell::default());
        t.conns.insert(
            id,
            Entry {
                peer,
                stream: clone,
                since: Instant::now(),
                cell: cell.clone(),
                evicted: false,
            },
        );
        *t.per_addr.entry(ip).or_insert(0) += 1;
        drop(t);
        Counters::inc(&c.connections_active);
        let sh2 = sh.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .stack_size(512 * 1024)
            .spawn(move || {
                let _end = serve_conn(stream, &sh2.export, &cell);
                sh2.table().remove(id);
                Counters::dec(&sh2.export.counters.connections_active);
            });
        match spawned {
            Ok(t) => Some(t),
            Err(_) => {
                if let Some(e) = sh.table().remove(id) {
                    let _ = e.stream.shutdown(std::net::Shutdown::Both);
                }
                Counters::dec(&c.connections_active);
                None
            }
        }
    }
}

/// poll(2) the listeners for up to `ms` milliseconds (sleep that long if
/// there are none); the readable ones.
fn wait_readable(ls: &[Arc<TcpListener>], ms: i32) -> Vec<Arc<TcpListener>> {
    if ls.is_empty() {
        std::thread::sleep(Duration::from_millis(ms as u64));
        return Vec::new();
    }
    let mut p: Vec<libc::pollfd> = ls
        .iter()
        .map(|l| libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` holds p.len() valid pollfds whose descriptors `ls` keeps open.
    let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    if r <= 0 {
        return Vec::new();
    }
    ls.iter()
        .zip(&p)
        .filter(|(_, p)| p.revents != 0)
        .map(|(l, _)| l.clone())
        .collect()
}

/// Serve `backend` as `export_name` on `listener` until `stop` is set.
pub fn serve(
    listener: TcpListener,
    export_name: String,
    backend: Arc<dyn Backend>,
    cfg: ServerConfig,
    stop: Arc<AtomicBool>,
) -> io::Result<()> {
    Server::new(listener, export_name, backend, cfg, stop).run()
}
