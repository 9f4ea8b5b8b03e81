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
    let f = &cfg.file;
    let path = &f.volume.metadata;
    let core_cfg = cfg.core_config();
    if path.exists() && !force {
        return Err(match MetaStore::open_checked(path, &core_cfg) {
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
        });
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()) << 32;
    let gen = initial_primary.then_some(seed | 1);
    let meta = Meta::create(
        f.cluster_id,
        f.node_id,
        core_cfg.volume_blocks,
        f.volume.block_size,
        gen,
    );
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
