//! The mirrored volume: a regular file or a block device.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use crate::error::StoreError;

const WHAT: &str = "volume";
/// Chunk size for writing zeroes when the kernel cannot do it for us.
const ZERO_CHUNK: usize = 256 * 1024;
/// Largest single `pwrite` of a volume write. On ext4 with large folios
/// (Linux 6.16 on) a write creates page-cache folios as large as itself,
/// and every later 4 KiB write into such a folio walks all of its buffer
/// heads: after a 1 MiB write, a 4 KiB write into it cost 11 us instead of
/// 2-5 us, and on msld's core thread `ext4_block_write_begin` was half of
/// all its time under 4 KiB random writes. 64 KiB pieces keep the folios
/// small at one system call per 64 KiB.
const WRITE_PIECE: usize = 64 * 1024;

/// What backs a [`Volume`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeKind {
    /// A regular file (created or extended to the configured size).
    File,
    /// A block device (must be at least the configured size).
    BlockDevice,
}

/// How [`Volume::open_with`] prepares a regular file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VolumeOptions {
    /// Allocate the whole file ahead (`fallocate`), so a full filesystem
    /// shows at start. With `false` the file is thin (sparse): blocks are
    /// allocated as they are first written, so a filesystem that fills up
    /// fails a later write with ENOSPC, which latches the volume and
    /// takes the node out of service (the peer, if in sync, keeps
    /// serving). Choose `false` only where the space is watched. Block
    /// devices are used as they are either way.
    pub preallocate: bool,
}

impl Default for VolumeOptions {
    fn default() -> Self {
        VolumeOptions { preallocate: true }
    }
}

/// The backing store of the mirrored volume.
///
/// All methods take `&self` (positioned I/O) so several threads can share
/// one `Volume`. Accesses are range-checked against the configured size.
/// The first I/O error latches the volume: every later call returns
/// [`StoreError::PreviousIo`].
///
/// Durability: [`Volume::write_at`] with `fua` is durable when it returns;
/// everything else (plain writes, trims, zeroes) is durable after the next
/// successful [`Volume::flush`].
#[derive(Debug)]
pub struct Volume {
    path: PathBuf,
    file: File,
    size: u64,
    kind: VolumeKind,
    /// A file configured `preallocate` whose blocks are all allocated (a
    /// sparse file stays sparse when zeroed).
    preallocated: bool,
    failed: OnceLock<String>,
    /// `pwritev2(RWF_DSYNC)` is unavailable: FUA falls back to write + sync.
    no_dsync: AtomicBool,
    /// `fallocate` cannot punch holes / zero ranges here: write zeroes.
    no_punch: AtomicBool,
    no_zero_range: AtomicBool,
}

impl Volume {
    /// Open the volume at `path` with `size` bytes (volume blocks times
    /// block size), taking an exclusive advisory lock.
    ///
    /// A regular file is created if missing and extended if shorter, with
    /// the new space allocated (`fallocate`), so a full filesystem shows
    /// at start and not as a failed write while mirroring; where the
    /// filesystem cannot allocate ahead the file is extended sparse. A
    /// longer file is used up to `size`. A block device must
    /// hold at least `size` bytes. Anything else is refused.
    pub fn open(path: &Path, size: u64) -> Result<Volume, StoreError> {
        Self::open_with(path, size, &VolumeOptions::default())
    }

    /// [`Volume::open`] with options: `preallocate = false` makes a thin
    /// (sparse) file instead of allocating it ahead.
    pub fn open_with(path: &Path, size: u64, opts: &VolumeOptions) -> Result<Volume, StoreError> {
        let p = path.to_path_buf();
        let existing = match std::fs::metadata(path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(path, "stat", e)),
        };
        let kind = match &existing {
            None => VolumeKind::File,
            Some(m) if m.file_type().is_file() => VolumeKind::File,
            Some(m) if m.file_type().is_block_device() => VolumeKind::BlockDevice,
            Some(_) => return Err(StoreError::NotFileOrDevice { path: p }),
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(kind == VolumeKind::File)
            .truncate(false)
            .open(path)
            .map_err(|e| io_err(path, "open", e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    what: WHAT,
                    path: p,
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(path, "lock", e)),
        }
        match kind {
            VolumeKind::File => {
                let len = file.metadata().map_err(|e| io_err(path, "stat", e))?.len();
                if len < size {
                    let grow = if opts.preallocate {
                        preallocate(&file, len, size)
                    } else {
                        file.set_len(size)
                    };
                    grow.and_then(|()| file.sync_all())
                        .map_err(|e| io_err(path, format!("extend to {size} bytes"), e))?;
                }
                if existing.is_none() {
                    // Make the new directory entry durable too.
                    let dir = match path.parent() {
                        Some(d) if !d.as_os_str().is_empty() => d,
                        _ => Path::new("."),
                    };
                    File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(|e| io_err(dir, "fsync directory", e))?;
                }
            }
            VolumeKind::BlockDevice => {
                // Seeking to the end of a block device yields its size
                // (same value as the BLKGETSIZE64 ioctl).
                let dev = file
                    .seek(SeekFrom::End(0))
                    .map_err(|e| io_err(path, "size (seek to end)", e))?;
                if dev < size {
                    return Err(StoreError::TooSmall {
                        path: p,
                        size: dev,
                        need: size,
                    });
                }
            }
        }
        // No kernel readahead on the volume: readahead fills the page cache
        // with large folios (up to 2 MiB on ext4 since Linux 6.16), and
        // every later 4 KiB write into one walks all of its buffer heads:
        // after a sequential read of the file (a resync source reads it
        // all), 4 KiB random writes cost 38 us each instead of 3.3 us.
        // Clients and the resync read what they need in large requests
        // anyway. Advice only: an error changes nothing.
        // SAFETY: a valid fd owned by `file`; plain integer arguments.
        let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        let preallocated = kind == VolumeKind::File && opts.preallocate && {
            use std::os::unix::fs::MetadataExt;
            file.metadata().is_ok_and(|m| m.blocks() * 512 >= size)
        };
        Ok(Volume {
            path: p,
            file,
            size,
            kind,
            preallocated,
            failed: OnceLock::new(),
            no_dsync: AtomicBool::new(false),
            no_punch: AtomicBool::new(false),
            no_zero_range: AtomicBool::new(false),
        })
    }

    /// The next range holding data at or after `offset`, as
    /// `(start, end)` within the volume: everything outside such ranges
    /// reads as zeroes (holes of a sparse file, found with `SEEK_DATA` /
    /// `SEEK_HOLE`). `None` when only holes follow. Where the file system
    /// or device cannot tell (block devices, for instance), everything
    /// from `offset` on counts as data. The granularity is the file
    /// system's block, so a range may start before and end after the
    /// bytes actually written.
    pub fn next_data(&self, offset: u64) -> Result<Option<(u64, u64)>, StoreError> {
        self.check("seek data", offset.min(self.size), 0)?;
        if offset >= self.size {
            return Ok(None);
        }
        if self.kind == VolumeKind::BlockDevice {
            return Ok(Some((offset, self.size)));
        }
        let start = match lseek(&self.file, offset, libc::SEEK_DATA) {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(Some((offset, self.size)))
            }
            Err(e) => return Err(io_err(&self.path, format!("seek data from {offset}"), e)),
        };
        if start >= self.size {
            return Ok(None);
        }
        let end = match lseek(&self.file, start, libc::SEEK_HOLE) {
            Ok(h) => h.min(self.size),
            Err(e) => return Err(io_err(&self.path, format!("seek hole from {start}"), e)),
        };
        Ok(Some((start, end.max(start + 1).min(self.size))))
    }

    /// True if `[offset, offset + len)` holds no data (reads as zeroes
    /// without reading it): see [`Volume::next_data`].
    pub fn is_hole(&self, offset: u64, len: u64) -> Result<bool, StoreError> {
        Ok(match self.next_data(offset)? {
            None => true,
            Some((start, _)) => start >= offset.saturating_add(len),
        })
    }

    /// Bytes the volume occupies on its file system (allocated blocks;
    /// the device size for a block device).
    pub fn allocated_bytes(&self) -> Result<u64, StoreError> {
        use std::os::unix::fs::MetadataExt;
        if self.kind == VolumeKind::BlockDevice {
            return Ok(self.size);
        }
        let m = self
            .file
            .metadata()
            .map_err(|e| io_err(&self.path, "stat", e))?;
        Ok(m.blocks() * 512)
    }

    /// Configured size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Regular file or block device.
    pub fn kind(&self) -> VolumeKind {
        self.kind
    }

    /// The file or device path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True once an I/O error latched the volume.
    pub fn is_failed(&self) -> bool {
        self.failed.get().is_some()
    }

    /// Read exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        self.check("read", offset, buf.len() as u64)?;
        let r = self.file.read_exact_at(buf, offset);
        self.latch(r, || {
            format!("read of {} bytes at offset {offset}", buf.len())
        })
    }

    /// Read `len` bytes at `offset` into a new buffer, which is not zeroed
    /// first (the read fills it; resync reads run at link speed, and
    /// zeroing each buffer before reading into it doubled the writes to
    /// memory).
    pub fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>, StoreError> {
        self.check("read", offset, len as u64)?;
        let mut buf: Vec<u8> = Vec::with_capacity(len);
        let fd = self.file.as_raw_fd();
        let r = loop {
            let done = buf.len();
            if done == len {
                break Ok(());
            }
            let spare = buf.spare_capacity_mut();
            // SAFETY: `spare` is this Vec's unused capacity, valid for
            // writes of `len - done` <= spare.len() bytes; pread writes at
            // most that many into it.
            let n = unsafe {
                libc::pread(
                    fd,
                    spare.as_mut_ptr().cast(),
                    len - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            match n {
                n if n > 0 => {
                    // SAFETY: pread initialized the `n` bytes after `done`.
                    unsafe { buf.set_len(done + n as usize) };
                }
                0 => break Err(std::io::ErrorKind::UnexpectedEof.into()),
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        break Err(e);
                    }
                }
            }
        };
        self.latch(r, || format!("read of {len} bytes at offset {offset}"))?;
        Ok(buf)
    }

    /// Write `buf` at `offset`. With `fua` the data is durable when this
    /// returns (`pwritev2(RWF_DSYNC)`, i.e. a FUA write on devices that
    /// support it; otherwise write then `fdatasync`).
    pub fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> Result<(), StoreError> {
        self.check("write", offset, buf.len() as u64)?;
        let r = if fua {
            self.write_dsync(buf, offset)
        } else {
            // In pieces of at most WRITE_PIECE: see there.
            buf.chunks(WRITE_PIECE)
                .zip((offset..).step_by(WRITE_PIECE))
                .try_for_each(|(piece, at)| self.file.write_all_at(piece, at))
        };
        let fua_s = if fua { " (FUA)" } else { "" };
        self.latch(r, || {
            format!("write{fua_s} of {} bytes at offset {offset}", buf.len())
        })
    }

    /// Make every completed write, trim and zeroing durable (`fdatasync`;
    /// on a block device this also flushes the device's write cache).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.check("flush", 0, 0)?;
        let r = self.file.sync_data();
        self.latch(r, || "fdatasync".to_string())
    }

    /// Discard `len` bytes at `offset`. The range reads back as zeroes
    /// afterwards (so both mirrors stay byte-identical): a hole is punched
    /// (`fallocate(PUNCH_HOLE | KEEP_SIZE)`), or, where that is not
    /// supported, zeroes are written.
    pub fn trim(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.check("trim", offset, len)?;
        // A range of a file that is a hole already needs nothing: a full
        // sync of a thin terabyte volume zeroes mostly such ranges, and a
        // `SEEK_DATA` costs far less than punching (which journals).
        if self.kind != VolumeKind::BlockDevice && self.is_hole(offset, len)? {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let r = self.fallocate_or_zero(&self.no_punch, mode, offset, len);
        self.latch(r, || format!("trim of {len} bytes at offset {offset}"))
    }

    /// Make `len` bytes at `offset` read as zeroes, keeping them allocated
    /// (`fallocate(ZERO_RANGE | KEEP_SIZE)`, or writing zeroes).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.check("write zeroes", offset, len)?;
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        let r = self.fallocate_or_zero(&self.no_zero_range, mode, offset, len);
        self.latch(r, || {
            format!("write zeroes of {len} bytes at offset {offset}")
        })
    }

    /// Make `len` bytes at `offset` read as zeroes the way the volume is
    /// kept: a preallocated file keeps its blocks ([`Volume::write_zeroes`]);
    /// a thin file or a block device gets a hole or a discard that reads
    /// back as zeroes ([`Volume::trim`]), so zeroing a terabyte costs
    /// neither its space nor its writes.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        if self.preallocated {
            self.write_zeroes(offset, len)
        } else {
            self.trim(offset, len)
        }
    }

    /// The blocks (of `block` bytes) from `offset` on that hold no data,
    /// counted up to the next data or the end of the volume: `Some(n)` when
    /// the `len` bytes at `offset` are all in a hole (so `n` covers them),
    /// `None` when some hold data or the volume cannot tell (a block
    /// device). See [`Volume::next_data`].
    pub fn hole_blocks(
        &self,
        offset: u64,
        len: u64,
        block: u64,
    ) -> Result<Option<u64>, StoreError> {
        if self.kind == VolumeKind::BlockDevice || block == 0 {
            return Ok(None);
        }
        let end = match self.next_data(offset)? {
            None => self.size,
            Some((start, _)) => start,
        };
        Ok((end >= offset.saturating_add(len)).then(|| (end - offset) / block))
    }

    /// Refuse when latched or out of range.
    fn check(&self, op: &'static str, offset: u64, len: u64) -> Result<(), StoreError> {
        if let Some(first) = self.failed.get() {
            return Err(StoreError::PreviousIo {
                what: WHAT,
                path: self.path.clone(),
                first: first.clone(),
            });
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(StoreError::OutOfRange {
                path: self.path.clone(),
                op,
                offset,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Turn an I/O result into ours, latching on error.
    fn latch(&self, r: io::Result<()>, op: impl FnOnce() -> String) -> Result<(), StoreError> {
        r.map_err(|source| {
            let err = io_err(&self.path, op(), source);
            let _ = self.failed.set(err.to_string());
            err
        })
    }

    fn write_dsync(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        if !self.no_dsync.load(Ordering::Relaxed) {
            while !buf.is_empty() {
                let iov = libc::iovec {
                    iov_base: buf.as_ptr() as *mut libc::c_void,
                    iov_len: buf.len(),
                };
                // SAFETY: `iov` points at `buf`, which is live and at least
                // `iov_len` bytes long for the duration of the call; the
                // kernel only reads from it. The fd is owned by `self.file`
                // and open. `offset` fits in off_t (checked against the
                // volume size, which came from a file/device length).
                let n = unsafe {
                    libc::pwritev2(
                        self.file.as_raw_fd(),
                        &iov,
                        1,
                        offset as libc::off_t,
                        libc::RWF_DSYNC,
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EINTR) => continue,
                        Some(libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                            self.no_dsync.store(true, Ordering::Relaxed);
                            break;
                        }
                        _ => return Err(e),
                    }
                }
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                buf = &buf[n as usize..];
                offset += n as u64;
            }
            if buf.is_empty() {
                return Ok(());
            }
        }
        self.file.write_all_at(buf, offset)?;
        self.file.sync_data()
    }

    fn fallocate_or_zero(
        &self,
        unsupported: &AtomicBool,
        mode: libc::c_int,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if !unsupported.load(Ordering::Relaxed) {
            match fallocate(&self.file, mode, offset, len) {
                Ok(()) => return Ok(()),
                // Filesystem or device cannot do it (or this range is not
                // aligned for a device): write zeroes instead.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) => {
                    unsupported.store(true, Ordering::Relaxed);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Extend `file` from `from` to `to` bytes with the new range allocated;
/// sparse (`set_len`) where the filesystem cannot allocate ahead.
fn preallocate(file: &File, from: u64, to: u64) -> io::Result<()> {
    match fallocate(file, 0, from, to - from) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) => {
            file.set_len(to)
        }
        Err(e) => {
            // Give back whatever part was allocated (best effort).
            let _ = file.set_len(from);
            Err(e)
        }
    }
}

/// `lseek(2)` with `whence` (`SEEK_DATA` / `SEEK_HOLE`). Does not move any
/// shared position that matters: all volume I/O is positioned.
pub(crate) fn lseek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: plain syscall on an fd `file` owns; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// `fallocate(2)` of `[offset, offset + len)`, retried on EINTR.
fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: plain syscall on an fd `file` owns (open for writing); no
        // memory is passed. Callers keep `offset + len` within the volume
        // size (or its new size), so both fit in off_t.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

fn io_err(path: &Path, op: impl Into<String>, source: io::Error) -> StoreError {
    StoreError::Io {
        what: WHAT,
        path: path.to_path_buf(),
        op: op.into(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file cut short behind the volume's back: `read_vec` across the new
    /// end returns the short read as an error (never uninitialized bytes)
    /// and latches the volume; a read inside it still matched before.
    #[test]
    fn read_vec_short_file_is_an_error_and_latches() {
        let dir = std::env::temp_dir().join(format!("msl-store-vol-short-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("vol");
        let v = Volume::open(&path, 1 << 16).unwrap();
        v.write_at(&[7u8; 8192], 0, false).unwrap();
        assert_eq!(v.read_vec(4096, 4096).unwrap(), vec![7u8; 4096]);
        // 6000 bytes left: a read of 0..8192 gets 6000, then EOF.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(6000)
            .unwrap();
        let e = v.read_vec(0, 8192).unwrap_err();
        assert!(matches!(e, StoreError::Io { .. }), "{e}");
        assert!(v.is_failed());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A new volume file has all its blocks allocated (on a filesystem
    /// that can: the test's temp dir), so a full disk shows at start, and a
    /// shorter existing file is extended with its data kept.
    #[test]
    fn new_file_is_allocated_and_extension_keeps_data() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("msl-store-vol-alloc-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("vol");
        let size = 8u64 << 20;
        let v = Volume::open(&path, size).unwrap();
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.len(), size);
        assert!(m.blocks() * 512 >= size, "{} blocks of 512", m.blocks());
        v.write_at(&[9u8; 4096], 4096, false).unwrap();
        drop(v);
        let v = Volume::open(&path, 2 * size).unwrap();
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.len(), 2 * size);
        assert!(m.blocks() * 512 >= 2 * size, "{} blocks of 512", m.blocks());
        assert_eq!(v.read_vec(4096, 4096).unwrap(), vec![9u8; 4096]);
        assert_eq!(v.read_vec(size + 4096, 4096).unwrap(), vec![0u8; 4096]);
        drop(v);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A volume larger than the filesystem's free space is refused at
    /// open with an error that names the step, instead of failing writes
    /// later.
    #[test]
    fn volume_larger_than_free_space_is_refused_at_open() {
        let dir = std::env::temp_dir().join(format!("msl-store-vol-nospc-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("vol");
        // 1 GiB more than the free space (a sparse file that size would be
        // created without complaint).
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `statvfs` is a plain C struct; all-zero is a valid value.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid NUL-terminated path and `st` a live,
        // writable statvfs for the call to fill.
        let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        assert_eq!(r, 0);
        let free = st.f_bavail as u64 * st.f_frsize as u64;
        let size = (free + (1 << 30)) & !4095;
        let e = Volume::open(&path, size).unwrap_err();
        assert!(e.to_string().contains("extend to"), "{e}");
        // Nothing of it was kept allocated.
        assert!(std::fs::metadata(&path).map_or(0, |m| m.len()) < size);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A real I/O error (EBADF from a read-only descriptor) latches the
    /// volume.
    #[test]
    fn io_error_latches() {
        let dir = std::env::temp_dir().join(format!("msl-store-vol-latch-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("vol");
        drop(Volume::open(&path, 1 << 16).unwrap());
        let mut v = Volume::open(&path, 1 << 16).unwrap();
        v.file = File::open(&path).unwrap(); // read-only: writes fail with EBADF
        let mut buf = [0u8; 512];
        v.read_at(&mut buf, 0).unwrap();
        let e = v.write_at(&[1; 512], 0, false).unwrap_err();
        assert!(matches!(e, StoreError::Io { .. }), "{e}");
        assert!(v.is_failed());
        for e in [
            v.read_at(&mut buf, 0).unwrap_err(),
            v.write_at(&[1; 512], 0, true).unwrap_err(),
            v.flush().unwrap_err(),
            v.trim(0, 512).unwrap_err(),
            v.write_zeroes(0, 512).unwrap_err(),
        ] {
            assert!(matches!(e, StoreError::PreviousIo { .. }), "{e}");
            assert!(e.to_string().contains("earlier error"), "{e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
