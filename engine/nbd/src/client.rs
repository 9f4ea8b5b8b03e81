//! A minimal NBD client: fixed newstyle handshake, `NBD_OPT_GO`, simple
//! replies, READ / WRITE (+FUA) / FLUSH / DISC, one request at a time.
//!
//! Hand-written because no well-kept Rust NBD client crate exists (the
//! published ones are unmaintained or bind libnbd through C); the test
//! harness needs one it can drive from a thread inside a network namespace,
//! with a timeout on every call and errors it can tell apart (the
//! connection broke vs. the server refused a request) to reconnect in a
//! tight loop. Real-world clients (qemu-io, nbdcopy, fio) are what the
//! server is tested against; this one exists for the harness workload.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::proto::*;

/// Why a client call failed.
#[derive(Debug)]
pub enum ClientError {
    /// The connection failed or broke (reconnect and retry).
    Io(io::Error),
    /// The server sent something this client does not understand.
    Protocol(String),
    /// The server refused the export during the handshake.
    Refused(String),
    /// The server answered a request with an NBD error (the connection is
    /// still usable).
    Server { cmd: u16, errno: u32 },
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "nbd connection: {e}"),
            ClientError::Protocol(m) => write!(f, "nbd protocol: {m}"),
            ClientError::Refused(m) => write!(f, "nbd export refused: {m}"),
            ClientError::Server { cmd, errno } => {
                write!(f, "nbd server answered command {cmd} with error {errno}")
            }
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl ClientError {
    /// Whether the connection is gone (as opposed to one refused request).
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, ClientError::Io(_) | ClientError::Protocol(_))
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// One connection to one export.
#[derive(Debug)]
pub struct Client {
    sock: TcpStream,
    size: u64,
    flags: u16,
    next_handle: u64,
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn read_exact<const N: usize>(s: &mut TcpStream) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// Longest option reply payload accepted during the handshake.
const MAX_OPT_REPLY: u32 = 64 << 10;

impl Client {
    /// Connect to `addr` and open `export` (msld serves the empty name).
    /// `timeout` bounds the connect and every later read or write.
    pub fn connect(addr: SocketAddr, export: &str, timeout: Duration) -> Result<Client> {
        let sock = TcpStream::connect_timeout(&addr, timeout)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        Self::handshake(sock, export)
    }

    /// Run the handshake on an already connected stream.
    pub fn handshake(mut sock: TcpStream, export: &str) -> Result<Client> {
        sock.set_nodelay(true)?;
        let hello: [u8; 18] = read_exact(&mut sock)?;
        if be_u64(&hello[0..8]) != NBDMAGIC || be_u64(&hello[8..16]) != IHAVEOPT {
            return Err(ClientError::Protocol(
                "not a newstyle NBD server (bad greeting magic)".into(),
            ));
        }
        let sflags = be_u16(&hello[16..18]);
        if sflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::Protocol(
                "server does not speak fixed newstyle".into(),
            ));
        }
        let no_zeroes = sflags & FLAG_NO_ZEROES != 0;
        let mut cflags = FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= FLAG_C_NO_ZEROES;
        }
        // Client flags, then OPT_GO with the export name and no info
        // requests (the server always sends NBD_INFO_EXPORT).
        let name = export.as_bytes();
        let mut m = Vec::with_capacity(4 + 16 + 6 + name.len());
        m.extend_from_slice(&cflags.to_be_bytes());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&OPT_GO.to_be_bytes());
        m.extend_from_slice(&((4 + name.len() + 2) as u32).to_be_bytes());
        m.extend_from_slice(&(name.len() as u32).to_be_bytes());
        m.extend_from_slice(name);
        m.extend_from_slice(&0u16.to_be_bytes());
        sock.write_all(&m)?;
        let mut export_info: Option<(u64, u16)> = None;
        loop {
            let h: [u8; 20] = read_exact(&mut sock)?;
            if be_u64(&h[0..8]) != OPT_REPLY_MAGIC {
                return Err(ClientError::Protocol("bad option reply magic".into()));
            }
            let (opt, kind, len) = (be_u32(&h[8..12]), be_u32(&h[12..16]), be_u32(&h[16..20]));
            if opt != OPT_GO {
                return Err(ClientError::Protocol(format!(
                    "option reply for option {opt}, expected OPT_GO"
                )));
            }
            if len > MAX_OPT_REPLY {
                return Err(ClientError::Protocol(format!(
                    "option reply of {len} bytes"
                )));
            }
            let mut data = vec![0u8; len as usize];
            sock.read_exact(&mut data)?;
            match kind {
                REP_ACK => break,
                REP_INFO => {
                    if data.len() >= 12 && be_u16(&data[0..2]) == INFO_EXPORT {
                        export_info = Some((be_u64(&data[2..10]), be_u16(&data[10..12])));
                    }
                }
                k if k & (1 << 31) != 0 => {
                    return Err(ClientError::Refused(format!(
                        "error reply {k:#x}: {}",
                        String::from_utf8_lossy(&data)
                    )));
                }
                k => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected option reply type {k}"
                    )))
                }
            }
        }
        let (size, flags) = export_info.ok_or_else(|| {
            ClientError::Protocol("OPT_GO acknowledged without NBD_INFO_EXPORT".into())
        })?;
        Ok(Client {
            sock,
            size,
            flags,
            next_handle: 1,
        })
    }

    /// Bound every later read and write on the connection by `t`.
    pub fn set_timeout(&self, t: Duration) -> Result<()> {
        self.sock.set_read_timeout(Some(t))?;
        self.sock.set_write_timeout(Some(t))?;
        Ok(())
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags (`TFLAG_*`).
    pub fn flags(&self) -> u16 {
        self.flags
    }

    fn send(&mut self, cmd: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> Result<u64> {
        let handle = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1);
        let mut r = [0u8; REQUEST_LEN];
        r[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r[4..6].copy_from_slice(&flags.to_be_bytes());
        r[6..8].copy_from_slice(&cmd.to_be_bytes());
        r[8..16].copy_from_slice(&handle.to_be_bytes());
        r[16..24].copy_from_slice(&offset.to_be_bytes());
        r[24..28].copy_from_slice(&len.to_be_bytes());
        if data.is_empty() {
            self.sock.write_all(&r)?;
        } else {
            let mut m = Vec::with_capacity(REQUEST_LEN + data.len());
            m.extend_from_slice(&r);
            m.extend_from_slice(data);
            self.sock.write_all(&m)?;
        }
        Ok(handle)
    }

    /// Read a simple reply for `handle`; on success read `payload` too.
    fn reply(&mut self, cmd: u16, handle: u64, payload: &mut [u8]) -> Result<()> {
        let h: [u8; SIMPLE_REPLY_LEN] = read_exact(&mut self.sock)?;
        if be_u32(&h[0..4]) != SIMPLE_REPLY_MAGIC {
            return Err(ClientError::Protocol(format!(
                "reply magic {:#x} (structured replies were not negotiated)",
                be_u32(&h[0..4])
            )));
        }
        if be_u64(&h[8..16]) != handle {
            return Err(ClientError::Protocol(format!(
                "reply for handle {}, expected {handle}",
                be_u64(&h[8..16])
            )));
        }
        let errno = be_u32(&h[4..8]);
        if errno != 0 {
            return Err(ClientError::Server { cmd, errno });
        }
        self.sock.read_exact(payload)?;
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = u32::try_from(buf.len())
            .map_err(|_| ClientError::Protocol("read longer than 4 GiB".into()))?;
        let h = self.send(CMD_READ, 0, offset, len, &[])?;
        self.reply(CMD_READ, h, buf)
    }

    /// Write `data` at `offset`; with `fua`, durable on return.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let len = u32::try_from(data.len())
            .map_err(|_| ClientError::Protocol("write longer than 4 GiB".into()))?;
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let h = self.send(CMD_WRITE, flags, offset, len, data)?;
        self.reply(CMD_WRITE, h, &mut [])
    }

    /// Make every completed write durable.
    pub fn flush(&mut self) -> Result<()> {
        let h = self.send(CMD_FLUSH, 0, 0, 0, &[])?;
        self.reply(CMD_FLUSH, h, &mut [])
    }

    /// Say goodbye (NBD_CMD_DISC has no reply) and close.
    pub fn disconnect(mut self) -> Result<()> {
        self.send(CMD_DISC, 0, 0, 0, &[])?;
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FileBackend, Server, ServerConfig};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const T: Duration = Duration::from_secs(5);

    struct Running {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn server(size: u64, cfg: ServerConfig) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol");
        let backend = Arc::new(FileBackend::create(&path, size).unwrap());
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = Server::new(l, String::new(), backend, cfg, stop.clone());
        let thread = std::thread::spawn(move || {
            let _ = s.run();
        });
        Running {
            addr,
            stop,
            thread: Some(thread),
            _dir: dir,
            path,
        }
    }

    #[test]
    fn test_client_write_read_flush_fua_reach_the_file() {
        let srv = server(1 << 20, ServerConfig::default());
        let mut c = Client::connect(srv.addr, "", T).unwrap();
        assert_eq!(c.size(), 1 << 20);
        assert!(c.flags() & TFLAG_SEND_FLUSH != 0 && c.flags() & TFLAG_SEND_FUA != 0);
        let a: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        c.write(4096, &a, false).unwrap();
        c.write(65536, &[0xee; 4096], true).unwrap();
        c.flush().unwrap();
        let mut back = vec![0u8; 8192];
        c.read(4096, &mut back).unwrap();
        assert_eq!(back, a);
        // Reads after a read keep the stream in step (payload fully read).
        let mut b2 = [0u8; 4096];
        c.read(65536, &mut b2).unwrap();
        assert!(b2.iter().all(|&x| x == 0xee));
        c.disconnect().unwrap();
        let file = std::fs::read(&srv.path).unwrap();
        assert_eq!(&file[4096..12288], &a[..]);
        assert!(file[65536..69632].iter().all(|&x| x == 0xee));
        assert!(file[..4096].iter().all(|&x| x == 0));
    }

    #[test]
    fn test_client_server_error_keeps_connection_usable() {
        let srv = server(1 << 20, ServerConfig::default());
        let mut c = Client::connect(srv.addr, "", T).unwrap();
        let mut buf = [0u8; 4096];
        let e = c.read((1 << 20) - 1024, &mut buf).unwrap_err();
        assert!(
            matches!(e, ClientError::Server { cmd: CMD_READ, errno } if errno != 0),
            "{e}"
        );
        assert!(!e.is_connection_lost());
        c.write(0, &[1; 512], false).unwrap();
        c.read(0, &mut buf[..512]).unwrap();
        assert!(buf[..512].iter().all(|&x| x == 1));
    }

    #[test]
    fn test_client_read_only_export_refuses_writes_with_eperm() {
        let cfg = ServerConfig {
            read_only: true,
            ..ServerConfig::default()
        };
        let srv = server(1 << 20, cfg);
        let mut c = Client::connect(srv.addr, "", T).unwrap();
        assert!(c.flags() & TFLAG_READ_ONLY != 0);
        let e = c.write(0, &[1; 512], false).unwrap_err();
        assert!(
            matches!(
                e,
                ClientError::Server {
                    cmd: CMD_WRITE,
                    errno: EPERM
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn test_client_unknown_export_is_refused() {
        let srv = server(1 << 20, ServerConfig::default());
        let e = Client::connect(srv.addr, "no-such-export", T).unwrap_err();
        assert!(matches!(e, ClientError::Refused(_)), "{e}");
    }

    #[test]
    fn test_client_not_nbd_or_dead_server_is_a_connection_error() {
        // A server that greets with garbage.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").unwrap();
        });
        let e = Client::connect(addr, "", T).unwrap_err();
        assert!(e.is_connection_lost(), "{e}");
        t.join().unwrap();
        // Nobody listening: refused at once.
        let e = Client::connect(addr, "", T).unwrap_err();
        assert!(matches!(e, ClientError::Io(_)), "{e}");
        // The server stops mid-session: the next call says the connection
        // is lost.
        let srv = server(1 << 20, ServerConfig::default());
        let mut c = Client::connect(srv.addr, "", T).unwrap();
        drop(srv);
        let e = c.write(0, &[1; 512], false).unwrap_err();
        assert!(e.is_connection_lost(), "{e}");
    }
}
