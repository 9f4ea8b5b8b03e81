//! The storage behind an export.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use bytes::Bytes;

/// What the NBD server reads and writes. Every call is made with a range the
/// server has already checked against [`Backend::size`]. Calls may run
/// concurrently from several worker threads.
///
/// The mirroring daemon implements this on top of its core: `write` returns
/// only once the data is durable as the write semantics require.
pub trait Backend: Send + Sync + 'static {
    /// Export size in bytes; fixed for the life of the server.
    fn size(&self) -> u64;
    /// Fill `buf` from `off`.
    fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Write `data` at `off`; with `fua`, it must be durable before returning.
    fn write(&self, off: u64, data: &[u8], fua: bool) -> io::Result<()>;
    /// Make every write completed so far durable.
    fn flush(&self) -> io::Result<()>;
    /// Advisory discard: afterwards the range may read as anything.
    fn trim(&self, off: u64, len: u64) -> io::Result<()>;
    /// The range reads as zeroes afterwards.
    fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> io::Result<()>;
    /// Longest range one [`Backend::trim`] or [`Backend::write_zeroes`]
    /// call gets: the server cuts a longer TRIM or WRITE_ZEROES at
    /// multiples of this, so no call (and no lock it holds) lasts for a
    /// whole-volume range, and a backend that must allocate or mirror per
    /// call stays bounded. At least 4096. Default 1 MiB.
    fn range_piece(&self) -> u64 {
        1 << 20
    }
    /// True only if a FLUSH on one connection covers writes completed on all
    /// connections (then the server advertises NBD_FLAG_CAN_MULTI_CONN).
    fn can_multi_conn(&self) -> bool {
        false
    }
    /// True if [`Backend::write_async`] returns without waiting for the
    /// write: the server then hands every WRITE to it from the connection's
    /// reader and answers from one reply thread per connection as
    /// completions arrive, so no thread waits per request in flight (the
    /// mirror's writes wait for the peer; 32 in flight were 32 parked
    /// threads and 64 thread wake-ups).
    fn async_writes(&self) -> bool {
        false
    }
    /// Start a write of `data` at `off` (durable before completion with
    /// `fua`) and report its outcome through `done`, exactly once, from any
    /// thread. Overlapping writes in flight may complete in any order, as
    /// NBD allows. The default runs [`Backend::write`] here.
    fn write_async(&self, off: u64, data: Bytes, fua: bool, done: Completion) {
        done.complete(self.write(off, &data, fua));
    }
}

/// A finished asynchronous write, on its way to the connection's reply
/// thread.
pub(crate) struct Done {
    pub handle: u64,
    pub cost: u64,
    pub len: u64,
    pub result: io::Result<()>,
}

/// Where an asynchronous write reports its outcome. Dropping it without
/// [`Completion::complete`] answers the request with EIO, so a backend
/// that loses a request never leaves the client waiting forever.
pub struct Completion {
    to: Option<(msl_buf::queue::Sender<Done>, u64, u64, u64)>,
}

impl Completion {
    pub(crate) fn new(to: msl_buf::queue::Sender<Done>, handle: u64, cost: u64, len: u64) -> Self {
        Completion {
            to: Some((to, handle, cost, len)),
        }
    }

    /// Report the write's outcome (the client's reply follows).
    pub fn complete(mut self, result: io::Result<()>) {
        self.finish(result);
    }

    fn finish(&mut self, result: io::Result<()>) {
        if let Some((to, handle, cost, len)) = self.to.take() {
            // The connection may be gone; then nobody waits for this.
            let _ = to.send(Done {
                handle,
                cost,
                len,
                result,
            });
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.finish(Err(io::Error::from_raw_os_error(libc::EIO)));
    }
}

/// A regular file or block device, through pread/pwrite/fdatasync, with
/// fallocate for TRIM (punch hole) and WRITE_ZEROES (zero range). This is the
/// unreplicated baseline and what the tests serve.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size: u64,
}

impl FileBackend {
    /// Open an existing file or block device read-write (or read-only); the
    /// export size is its current size.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> io::Result<Self> {
        let mut file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size = file.seek(SeekFrom::End(0))?;
        Ok(Self { file, size })
    }

    /// Create (or truncate) a regular file of `size` bytes and open it.
    pub fn create(path: impl AsRef<Path>, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(size)?;
        Ok(Self { file, size })
    }

    fn fallocate(&self, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate takes a valid fd owned by self.file and plain integers.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, o, l) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn zero_by_writing(&self, mut off: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeroes = vec![0u8; CHUNK.min(len) as usize];
        let end = off + len;
        while off < end {
            let n = CHUNK.min(end - off) as usize;
            self.file.write_all_at(&zeroes[..n], off)?;
            off += n as u64;
        }
        Ok(())
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENODEV)
    )
}

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }

    fn write(&self, off: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.file.write_all_at(data, off)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        ) {
            // TRIM is advisory: where the file system cannot punch, do nothing.
            Err(e) if unsupported(&e) => Ok(()),
            r => r,
        }
    }

    fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        ) {
            Ok(()) => {}
            Err(e) if unsupported(&e) => self.zero_by_writing(off, len)?,
            Err(e) => return Err(e),
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// A single file descriptor: fdatasync on any connection covers writes
    /// completed on every connection.
    fn can_multi_conn(&self) -> bool {
        true
    }
}
