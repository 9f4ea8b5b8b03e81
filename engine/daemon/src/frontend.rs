//! The NBD front end's backend: the mirrored volume.
//!
//! Reads come straight from the local volume while this node serves (the
//! primary's volume holds every acknowledged write). Writes, trims and
//! write-zeroes go through the protocol core, which acknowledges them only
//! when they are written locally AND on the peer (sync mode) or marked dirty
//! (degraded). Aligned writes are asynchronous: the core answers the NBD
//! connection's reply thread directly. Requests not aligned to the block
//! size are done as read-modify-write of whole blocks, under a lock that
//! keeps other writes out, once the asynchronous writes in flight are done
//! (the merge must read their data).

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use msl_core::node::{ClientError, IoKind};
use msl_nbd::{Backend, Bytes, Completion};
use msl_store::Volume;

use crate::client::Client;
use crate::driver::writes_here;
use crate::input::{nbd_error, Block, Release, Reply, ReplyTo, Ticket};

/// Core writes submitted asynchronously and not yet answered, at most
/// [`MAX_WRITES_IN_FLIGHT`]: a client that queues deeper waits on its
/// connection's reader. Without the bound, writes would pile up in the
/// core's input queue (up to its 16384 entries) ahead of the peer's
/// heartbeats, and past the core's own limit be refused as busy.
#[derive(Default)]
struct InFlight {
    /// (writes in flight, threads waiting for a change)
    state: Mutex<(usize, usize)>,
    changed: Condvar,
}

/// Core writes (pieces) in flight from the NBD front end.
const MAX_WRITES_IN_FLIGHT: usize = 512;

/// Longest a client request waits for a node's post-stall hold to end (the
/// hold lasts one dead interval: 400 ms with the default tunables); after
/// it the request is refused as on a node that does not serve.
const HOLD_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// Bytes per core write when a client write is split so that its pieces
/// pipeline across the link (a multiple of every supported block size).
const PIPELINE_PIECE: u64 = 128 * 1024;

/// The pieces of `0..len` a large write goes in: `piece` bytes each, the
/// last one shorter when `len` is not a multiple of it.
fn pieces(len: usize, piece: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..len)
        .step_by(piece.max(1))
        .map(move |start| start..(start + piece).min(len))
}

/// The pieces of one client write in flight: the client is answered when
/// the last is done, with the first error if any. If pieces are dropped
/// unanswered (the core stopped), dropping the joint answers EIO.
struct Joint {
    left: AtomicUsize,
    failed: Mutex<Option<ClientError>>,
    done: Mutex<Option<Completion>>,
    _guard: Ticket,
}

impl Joint {
    fn piece_done(&self, r: Reply) {
        if let Err(e) = r {
            self.failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(e);
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let failed = self.failed.lock().unwrap_or_else(|e| e.into_inner()).take();
            let done = self.done.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(done) = done {
                done.complete(failed.map_or(Ok(()), |e| Err(nbd_error(e))));
            }
        }
    }
}

impl Release for InFlight {
    fn release(&self, k: usize) {
        let mut s = self.lock();
        s.0 -= k;
        if s.1 > 0 {
            self.changed.notify_all();
        }
    }
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, usize)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Count `k` writes until the returned guard drops (answered, or
    /// dropped unanswered when the core is gone); waits for room first.
    fn enter(self: &Arc<Self>, k: usize) -> Ticket {
        let mut s = self.lock();
        while s.0 > 0 && s.0 + k > MAX_WRITES_IN_FLIGHT {
            s.1 += 1;
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            s.1 -= 1;
        }
        s.0 += k;
        Ticket::new(self.clone(), k)
    }
    fn wait_idle(&self) {
        let mut s = self.lock();
        while s.0 > 0 {
            s.1 += 1;
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            s.1 -= 1;
        }
    }
}

/// A [`Backend`] over the mirroring core.
pub struct MirrorBackend {
    client: Client,
    volume: Arc<Volume>,
    /// Largest write handed to the core at once (a multiple of the block
    /// size; bounded so one mirrored message fits the fragment limit).
    max_write_bytes: u64,
    rmw: RwLock<()>,
    in_flight: Arc<InFlight>,
}

impl MirrorBackend {
    /// Queue a large write's pieces, all answering `joint`.
    fn submit_pieces(&self, off: u64, data: &Bytes, piece: usize, fua: bool, joint: &Arc<Joint>) {
        for range in pieces(data.len(), piece) {
            let j = joint.clone();
            let answer = Box::new(move |r: Reply| j.piece_done(r));
            let at = off + range.start as u64;
            // A piece shares the client's buffer: no copy.
            let block = Block::from(data.slice(range));
            let sent =
                self.client
                    .submit_async(at, block.len() as u64, fua, block, ReplyTo::Call(answer));
            if sent.is_err() {
                // The core is gone: the rest would fail alike. The pieces
                // dropped unanswered drop the joint: EIO to the client.
                break;
            }
        }
    }

    pub fn new(client: Client, volume: Arc<Volume>, max_write_bytes: u64) -> Self {
        let bs = client.block_size;
        let max_write_bytes = (max_write_bytes / bs).max(1) * bs;
        MirrorBackend {
            client,
            volume,
            max_write_bytes,
            rmw: RwLock::new(()),
            in_flight: Arc::default(),
        }
    }

    fn serving(&self) -> io::Result<()> {
        use Ordering::Relaxed;
        let shared = &self.client.shared;
        // After a stall the node holds I/O for one dead interval: wait
        // rather than fail the client.
        let t = std::time::Instant::now();
        while shared.holding.load(Relaxed) && t.elapsed() < HOLD_WAIT_MAX {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if shared.serving.load(Relaxed) {
            Ok(())
        } else {
            Err(nbd_error(ClientError::NotPrimary))
        }
    }

    /// Aligned blocks, split into core-sized pieces.
    fn submit_aligned(
        &self,
        off: u64,
        len: u64,
        kind: IoKind,
        data: Option<&[u8]>,
        fua: bool,
    ) -> Reply {
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(self.max_write_bytes);
            let piece = data.map(|d| &d[done as usize..(done + n) as usize]);
            self.client.submit(off + done, n, kind, fua, piece)?;
            done += n;
        }
        Ok(())
    }

    fn write_any(
        &self,
        off: u64,
        len: u64,
        kind: IoKind,
        data: Option<&[u8]>,
        fua: bool,
    ) -> io::Result<()> {
        self.serving()?;
        let bs = self.client.block_size;
        if off.is_multiple_of(bs) && len.is_multiple_of(bs) {
            let _g = self
                .rmw
                .read()
                .map_err(|_| io::Error::other("lock poisoned"))?;
            return self
                .submit_aligned(off, len, kind, data, fua)
                .map_err(nbd_error);
        }
        // Read-modify-write of the covering blocks.
        let _g = self
            .rmw
            .write()
            .map_err(|_| io::Error::other("lock poisoned"))?;
        self.in_flight.wait_idle();
        let first = off / bs * bs;
        let end = (off + len).div_ceil(bs) * bs;
        let mut buf = vec![0u8; (end - first) as usize];
        self.volume
            .read_at(&mut buf, first)
            .map_err(io::Error::other)?;
        let at = (off - first) as usize;
        match data {
            Some(d) => buf[at..at + d.len()].copy_from_slice(d),
            None => buf[at..at + len as usize].fill(0),
        }
        self.submit_aligned(first, end - first, IoKind::Write, Some(&buf), fua)
            .map_err(nbd_error)
    }
}

impl Backend for MirrorBackend {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.serving()?;
        self.volume.read_at(buf, off).map_err(io::Error::other)
    }

    fn write(&self, off: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.write_any(off, data.len() as u64, IoKind::Write, Some(data), fua)
    }

    fn async_writes(&self) -> bool {
        true
    }

    fn write_async(&self, off: u64, data: Bytes, fua: bool, done: Completion) {
        let len = data.len() as u64;
        let bs = self.client.block_size;
        if !(off.is_multiple_of(bs) && len.is_multiple_of(bs) && len > 0) {
            // Unaligned (read-modify-write): rare; done here.
            return done.complete(self.write(off, &data, fua));
        }
        if let Err(e) = self.serving() {
            return done.complete(Err(e));
        }
        let Ok(_g) = self.rmw.read() else {
            return done.complete(Err(io::Error::other("lock poisoned")));
        };
        let piece = PIPELINE_PIECE.min(self.max_write_bytes).max(bs);
        let guard = self.in_flight.enter(len.div_ceil(piece) as usize);
        if len <= piece {
            // If the core is gone the answer is dropped unanswered: its
            // Completion answers EIO and its ticket leaves the count.
            writes_here(&self.client.inputs, || {
                self.client.submit_async(
                    off,
                    len,
                    fua,
                    Block::from(data),
                    ReplyTo::Nbd(done, guard),
                )
            })
            .ok();
            return;
        }
        // A large write goes in pieces that are all in flight at once, so
        // the peer verifies and writes the first while later ones are
        // still being framed and sent (one 1 MiB message waited for all
        // of its frames at each hop).
        let joint = Arc::new(Joint {
            left: AtomicUsize::new(len.div_ceil(piece) as usize),
            failed: Mutex::new(None),
            done: Mutex::new(Some(done)),
            _guard: guard,
        });
        let piece = piece as usize;
        writes_here(&self.client.inputs, || {
            self.submit_pieces(off, &data, piece, fua, &joint)
        });
    }

    fn flush(&self) -> io::Result<()> {
        self.serving()?;
        self.client.flush().map_err(nbd_error)
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        let bs = self.client.block_size;
        // Trim is advisory: only whole blocks inside the range are trimmed.
        let first = off.div_ceil(bs) * bs;
        let end = (off + len) / bs * bs;
        if end <= first {
            return self.serving();
        }
        self.write_any(first, end - first, IoKind::Trim, None, false)
    }

    fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        self.write_any(off, len, IoKind::Zeroes, None, fua)
    }

    /// The core orders every write and a FLUSH covers all acknowledged
    /// writes, from any connection.
    fn can_multi_conn(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::pieces;

    #[test]
    fn test_pieces_cover_a_write_exactly_with_a_short_last_piece() {
        let got: Vec<_> = pieces(320 * 1024, 128 * 1024).collect();
        assert_eq!(got, vec![0..131072, 131072..262144, 262144..327680]);
        let got: Vec<_> = pieces(256 * 1024, 128 * 1024).collect();
        assert_eq!(got, vec![0..131072, 131072..262144]);
        assert_eq!(pieces(4096, 128 * 1024).collect::<Vec<_>>(), vec![0..4096]);
    }
}
