//! The fuzz targets' bodies (`fuzz/fuzz_targets/nbd_*.rs`), shared with the
//! stable test suite (`tests/parsers.rs` runs them under proptest and over
//! the seeds below). They panic only on a real bug: a parser that accepts
//! bytes it does not re-encode to the same bytes, or a connection that
//! panics, hangs or answers an unknown request with anything but an error.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::conn::{parse_info, parse_meta, parse_option_header, parse_request, Socket};
use crate::proto::*;
use crate::{serve_stream, Backend, Export, ServerConfig};

/// Feed `data` to every parser; what one accepts must re-encode to the
/// same bytes.
pub fn fuzz_parsers(data: &[u8]) {
    if let Ok(h) = <[u8; 16]>::try_from(data.get(..16).unwrap_or(&[])) {
        if let Ok((opt, len)) = parse_option_header(&h) {
            assert!(len <= crate::MAX_OPTION_LEN);
            assert_eq!(opt.to_be_bytes(), h[8..12]);
        }
    }
    if let Ok(h) = <[u8; REQUEST_LEN]>::try_from(data.get(..REQUEST_LEN).unwrap_or(&[])) {
        if let Some(r) = parse_request(&h) {
            let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&r.flags.to_be_bytes());
            b.extend_from_slice(&r.cmd.to_be_bytes());
            b.extend_from_slice(&r.handle.to_be_bytes());
            b.extend_from_slice(&r.off.to_be_bytes());
            b.extend_from_slice(&r.len.to_be_bytes());
            assert_eq!(b, h);
        }
    }
    if let Some((name, reqs)) = parse_info(data) {
        let mut b = (name.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(name);
        b.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            b.extend_from_slice(&r.to_be_bytes());
        }
        assert_eq!(b, data);
    }
    if let Some((name, queries)) = parse_meta(data) {
        let mut b = (name.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(name);
        b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            b.extend_from_slice(&(q.len() as u32).to_be_bytes());
            b.extend_from_slice(q);
        }
        assert_eq!(b, data);
    }
}

/// A connection whose client bytes are `data` (then EOF) and whose replies
/// are kept.
#[derive(Clone)]
struct MemSock {
    input: Arc<Mutex<(Vec<u8>, usize)>>,
    output: Arc<Mutex<Vec<u8>>>,
    closed: Arc<AtomicBool>,
}

impl Read for MemSock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.closed.load(Ordering::Relaxed) {
            return Ok(0);
        }
        let mut g = self.input.lock().unwrap_or_else(|e| e.into_inner());
        let (data, at) = &mut *g;
        let n = buf.len().min(data.len() - *at);
        buf[..n].copy_from_slice(&data[*at..*at + n]);
        *at += n;
        Ok(n)
    }
}

impl Write for MemSock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let mut o = self.output.lock().unwrap_or_else(|e| e.into_inner());
        // Replies are bounded by the requests; keep at most 1 MiB.
        if o.len() < 1 << 20 {
            let room = (1 << 20) - o.len();
            o.extend_from_slice(&buf[..buf.len().min(room)]);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Socket for MemSock {
    fn clone_socket(&self) -> io::Result<Self> {
        Ok(self.clone())
    }
    fn shutdown_both(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }
    fn set_timeout(&self, _t: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
}

/// 1 MiB in memory, counting the bytes it was asked to touch.
struct Mem {
    data: Mutex<Vec<u8>>,
    touched: AtomicU64,
}

impl Backend for Mem {
    fn size(&self) -> u64 {
        1 << 20
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, off: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        d[off as usize..off as usize + data.len()].copy_from_slice(data);
        self.touched.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        assert!(off + len <= self.size() && len <= self.range_piece());
        Ok(())
    }
    fn write_zeroes(&self, off: u64, len: u64, _fua: bool) -> io::Result<()> {
        assert!(len <= self.range_piece());
        let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
        d[off as usize..(off + len) as usize].fill(0);
        Ok(())
    }
    fn range_piece(&self) -> u64 {
        64 * 1024
    }
}

/// Serve one whole connection (handshake and transmission) whose client
/// sends `data`; returns the server's bytes. Every backend call must stay
/// inside the export and every piece of a zero or trim within the piece
/// size (the backend asserts both).
pub fn fuzz_session(data: &[u8]) -> Vec<u8> {
    let sock = MemSock {
        input: Arc::new(Mutex::new((data.to_vec(), 0))),
        output: Arc::default(),
        closed: Arc::default(),
    };
    let out = sock.output.clone();
    let backend = Arc::new(Mem {
        data: Mutex::new(vec![0; 1 << 20]),
        touched: AtomicU64::new(0),
    });
    let cfg = ServerConfig {
        max_request: 64 * 1024,
        max_inflight_bytes: 256 * 1024,
        workers_per_connection: 2,
        queue_depth: 4,
        ..Default::default()
    };
    let ex = Export::new("fuzz".into(), backend, cfg);
    let _ = serve_stream(sock, &ex);
    let o = out.lock().unwrap_or_else(|e| e.into_inner());
    o.clone()
}

/// Seeds: a client that negotiates (STRUCTURED_REPLY, SET_META_CONTEXT, GO)
/// and sends one request of each command, and option payloads.
pub fn seeds() -> Vec<Vec<u8>> {
    fn opt(b: &mut Vec<u8>, o: u32, p: &[u8]) {
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(p.len() as u32).to_be_bytes());
        b.extend_from_slice(p);
    }
    fn req(b: &mut Vec<u8>, flags: u16, cmd: u16, off: u64, len: u32, payload: &[u8]) {
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&7u64.to_be_bytes());
        b.extend_from_slice(&off.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
    }
    let info = [0, 0, 0, 4, b'f', b'u', b'z', b'z', 0, 1, 0, 3];
    let meta = [
        &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15][..],
        META_BASE_ALLOCATION.as_bytes(),
    ]
    .concat();
    let mut s = 3u32.to_be_bytes().to_vec();
    opt(&mut s, OPT_LIST, &[]);
    opt(&mut s, OPT_STRUCTURED_REPLY, &[]);
    opt(&mut s, OPT_SET_META_CONTEXT, &meta);
    opt(&mut s, OPT_GO, &info);
    req(&mut s, CMD_FLAG_FUA, CMD_WRITE, 100, 8, b"abcdefgh");
    req(&mut s, 0, CMD_READ, 96, 16, &[]);
    req(&mut s, CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 1, 200_000, &[]);
    req(&mut s, 0, CMD_TRIM, 3, 300_000, &[]);
    req(&mut s, CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0, 4096, &[]);
    req(&mut s, 0, CMD_FLUSH, 0, 0, &[]);
    req(&mut s, 0, CMD_DISC, 0, 0, &[]);
    let mut plain = 3u32.to_be_bytes().to_vec();
    opt(&mut plain, OPT_EXPORT_NAME, b"fuzz");
    req(&mut plain, 0, CMD_READ, 0, 512, &[]);
    vec![s, plain, info.to_vec(), meta]
}
