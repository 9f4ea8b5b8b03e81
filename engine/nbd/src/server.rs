//! The accept loop: a thread per connection, a bounded number of them, and a
//! stop flag that ends the loop and every open connection.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::conn::{serve_stream, Export};
use crate::counters::Counters;
use crate::{Backend, ServerConfig};

/// An NBD server for one export on one TCP listener.
pub struct Server {
    listener: TcpListener,
    export: Arc<Export>,
    stop: Arc<AtomicBool>,
}

type Registry = Arc<Mutex<HashMap<u64, TcpStream>>>;

impl Server {
    pub fn new(
        listener: TcpListener,
        export_name: String,
        backend: Arc<dyn Backend>,
        cfg: ServerConfig,
        stop: Arc<AtomicBool>,
    ) -> Self {
        Self {
            listener,
            export: Arc::new(Export::new(export_name, backend, cfg)),
            stop,
        }
    }

    /// The server's counters (shared; keep the Arc to read them live).
    pub fn counters(&self) -> Arc<Counters> {
        self.export.counters.clone()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept and serve until `stop` is set; then shut every connection
    /// down, wait for their threads, and return.
    pub fn run(self) -> io::Result<()> {
        self.listener.set_nonblocking(true)?;
        let conns: Registry = Arc::default();
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let c = &self.export.counters;
        let mut next_id = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            threads.retain(|t| !t.is_finished());
            if !wait_readable(&self.listener, 100) {
                continue;
            }
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    // EMFILE and the like: back off rather than spin.
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    continue;
                }
            };
            Counters::inc(&c.connections_accepted);
            let active = conns.lock().unwrap_or_else(|e| e.into_inner()).len();
            if active >= self.export.cfg.max_connections {
                Counters::inc(&c.connections_rejected);
                drop(stream);
                continue;
            }
            if stream.set_nonblocking(false).is_err() {
                continue;
            }
            let _ = stream.set_nodelay(true);
            let Ok(clone) = stream.try_clone() else {
                continue;
            };
            let id = next_id;
            next_id += 1;
            conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, clone);
            Counters::inc(&c.connections_active);
            let export = self.export.clone();
            let reg = conns.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || {
                    let _end = serve_stream(stream, &export);
                    reg.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                    Counters::dec(&export.counters.connections_active);
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(_) => {
                    if let Some(s) = conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                    Counters::dec(&c.connections_active);
                }
            }
        }
        for s in conns.lock().unwrap_or_else(|e| e.into_inner()).values() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        for t in threads {
            let _ = t.join();
        }
        Ok(())
    }
}

/// poll(2) the listener for up to `ms` milliseconds.
fn wait_readable(l: &TcpListener, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    r > 0
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
