//! The one error type of the crate.

use std::io;
use std::path::PathBuf;

/// How to recover when the metadata file is unusable.
const RECREATE: &str = "restore from the peer with `mslctl create-md --force` and a full resync";

/// Everything that can go wrong in [`crate::MetaStore`] and
/// [`crate::Volume`]. Every message names the file and says what is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An I/O call failed. The object is now latched: every later
    /// operation returns [`StoreError::PreviousIo`].
    #[error("{what} {}: {op} failed: {source}", path.display())]
    Io {
        /// `"metadata"` or `"volume"`.
        what: &'static str,
        /// The file or device.
        path: PathBuf,
        /// What was being done, e.g. `"write slot B at offset 8192"`.
        op: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An earlier I/O error latched this object; nothing more is written.
    #[error(
        "{what} {}: refusing I/O after an earlier error ({first}); the node must fail closed \
         (fix the disk, then restart)",
        path.display()
    )]
    PreviousIo {
        /// `"metadata"` or `"volume"`.
        what: &'static str,
        /// The file or device.
        path: PathBuf,
        /// The first error, as text.
        first: String,
    },
    /// `create` without `force` found an existing file.
    #[error(
        "metadata {}: already exists; use `mslctl create-md --force` to overwrite it \
         (this discards the node's metadata)",
        path.display()
    )]
    Exists {
        /// The metadata file.
        path: PathBuf,
    },
    /// Another process holds the file (another daemon on the same node?).
    #[error("{what} {}: in use by another process (lock held)", path.display())]
    Locked {
        /// `"metadata"` or `"volume"`.
        what: &'static str,
        /// The file or device.
        path: PathBuf,
    },
    /// The file is not msl metadata at all.
    #[error("metadata {}: not an msl metadata file ({detail}); {RECREATE}", path.display())]
    NotMetadata {
        /// The metadata file.
        path: PathBuf,
        /// What was found instead.
        detail: String,
    },
    /// The file is msl metadata but damaged beyond what the A/B slots
    /// tolerate (e.g. a bad superblock, or a slot whose checksum is valid
    /// but whose content is not).
    #[error("metadata {}: corrupt: {detail}; {RECREATE}", path.display())]
    Corrupt {
        /// The metadata file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Neither slot holds a valid version.
    #[error(
        "metadata {}: both slots are unusable (slot A: {slot_a}; slot B: {slot_b}); {RECREATE}",
        path.display()
    )]
    BothSlotsBad {
        /// The metadata file.
        path: PathBuf,
        /// Why slot A was rejected.
        slot_a: String,
        /// Why slot B was rejected.
        slot_b: String,
    },
    /// The file holds metadata of an older format.
    #[error(
        "metadata {}: format {format}, which this build no longer writes; convert it with \
         `mslctl convert-md` (the daemon stopped; the old file is kept as `<file>.v1`)",
        path.display()
    )]
    OldFormat {
        /// The metadata file.
        path: PathBuf,
        /// The format found.
        format: u32,
    },
    /// The file is shorter than its layout needs.
    #[error(
        "metadata {}: truncated: the file is {len} bytes but its layout needs {need}; {RECREATE}",
        path.display()
    )]
    Truncated {
        /// The metadata file.
        path: PathBuf,
        /// Actual length.
        len: u64,
        /// Length the layout needs.
        need: u64,
    },
    /// The metadata on disk does not match the configuration (or the
    /// metadata handed to `persist` does not match the file).
    #[error(
        "metadata {}: {key} is {found} on disk but {expected} in the configuration \
         (wrong metadata file, or the configuration changed; if the configuration is right, \
         {RECREATE})",
        path.display()
    )]
    Mismatch {
        /// The metadata file.
        path: PathBuf,
        /// Configuration key, e.g. `"cluster_id"`.
        key: &'static str,
        /// Value on disk.
        found: String,
        /// Value expected.
        expected: String,
    },
    /// The encoded metadata does not fit its slot.
    #[error(
        "metadata {}: encoded metadata is {need} bytes but a slot holds {cap} \
         (activity log larger than the file was created for?)",
        path.display()
    )]
    TooLarge {
        /// The metadata file.
        path: PathBuf,
        /// Bytes needed (slot header included).
        need: u64,
        /// Slot capacity.
        cap: u64,
    },
    /// A volume access outside the volume.
    #[error("volume {}: {op} of {len} bytes at offset {offset} is past the end ({size} bytes)", path.display())]
    OutOfRange {
        /// The volume.
        path: PathBuf,
        /// `"read"`, `"write"`, ...
        op: &'static str,
        /// Offset in bytes.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Volume size in bytes.
        size: u64,
    },
    /// The block device is smaller than the configured volume.
    #[error("volume {}: device holds {size} bytes but the configuration needs {need}", path.display())]
    TooSmall {
        /// The volume.
        path: PathBuf,
        /// Device size.
        size: u64,
        /// Configured size.
        need: u64,
    },
    /// The path is neither a regular file nor a block device.
    #[error("volume {}: not a regular file or block device", path.display())]
    NotFileOrDevice {
        /// The path.
        path: PathBuf,
    },
}
