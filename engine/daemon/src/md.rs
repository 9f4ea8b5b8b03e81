//! Creating a node's metadata: `mslctl create-md` and msld's first start
//! use the same code.

use msl_core::meta::Meta;
use msl_store::{convert_v1_to_v2, CreateOptions, MetaStore};

use crate::config::DaemonConfig;

/// Create fresh metadata for the node `cfg` describes: cluster id, node id,
/// volume geometry, and, for the initial primary, a fresh generation (its
/// data is authoritative); otherwise the node waits for a full sync.
///
/// An existing file is never overwritten without `force`: valid metadata
/// holds the node's generations and dirty map, and losing them forces a
/// full resync or, worse, hides which copy is newest.
pub fn create(
    cfg: &DaemonConfig,
    initial_primary: bool,
    force: bool,
) -> Result<(MetaStore, Meta), String> {
    create_with(cfg, initial_primary, force, None)
}

/// How `create_blank` knew the volume was blank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blank {
    /// A file holding no data: holes only (`SEEK_DATA` found none), or
    /// created just now.
    NoData,
    /// A block device, zeroed now (a discard that reads back as zeroes:
    /// fast on loop devices, thin storage and SSDs; other disks get zeroes
    /// written).
    Zeroed,
}

/// The generation a blank volume of cluster `cluster_id` holds: every
/// node created with `--blank` starts from it, so two blank nodes meet
/// with nothing to copy (the initial primary tracks its changes since
/// it, the other holds it as its current generation). A node that held
/// it once and moved on keeps it only in its history, which calls for a
/// full sync: a blank node never passes for one holding data.
pub fn blank_generation(cluster_id: u64) -> u64 {
    // splitmix64 of the cluster id, in its own domain ("blank").
    let mut z = cluster_id ^ 0x626c_616e_6b00_0000;
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

/// As [`create`], for a node whose volume is blank (reads as zeroes
/// throughout), like its peer's: the pair then comes up in sync without
/// copying the volume (as `mdadm --assume-clean` or DRBD's
/// `new-current-uuid --clear-bitmap`). A file volume must hold no data (a
/// new or all-holes file) or it is refused; a block device is zeroed. Both
/// nodes are created this way, `initial_primary` on one; a blank node
/// meeting a peer that holds data is refused as unrelated, never
/// synced from the wrong side.
pub fn create_blank(
    cfg: &DaemonConfig,
    initial_primary: bool,
    force: bool,
) -> Result<(MetaStore, Meta, Blank), String> {
    if !force {
        // The same refusal as without --blank, before touching the volume.
        refuse_existing(cfg)?;
    }
    let vol = crate::assemble::open_volume(cfg, true)?;
    let how = match vol.kind() {
        msl_store::VolumeKind::BlockDevice => {
            vol.trim(0, vol.size())
                .map_err(|e| format!("--blank: zeroing {}: {e}", cfg.file.volume.path.display()))?;
            vol.flush().map_err(|e| e.to_string())?;
            Blank::Zeroed
        }
        _ => match vol.next_data(0).map_err(|e| e.to_string())? {
            None => Blank::NoData,
            Some((at, _)) => {
                return Err(format!(
                    "--blank: volume {} holds data (at byte {at}): --blank is for new, empty \
                     volumes on both nodes; give this node a full sync instead (create-md \
                     without --blank)",
                    cfg.file.volume.path.display()
                ))
            }
        },
    };
    drop(vol);
    let (store, meta) = create_with(
        cfg,
        initial_primary,
        force,
        Some(blank_generation(cfg.file.cluster_id)),
    )?;
    Ok((store, meta, how))
}

/// `blank`: the cluster's blank generation, when the volume is blank.
fn create_with(
    cfg: &DaemonConfig,
    initial_primary: bool,
    force: bool,
    blank: Option<u64>,
) -> Result<(MetaStore, Meta), String> {
    let f = &cfg.file;
    let path = &f.volume.metadata;
    let core_cfg = cfg.core_config();
    if !force {
        refuse_existing(cfg)?;
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()) << 32;
    let gen = initial_primary.then_some(seed | 1);
    let mut meta = Meta::create(
        f.cluster_id,
        f.node_id,
        core_cfg.volume_blocks,
        f.volume.block_size,
        blank.or(gen),
    );
    if let (Some(_), Some(g)) = (blank, gen) {
        // The initial primary's data moves on from the blank volume: its
        // changes are tracked since the blank generation, which its blank
        // peer holds as current.
        msl_core::gens::new_generation(&mut meta.gens, g, true);
    }
    let opts = CreateOptions {
        force,
        al_capacity: CreateOptions::default()
            .al_capacity
            .max(core_cfg.al_extents as u32),
        extent_blocks: core_cfg.extent_blocks,
        ..CreateOptions::default()
    };
    let store = private_files(|| MetaStore::create(path, &meta, &opts))
        .map_err(|e| format!("metadata {}: {e}", path.display()))?;
    make_private(path)?;
    Ok((store, meta))
}

/// Valid metadata holds the node's generations and dirty map: never
/// overwritten without --force.
fn refuse_existing(cfg: &DaemonConfig) -> Result<(), String> {
    let path = &cfg.file.volume.metadata;
    if !path.exists() {
        return Ok(());
    }
    Err(match MetaStore::open_checked(path, &cfg.core_config()) {
            Ok((_, m)) => format!(
                "metadata {} already holds valid metadata (node {}, generation {:016x}, disk {:?}); \
                 refusing to overwrite it: give --force to discard it (the node then needs a full resync)",
                path.display(),
                m.node_id,
                m.gens.current,
                m.disk
            ),
            Err(e) => format!(
                "metadata {} exists but cannot be used ({e}); refusing to overwrite it without --force",
                path.display()
            ),
    })
}

/// Convert the node's format-1 metadata to the current format in place
/// (`mslctl convert-md`): generations, state, dirty map and activity log
/// are kept; the old file stays next to it as `<metadata>.v1`. The daemon
/// must be stopped (the file is locked while it runs).
pub fn convert(cfg: &DaemonConfig) -> Result<Meta, String> {
    let path = &cfg.file.volume.metadata;
    let core_cfg = cfg.core_config();
    let opts = CreateOptions {
        al_capacity: CreateOptions::default()
            .al_capacity
            .max(core_cfg.al_extents as u32),
        extent_blocks: core_cfg.extent_blocks,
        ..CreateOptions::default()
    };
    let meta = private_files(|| convert_v1_to_v2(path, &opts))
        .map_err(|e| format!("converting {}: {e}", path.display()))?;
    make_private(path)?;
    Ok(meta)
}

/// Run `f` with the process's umask at 077, so the files it creates
/// (metadata is written under a temporary name, then linked into place)
/// are owner-only from their first byte.
fn private_files<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: umask only swaps the process's file-creation mask.
    let old = unsafe { libc::umask(0o077) };
    let r = f();
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    r
}

/// Metadata is owner-only (msld refuses it otherwise): also after
/// `--force` over an existing file.
fn make_private(path: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("metadata {}: chmod 600: {e}", path.display()))
}
