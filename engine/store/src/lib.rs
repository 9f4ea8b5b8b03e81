//! Host-side persistence for an msl node: the mirrored volume and the
//! node metadata.
//!
//! * [`MetaStore`] keeps [`msl_core::meta::Meta`] in a file whose write
//!   cost is what changed: two superblocks (A/B) for the state, the dirty
//!   bitmap as checksummed 4 KiB pages (two copies each) written only when
//!   they change, and the activity log as a ring of checksummed
//!   transactions, so a new hot extent costs one 4 KiB write and one
//!   `fdatasync` whatever the volume size. A crash at any point leaves the
//!   previous or the new version loadable. This is how the host executes
//!   the core's `Action::PersistMeta` durably. Format-1 files are refused
//!   with a message; [`convert_v1_to_v2`] converts them.
//! * [`Volume`] is the backing regular file or block device: positioned
//!   reads and writes, FUA writes, flush, trim and write-zeroes.
//!
//! Both latch on the first I/O error: every later operation returns
//! [`StoreError::PreviousIo`]. After a failed write or sync the page cache
//! and the disk may disagree (the "fsyncgate" lesson), so a mirror node
//! must not keep going; it reports `Event::MetaFailed` (or the I/O
//! failure) and fails closed.

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod error;
mod io;
mod meta_store;
#[doc(hidden)]
pub mod testkit;
mod v1;
mod volume;

pub use error::StoreError;
pub use io::MetaIo;
pub use meta_store::{
    convert_v1_to_v2, CreateOptions, MetaStats, MetaStore, DEFAULT_AL_CAPACITY, DEFAULT_RING_LEN,
    FORMAT, PAGE,
};
pub use volume::{Volume, VolumeKind, VolumeOptions};
