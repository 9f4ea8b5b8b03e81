//! Deterministic sample metadata shared by the tests and the crash-test
//! helper binary. Not part of the API.

use msl_core::meta::Meta;
use msl_wire::{DiskState, Role};

use crate::MetaStats;

/// xorshift64*: deterministic randomness with no dependency.
pub struct Rng(pub u64);

impl Rng {
    // Not an iterator: it never ends, and `next` is its only step.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value below `n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Every counter of `a` plus the same counter of `b`.
pub fn stats_sum(a: MetaStats, b: MetaStats) -> MetaStats {
    MetaStats {
        persists: a.persists + b.persists,
        skipped: a.skipped + b.skipped,
        transactions: a.transactions + b.transactions,
        commits: a.commits + b.commits,
        pages_written: a.pages_written + b.pages_written,
        bytes_written: a.bytes_written + b.bytes_written,
        syncs: a.syncs + b.syncs,
    }
}

/// What the counters went up by from `a` to `b`.
pub fn stats_delta(a: MetaStats, b: MetaStats) -> MetaStats {
    MetaStats {
        persists: b.persists - a.persists,
        skipped: b.skipped - a.skipped,
        transactions: b.transactions - a.transactions,
        commits: b.commits - a.commits,
        pages_written: b.pages_written - a.pages_written,
        bytes_written: b.bytes_written - a.bytes_written,
        syncs: b.syncs - a.syncs,
    }
}

/// Version `v` of a node's metadata, derived only from `base`'s geometry
/// and `v`: `gens.current == v`, with bitmap bits, activity log, role and
/// flags varying with `v` (so the encoded length varies too).
pub fn sample_meta(base: &Meta, v: u64) -> Meta {
    let mut m = Meta::create(
        base.cluster_id,
        base.node_id,
        base.volume_blocks,
        base.block_size,
        Some(v),
    );
    m.gens.bitmap = v.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for (i, h) in m.gens.history.iter_mut().enumerate() {
        *h = v.saturating_sub(i as u64 + 1);
    }
    m.disk = if v.is_multiple_of(3) {
        DiskState::Outdated
    } else {
        DiskState::UpToDate
    };
    m.role = if v.is_multiple_of(2) {
        Role::Primary
    } else {
        Role::Secondary
    };
    m.clean = v.is_multiple_of(5);
    if m.volume_blocks > 0 {
        for k in 0..(v % 17) {
            m.dirty
                .set((v.wrapping_mul(7919) + k * 104_729) % m.volume_blocks);
        }
    }
    m.al = (0..v % 61).map(|i| v + i).collect();
    m
}

/// Write a format-1 metadata file holding `meta` (for conversion tests).
pub fn write_v1(path: &std::path::Path, meta: &Meta) -> std::io::Result<()> {
    crate::v1::write(path, meta, 4096)
}

/// Blocks per extent of the `--hot` crash loop.
pub const HOT_EXTENT_BLOCKS: u64 = 64;
/// Extents of its volume (a bijection of versions onto extents below this).
pub const HOT_EXTENTS: u64 = 1 << 16;
/// Its activity-log length.
pub const HOT_LOG: usize = 8;
const HOT_MUL: u64 = 7919;

/// The extent version `v` of the `--hot` crash loop adds to the log.
pub fn hot_extent(v: u64) -> u64 {
    v.wrapping_mul(HOT_MUL) % HOT_EXTENTS
}

/// The version whose extent is `e` (`v < HOT_EXTENTS`).
pub fn hot_version_of(e: u64) -> u64 {
    // The inverse of HOT_MUL modulo 2^16, by Newton's iteration.
    let mut inv: u64 = HOT_MUL;
    for _ in 0..5 {
        inv = inv.wrapping_mul(2u64.wrapping_sub(HOT_MUL.wrapping_mul(inv)));
    }
    e.wrapping_mul(inv) % HOT_EXTENTS
}

/// The newest version named by a loaded log (0 for an empty one).
pub fn hot_version(al: &[u64]) -> u64 {
    al.iter().map(|&e| hot_version_of(e)).max().unwrap_or(0)
}
