//! Shared test helpers: an in-process server on 127.0.0.1, bounded child
//! processes, tool checks.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use msl_nbd::{Backend, Counters, Server, ServerConfig, ServerHandle};

pub const EXPORT: &str = "msl";

/// A running server; stopped and joined on drop.
pub struct TestServer {
    pub port: u16,
    pub counters: Arc<Counters>,
    pub handle: ServerHandle,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    pub fn start(backend: Arc<dyn Backend>, cfg: ServerConfig) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let stop = Arc::new(AtomicBool::new(false));
        let server = Server::new(l, EXPORT.to_string(), backend, cfg, stop.clone());
        Self::run(server, stop)
    }

    /// A server on 127.0.0.1 whose TLS files (if any) must load.
    pub fn start_checked(backend: Arc<dyn Backend>, cfg: ServerConfig) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let server = Server::with_listeners(
            &["127.0.0.1:0".parse().unwrap()],
            EXPORT.to_string(),
            backend,
            cfg,
            stop.clone(),
        )
        .expect("server with its TLS files");
        Self::run(server, stop)
    }

    fn run(server: Server, stop: Arc<AtomicBool>) -> Self {
        let port = server.local_addr().unwrap().port();
        let counters = server.counters();
        let handle = server.handle();
        let thread = std::thread::spawn(move || server.run().expect("server run"));
        Self {
            port,
            counters,
            handle,
            stop,
            thread: Some(thread),
        }
    }

    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, EXPORT)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Panic (test failure) naming the Debian package if `tool` is missing.
pub fn require(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` not found: install the Debian package `{package}` \
         (scripts/setup.sh installs it: apt-get install -y {package})"
    );
}

/// Run a command with a deadline; kill it if it overruns. Panics on
/// timeout or failure, printing its output.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let out = run_status(cmd, timeout);
    assert!(
        out.status.success(),
        "{:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        cmd,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Like [`run`] but returns whatever status the command ended with.
pub fn run_status(cmd: &mut Command, timeout: Duration) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap())
        .spawn()
        .unwrap_or_else(|err| panic!("spawn {cmd:?}: {err}"));
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if t0.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} timed out after {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                std::fs::read_to_string(&o).unwrap_or_default(),
                std::fs::read_to_string(&e).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: std::fs::read(&o).unwrap_or_default(),
        stderr: std::fs::read(&e).unwrap_or_default(),
    }
}

/// sha256 of a file, via coreutils `sha256sum`.
pub fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path), Duration::from_secs(60));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Run a shell command line (bash), panicking with its output on failure.
pub fn sh(script: &str) {
    run(
        Command::new("bash").arg("-ec").arg(script),
        Duration::from_secs(60),
    );
}

/// Certificates made with the openssl CLI, in the layout nbdkit, qemu and
/// libnbd use: `server` (ca-cert.pem, server-cert.pem, server-key.pem),
/// `client` (ca-cert.pem, client-cert.pem, client-key.pem, signed by the
/// CA), `rogue` (a client certificate from another CA), `nocert` (the CA
/// only: a client without a certificate).
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn new() -> Self {
        require("openssl", "openssl");
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display();
        sh(&format!(
            r#"cd {d}
mkdir server client rogue nocert
key() {{ openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }}
ca() {{ key $1-key.pem
  openssl req -x509 -new -key $1-key.pem -days 365 -subj "/CN=$1 CA" -out $1-cert.pem \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign; }}
leaf() {{ # name ca-prefix extensions
  key $1-key.pem
  openssl req -new -key $1-key.pem -subj "/CN=$1" -out $1.csr
  printf '%s\n' "$3" basicConstraints=critical,CA:FALSE keyUsage=digitalSignature,keyEncipherment > $1.ext
  openssl x509 -req -in $1.csr -CA $2-cert.pem -CAkey $2-key.pem -CAcreateserial -days 365 \
    -extfile $1.ext -out $1-cert.pem 2>/dev/null; }}
ca ca; ca other
leaf server ca "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1
extendedKeyUsage=serverAuth"
leaf client ca extendedKeyUsage=clientAuth
leaf stranger other extendedKeyUsage=clientAuth
cp ca-cert.pem server/; cp server-cert.pem server-key.pem server/
cp ca-cert.pem client/; cp client-cert.pem client-key.pem client/
cp ca-cert.pem rogue/; cp stranger-cert.pem rogue/client-cert.pem; cp stranger-key.pem rogue/client-key.pem
cp ca-cert.pem nocert/
"#
        ));
        Self { dir }
    }
    pub fn path(&self, which: &str) -> std::path::PathBuf {
        self.dir.path().join(which)
    }
}

/// Resident set size of this process, in bytes.
pub fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

/// A hand-rolled NBD client over any byte stream (plain TCP, or a rustls
/// client stream after STARTTLS), for the tests that misbehave on purpose.
pub struct Nbd<S: std::io::Read + std::io::Write> {
    pub s: S,
}

impl<S: std::io::Read + std::io::Write> Nbd<S> {
    pub fn rd(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut b = vec![0; n];
        self.s.read_exact(&mut b)?;
        Ok(b)
    }
    /// Read the greeting and answer with FIXED_NEWSTYLE | NO_ZEROES.
    pub fn greet(&mut self) -> std::io::Result<()> {
        let g = self.rd(18)?;
        assert_eq!(&g[..8], &msl_nbd::proto::NBDMAGIC.to_be_bytes());
        self.s.write_all(&3u32.to_be_bytes())
    }
    pub fn opt(&mut self, opt: u32, data: &[u8]) -> std::io::Result<()> {
        let mut b = msl_nbd::proto::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b)
    }
    /// (option, reply type, payload)
    pub fn rep(&mut self) -> std::io::Result<(u32, u32, Vec<u8>)> {
        let h = self.rd(20)?;
        assert_eq!(&h[..8], &msl_nbd::proto::OPT_REPLY_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        Ok((opt, typ, self.rd(len)?))
    }
    /// OPT_GO for the default export: the final reply type (REP_ACK when
    /// the export is open).
    pub fn go(&mut self) -> std::io::Result<u32> {
        self.opt(msl_nbd::proto::OPT_GO, &[0, 0, 0, 0, 0, 0])?;
        loop {
            let (_, typ, _) = self.rep()?;
            if typ != msl_nbd::proto::REP_INFO {
                return Ok(typ);
            }
        }
    }
    pub fn req(
        &mut self,
        flags: u16,
        cmd: u16,
        handle: u64,
        off: u64,
        len: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        self.s
            .write_all(&request(flags, cmd, handle, off, len, payload))
    }
    /// A simple reply header: (errno, handle).
    pub fn simple(&mut self) -> std::io::Result<(u32, u64)> {
        let h = self.rd(16)?;
        assert_eq!(&h[..4], &msl_nbd::proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
        Ok((
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        ))
    }
    /// Whether the server closed the connection (EOF or reset) within 5 s.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

/// A transmission-phase request: header, then `payload`.
pub fn request(flags: u16, cmd: u16, handle: u64, off: u64, len: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = msl_nbd::proto::REQUEST_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&handle.to_be_bytes());
    b.extend_from_slice(&off.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(payload);
    b
}

/// A TCP connection to `dst` from source address `src` (any 127.0.0.0/8
/// address works on loopback), with 5 s read and write timeouts.
pub fn connect_from(
    src: std::net::IpAddr,
    dst: std::net::SocketAddr,
) -> std::io::Result<std::net::TcpStream> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(dst),
        socket2::Type::STREAM,
        None,
    )?;
    s.bind(&std::net::SocketAddr::new(src, 0).into())?;
    s.connect_timeout(&dst.into(), Duration::from_secs(5))?;
    let t: std::net::TcpStream = s.into();
    t.set_read_timeout(Some(Duration::from_secs(5)))?;
    t.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(t)
}

pub fn plain(port: u16) -> Nbd<std::net::TcpStream> {
    let s = connect_from(
        "127.0.0.1".parse().unwrap(),
        format!("127.0.0.1:{port}").parse().unwrap(),
    )
    .expect("connect");
    Nbd { s }
}
