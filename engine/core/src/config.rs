//! Protocol tunables, each with a default and bounds checked at start.

use core::fmt;

/// Write acknowledgement mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// Acknowledge after the local write AND the peer's write (DRBD
    /// protocol C). The default.
    Sync,
    /// Acknowledge after the local write; mirror in the background. An
    /// acknowledged write can be lost if the primary dies: allowed only
    /// with a warning.
    Async,
}

/// What a node does, with a witness configured, while it cannot reach it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoQuorum {
    /// Wait: no takeover, and a primary without its peer acknowledges no
    /// write until it holds the lease again (or the peer is back). The
    /// default: never two nodes acknowledging at once.
    Suspend,
    /// Behave as without a witness (NetWare SFT III): take over, or keep
    /// serving alone, without the lease. Both links and the witness cut
    /// at once then lets both nodes serve.
    Sft3,
}

/// Core configuration. Times in microseconds, sizes in blocks unless named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub node_id: u16,
    pub peer_id: u16,
    pub cluster_id: u64,
    /// This start of the node: persisted in its metadata and one higher at
    /// every start, so the peer can tell a restarted node's packets from a
    /// replay of the previous run's.
    pub epoch: u64,
    pub volume_blocks: u64,
    pub block_size: u32,
    pub write_mode: WriteMode,
    /// Heartbeat period on both the MSL and the LAN.
    pub heartbeat_interval_us: u64,
    /// The peer is dead on a path after this many missed heartbeats.
    pub miss_count: u32,
    /// A gap longer than this between two calls of the core means the node
    /// did not run (VM pause, SIGSTOP, a slow fsync on the core thread): its
    /// own measurement of the peer's silence is void, so it restarts its
    /// failure detection instead of concluding anything. The host wakes the
    /// core at least once per heartbeat interval, so a running node never
    /// sees a gap of more than one interval plus scheduling delay; the
    /// default, two intervals plus one of slack, leaves room for a loaded
    /// host. At most the dead interval minus two heartbeat intervals: a
    /// stall just under the threshold goes unnoticed, and the peer's
    /// silence clock for this node started at its last heartbeat before the
    /// stall (up to one interval earlier, two if that one was lost), so a
    /// longer threshold lets the peer take over during a stall this node
    /// never notices (msl-sim finds that at 390 ms with the default 400 ms
    /// dead interval). Set it with the heartbeat interval: a threshold
    /// under one interval is refused.
    pub stall_threshold_us: u64,
    /// The node decides its role itself: takes over from a failed primary,
    /// starts the pair as primary when it holds the good data, switches
    /// over when its LAN side fails. False when a cluster manager decides
    /// (`role_control = "cluster"`): the role then changes only by
    /// administrator command (promote, demote, switchover).
    pub auto_takeover: bool,
    /// A witness on a third host grants the right to serve without the
    /// peer as a time-bounded lease (the host talks to it and reports
    /// `Event::Lease`): a secondary takes over, and a primary that lost
    /// its peer acknowledges writes, only while it holds the lease.
    pub witness: bool,
    /// With `witness`, what to do while the witness is unreachable.
    pub on_no_quorum: NoQuorum,
    /// Reliable-delivery window (messages in flight).
    pub window: usize,
    pub rto_initial_us: u64,
    pub rto_min_us: u64,
    pub rto_max_us: u64,
    /// Activity-log slots (hot extents).
    pub al_extents: usize,
    /// Blocks per activity-log extent.
    pub extent_blocks: u64,
    /// Resync reads in flight when clients are idle.
    pub resync_max_in_flight: usize,
    /// With clients idle, the most resync bytes read or sent but not yet
    /// applied by the target: what the target's MSL receive ring holds,
    /// so a resync burst never overruns it (msld sets it from the MTU).
    pub resync_max_in_flight_bytes: u64,
    /// Upper bound on the resync rate, bytes per second (0 = no limit:
    /// the whole link when clients are idle).
    pub resync_max_bytes_per_s: u64,
    /// Resync reads in flight while clients write (the floor that keeps a
    /// resync moving under load, like DRBD's c-min-rate).
    pub resync_min_in_flight: usize,
    /// Resync rate floor while clients write, bytes per second (DRBD's
    /// c-min-rate): under load the resync reads at least this fast (and
    /// keeps `resync_min_in_flight` blocks moving); when clients are idle
    /// it uses the whole link. 0 = only the in-flight floor. Default
    /// 10 MiB/s: a 64 MiB backlog catches up in under 7 s under load while
    /// taking a few percent of a 1 GbE-class link from clients.
    pub resync_min_bytes_per_s: u64,
    /// Clients count as idle after this long without a write.
    pub resync_idle_us: u64,
    /// Flush both sides after this long with unstable hot extents while
    /// the activity log is under pressure (at least 3/4 of its slots hold
    /// extents not yet stable on both sides).
    pub stabilize_interval_us: u64,
    /// The same while the activity log has room: stable points then only
    /// bound what a power loss of the secondary makes the primary resync
    /// (the extents written since the last one), and flushing less often
    /// writes back a page rewritten meanwhile once instead of at every
    /// stable point. At least `stabilize_interval_us`.
    pub stabilize_relaxed_us: u64,
    /// The primary's LAN must be worse than the secondary's for this long
    /// before a switchover.
    pub switchover_debounce_us: u64,
    /// Client writes queued in the core before new ones are refused.
    pub max_pending_writes: usize,
}

impl Config {
    /// Defaults for a node pair; the host fills geometry and identities.
    pub fn new(
        node_id: u16,
        peer_id: u16,
        cluster_id: u64,
        volume_blocks: u64,
        block_size: u32,
    ) -> Self {
        Config {
            node_id,
            peer_id,
            cluster_id,
            epoch: 0,
            volume_blocks,
            block_size,
            write_mode: WriteMode::Sync,
            heartbeat_interval_us: 50_000,
            miss_count: 8,
            stall_threshold_us: 150_000,
            auto_takeover: true,
            witness: false,
            on_no_quorum: NoQuorum::Suspend,
            window: 256,
            rto_initial_us: 20_000,
            rto_min_us: 2_000,
            rto_max_us: 1_000_000,
            al_extents: 1237,
            extent_blocks: 1024,
            resync_max_in_flight: 64,
            resync_max_in_flight_bytes: 8 << 20,
            resync_max_bytes_per_s: 0,
            resync_min_in_flight: 1,
            resync_min_bytes_per_s: 10 << 20,
            resync_idle_us: 20_000,
            stabilize_interval_us: 200_000,
            stabilize_relaxed_us: 5_000_000,
            switchover_debounce_us: 300_000,
            max_pending_writes: 4096,
        }
    }

    /// A path is declared dead after this long without a frame.
    pub fn dead_after_us(&self) -> u64 {
        self.heartbeat_interval_us * u64::from(self.miss_count)
    }

    /// Check every tunable against its bounds; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn range(key: &'static str, v: u64, lo: u64, hi: u64) -> Result<(), ConfigError> {
            if v < lo || v > hi {
                return Err(ConfigError {
                    key,
                    value: v,
                    min: lo,
                    max: hi,
                });
            }
            Ok(())
        }
        range("node_id", u64::from(self.node_id), 1, u64::from(u16::MAX))?;
        range("peer_id", u64::from(self.peer_id), 1, u64::from(u16::MAX))?;
        if self.peer_id == self.node_id {
            return Err(ConfigError {
                key: "peer_id",
                value: u64::from(self.peer_id),
                min: 1,
                max: u64::from(u16::MAX),
            });
        }
        range("volume_blocks", self.volume_blocks, 1, 1 << 40)?;
        range("block_size", u64::from(self.block_size), 512, 65536)?;
        if !self.block_size.is_power_of_two() {
            return Err(ConfigError {
                key: "block_size",
                value: u64::from(self.block_size),
                min: 512,
                max: 65536,
            });
        }
        range(
            "heartbeat_interval_us",
            self.heartbeat_interval_us,
            1_000,
            1_000_000,
        )?;
        range("miss_count", u64::from(self.miss_count), 2, 100)?;
        range(
            "stall_threshold_us",
            self.stall_threshold_us,
            self.heartbeat_interval_us,
            self.dead_after_us()
                .saturating_sub(2 * self.heartbeat_interval_us)
                .max(self.heartbeat_interval_us),
        )?;
        range("window", self.window as u64, 1, 65536)?;
        range("rto_min_us", self.rto_min_us, 100, 1_000_000)?;
        range(
            "rto_initial_us",
            self.rto_initial_us,
            self.rto_min_us,
            10_000_000,
        )?;
        range(
            "rto_max_us",
            self.rto_max_us,
            self.rto_initial_us,
            10_000_000,
        )?;
        range("al_extents", self.al_extents as u64, 1, 65536)?;
        range("extent_blocks", self.extent_blocks, 1, 1 << 20)?;
        range(
            "resync_max_in_flight",
            self.resync_max_in_flight as u64,
            1,
            65536,
        )?;
        range(
            "resync_max_in_flight_bytes",
            self.resync_max_in_flight_bytes,
            u64::from(self.block_size),
            u64::MAX,
        )?;
        range(
            "resync_min_in_flight",
            self.resync_min_in_flight as u64,
            1,
            self.resync_max_in_flight as u64,
        )?;
        range(
            "resync_min_bytes_per_s",
            self.resync_min_bytes_per_s,
            0,
            if self.resync_max_bytes_per_s == 0 {
                u64::MAX
            } else {
                self.resync_max_bytes_per_s
            },
        )?;
        range("resync_idle_us", self.resync_idle_us, 0, 10_000_000)?;
        range(
            "stabilize_interval_us",
            self.stabilize_interval_us,
            1_000,
            60_000_000,
        )?;
        range(
            "stabilize_relaxed_us",
            self.stabilize_relaxed_us,
            self.stabilize_interval_us,
            600_000_000,
        )?;
        range(
            "switchover_debounce_us",
            self.switchover_debounce_us,
            0,
            60_000_000,
        )?;
        range(
            "max_pending_writes",
            self.max_pending_writes as u64,
            1,
            1 << 20,
        )?;
        Ok(())
    }
}

/// A tunable out of bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub key: &'static str,
    pub value: u64,
    pub min: u64,
    pub max: u64,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "config key `{}` = {} is invalid: must be between {} and {}{}",
            self.key,
            self.value,
            self.min,
            self.max,
            match self.key {
                "peer_id" => " and differ from node_id",
                "block_size" => " and a power of two",
                _ => "",
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_defaults_valid_and_detect_dead_peer_within_half_second() {
        let c = Config::new(1, 2, 7, 1024, 4096);
        assert_eq!(c.validate(), Ok(()));
        assert!(c.dead_after_us() <= 500_000);
    }

    #[test]
    fn test_out_of_bounds_key_named() {
        let mut c = Config::new(1, 2, 7, 1024, 4096);
        c.miss_count = 1;
        let e = c.validate().unwrap_err();
        assert_eq!(e.key, "miss_count");
        c.miss_count = 8;
        c.peer_id = 1;
        assert_eq!(c.validate().unwrap_err().key, "peer_id");
        c.peer_id = 2;
        // A stall threshold near the dead interval would let the peer take
        // over during a stall this node never notices.
        c.stall_threshold_us = c.dead_after_us() - 2 * c.heartbeat_interval_us;
        assert_eq!(c.validate(), Ok(()));
        c.stall_threshold_us += 1;
        assert_eq!(c.validate().unwrap_err().key, "stall_threshold_us");
        c.stall_threshold_us = c.heartbeat_interval_us - 1;
        assert_eq!(c.validate().unwrap_err().key, "stall_threshold_us");
    }
}
