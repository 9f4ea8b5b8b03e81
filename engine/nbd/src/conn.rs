//! One NBD connection: the fixed-newstyle handshake, then transmission with
//! a reader thread (parses and validates requests, reads WRITE payloads) and
//! worker threads started on demand (run backend calls and send replies).
//! Several requests are in flight at once; replies go out in completion
//! order, as the protocol allows, combined into one write when several
//! complete together. A request that arrives alone (nothing in flight,
//! nothing more to read) runs on the reader: no hand-off for a client at
//! queue depth 1.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{bounded, Receiver};
use msl_buf::Chunks;

use crate::backend::{Completion, Done};
use crate::counters::Counters;
use crate::proto::*;
use crate::tls::{self, TlsMode, TlsStream};
use crate::{Backend, ServerConfig};

/// Longest option payload accepted; a longer one drops the connection (the
/// spec bounds names and queries at 4096 bytes each).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// A byte stream the server can split into a reader and a writer.
pub trait Socket: Read + Write + Send + Sync + Sized + 'static {
    /// Another handle to the same connection.
    fn clone_socket(&self) -> io::Result<Self>;
    /// Shut both directions down (wakes a blocked reader).
    fn shutdown_both(&self);
    /// Read timeout (None: block forever).
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// Send timeout: a write blocked this long fails (None: block forever).
    /// The default does nothing.
    fn set_send_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        let _ = t;
        Ok(())
    }
    /// Whether more bytes are waiting to be read right now. When it says
    /// no and nothing is in flight, the reader runs the request itself
    /// instead of handing it to a worker (one thread hand-off less for a
    /// client that waits for each reply). The default, true, always hands
    /// off.
    fn input_pending(&self) -> bool {
        true
    }
    /// Poll for input for up to `limit`, yielding the CPU between looks;
    /// true once something is readable. The default does not poll.
    fn poll_input(&self, limit: Duration) -> bool {
        let _ = limit;
        false
    }
}

/// Bytes readable on `fd` now (FIONREAD); errors count as "some".
fn readable_bytes(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the valid pointer.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if r == 0 {
        n.max(0) as usize
    } else {
        1
    }
}

/// Look for readable bytes on `fd` until `limit` passes, giving the CPU to
/// any other runnable thread between looks (`sched_yield`).
fn spin_until_readable(fd: RawFd, limit: Duration) -> bool {
    let start = std::time::Instant::now();
    loop {
        if readable_bytes(fd) > 0 {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
        unsafe {
            libc::sched_yield();
        }
    }
}

/// `TcpStream` and `UnixStream` offer the same calls under the same names.
macro_rules! impl_socket {
    ($($t:ty),*) => {$(
        impl Socket for $t {
            fn clone_socket(&self) -> io::Result<Self> {
                self.try_clone()
            }
            fn shutdown_both(&self) {
                let _ = self.shutdown(Shutdown::Both);
            }
            fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
                self.set_read_timeout(t)
            }
            fn set_send_timeout(&self, t: Option<Duration>) -> io::Result<()> {
                self.set_write_timeout(t)
            }
            fn input_pending(&self) -> bool {
                readable_bytes(self.as_raw_fd()) > 0
            }
            fn poll_input(&self, limit: Duration) -> bool {
                spin_until_readable(self.as_raw_fd(), limit)
            }
        }
    )*};
}
impl_socket!(TcpStream, UnixStream);

/// One export: a name, a backend, its configuration and its counters.
pub struct Export {
    pub name: String,
    pub backend: Arc<dyn Backend>,
    pub cfg: ServerConfig,
    pub counters: Arc<Counters>,
    /// The TLS configuration STARTTLS uses; None answers it
    /// NBD_REP_ERR_POLICY.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Export {
    /// An export without TLS (whatever `cfg.tls` says; see
    /// [`Export::with_tls`]).
    pub fn new(name: String, backend: Arc<dyn Backend>, cfg: ServerConfig) -> Self {
        Self {
            name,
            backend,
            cfg,
            counters: Arc::new(Counters::default()),
            tls: None,
        }
    }

    /// An export with its TLS files loaded from `cfg.tls_dir` when
    /// `cfg.tls` is not `Off`.
    pub fn with_tls(
        name: String,
        backend: Arc<dyn Backend>,
        cfg: ServerConfig,
    ) -> io::Result<Self> {
        let tls = match cfg.tls {
            TlsMode::Off => None,
            _ => Some(tls::load_server_config(&cfg.tls_dir, cfg.tls_verify_peer)?),
        };
        Ok(Self {
            tls,
            ..Self::new(name, backend, cfg)
        })
    }

    fn name_ok(&self, name: &[u8]) -> bool {
        // The empty name selects the default export, which is ours.
        name.is_empty() || name == self.name.as_bytes()
    }

    fn max_request(&self) -> u32 {
        self.cfg.max_request.max(1)
    }

    fn transmission_flags(&self) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH;
        if self.cfg.read_only {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
        }
        if self.backend.can_multi_conn() {
            f |= TFLAG_CAN_MULTI_CONN;
        }
        f
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnEnd {
    /// NBD_CMD_DISC after all in-flight requests were answered.
    Disconnect,
    /// The client closed the socket (or the server was stopped).
    Closed,
    /// NBD_OPT_ABORT during the handshake.
    Aborted,
    /// The handshake failed; the reason is counted in `handshake_failures`.
    HandshakeFailed(String),
    /// A request with a bad magic: the stream cannot be trusted any more.
    BadMagic,
    /// A WRITE longer than the maximum request: its payload is not read.
    OversizedWrite,
    /// A reply could not be sent (the client did not take it within the
    /// write timeout, or the socket failed).
    ReplyFailed,
    /// Nothing in flight and no request for `idle_timeout`.
    IdleTimeout,
}

#[derive(Debug, Clone, Copy)]
struct Negotiated {
    structured: bool,
    meta_alloc: bool,
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}
fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

fn send_rep<W: Write>(w: &mut W, opt: u32, typ: u32, payload: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    w.write_all(&b)
}

/// Parse `u32 len + name` at `at`; returns the name and the offset after it.
fn take_str(data: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let n = be_u32(data.get(at..at + 4)?, 0) as usize;
    let end = at.checked_add(4)?.checked_add(n)?;
    Some((data.get(at + 4..end)?, end))
}

/// Parse an OPT_INFO / OPT_GO payload: the export name and the info requests.
pub fn parse_info(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let (name, at) = take_str(data, 0)?;
    let n = be_u16(data.get(at..at + 2)?, 0) as usize;
    let reqs = data.get(at + 2..)?;
    if reqs.len() != 2 * n {
        return None;
    }
    Some((name, reqs.chunks_exact(2).map(|c| be_u16(c, 0)).collect()))
}

/// Parse an OPT_{LIST,SET}_META_CONTEXT payload: export name and queries.
pub fn parse_meta(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let (name, mut at) = take_str(data, 0)?;
    let n = be_u32(data.get(at..at + 4)?, 0);
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..n {
        let (q, next) = take_str(data, at)?;
        queries.push(q);
        at = next;
    }
    (at == data.len()).then_some((name, queries))
}

/// The connection during the handshake: plain text, or TLS after
/// NBD_OPT_STARTTLS.
enum Chan<S: Socket> {
    Plain(S),
    Tls(TlsStream<S>),
}

impl<S: Socket> Read for Chan<S> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Chan::Plain(s) => s.read(b),
            Chan::Tls(s) => s.read(b),
        }
    }
}

impl<S: Socket> Write for Chan<S> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Chan::Plain(s) => s.write(b),
            Chan::Tls(s) => s.write(b),
        }
    }
    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Chan::Plain(s) => s.write_all(b),
            Chan::Tls(s) => s.write_all(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<S: Socket> Chan<S> {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        let (r, w) = match self {
            Chan::Plain(s) => (s.set_timeout(Some(t)), s.set_send_timeout(Some(t))),
            Chan::Tls(s) => (s.set_timeout(Some(t)), s.set_send_timeout(Some(t))),
        };
        r.and(w)
    }
}

/// Connection phases, as [`ConnCell`] holds them (0: in the handshake).
pub(crate) const PHASE_TRANSMISSION: u8 = 1;
/// Set with either phase once TLS is up.
pub(crate) const PHASE_TLS: u8 = 4;

/// What the server's connection table sees of a connection.
#[derive(Default)]
pub(crate) struct ConnCell {
    pub phase: AtomicU8,
}

enum Hs<S: Socket> {
    Go(Negotiated, Chan<S>),
    End(ConnEnd),
}

/// Parse one option header (`IHAVEOPT`, option, length): the option and its
/// payload length, or why the connection must end.
pub fn parse_option_header(h: &[u8; 16]) -> Result<(u32, u32), &'static str> {
    if be_u64(h, 0) != IHAVEOPT {
        return Err("bad option magic");
    }
    let len = be_u32(h, 12);
    if len > MAX_OPTION_LEN {
        return Err("option payload too long");
    }
    Ok((be_u32(h, 8), len))
}

fn handshake<S: Socket>(s: S, ex: &Export, cell: &ConnCell) -> io::Result<Hs<S>> {
    let c = &ex.counters;
    let fail = |why: &str| Ok(Hs::End(ConnEnd::HandshakeFailed(why.to_string())));
    let mut s = Chan::Plain(s);
    let deadline = Instant::now() + ex.cfg.handshake_timeout;
    s.set_timeouts(ex.cfg.handshake_timeout)?;
    let mut greet = [0u8; 18];
    greet[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    greet[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greet[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greet)?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let cflags = u32::from_be_bytes(cf);
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return fail("unknown client flags");
    }
    let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
    let mut neg = Negotiated {
        structured: false,
        meta_alloc: false,
    };
    let size = ex.backend.size();
    let tflags = ex.transmission_flags();
    let mut options = 0u32;
    // The whole negotiation must finish by the deadline, however many
    // options the client sends.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Counters::inc(&c.handshake_timeouts);
            return fail("handshake deadline passed");
        }
        s.set_timeouts(left)?;
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let (opt, len) = match parse_option_header(&h) {
            Ok(x) => x,
            Err(why) => return fail(why),
        };
        options += 1;
        if options > ex.cfg.max_options.max(1) {
            Counters::inc(&c.too_many_options);
            return fail("too many options");
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        let tls_up = matches!(s, Chan::Tls(_));
        if ex.cfg.tls == TlsMode::Require && !tls_up && opt != OPT_STARTTLS && opt != OPT_ABORT {
            Counters::inc(&c.tls_required_refusals);
            if opt == OPT_EXPORT_NAME {
                // No error reply exists for EXPORT_NAME: close.
                return fail("TLS required");
            }
            send_rep(&mut s, opt, REP_ERR_TLS_REQD, &[])?;
            continue;
        }
        match opt {
            OPT_STARTTLS => {
                let why = match (&ex.tls, tls_up) {
                    (_, true) => Some(REP_ERR_INVALID),
                    (None, _) => Some(REP_ERR_POLICY),
                    _ if !data.is_empty() => Some(REP_ERR_INVALID),
                    _ => None,
                };
                if let Some(rep) = why {
                    Counters::inc(&c.starttls_refused);
                    send_rep(&mut s, opt, rep, &[])?;
                    continue;
                }
                send_rep(&mut s, opt, REP_ACK, &[])?;
                let (Chan::Plain(raw), Some(cfg)) = (s, ex.tls.clone()) else {
                    unreachable!("checked above: plain text and TLS configured");
                };
                match tls::accept(raw, cfg, deadline) {
                    Ok(t) => {
                        Counters::inc(&c.tls_handshakes);
                        cell.phase.fetch_or(PHASE_TLS, Ordering::Relaxed);
                        s = Chan::Tls(t);
                    }
                    Err(e) => {
                        Counters::inc(&c.tls_failures);
                        return fail(&format!("TLS handshake: {e}"));
                    }
                }
                // Nothing negotiated in plain text carries over.
                neg = Negotiated {
                    structured: false,
                    meta_alloc: false,
                };
            }
            OPT_EXPORT_NAME => {
                if !ex.name_ok(&data) {
                    // No error reply exists for EXPORT_NAME: close.
                    return fail("unknown export name");
                }
                let mut b = Vec::with_capacity(10 + 124);
                b.extend_from_slice(&size.to_be_bytes());
                b.extend_from_slice(&tflags.to_be_bytes());
                if !no_zeroes {
                    b.resize(b.len() + 124, 0);
                }
                s.write_all(&b)?;
                return Ok(Hs::Go(neg, s));
            }
            OPT_ABORT => {
                let _ = send_rep(&mut s, opt, REP_ACK, &[]);
                return Ok(Hs::End(ConnEnd::Aborted));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    send_rep(&mut s, opt, REP_ERR_INVALID, &[])?;
                    continue;
                }
                let mut p = (ex.name.len() as u32).to_be_bytes().to_vec();
                p.extend_from_slice(ex.name.as_bytes());
                send_rep(&mut s, opt, REP_SERVER, &p)?;
                send_rep(&mut s, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some((name, reqs)) = parse_info(&data) else {
                    send_rep(&mut s, opt, REP_ERR_INVALID, &[])?;
                    continue;
                };
                if !ex.name_ok(name) {
                    send_rep(&mut s, opt, REP_ERR_UNKNOWN, &[])?;
                    continue;
                }
                let mut p = INFO_EXPORT.to_be_bytes().to_vec();
                p.extend_from_slice(&size.to_be_bytes());
                p.extend_from_slice(&tflags.to_be_bytes());
                send_rep(&mut s, opt, REP_INFO, &p)?;
                if reqs.contains(&INFO_NAME) {
                    let mut p = INFO_NAME.to_be_bytes().to_vec();
                    p.extend_from_slice(ex.name.as_bytes());
                    send_rep(&mut s, opt, REP_INFO, &p)?;
                }
                let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                p.extend_from_slice(&1u32.to_be_bytes());
                p.extend_from_slice(&4096u32.min(ex.max_request()).to_be_bytes());
                p.extend_from_slice(&ex.max_request().to_be_bytes());
                send_rep(&mut s, opt, REP_INFO, &p)?;
                send_rep(&mut s, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Hs::Go(neg, s));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_rep(&mut s, opt, REP_ERR_INVALID, &[])?;
                    continue;
                }
                neg.structured = true;
                send_rep(&mut s, opt, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set && !neg.structured {
                    send_rep(&mut s, opt, REP_ERR_INVALID, &[])?;
                    continue;
                }
                let Some((name, queries)) = parse_meta(&data) else {
                    send_rep(&mut s, opt, REP_ERR_INVALID, &[])?;
                    continue;
                };
                if !ex.name_ok(name) {
                    send_rep(&mut s, opt, REP_ERR_UNKNOWN, &[])?;
                    continue;
                }
                let exact = queries
                    .iter()
                    .any(|q| *q == META_BASE_ALLOCATION.as_bytes());
                let listed = !set && (queries.is_empty() || queries.iter().any(|q| *q == b"base:"));
                if exact || listed {
                    let mut p = META_BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    p.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                    send_rep(&mut s, opt, REP_META_CONTEXT, &p)?;
                }
                if set {
                    neg.meta_alloc = exact;
                }
                send_rep(&mut s, opt, REP_ACK, &[])?;
            }
            // EXTENDED_HEADERS, anything unknown: unsupported, and the
            // client may carry on negotiating.
            _ => {
                Counters::inc(&c.options_unsupported);
                send_rep(&mut s, opt, REP_ERR_UNSUP, &[])?;
            }
        }
    }
}

/// Serve one connection to the end: handshake, then transmission.
pub fn serve_stream<S: Socket>(sock: S, ex: &Export) -> ConnEnd {
    serve_conn(sock, ex, &ConnCell::default())
}

pub(crate) fn serve_conn<S: Socket>(sock: S, ex: &Export, cell: &ConnCell) -> ConnEnd {
    let c = &ex.counters;
    let Ok(killer) = sock.clone_socket() else {
        sock.shutdown_both();
        return ConnEnd::Closed;
    };
    let (neg, chan) = match handshake(sock, ex, cell) {
        Ok(Hs::Go(n, chan)) => (n, chan),
        Ok(Hs::End(e)) => {
            if matches!(e, ConnEnd::HandshakeFailed(_)) {
                Counters::inc(&c.handshake_failures);
            }
            killer.shutdown_both();
            return e;
        }
        Err(e) => {
            Counters::inc(&c.handshake_failures);
            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                Counters::inc(&c.handshake_timeouts);
            }
            killer.shutdown_both();
            return ConnEnd::HandshakeFailed(e.to_string());
        }
    };
    drop(killer);
    Counters::inc(&c.handshakes_completed);
    cell.phase.fetch_or(PHASE_TRANSMISSION, Ordering::Relaxed);
    let end = match chan {
        Chan::Plain(s) => transmission(s, ex, neg),
        Chan::Tls(s) => transmission(s, ex, neg),
    };
    match end {
        ConnEnd::ReplyFailed => Counters::inc(&c.reply_send_failures),
        ConnEnd::IdleTimeout => Counters::inc(&c.idle_timeouts),
        _ => {}
    }
    end
}

/// Bounds the payload bytes held by in-flight requests of one connection.
struct Budget {
    used: Mutex<u64>,
    cv: Condvar,
    cap: u64,
}

impl Budget {
    fn acquire(&self, n: u64) {
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        // A single request larger than the cap still runs, alone.
        while *u > 0 && *u + n > self.cap {
            u = self.cv.wait(u).unwrap_or_else(|e| e.into_inner());
        }
        *u += n;
    }
    fn in_use(&self) -> bool {
        *self.used.lock().unwrap_or_else(|e| e.into_inner()) > 0
    }
    fn release(&self, n: u64) {
        let mut u = self.used.lock().unwrap_or_else(|e| e.into_inner());
        *u -= n;
        self.cv.notify_all();
    }
}

struct Job {
    handle: u64,
    cmd: u16,
    flags: u16,
    off: u64,
    len: u32,
    data: Bytes,
    cost: u64,
}

/// Replies waiting for the thread that is writing (see [`Conn::send`]).
#[derive(Default)]
struct Outbox {
    queued: Vec<u8>,
    writing: bool,
}

/// Bytes queued behind the writing thread beyond which a replier waits its
/// turn instead (bounds the outbox; read replies can be large).
const OUTBOX_MAX: usize = 1 << 20;

struct Conn<'a, S: Socket> {
    ex: &'a Export,
    neg: Negotiated,
    /// Only the thread that set `outbox.writing` uses the socket.
    writer: Mutex<S>,
    outbox: Mutex<Outbox>,
    outbox_cv: Condvar,
    killer: S,
    dead: AtomicBool,
    budget: Budget,
    /// Requests handed to the workers and not yet answered.
    queued: AtomicUsize,
}

impl<S: Socket> Conn<'_, S> {
    fn lock_outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Send one reply. Replies completing together are combined: if
    /// another thread is writing, the reply is appended to the outbox and
    /// that thread sends it with the others in one write, so a burst of
    /// completions (the mirror acknowledges writes in batches) costs one
    /// system call instead of one each, and no replier blocks on the
    /// socket behind another.
    fn send(&self, buf: &[u8]) {
        if self.dead.load(Ordering::Relaxed) {
            return;
        }
        let mut o = self.lock_outbox();
        while o.writing && o.queued.len() + buf.len() > OUTBOX_MAX && !o.queued.is_empty() {
            o = self.outbox_cv.wait(o).unwrap_or_else(|e| e.into_inner());
            if self.dead.load(Ordering::Relaxed) {
                return;
            }
        }
        if o.writing {
            o.queued.extend_from_slice(buf);
            return;
        }
        o.writing = true;
        drop(o);
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut res = w.write_all(buf);
        let mut spare = Vec::new();
        loop {
            let ok = res.is_ok();
            let mut o = self.lock_outbox();
            if o.queued.is_empty() || !ok {
                o.queued.clear();
                o.writing = false;
                drop(o);
                self.outbox_cv.notify_all();
                break;
            }
            std::mem::swap(&mut o.queued, &mut spare);
            drop(o);
            self.outbox_cv.notify_all();
            res = w.write_all(&spare);
            spare.clear();
        }
        if let Err(e) = res {
            if !self.dead.swap(true, Ordering::Relaxed) {
                if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) {
                    Counters::inc(&self.ex.counters.write_timeouts);
                }
                self.killer.shutdown_both();
            }
        }
    }

    /// A reply without payload: success (`errno` 0) or an error.
    fn status_reply(&self, handle: u64, errno: u32) -> ([u8; STRUCTURED_REPLY_LEN + 6], usize) {
        let mut b = [0u8; STRUCTURED_REPLY_LEN + 6];
        let n = if !self.neg.structured {
            simple_header(&mut b, errno, handle);
            SIMPLE_REPLY_LEN
        } else if errno == 0 {
            structured_header(&mut b, REPLY_TYPE_NONE, handle, 0);
            STRUCTURED_REPLY_LEN
        } else {
            structured_header(&mut b, REPLY_TYPE_ERROR, handle, 6);
            b[20..24].copy_from_slice(&errno.to_be_bytes());
            // b[24..26]: message length 0.
            STRUCTURED_REPLY_LEN + 6
        };
        (b, n)
    }

    fn reply_ok(&self, handle: u64) {
        let (b, n) = self.status_reply(handle, 0);
        self.send(&b[..n]);
    }

    fn reply_err(&self, handle: u64, errno: u32) {
        self.ex.counters.count_error(errno);
        let (b, n) = self.status_reply(handle, errno);
        self.send(&b[..n]);
    }

    fn reply_result(&self, handle: u64, r: io::Result<()>) {
        match r {
            Ok(()) => self.reply_ok(handle),
            Err(e) => self.reply_err(handle, errno_of(&e)),
        }
    }

    fn execute(&self, job: Job) {
        let be = &*self.ex.backend;
        let c = &self.ex.counters;
        let fua = job.flags & CMD_FLAG_FUA != 0;
        match job.cmd {
            CMD_READ => {
                let n = job.len as usize;
                if n == 0 {
                    self.reply_ok(job.handle);
                } else if self.neg.structured {
                    let h = STRUCTURED_REPLY_LEN + 8;
                    let mut b = vec![0u8; h + n];
                    match be.read(job.off, &mut b[h..]) {
                        Ok(()) => {
                            structured_header(&mut b, REPLY_TYPE_OFFSET_DATA, job.handle, 8 + n);
                            b[20..28].copy_from_slice(&job.off.to_be_bytes());
                            Counters::add(&c.bytes_read, n as u64);
                            self.send(&b);
                        }
                        Err(e) => self.reply_err(job.handle, errno_of(&e)),
                    }
                } else {
                    let h = SIMPLE_REPLY_LEN;
                    let mut b = vec![0u8; h + n];
                    match be.read(job.off, &mut b[h..]) {
                        Ok(()) => {
                            simple_header(&mut b, 0, job.handle);
                            Counters::add(&c.bytes_read, n as u64);
                            self.send(&b);
                        }
                        Err(e) => self.reply_err(job.handle, errno_of(&e)),
                    }
                }
            }
            CMD_WRITE => {
                let r = be.write(job.off, &job.data, fua);
                if r.is_ok() {
                    Counters::add(&c.bytes_written, job.data.len() as u64);
                }
                self.reply_result(job.handle, r);
            }
            CMD_FLUSH => self.reply_result(job.handle, be.flush()),
            CMD_TRIM | CMD_WRITE_ZEROES => {
                // In pieces, so that no backend call (and no lock it takes)
                // lasts for a whole-volume range; FUA as one flush after.
                let piece = be.range_piece();
                let mut r = in_pieces(job.off, job.len.into(), piece, |o, n| {
                    if job.cmd == CMD_TRIM {
                        be.trim(o, n)
                    } else {
                        be.write_zeroes(o, n, false)
                    }
                });
                if r.is_ok() && fua {
                    r = be.flush();
                }
                self.reply_result(job.handle, r);
            }
            CMD_BLOCK_STATUS => {
                // Everything is reported allocated data: one extent, flags 0.
                let mut b = [0u8; STRUCTURED_REPLY_LEN + 12];
                structured_header(&mut b, REPLY_TYPE_BLOCK_STATUS, job.handle, 12);
                b[20..24].copy_from_slice(&META_BASE_ALLOCATION_ID.to_be_bytes());
                b[24..28].copy_from_slice(&job.len.to_be_bytes());
                self.send(&b);
            }
            _ => self.reply_err(job.handle, EINVAL),
        }
        self.budget.release(job.cost);
    }

    /// Answer asynchronous writes as they complete: every completion that
    /// is already there goes out in one write.
    fn replier(&self, rx: &msl_buf::queue::Receiver<Done>) {
        let mut out = Vec::new();
        let mut batch = VecDeque::new();
        while rx.take(&mut batch) {
            let mut cost = 0;
            while let Some(d) = batch.pop_front() {
                let errno = match &d.result {
                    Ok(()) => {
                        Counters::add(&self.ex.counters.bytes_written, d.len);
                        0
                    }
                    Err(e) => {
                        let errno = errno_of(e);
                        self.ex.counters.count_error(errno);
                        errno
                    }
                };
                let (b, n) = self.status_reply(d.handle, errno);
                out.extend_from_slice(&b[..n]);
                cost += d.cost;
                if batch.is_empty() && out.len() < OUTBOX_MAX {
                    rx.try_take(&mut batch);
                }
            }
            self.send(&out);
            out.clear();
            self.budget.release(cost);
        }
    }

    fn worker(&self, rx: &Receiver<Job>) {
        while let Ok(job) = rx.recv() {
            self.execute(job);
            self.queued.fetch_sub(1, Ordering::Release);
        }
    }
}

/// Call `f` on `[off, off + len)` cut at multiples of `piece` (one call
/// for an empty range, none longer than `piece`), stopping at the first
/// error.
pub fn in_pieces(
    off: u64,
    len: u64,
    piece: u64,
    mut f: impl FnMut(u64, u64) -> io::Result<()>,
) -> io::Result<()> {
    let piece = piece.max(4096);
    let end = off.saturating_add(len);
    if len == 0 {
        return f(off, 0);
    }
    let mut o = off;
    while o < end {
        let next = (o / piece).saturating_add(1).saturating_mul(piece).min(end);
        f(o, next - o)?;
        o = next;
    }
    Ok(())
}

/// A request header, as [`parse_request`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub cmd: u16,
    pub handle: u64,
    pub off: u64,
    pub len: u32,
}

/// Parse a request header; None for a bad magic.
pub fn parse_request(h: &[u8; REQUEST_LEN]) -> Option<Request> {
    (be_u32(h, 0) == REQUEST_MAGIC).then(|| Request {
        flags: be_u16(h, 4),
        cmd: be_u16(h, 6),
        handle: be_u64(h, 8),
        off: be_u64(h, 16),
        len: be_u32(h, 24),
    })
}

fn simple_header(b: &mut [u8], errno: u32, handle: u64) {
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
}

fn structured_header(b: &mut [u8], typ: u16, handle: u64, len: usize) {
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    b[6..8].copy_from_slice(&typ.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&(len as u32).to_be_bytes());
}

/// The error [`read_full`] returns when the read timeout passed before the
/// first byte of a request.
const IDLE: &str = "idle";

/// Read exactly `buf.len()` bytes; `Ok(false)` on a clean EOF before the
/// first byte; the error [`IDLE`] on a timeout before the first byte (a
/// timeout later, mid-request, is an error like any other).
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e)
                if got == 0 && matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
            {
                return Err(io::Error::new(ErrorKind::TimedOut, IDLE))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn transmission<S: Socket>(sock: S, ex: &Export, neg: Negotiated) -> ConnEnd {
    let (writer, killer) = match (sock.clone_socket(), sock.clone_socket()) {
        (Ok(w), Ok(k)) => (w, k),
        _ => {
            sock.shutdown_both();
            return ConnEnd::Closed;
        }
    };
    let max = ex.max_request();
    let _ = writer.set_send_timeout(Some(ex.cfg.write_timeout));
    let _ = sock.set_timeout(ex.cfg.idle_timeout);
    let conn = Conn {
        ex,
        neg,
        writer: Mutex::new(writer),
        outbox: Mutex::new(Outbox::default()),
        outbox_cv: Condvar::new(),
        killer,
        dead: AtomicBool::new(false),
        budget: Budget {
            used: Mutex::new(0),
            cv: Condvar::new(),
            cap: ex.cfg.max_inflight_bytes.max(u64::from(max)),
        },
        queued: AtomicUsize::new(0),
    };
    let workers = ex.cfg.workers_per_connection.max(1);
    let (tx, rx) = bounded::<Job>(ex.cfg.queue_depth.max(1));
    let c = &ex.counters;
    let size = ex.backend.size();
    let ro = ex.cfg.read_only;
    let mut r = BufReader::with_capacity(64 * 1024, sock);
    let mut payloads = Payloads::default();
    let async_writes = ex.backend.async_writes();
    // Not a channel: std's and crossbeam's allocate a block per 31 items.
    let (done_tx, done_rx) = msl_buf::queue::queue::<Done>();
    // A panic below (a bug in a backend or here) must not leave the client
    // waiting on an open socket for replies that will never come: the
    // connection is closed like any other failed one, and the panic message
    // has already gone to stderr.
    let end = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        std::thread::scope(|scope| {
            if async_writes {
                let (conn, done_rx) = (&conn, &done_rx);
                let t = std::thread::Builder::new()
                    .name("nbd-reply".into())
                    .spawn_scoped(scope, move || conn.replier(done_rx));
                if t.is_err() {
                    return ConnEnd::Closed;
                }
            }
            // Workers start on demand: one more whenever every running worker
            // has a request, up to `workers_per_connection`. A queue-depth-1
            // client runs on the reader alone; a deep queue against a backend
            // that blocks (the mirror waits for the peer) gets one thread per
            // request in flight.
            let mut spawned = 0usize;
            let busy_poll = ex.cfg.busy_poll;
            let end = loop {
                let mut h = [0u8; REQUEST_LEN];
                if !busy_poll.is_zero() && r.buffer().is_empty() {
                    Counters::inc(if r.get_ref().poll_input(busy_poll) {
                        &c.busy_poll_hits
                    } else {
                        &c.busy_poll_misses
                    });
                }
                match read_full(&mut r, &mut h) {
                    Ok(true) => {}
                    Err(e)
                        if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
                            && e.to_string() == IDLE =>
                    {
                        if conn.queued.load(Ordering::Acquire) > 0 || conn.budget.in_use() {
                            continue;
                        }
                        break ConnEnd::IdleTimeout;
                    }
                    _ => break ConnEnd::Closed,
                }
                if conn.dead.load(Ordering::Relaxed) {
                    break ConnEnd::ReplyFailed;
                }
                let Some(Request {
                    flags,
                    cmd,
                    handle,
                    off,
                    len,
                }) = parse_request(&h)
                else {
                    Counters::inc(&c.bad_magic);
                    break ConnEnd::BadMagic;
                };
                let bad_flags = flags & !allowed_flags(cmd) != 0;
                let in_range = off.checked_add(len.into()).is_some_and(|e| e <= size);
                let mut job = Job {
                    handle,
                    cmd,
                    flags,
                    off,
                    len,
                    data: Bytes::new(),
                    cost: 0,
                };
                let err = match cmd {
                    CMD_DISC => {
                        Counters::inc(&c.req_disc);
                        break ConnEnd::Disconnect;
                    }
                    CMD_WRITE => {
                        Counters::inc(&c.req_write);
                        if len > max {
                            // Reading up to 4 GiB just to stay in sync is not
                            // worth it: drop the connection (the spec allows it).
                            Counters::inc(&c.oversized_writes);
                            break ConnEnd::OversizedWrite;
                        }
                        job.cost = len.into();
                        conn.budget.acquire(job.cost);
                        // Past the connection's read buffer, into a buffer
                        // that needs no allocation (see `Payloads`).
                        match payloads.read(&mut r, len as usize) {
                            Ok(data) => job.data = data,
                            Err(_) => {
                                conn.budget.release(job.cost);
                                break ConnEnd::Closed;
                            }
                        }
                        write_check(ro, in_range)
                    }
                    CMD_READ => {
                        Counters::inc(&c.req_read);
                        if len > max || !in_range {
                            Some(EINVAL)
                        } else {
                            job.cost = len.into();
                            conn.budget.acquire(job.cost);
                            None
                        }
                    }
                    CMD_FLUSH => {
                        Counters::inc(&c.req_flush);
                        None
                    }
                    CMD_TRIM | CMD_WRITE_ZEROES => {
                        Counters::inc(if cmd == CMD_TRIM {
                            &c.req_trim
                        } else {
                            &c.req_write_zeroes
                        });
                        write_check(ro, in_range)
                    }
                    CMD_BLOCK_STATUS => {
                        Counters::inc(&c.req_block_status);
                        if !(neg.structured && neg.meta_alloc) || len == 0 || !in_range {
                            Some(EINVAL)
                        } else {
                            None
                        }
                    }
                    _ => {
                        Counters::inc(&c.req_unknown);
                        Some(EINVAL)
                    }
                };
                let err = match err {
                    _ if bad_flags && cmd != CMD_DISC => {
                        Counters::inc(&c.bad_flags);
                        Some(EINVAL)
                    }
                    e => e,
                };
                match err {
                    Some(errno) => {
                        let cost = job.cost;
                        drop(job);
                        conn.budget.release(cost);
                        conn.reply_err(handle, errno);
                    }
                    None if async_writes && cmd == CMD_WRITE => {
                        // Answered by the reply thread when the backend is done.
                        let data = std::mem::take(&mut job.data);
                        let done = Completion::new(done_tx.clone(), handle, job.cost, len.into());
                        ex.backend
                            .write_async(off, data, flags & CMD_FLAG_FUA != 0, done);
                    }
                    None => {
                        // Nothing in flight and nothing more to read: the
                        // client waits for this reply (queue depth 1), so run
                        // it here rather than wake a worker for it.
                        if conn.queued.load(Ordering::Acquire) == 0
                            && r.buffer().is_empty()
                            && !r.get_ref().input_pending()
                        {
                            conn.execute(job);
                            continue;
                        }
                        let busy = conn.queued.fetch_add(1, Ordering::AcqRel);
                        if busy >= spawned && spawned < workers {
                            let rx = &rx;
                            let conn = &conn;
                            let t = std::thread::Builder::new()
                                .name("nbd-worker".into())
                                .spawn_scoped(scope, move || conn.worker(rx));
                            if t.is_ok() {
                                spawned += 1;
                            }
                        }
                        if spawned == 0 {
                            // No thread could be started: serve it here.
                            conn.execute(job);
                            conn.queued.fetch_sub(1, Ordering::AcqRel);
                            continue;
                        }
                        if tx.send(job).is_err() {
                            break ConnEnd::Closed;
                        }
                    }
                }
            };
            // Let the workers and the reply thread drain what is in flight,
            // then close.
            drop(tx);
            drop(done_tx);
            end
        })
    }))
    .unwrap_or(ConnEnd::Closed);
    r.get_ref().shutdown_both();
    if conn.dead.load(Ordering::Relaxed) && end == ConnEnd::Closed {
        return ConnEnd::ReplyFailed;
    }
    end
}

/// Where write payloads are read into. A payload of at most
/// [`Payloads::SMALL`] bytes is a buffer cut from a few chunks reused in
/// turn (`msl_buf::Chunks`): no allocation per write while less than the
/// ring's bytes are in flight. A connection keeps its chunks while it is
/// open. A larger payload gets a buffer of its own, read into without
/// zeroing it first.
struct Payloads {
    chunks: Chunks,
}

impl Default for Payloads {
    fn default() -> Self {
        Payloads {
            chunks: Chunks::for_blocks(),
        }
    }
}

impl Payloads {
    const SMALL: usize = 64 * 1024;

    /// A request's `len` payload bytes from `r` (see [`read_payload`]).
    fn read<R: Read>(&mut self, r: &mut BufReader<R>, len: usize) -> io::Result<Bytes> {
        if len > Self::SMALL {
            let mut data = Vec::with_capacity(len);
            read_payload(r, &mut data, len)?;
            return Ok(Bytes::from(data));
        }
        let mut buf = self.chunks.take(len);
        let have = r.buffer().len().min(len);
        buf.extend_from_slice(&r.buffer()[..have]);
        r.consume(have);
        buf.resize(len, 0);
        r.get_mut().read_exact(&mut buf[have..])?;
        Ok(buf.freeze())
    }
}

/// Read a request's `len` payload bytes onto the end of `data`: what the
/// connection's reader has already buffered (copied), then the rest
/// straight from the socket into `data`, so the payload is not copied
/// through the read buffer; a following request stays buffered. Fails
/// (UnexpectedEof) if the stream ends first.
fn read_payload<R: Read>(r: &mut BufReader<R>, data: &mut Vec<u8>, len: usize) -> io::Result<()> {
    let have = r.buffer().len().min(len);
    data.extend_from_slice(&r.buffer()[..have]);
    r.consume(have);
    let rest = (len - have) as u64;
    if rest > 0 && r.get_mut().take(rest).read_to_end(data)? as u64 != rest {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// The error a write-type command (WRITE, TRIM, WRITE_ZEROES) gets before it
/// runs: EPERM on a read-only export, ENOSPC past the end.
fn write_check(read_only: bool, in_range: bool) -> Option<u32> {
    if read_only {
        Some(EPERM)
    } else if !in_range {
        Some(ENOSPC)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that arrives in `chunks` (a read returns at most the rest
    /// of the current one, like packets), recording the size of every
    /// buffer it is offered.
    struct Packets {
        chunks: Vec<Vec<u8>>,
        offered: Vec<usize>,
    }

    impl Read for Packets {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.offered.push(buf.len());
            let Some(c) = self.chunks.first_mut() else {
                return Ok(0);
            };
            let n = buf.len().min(c.len());
            buf[..n].copy_from_slice(&c[..n]);
            c.drain(..n);
            if c.is_empty() {
                self.chunks.remove(0);
            }
            Ok(n)
        }
    }

    fn packets(chunks: &[&[u8]]) -> Packets {
        Packets {
            chunks: chunks.iter().map(|c| c.to_vec()).collect(),
            offered: Vec::new(),
        }
    }

    /// A write's payload is read from the socket into its own buffer, not
    /// through the connection's read buffer, whether the reader buffered
    /// none, some or all of it; the next request's bytes stay buffered.
    #[test]
    fn test_payload_read_past_the_buffer_keeps_the_next_request() {
        const CAP: usize = 64 * 1024;
        let header = [0x11u8; 28];
        let payload: Vec<u8> = (0..60_000u32).map(|i| (i * 7) as u8).collect();
        let next = b"NEXT-REQUEST";

        // The header arrives alone, then the payload: the payload's reads
        // are offered the write's own buffer (60000 bytes in all), not the
        // read buffer (CAP) to be copied out of.
        let mut r = BufReader::with_capacity(CAP, packets(&[&header, &payload, next]));
        let mut h = [0u8; 28];
        r.read_exact(&mut h).unwrap();
        let mut data = Vec::with_capacity(payload.len());
        read_payload(&mut r, &mut data, payload.len()).unwrap();
        assert_eq!(data, payload);
        let offered = &r.get_ref().offered;
        assert_eq!(offered[0], CAP, "the header fills the read buffer");
        assert_eq!(offered[1..].iter().sum::<usize>(), payload.len());
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, next);

        // Header, part of the payload and the next request in one chunk
        // or many: the same bytes come out.
        let mut stream = header.to_vec();
        stream.extend_from_slice(&payload);
        stream.extend_from_slice(next);
        for split in [1usize, 100, 4096, 50_000, stream.len()] {
            let chunks: Vec<&[u8]> = stream.chunks(split).collect();
            let mut r = BufReader::with_capacity(CAP, packets(&chunks));
            r.read_exact(&mut h).unwrap();
            let mut data = Vec::new();
            read_payload(&mut r, &mut data, payload.len()).unwrap();
            assert_eq!(data, payload, "chunks of {split}");
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).unwrap();
            assert_eq!(rest, next, "chunks of {split}");
        }

        // A stream that ends inside the payload fails.
        let mut r = BufReader::new(&payload[..100]);
        let mut data = Vec::new();
        let e = read_payload(&mut r, &mut data, 200).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnexpectedEof);
    }

    /// Small payloads are cut from chunks that are reused in place once
    /// they are gone (no allocation per write), a payload still held keeps
    /// its bytes while later ones are read, and a large one is read whole.
    #[test]
    fn test_small_payloads_reuse_their_chunk_and_keep_held_bytes() {
        const N: usize = Chunks::BLOCK_CHUNK / 4096 * 3;
        let block = |i: usize| vec![(i % 251) as u8 + 1; 4096];
        let mut stream = Vec::new();
        for i in 0..N {
            stream.extend_from_slice(&block(i));
        }
        let big: Vec<u8> = (0..Payloads::SMALL * 2).map(|i| (i % 253) as u8).collect();
        stream.extend_from_slice(&big);
        let mut r = BufReader::with_capacity(64 * 1024, packets(&[&stream]));
        let mut p = Payloads::default();

        let held = p.read(&mut r, 4096).unwrap();
        assert_eq!(&held[..], &block(0)[..]);
        let mut starts = Vec::new();
        for i in 1..N {
            let b = p.read(&mut r, 4096).unwrap();
            assert_eq!(&b[..], &block(i)[..], "payload {i}");
            starts.push(b.as_ptr() as usize);
        }
        // Every payload read while `held` lives, and it kept its bytes.
        assert_eq!(&held[..], &block(0)[..]);
        let per_chunk = Chunks::BLOCK_CHUNK / 4096;
        // Within a chunk the payloads follow each other: one chunk, not
        // one buffer each.
        assert!(starts[..per_chunk - 1]
            .windows(2)
            .all(|w| w[1] == w[0] + 4096));
        // After `held`'s chunk, the next chunk is reused in place: its
        // payloads were all dropped by then.
        let second = starts[per_chunk - 1];
        assert_eq!(starts[2 * per_chunk - 1], second, "the chunk is reused");
        assert_eq!(p.chunks.allocations(), 2, "held's chunk and one more");

        let b = p.read(&mut r, big.len()).unwrap();
        assert_eq!(&b[..], &big[..]);
    }
}
