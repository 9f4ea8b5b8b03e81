//! The daemon's own counters and flags, shared by its threads (the MSL
//! threads, the driver, the front end) and read by status and metrics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Shared view for front ends: whether this node serves clients.
#[derive(Debug, Default)]
pub struct Shared {
    pub serving: AtomicBool,
    /// The node woke from a stall and holds client I/O until it knows its
    /// peer did not take over meanwhile (at most one dead interval): the
    /// front end waits instead of refusing.
    pub holding: AtomicBool,
    pub in_sync: AtomicBool,
    pub msl_tx_frames: AtomicU64,
    /// Of those, frames the thread running the core sent itself (no hand-off to the
    /// transmit thread).
    pub msl_tx_direct: AtomicU64,
    /// Volume writes the NBD reader that queued them did itself (no
    /// hand-off to the I/O worker).
    pub disk_writes_here: AtomicU64,
    pub msl_tx_bytes: AtomicU64,
    /// Frames the core produced that the transmit queue had no room for
    /// (the reliable layer retransmits them).
    pub msl_tx_dropped: AtomicU64,
    /// Frames the link refused to send (counted per frame of the batch).
    pub msl_tx_errors: AtomicU64,
    /// Messages the core produced that could not be encoded into frames
    /// (none is expected: a message too large for the link's frames).
    /// Nothing is sent; the reliable layer keeps retrying a data message.
    pub msl_tx_encode_errors: AtomicU64,
    pub msl_rx_frames: AtomicU64,
    pub msl_rx_bytes: AtomicU64,
    /// Received frames dropped for any reason (including bad auth).
    pub msl_rx_dropped: AtomicU64,
    /// Received frames that failed authentication (wrong, missing or
    /// unexpected cluster key): a peer with another `key_file`.
    pub msl_rx_bad_auth: AtomicU64,
    /// Frames the kernel dropped before this process saw them (receive
    /// ring full, or too long for it): the socket's own statistics, read
    /// by the receive thread at most every 100 ms. The reliable layer
    /// retransmits them; a steady rise means the receive thread falls
    /// behind.
    pub msl_rx_ring_dropped: AtomicU64,
    /// Times the driver found inputs lost because the core did not take
    /// them in time: the MSL receive ring, a LAN socket's buffer or the
    /// LAN hand-off queue dropped frames since the core last ran.
    pub input_overruns: AtomicU64,
    /// Bytes of client writes the core accepted (whole blocks).
    pub client_bytes_written: AtomicU64,
    /// Bytes the metadata store wrote since start (activity-log
    /// transactions, bitmap pages, superblocks).
    pub meta_bytes_written: AtomicU64,
    /// Measured resync rate (bytes per second, smoothed; 0 when idle).
    pub resync_rate_bytes_s: AtomicU64,
    /// The resync rate limits in force (bytes/s; max 0: the link's speed),
    /// as configured at start or by the last reload (SIGHUP).
    pub resync_min_bytes_s: AtomicU64,
    pub resync_max_bytes_s: AtomicU64,
}

impl Shared {
    /// Frames handed to the link.
    pub(crate) fn count_sent(&self, frames: usize, bytes: usize) {
        self.msl_tx_frames
            .fetch_add(frames as u64, Ordering::Relaxed);
        self.msl_tx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Frames the link refused (the reliable layer resends them).
    pub(crate) fn count_lost(&self, n: usize) {
        self.msl_tx_errors.fetch_add(n as u64, Ordering::Relaxed);
    }
}
