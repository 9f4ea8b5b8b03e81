//! The positioned-I/O seam under [`crate::MetaStore`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Positioned I/O on the metadata file.
///
/// Implemented for [`File`]; tests wrap a file to inject faults (a failing
/// write or `fdatasync`) and check the error latch.
pub trait MetaIo {
    /// Read exactly `buf.len()` bytes at `offset`.
    fn pread_exact(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset`.
    fn pwrite_all(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every completed write durable (`fdatasync`).
    fn fdatasync(&self) -> io::Result<()>;
    /// Current length of the file in bytes.
    fn file_len(&self) -> io::Result<u64>;
    /// The first offset at or after `offset` that may hold data (`None`:
    /// nothing from there on does), so that loading skips what was never
    /// written. By default everything may hold data.
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok(Some(offset))
    }
}

impl MetaIo for File {
    fn pread_exact(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn pwrite_all(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn fdatasync(&self) -> io::Result<()> {
        File::sync_data(self)
    }
    fn file_len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        match crate::volume::lseek(self, offset, libc::SEEK_DATA) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            // A file system without SEEK_DATA: read everything.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Some(offset)),
            Err(e) => Err(e),
        }
    }
}
