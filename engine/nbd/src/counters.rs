//! Per-server counters (relaxed atomics), for later Prometheus export.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($( $(#[$m:meta])* $name:ident ),* $(,)?) => {
        /// Live counters of one server; shared by all its connections.
        #[derive(Debug, Default)]
        pub struct Counters { $( $(#[$m])* pub $name: AtomicU64, )* }

        /// A plain copy of [`Counters`] at one moment.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct CountersSnapshot { $( $(#[$m])* pub $name: u64, )* }

        impl Counters {
            /// Copy every counter.
            pub fn snapshot(&self) -> CountersSnapshot {
                CountersSnapshot { $( $name: self.$name.load(Relaxed), )* }
            }
        }

        impl CountersSnapshot {
            /// Prometheus text exposition, one counter per line, each name
            /// prefixed with `prefix` (for example `msl_nbd_`).
            pub fn prometheus(&self, prefix: &str) -> String {
                let mut s = String::new();
                $( let _ = writeln!(s, "{}{} {}", prefix, stringify!($name), self.$name); )*
                s
            }
        }
    };
}

counters! {
    /// TCP connections accepted.
    connections_accepted,
    /// Connections refused because `max_connections` were open.
    connections_rejected,
    /// Connections from a peer outside the allow list, closed before the
    /// greeting.
    refused_not_allowed,
    /// Connections refused because `max_per_address` were open from the
    /// same client address.
    refused_per_address,
    /// Connections still negotiating, closed to make room for a new one
    /// (`max_handshakes`).
    handshakes_evicted,
    /// Handshakes that did not finish by the deadline.
    handshake_timeouts,
    /// Handshakes that sent more than `max_options` options.
    too_many_options,
    /// Options answered NBD_REP_ERR_TLS_REQD (TLS required, not yet up).
    tls_required_refusals,
    /// NBD_OPT_STARTTLS refused: TLS off, already up, or a payload.
    starttls_refused,
    /// TLS handshakes completed, and failed (bad or missing client
    /// certificate, protocol error, deadline).
    tls_handshakes,
    tls_failures,
    /// Connections dropped after `idle_timeout` with nothing in flight.
    idle_timeouts,
    /// Connections dropped because the client did not take a reply within
    /// `write_timeout`.
    write_timeouts,
    /// Requests with a command flag the command does not take (EINVAL).
    bad_flags,
    /// Connections currently open.
    connections_active,
    /// Handshakes that failed (bad magic, bad flags, oversized option, timeout, I/O).
    handshake_failures,
    /// Handshakes that reached transmission.
    handshakes_completed,
    /// Options answered NBD_REP_ERR_UNSUP.
    options_unsupported,
    req_read,
    req_write,
    req_flush,
    req_trim,
    req_write_zeroes,
    req_block_status,
    req_disc,
    /// Requests of an unknown command type (answered EINVAL).
    req_unknown,
    /// Payload bytes returned by READ.
    bytes_read,
    /// Payload bytes accepted by WRITE.
    bytes_written,
    /// Error replies by NBD errno.
    err_einval,
    err_enospc,
    err_eperm,
    err_eio,
    /// Error replies with any other errno.
    err_other,
    /// Requests with a bad magic (connection dropped).
    bad_magic,
    /// WRITEs longer than the maximum request (connection dropped).
    oversized_writes,
    /// Connections dropped because a reply could not be sent.
    reply_send_failures,
    /// Requests the reader found while polling (`busy_poll`), and polls
    /// that ended with nothing, the reader then sleeping in `recv`.
    busy_poll_hits,
    busy_poll_misses,
}

impl Counters {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
    pub(crate) fn dec(c: &AtomicU64) {
        c.fetch_sub(1, Relaxed);
    }
    pub(crate) fn count_error(&self, errno: u32) {
        use crate::proto::*;
        Self::inc(match errno {
            EINVAL => &self.err_einval,
            ENOSPC => &self.err_enospc,
            EPERM => &self.err_eperm,
            EIO => &self.err_eio,
            _ => &self.err_other,
        });
    }
}
