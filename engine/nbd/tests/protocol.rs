//! Handshake, option parsing and request validation over an in-memory
//! stream (a Unix socket pair), with a hand-rolled client sending both
//! well-formed and hostile input.

mod common;

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use msl_nbd::proto::*;
use msl_nbd::{serve_stream, Backend, ConnEnd, Export, Server, ServerConfig};

const SIZE: u64 = 1 << 20;

/// In-memory backend; `fail` makes every call return EIO.
struct Mem {
    data: Mutex<Vec<u8>>,
    fail: AtomicBool,
}

impl Mem {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            data: Mutex::new(vec![0; SIZE as usize]),
            fail: AtomicBool::new(false),
        })
    }
    fn check(&self) -> io::Result<()> {
        if self.fail.load(Ordering::Relaxed) {
            Err(io::Error::from_raw_os_error(libc_eio()))
        } else {
            Ok(())
        }
    }
}

fn libc_eio() -> i32 {
    5
}

impl Backend for Mem {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check()?;
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, off: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        self.check()?;
        self.data.lock().unwrap()[off as usize..off as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        self.check()
    }
    fn trim(&self, _off: u64, _len: u64) -> io::Result<()> {
        self.check()
    }
    fn write_zeroes(&self, off: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.check()?;
        self.data.lock().unwrap()[off as usize..(off + len) as usize].fill(0);
        Ok(())
    }
}

struct Conn {
    c: UnixStream,
    end: mpsc::Receiver<ConnEnd>,
    export: Arc<Export>,
    mem: Arc<Mem>,
}

fn small_cfg() -> ServerConfig {
    ServerConfig {
        max_request: 64 * 1024,
        ..Default::default()
    }
}

fn start(cfg: ServerConfig) -> Conn {
    let mem = Mem::new();
    let export = Arc::new(Export::new("msl".into(), mem.clone(), cfg));
    let (c, s) = UnixStream::pair().unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let (tx, end) = mpsc::channel();
    let ex = export.clone();
    std::thread::spawn(move || {
        let _ = tx.send(serve_stream(s, &ex));
    });
    Conn {
        c,
        end,
        export,
        mem,
    }
}

impl Conn {
    fn rd(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.c.read_exact(&mut b).expect("read from server");
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.rd(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.rd(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.rd(8).try_into().unwrap())
    }
    fn greet(&mut self, cflags: u32) {
        assert_eq!(self.u64(), NBDMAGIC);
        assert_eq!(self.u64(), IHAVEOPT);
        assert_eq!(self.u16(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        self.c.write_all(&cflags.to_be_bytes()).unwrap();
    }
    fn opt(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.c.write_all(&b).unwrap();
    }
    /// (option, reply type, payload)
    fn rep(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC);
        let opt = self.u32();
        let typ = self.u32();
        let len = self.u32() as usize;
        (opt, typ, self.rd(len))
    }
    /// OPT_GO for `name`; returns (size, transmission flags).
    fn go(&mut self, name: &str) -> Result<(u64, u16), u32> {
        self.opt(OPT_GO, &info_payload(name, &[INFO_BLOCK_SIZE]));
        let mut got = None;
        loop {
            let (opt, typ, p) = self.rep();
            assert_eq!(opt, OPT_GO);
            match typ {
                REP_ACK => return Ok(got.expect("NBD_INFO_EXPORT before ACK")),
                REP_INFO if u16::from_be_bytes([p[0], p[1]]) == INFO_EXPORT => {
                    assert_eq!(p.len(), 12);
                    let size = u64::from_be_bytes(p[2..10].try_into().unwrap());
                    got = Some((size, u16::from_be_bytes([p[10], p[11]])));
                }
                REP_INFO => {}
                e => return Err(e),
            }
        }
    }
    fn structured(&mut self) {
        self.opt(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(self.rep(), (OPT_STRUCTURED_REPLY, REP_ACK, vec![]));
    }
    fn req(&mut self, flags: u16, cmd: u16, handle: u64, off: u64, len: u32, payload: &[u8]) {
        self.c
            .write_all(&common::request(flags, cmd, handle, off, len, payload))
            .unwrap();
    }
    /// Simple reply: (errno, handle).
    fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC);
        let e = self.u32();
        (e, self.u64())
    }
    /// Structured chunk: (flags, type, handle, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(self.u32(), STRUCTURED_REPLY_MAGIC);
        let f = self.u16();
        let t = self.u16();
        let h = self.u64();
        let n = self.u32() as usize;
        (f, t, h, self.rd(n))
    }
    fn write(&mut self, handle: u64, off: u64, data: &[u8]) {
        self.req(0, CMD_WRITE, handle, off, data.len() as u32, data);
    }
    /// Wait (bounded) for the server side to end, and return why.
    fn end(self) -> ConnEnd {
        drop(self.c);
        self.end
            .recv_timeout(Duration::from_secs(10))
            .expect("server connection did not end")
    }
    fn end_keep(&self) -> ConnEnd {
        self.end
            .recv_timeout(Duration::from_secs(10))
            .expect("server connection did not end")
    }
    fn at_eof(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.c.read(&mut b), Ok(0) | Err(_))
    }
}

fn info_payload(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        p.extend_from_slice(&r.to_be_bytes());
    }
    p
}

fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        p.extend_from_slice(&(q.len() as u32).to_be_bytes());
        p.extend_from_slice(q.as_bytes());
    }
    p
}

const CF: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

#[test]
fn unknown_client_flags_fail_handshake() {
    let mut c = start(small_cfg());
    c.greet(1 << 7);
    let ex = c.export.clone();
    assert!(matches!(c.end(), ConnEnd::HandshakeFailed(_)));
    assert_eq!(ex.counters.snapshot().handshake_failures, 1);
}

#[test]
fn bad_option_magic_disconnects() {
    let mut c = start(small_cfg());
    c.greet(CF);
    c.c.write_all(&[0x55; 16]).unwrap();
    assert!(c.at_eof());
    let ex = c.export.clone();
    assert!(matches!(c.end(), ConnEnd::HandshakeFailed(_)));
    assert_eq!(ex.counters.snapshot().handshake_failures, 1);
}

#[test]
fn huge_option_length_disconnects_without_allocating() {
    let mut c = start(small_cfg());
    c.greet(CF);
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.c.write_all(&b).unwrap();
    let t0 = Instant::now();
    assert!(c.at_eof());
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert!(matches!(c.end(), ConnEnd::HandshakeFailed(_)));
}

#[test]
fn unsupported_and_malformed_options_keep_the_connection() {
    let mut c = start(small_cfg());
    c.greet(CF);
    for opt in [OPT_EXTENDED_HEADERS, 4, 999, 0x7fff_ffff] {
        c.opt(opt, b"junk");
        assert_eq!(c.rep(), (opt, REP_ERR_UNSUP, vec![]));
    }
    // STARTTLS on an export without TLS: refused by policy, negotiation
    // goes on.
    c.opt(OPT_STARTTLS, &[]);
    assert_eq!(c.rep(), (OPT_STARTTLS, REP_ERR_POLICY, vec![]));
    assert_eq!(c.export.counters.snapshot().starttls_refused, 1);
    // Malformed INFO: declared name longer than the payload.
    c.opt(OPT_INFO, &[0, 0, 0, 200, b'm']);
    assert_eq!(c.rep().1, REP_ERR_INVALID);
    // INFO with a trailing byte.
    let mut p = info_payload("msl", &[]);
    p.push(0);
    c.opt(OPT_INFO, &p);
    assert_eq!(c.rep().1, REP_ERR_INVALID);
    // LIST with a payload is invalid; without, it names the export.
    c.opt(OPT_LIST, b"x");
    assert_eq!(c.rep().1, REP_ERR_INVALID);
    c.opt(OPT_LIST, &[]);
    let (_, t, p) = c.rep();
    assert_eq!(t, REP_SERVER);
    assert_eq!(p, [&[0, 0, 0, 3][..], b"msl"].concat());
    assert_eq!(c.rep().1, REP_ACK);
    // Wrong export name.
    assert_eq!(c.go("nope"), Err(REP_ERR_UNKNOWN));
    // SET_META_CONTEXT needs structured replies first.
    c.opt(
        OPT_SET_META_CONTEXT,
        &meta_payload("msl", &["base:allocation"]),
    );
    assert_eq!(c.rep().1, REP_ERR_INVALID);
    // Malformed meta payload: query count larger than present.
    c.opt(OPT_LIST_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 9]);
    assert_eq!(c.rep().1, REP_ERR_INVALID);
    c.opt(OPT_STRUCTURED_REPLY, b"x");
    assert_eq!(c.rep().1, REP_ERR_INVALID);
    // INFO then GO succeed; the empty name is the default export.
    c.opt(OPT_INFO, &info_payload("", &[INFO_NAME, INFO_BLOCK_SIZE]));
    let mut block = None;
    loop {
        let (_, t, p) = c.rep();
        if t == REP_ACK {
            break;
        }
        assert_eq!(t, REP_INFO);
        if u16::from_be_bytes([p[0], p[1]]) == INFO_BLOCK_SIZE {
            let w = |i: usize| u32::from_be_bytes(p[i..i + 4].try_into().unwrap());
            block = Some((w(2), w(6), w(10)));
        }
    }
    assert_eq!(block, Some((1, 4096, 64 * 1024)));
    let (size, flags) = c.go("msl").unwrap();
    assert_eq!(size, SIZE);
    let want = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES;
    assert_eq!(flags, want, "no CAN_MULTI_CONN: the backend did not ask");
    c.req(0, CMD_DISC, 1, 0, 0, &[]);
    let ex = c.export.clone();
    assert_eq!(c.end(), ConnEnd::Disconnect);
    let s = ex.counters.snapshot();
    assert_eq!(s.options_unsupported, 4);
    assert_eq!(s.handshake_failures, 0);
}

#[test]
fn meta_context_list_and_set() {
    let mut c = start(small_cfg());
    c.greet(CF);
    c.structured();
    c.opt(OPT_LIST_META_CONTEXT, &meta_payload("msl", &[]));
    let (_, t, p) = c.rep();
    assert_eq!(t, REP_META_CONTEXT);
    assert_eq!(&p[4..], b"base:allocation");
    assert_eq!(c.rep().1, REP_ACK);
    c.opt(
        OPT_SET_META_CONTEXT,
        &meta_payload("msl", &["qemu:dirty-bitmap:x", "base:allocation"]),
    );
    let (_, t, p) = c.rep();
    assert_eq!(t, REP_META_CONTEXT);
    let id = u32::from_be_bytes(p[..4].try_into().unwrap());
    assert_eq!(c.rep().1, REP_ACK);
    c.go("msl").unwrap();
    c.req(0, CMD_BLOCK_STATUS, 7, 4096, 65536, &[]);
    let (f, t, h, p) = c.chunk();
    assert_eq!((f, t, h), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 7));
    assert_eq!(u32::from_be_bytes(p[..4].try_into().unwrap()), id);
    assert_eq!(&p[4..], &[0, 1, 0, 0, 0, 0, 0, 0]);
    // Out of range block status: EINVAL error chunk.
    c.req(0, CMD_BLOCK_STATUS, 8, SIZE, 1, &[]);
    let (f, t, h, p) = c.chunk();
    assert_eq!((f, t, h), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 8));
    assert_eq!(&p[..4], &EINVAL.to_be_bytes());
    assert_eq!(c.end(), ConnEnd::Closed);
}

#[test]
fn abort_and_export_name() {
    let mut c = start(small_cfg());
    c.greet(CF);
    c.opt(OPT_ABORT, &[]);
    assert_eq!(c.rep(), (OPT_ABORT, REP_ACK, vec![]));
    assert_eq!(c.end(), ConnEnd::Aborted);

    // EXPORT_NAME with an unknown name: closed (no error reply exists).
    let mut c = start(small_cfg());
    c.greet(CF);
    c.opt(OPT_EXPORT_NAME, b"nope");
    assert!(c.at_eof());
    assert!(matches!(c.end(), ConnEnd::HandshakeFailed(_)));

    // Without NO_ZEROES: size, flags and 124 zero bytes.
    let mut c = start(small_cfg());
    c.greet(FLAG_C_FIXED_NEWSTYLE);
    c.opt(OPT_EXPORT_NAME, b"msl");
    assert_eq!(c.u64(), SIZE);
    let _flags = c.u16();
    assert_eq!(c.rd(124), vec![0; 124]);
    c.write(1, 0, b"hello");
    assert_eq!(c.simple(), (0, 1));
    c.req(0, CMD_READ, 2, 0, 5, &[]);
    assert_eq!(c.simple(), (0, 2));
    assert_eq!(c.rd(5), b"hello");
    c.req(0, CMD_DISC, 3, 0, 0, &[]);
    assert_eq!(c.end(), ConnEnd::Disconnect);
}

#[test]
fn simple_replies_and_request_validation() {
    let mut c = start(small_cfg());
    c.greet(CF);
    c.go("msl").unwrap();
    let data = common::pattern(8192, 3);
    c.write(1, 4096, &data);
    assert_eq!(c.simple(), (0, 1));
    c.req(0, CMD_READ, 2, 4096, 8192, &[]);
    assert_eq!(c.simple(), (0, 2));
    assert_eq!(c.rd(8192), data);
    // Read past the end: EINVAL; write past the end: ENOSPC, and the payload
    // is consumed so the stream stays in sync.
    c.req(0, CMD_READ, 3, SIZE - 1, 2, &[]);
    assert_eq!(c.simple(), (EINVAL, 3));
    c.write(4, SIZE - 2, b"abcd");
    assert_eq!(c.simple(), (ENOSPC, 4));
    c.req(0, CMD_READ, 5, u64::MAX - 1, 4, &[]);
    assert_eq!(c.simple(), (EINVAL, 5));
    c.req(0, CMD_TRIM, 6, u64::MAX, 4096, &[]);
    assert_eq!(c.simple(), (ENOSPC, 6));
    c.req(0, CMD_WRITE_ZEROES, 7, SIZE, 1, &[]);
    assert_eq!(c.simple(), (ENOSPC, 7));
    // Read longer than the maximum request: EINVAL, nothing allocated.
    c.req(0, CMD_READ, 8, 0, u32::MAX, &[]);
    assert_eq!(c.simple(), (EINVAL, 8));
    // Unknown commands: EINVAL.
    for (h, cmd) in [(9u64, 42u16), (10, CMD_BLOCK_STATUS), (11, 5), (12, 0xffff)] {
        c.req(0, cmd, h, 0, 0, &[]);
        assert_eq!(c.simple(), (EINVAL, h));
    }
    // Zeroes, trim, flush, FUA write.
    c.req(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 13, 4096, 4096, &[]);
    assert_eq!(c.simple(), (0, 13));
    c.req(0, CMD_TRIM, 14, 8192, 4096, &[]);
    assert_eq!(c.simple(), (0, 14));
    c.req(0, CMD_FLUSH, 15, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 15));
    c.req(CMD_FLAG_FUA, CMD_WRITE, 16, 0, 3, b"fua");
    assert_eq!(c.simple(), (0, 16));
    {
        let d = c.mem.data.lock().unwrap();
        assert_eq!(&d[..3], b"fua");
        assert!(d[4096..8192].iter().all(|&b| b == 0));
        assert_eq!(&d[8192..12288], &data[4096..]);
    }
    // Backend failure: EIO, connection stays up.
    c.mem.fail.store(true, Ordering::Relaxed);
    c.req(0, CMD_READ, 17, 0, 512, &[]);
    assert_eq!(c.simple(), (EIO, 17));
    c.req(0, CMD_FLUSH, 18, 0, 0, &[]);
    assert_eq!(c.simple(), (EIO, 18));
    c.mem.fail.store(false, Ordering::Relaxed);
    // Bad magic: disconnect.
    c.c.write_all(&[0u8; REQUEST_LEN]).unwrap();
    assert!(c.at_eof());
    let ex = c.export.clone();
    assert_eq!(c.end(), ConnEnd::BadMagic);
    let s = ex.counters.snapshot();
    assert_eq!(s.bad_magic, 1);
    assert_eq!(s.err_einval, 7);
    assert_eq!(s.err_enospc, 3);
    assert_eq!(s.err_eio, 2);
    assert_eq!(s.req_unknown, 3);
}

#[test]
fn oversized_write_disconnects() {
    let mut c = start(small_cfg());
    c.greet(CF);
    c.go("msl").unwrap();
    c.req(0, CMD_WRITE, 1, 0, 64 * 1024 + 1, &[]);
    assert!(c.at_eof());
    let ex = c.export.clone();
    assert_eq!(c.end(), ConnEnd::OversizedWrite);
    assert_eq!(ex.counters.snapshot().oversized_writes, 1);
}

#[test]
fn structured_replies() {
    let mut c = start(small_cfg());
    c.greet(CF);
    c.structured();
    c.go("msl").unwrap();
    c.write(1, 100, b"structured");
    assert_eq!(c.chunk(), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, vec![]));
    c.req(0, CMD_READ, 2, 100, 10, &[]);
    let (f, t, h, p) = c.chunk();
    assert_eq!((f, t, h), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 2));
    assert_eq!(&p[..8], &100u64.to_be_bytes());
    assert_eq!(&p[8..], b"structured");
    c.req(0, CMD_READ, 3, SIZE, 1, &[]);
    let (f, t, h, p) = c.chunk();
    assert_eq!((f, t, h), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 3));
    assert_eq!(p, [&EINVAL.to_be_bytes()[..], &[0, 0]].concat());
    // BLOCK_STATUS without a negotiated context: EINVAL.
    c.req(0, CMD_BLOCK_STATUS, 4, 0, 512, &[]);
    let (_, t, h, p) = c.chunk();
    assert_eq!((t, h), (REPLY_TYPE_ERROR, 4));
    assert_eq!(&p[..4], &EINVAL.to_be_bytes());
    for (h, cmd) in [(5, CMD_FLUSH), (6, CMD_TRIM), (7, CMD_WRITE_ZEROES)] {
        c.req(0, cmd, h, 0, 512, &[]);
        assert_eq!(c.chunk(), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, h, vec![]));
    }
    c.req(0, CMD_DISC, 8, 0, 0, &[]);
    assert_eq!(c.end(), ConnEnd::Disconnect);
}

#[test]
fn read_only_export_refuses_writes() {
    let mut c = start(ServerConfig {
        read_only: true,
        ..small_cfg()
    });
    c.greet(CF);
    let (_, flags) = c.go("msl").unwrap();
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    assert_eq!(flags & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES), 0);
    c.write(1, 0, b"nope");
    assert_eq!(c.simple(), (EPERM, 1));
    c.req(0, CMD_TRIM, 2, 0, 4096, &[]);
    assert_eq!(c.simple(), (EPERM, 2));
    c.req(0, CMD_WRITE_ZEROES, 3, 0, 4096, &[]);
    assert_eq!(c.simple(), (EPERM, 3));
    c.req(0, CMD_READ, 4, 0, 4, &[]);
    assert_eq!(c.simple(), (0, 4));
    assert_eq!(c.rd(4), vec![0; 4]);
    assert!(c.mem.data.lock().unwrap().iter().all(|&b| b == 0));
    let ex = c.export.clone();
    assert_eq!(c.end(), ConnEnd::Closed);
    assert_eq!(ex.counters.snapshot().err_eperm, 3);
}

#[test]
fn pipelined_requests_all_answered() {
    let mut c = start(small_cfg());
    c.greet(CF);
    c.go("msl").unwrap();
    let n = 256u64;
    // Writer thread sends everything without waiting for replies.
    let mut w = c.c.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..n {
            let data = common::pattern(4096, i + 1);
            w.write_all(&common::request(0, CMD_WRITE, i, i * 4096, 4096, &data))
                .unwrap();
        }
    });
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let (e, h) = c.simple();
        assert_eq!(e, 0);
        assert!(
            !std::mem::replace(&mut seen[h as usize], true),
            "duplicate handle {h}"
        );
    }
    sender.join().unwrap();
    let d = c.mem.data.lock().unwrap().clone();
    for i in 0..n as usize {
        assert_eq!(
            &d[i * 4096..(i + 1) * 4096],
            common::pattern(4096, i as u64 + 1)
        );
    }
    assert_eq!(c.end(), ConnEnd::Closed);
}

#[test]
fn silent_client_times_out_in_handshake() {
    let c = start(ServerConfig {
        handshake_timeout: Duration::from_millis(200),
        ..small_cfg()
    });
    assert!(matches!(c.end_keep(), ConnEnd::HandshakeFailed(_)));
    assert_eq!(c.export.counters.snapshot().handshake_failures, 1);
}

#[test]
fn server_limits_connections_and_stops_with_clients_attached() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let cfg = ServerConfig {
        max_connections: 1,
        ..Default::default()
    };
    let server = Server::new(l, "msl".into(), Mem::new(), cfg, stop.clone());
    let counters = server.counters();
    let (tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(server.run());
    });
    // First client completes GO and stays idle in transmission.
    let mut a = TcpStream::connect(addr).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut g = [0u8; 18];
    a.read_exact(&mut g).unwrap();
    a.write_all(&CF.to_be_bytes()).unwrap();
    let mut o = IHAVEOPT.to_be_bytes().to_vec();
    let p = info_payload("msl", &[]);
    o.extend_from_slice(&OPT_GO.to_be_bytes());
    o.extend_from_slice(&(p.len() as u32).to_be_bytes());
    o.extend_from_slice(&p);
    a.write_all(&o).unwrap();
    let t0 = Instant::now();
    while counters.snapshot().handshakes_completed == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    // Second client is over the limit: closed at once.
    let mut b = TcpStream::connect(addr).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1];
    assert!(matches!(b.read(&mut buf), Ok(0) | Err(_)));
    assert_eq!(counters.snapshot().connections_rejected, 1);
    // Stop with `a` still attached: run() returns promptly.
    stop.store(true, Ordering::Relaxed);
    let r = done
        .recv_timeout(Duration::from_secs(5))
        .expect("server did not stop");
    r.unwrap();
    assert_eq!(counters.snapshot().connections_active, 0);
}

#[test]
fn option_flood_hits_the_handshake_deadline() {
    let mut c = start(ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..small_cfg()
    });
    c.greet(CF);
    let t0 = Instant::now();
    // Keep sending valid options, each answered: the deadline still ends it.
    loop {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "handshake never ended"
        );
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&999u32.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        if c.c.write_all(&b).is_err() || c.at_eof_or_reply() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(matches!(c.end(), ConnEnd::HandshakeFailed(_)));
}

impl Conn {
    /// Read one option reply; true if the server closed instead.
    fn at_eof_or_reply(&mut self) -> bool {
        let mut b = [0u8; 20];
        self.c.read_exact(&mut b).is_err()
    }
}

/// Records which threads ran writes and how many ran at once; each write
/// takes `delay`, like a mirrored write waiting for the peer.
struct Probe {
    delay: Duration,
    threads: Mutex<Vec<String>>,
    now: std::sync::atomic::AtomicUsize,
    max: std::sync::atomic::AtomicUsize,
}

impl Backend for Probe {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read(&self, _off: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write(&self, _off: u64, _data: &[u8], _fua: bool) -> io::Result<()> {
        let name = std::thread::current().name().unwrap_or("").to_string();
        self.threads.lock().unwrap().push(name);
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, _off: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _off: u64, _len: u64, _fua: bool) -> io::Result<()> {
        Ok(())
    }
}

/// Serve `backend` on a thread named "nbd-reader" (`mem` is what the
/// test inspects).
fn start_on_reader(backend: Arc<dyn Backend>, mem: Arc<Mem>) -> Conn {
    let export = Arc::new(Export::new("msl".into(), backend, small_cfg()));
    let (c, s) = UnixStream::pair().unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (tx, end) = mpsc::channel();
    let ex = export.clone();
    std::thread::Builder::new()
        .name("nbd-reader".into())
        .spawn(move || {
            let _ = tx.send(serve_stream(s, &ex));
        })
        .unwrap();
    Conn {
        c,
        end,
        export,
        mem,
    }
}

fn write_request(handle: u64, off: u64) -> Vec<u8> {
    common::request(
        0,
        CMD_WRITE,
        handle,
        off,
        4096,
        &common::pattern(4096, handle),
    )
}

/// With `busy_poll`, the reader polls for the next request before it
/// sleeps: a request sent while it polls is found by polling (a hit), one
/// sent after the poll ended wakes it from `recv` (a miss); both are served
/// and their data lands.
#[test]
fn test_busy_poll_finds_requests_sent_while_polling_and_sleeps_after() {
    let mut c = start(ServerConfig {
        busy_poll: Duration::from_millis(300),
        ..small_cfg()
    });
    c.greet(CF);
    c.go("msl").unwrap();
    let polls = |c: &Conn| {
        let s = c.export.counters.snapshot();
        (s.busy_poll_hits, s.busy_poll_misses)
    };
    // Sent 20 ms into the reader's poll.
    std::thread::sleep(Duration::from_millis(20));
    c.c.write_all(&write_request(1, 0)).unwrap();
    assert_eq!(c.simple(), (0, 1));
    assert_eq!(polls(&c).0, 1, "the first request was found by polling");
    // Nothing sent now: the next poll gives up (a miss) and the reader
    // sleeps in recv.
    let deadline = Instant::now() + Duration::from_secs(5);
    while polls(&c).1 == 0 {
        assert!(Instant::now() < deadline, "the poll never gave up");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(polls(&c), (1, 1));
    c.c.write_all(&write_request(2, 4096)).unwrap();
    assert_eq!(c.simple(), (0, 2));
    let d = c.mem.data.lock().unwrap();
    assert_eq!(&d[..4096], &common::pattern(4096, 1)[..]);
    assert_eq!(&d[4096..8192], &common::pattern(4096, 2)[..]);
    drop(d);
    assert_eq!(c.end(), ConnEnd::Closed);
}

#[test]
fn test_queue_depth_one_runs_on_reader_and_deep_queue_gets_one_worker_per_request() {
    let probe = Arc::new(Probe {
        delay: Duration::from_millis(30),
        threads: Mutex::new(Vec::new()),
        now: Default::default(),
        max: Default::default(),
    });
    let mut c = start_on_reader(probe.clone(), Mem::new());
    c.greet(CF);
    c.go("msl").unwrap();
    // Queue depth 1: each write waits for its reply; no hand-off.
    for h in 0..4u64 {
        c.c.write_all(&write_request(h, h * 4096)).unwrap();
        assert_eq!(c.simple(), (0, h));
    }
    assert_eq!(*probe.threads.lock().unwrap(), vec!["nbd-reader"; 4]);
    // Queue depth 16 against a backend that blocks: they all run at once
    // (the default allows 32 workers), replies complete and are distinct.
    let n = 16u64;
    let mut all = Vec::new();
    for h in 100..100 + n {
        all.extend(write_request(h, (h - 100) * 4096));
    }
    let t = Instant::now();
    c.c.write_all(&all).unwrap();
    let mut seen: Vec<u64> = (0..n)
        .map(|_| c.simple())
        .map(|(e, h)| {
            assert_eq!(e, 0);
            h
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (100..100 + n).collect::<Vec<_>>());
    let max = probe.max.load(Ordering::SeqCst);
    assert!(max >= 12, "only {max} of {n} blocking writes ran at once");
    // 16 x 30 ms one after another would take 480 ms.
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    let names = probe.threads.lock().unwrap();
    assert!(names[4..].iter().any(|n| n == "nbd-worker"), "{names:?}");
    drop(names);
    assert_eq!(c.end(), ConnEnd::Closed);
}

/// A backend with asynchronous writes: completions are held until `batch`
/// of them are waiting, then answered in reverse order from another
/// thread; the write at `drop_off` is never answered (its Completion is
/// dropped), and the write at `panic_off` panics (a backend bug).
struct AsyncMem {
    mem: Arc<Mem>,
    batch: usize,
    drop_off: u64,
    panic_off: u64,
    held: Mutex<Vec<(u64, msl_nbd::Bytes, msl_nbd::Completion)>>,
    threads: Mutex<Vec<String>>,
}

impl Backend for AsyncMem {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.mem.read(off, buf)
    }
    fn write(&self, off: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.mem.write(off, data, fua)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, _off: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        self.mem.write_zeroes(off, len, fua)
    }
    fn async_writes(&self) -> bool {
        true
    }
    fn write_async(&self, off: u64, data: msl_nbd::Bytes, _fua: bool, done: msl_nbd::Completion) {
        assert_ne!(off, self.panic_off, "a backend bug");
        let name = std::thread::current().name().unwrap_or("").to_string();
        self.threads.lock().unwrap().push(name);
        let mut held = self.held.lock().unwrap();
        held.push((off, data, done));
        if held.len() < self.batch {
            return;
        }
        let mut all = std::mem::take(&mut *held);
        drop(held);
        let mem = self.mem.clone();
        let drop_off = self.drop_off;
        std::thread::spawn(move || {
            while let Some((off, data, done)) = all.pop() {
                if off == drop_off {
                    drop(done); // never answered by the backend
                    continue;
                }
                done.complete(mem.write(off, &data, false));
            }
        });
    }
}

#[test]
fn async_writes_complete_out_of_order_on_the_reply_thread() {
    let n = 32u64;
    let be = Arc::new(AsyncMem {
        mem: Mem::new(),
        batch: 8,
        drop_off: 5 * 4096,
        panic_off: u64::MAX,
        held: Mutex::new(Vec::new()),
        threads: Mutex::new(Vec::new()),
    });
    let mut c = start_on_reader(be.clone(), be.mem.clone());
    c.greet(CF);
    c.go("msl").unwrap();
    let mut all = Vec::new();
    for h in 0..n {
        all.extend(write_request(h, h * 4096));
    }
    c.c.write_all(&all).unwrap();
    let mut got: Vec<(u64, u32)> = (0..n).map(|_| c.simple()).map(|(e, h)| (h, e)).collect();
    let order: Vec<u64> = got.iter().map(|g| g.0).collect();
    got.sort();
    // Every request answered once; the dropped one with EIO, the rest OK.
    for (h, e) in &got {
        let want = if *h == 5 { libc_eio() as u32 } else { 0 };
        assert_eq!(*e, want, "handle {h}");
    }
    assert_eq!(
        got.iter().map(|g| g.0).collect::<Vec<_>>(),
        (0..n).collect::<Vec<_>>()
    );
    // Answered in completion order (reversed batches), not request order.
    assert_ne!(
        order,
        (0..n).filter(|h| *h != 5).chain([5]).collect::<Vec<_>>()
    );
    assert_ne!(order, (0..n).collect::<Vec<_>>());
    // All handed over on the reader: no worker thread per request.
    assert!(be.threads.lock().unwrap().iter().all(|t| t == "nbd-reader"));
    let d = be.mem.data.lock().unwrap().clone();
    for h in (0..n).filter(|h| *h != 5) {
        let at = (h * 4096) as usize;
        assert_eq!(&d[at..at + 4096], common::pattern(4096, h), "block {h}");
    }
    assert_eq!(c.export.counters.snapshot().bytes_written, (n - 1) * 4096);
    assert_eq!(c.end(), ConnEnd::Closed);
}

/// A panic while serving a request closes the connection: the request gets
/// EIO, the client is not left waiting on an open socket, writes answered
/// before it stay answered, and the connection ends.
#[test]
fn a_panic_while_serving_closes_the_connection() {
    let be = Arc::new(AsyncMem {
        mem: Mem::new(),
        batch: 1,
        drop_off: u64::MAX,
        panic_off: 3 * 4096,
        held: Mutex::new(Vec::new()),
        threads: Mutex::new(Vec::new()),
    });
    let mut c = start_on_reader(be.clone(), be.mem.clone());
    c.greet(CF);
    c.go("msl").unwrap();
    for h in 0..3u64 {
        c.c.write_all(&write_request(h, h * 4096)).unwrap();
        assert_eq!(c.simple(), (0, h));
    }
    c.c.write_all(&write_request(3, 3 * 4096)).unwrap();
    let t = Instant::now();
    assert_eq!(c.simple(), (libc_eio() as u32, 3));
    assert!(c.at_eof(), "the socket is closed, not left open");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(c.end_keep(), ConnEnd::Closed);
}
