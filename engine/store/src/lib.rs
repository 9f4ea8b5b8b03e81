//! Host-side persistence for an msl node: the mirrored volume and the
//! node metadata.
//!
//! * [`MetaStore`] keeps [`msl_core::meta::Meta`] in a small file with a
//!   superblock and two fixed slots (A/B) written alternately, each
//!   wrapped in a header with a sequence number and a CRC32C. A persist is
//!   one `pwrite` into the slot that does *not* hold the newest version,
//!   followed by `fdatasync`; a crash at any point therefore leaves either
//!   the previous or the new version loadable, and [`MetaStore::open`]
//!   picks the newest valid slot. This is how the host executes the core's
//!   `Action::PersistMeta` durably and atomically.
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
mod volume;

pub use error::StoreError;
pub use io::MetaIo;
pub use meta_store::{CreateOptions, MetaStore, DEFAULT_AL_CAPACITY, PAGE};
pub use volume::{Volume, VolumeKind};
