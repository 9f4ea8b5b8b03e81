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
pub mod proto;
mod server;

use std::time::Duration;

pub use backend::{Backend, Completion, FileBackend};
pub use conn::{serve_stream, ConnEnd, Export, Socket, MAX_OPTION_LEN};
pub use counters::{Counters, CountersSnapshot};
pub use server::{serve, Server};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest READ/WRITE payload; advertised as the maximum block size.
    /// A longer READ gets EINVAL; a longer WRITE drops the connection.
    pub max_request: u32,
    /// Connections beyond this are accepted and closed at once.
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_request: 32 << 20,
            max_connections: 64,
            read_only: false,
            workers_per_connection: 32,
            queue_depth: 64,
            max_inflight_bytes: 64 << 20,
            handshake_timeout: Duration::from_secs(10),
            busy_poll: Duration::ZERO,
        }
    }
}
