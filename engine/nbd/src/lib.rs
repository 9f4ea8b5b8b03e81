//! msl-nbd: the NBD front end of msld.
//!
//! A hand-written fixed-newstyle NBD server on std threads. One thread per
//! connection reads and validates requests; a few workers per connection run
//! the [`Backend`] calls and send replies under a writer lock, so requests
//! pipeline. See README.md for what is supported.

mod backend;
pub mod client;
mod conn;
mod counters;
pub mod fuzz_support;
pub mod proto;
mod server;
pub mod tls;

use std::path::PathBuf;
use std::time::Duration;

pub use backend::{Backend, Completion, FileBackend};
pub use bytes::Bytes;
pub use conn::{
    in_pieces, parse_info, parse_meta, parse_option_header, parse_request, serve_stream, ConnEnd,
    Export, Request, Socket, MAX_OPTION_LEN,
};
pub use counters::{Counters, CountersSnapshot};
pub use ipnet::IpNet;
pub use server::{bind_listener, serve, ConnInfo, ConnPhase, Server, ServerHandle};
pub use tls::TlsMode;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest READ/WRITE payload; advertised as the maximum block size.
    /// A longer READ gets EINVAL; a longer WRITE drops the connection.
    pub max_request: u32,
    /// Open connections in all; more are accepted and closed at once
    /// (`connections_rejected`).
    pub max_connections: usize,
    /// Export read-only: NBD_FLAG_READ_ONLY, and EPERM for any write.
    pub read_only: bool,
    /// Most worker threads per connection running backend calls (started
    /// on demand). A backend call that blocks holds its worker, so this
    /// bounds the requests of one connection in flight in the backend: keep
    /// it at least the clients' queue depth (fio's iodepth, the kernel
    /// client's queue) when the backend waits on a peer, as the mirror does.
    pub workers_per_connection: usize,
    /// Requests queued to the workers of one connection.
    pub queue_depth: usize,
    /// Payload bytes held by in-flight requests of one connection.
    pub max_inflight_bytes: u64,
    /// The whole handshake (greeting to OPT_GO) must finish within this.
    pub handshake_timeout: Duration,
    /// How long a connection's reader polls for the next request before
    /// it sleeps in `recv` (zero: it sleeps at once). A client that waits
    /// for each reply sends its next request a few tens of microseconds
    /// after the reply; a reader asleep by then is woken through the
    /// scheduler, and on a virtual machine an idle CPU's wake-up alone
    /// took about 35 us (the vCPU had halted). Polling yields the CPU to
    /// any other runnable thread between looks.
    pub busy_poll: Duration,
    /// NBD_OPT_STARTTLS: refused (`Off`), offered (`On`), or required
    /// before any other option (`Require`).
    pub tls: TlsMode,
    /// Directory of the x509 files, in the layout nbdkit and qemu use:
    /// `server-cert.pem` (the chain), `server-key.pem`, and `ca-cert.pem`
    /// (read only with `tls_verify_peer`).
    pub tls_dir: PathBuf,
    /// Mutual TLS: a client must present a certificate signed by
    /// `ca-cert.pem`, or the TLS handshake fails.
    pub tls_verify_peer: bool,
    /// Networks whose clients may connect; any other peer is closed before
    /// the greeting (counted in `refused_not_allowed`). Empty: anyone.
    pub allow: Vec<IpNet>,
    /// Open connections from one client address; more are closed at once
    /// (`refused_per_address`).
    pub max_per_address: usize,
    /// Connections still in the handshake at once. A new connection over
    /// this evicts the oldest one still negotiating
    /// (`handshakes_evicted`), so connections that never finish their
    /// handshake cannot keep a real client out until they time out.
    pub max_handshakes: usize,
    /// Options one handshake may send (`too_many_options`).
    pub max_options: u32,
    /// Drop a connection with nothing in flight that sends no request for
    /// this long (`idle_timeouts`). None by default: the kernel's NBD
    /// client sends nothing while its device is idle, and losing the
    /// connection fails its I/O; the per-address and total limits bound
    /// idle connections anyway.
    pub idle_timeout: Option<Duration>,
    /// A reply (or handshake answer) the client does not take within this
    /// drops the connection and frees what it held (`write_timeouts`).
    pub write_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_request: 32 << 20,
            max_connections: 1024,
            read_only: false,
            workers_per_connection: 32,
            queue_depth: 64,
            max_inflight_bytes: 64 << 20,
            handshake_timeout: Duration::from_secs(10),
            busy_poll: Duration::ZERO,
            tls: TlsMode::Off,
            tls_dir: PathBuf::new(),
            tls_verify_peer: false,
            allow: Vec::new(),
            max_per_address: 16,
            max_handshakes: 64,
            max_options: 64,
            idle_timeout: None,
            write_timeout: Duration::from_secs(30),
        }
    }
}
