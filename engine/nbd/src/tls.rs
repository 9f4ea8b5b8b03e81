//! TLS for NBD_OPT_STARTTLS, with rustls (ring provider).
//!
//! The server's files sit in one directory, in the layout nbdkit
//! (`--tls-certificates`) and qemu (`tls-creds-x509,dir=`) use:
//! `server-cert.pem` (the certificate chain, leaf first), `server-key.pem`
//! (PKCS#8, PKCS#1 or SEC1), and, for client-certificate verification
//! (mutual TLS), `ca-cert.pem`: the CA that signed the clients'
//! certificates.
//!
//! TLS-PSK (nbdkit `--tls-psk`, qemu `tls-creds-psk`) is not offered:
//! rustls implements resumption PSKs only, not external (out-of-band)
//! pre-shared keys, in TLS 1.2 (the PSK cipher suites) or TLS 1.3
//! (`psk_ke` with an imported key), and no maintained pure-Rust TLS crate
//! offers a server with external PSK either; binding OpenSSL or GnuTLS
//! would bring a C TLS stack back for this one mode. Client certificates
//! cover the same need (a client is let in by a secret it holds).
//!
//! After STARTTLS the connection is a [`TlsStream`]: one rustls session
//! shared by the connection's reader and its reply writers. The reader
//! feeds ciphertext in and takes plaintext out under the session lock; a
//! writer encrypts under that lock and writes the records to the socket
//! under a second lock that keeps records in order, so neither side holds
//! the session lock while blocked on the socket.

use std::fmt;
use std::io::{self, ErrorKind, Read, Write};
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConnection};

use crate::conn::Socket;

/// Whether the export offers or requires TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// NBD_OPT_STARTTLS is answered NBD_REP_ERR_POLICY.
    #[default]
    Off,
    /// A client may upgrade with NBD_OPT_STARTTLS, or stay in plain text.
    On,
    /// Every option but STARTTLS and ABORT is answered
    /// NBD_REP_ERR_TLS_REQD until TLS is up (NBD_OPT_EXPORT_NAME, which
    /// has no error reply, closes the connection).
    Require,
}

impl FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(TlsMode::Off),
            "on" => Ok(TlsMode::On),
            "require" => Ok(TlsMode::Require),
            _ => Err(format!("tls: \"{s}\" is not one of off, on, require")),
        }
    }
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        })
    }
}

fn bad(path: &Path, what: impl fmt::Display) -> io::Error {
    io::Error::new(
        ErrorKind::InvalidData,
        format!("{}: {what}", path.display()),
    )
}

/// Load `server-cert.pem` and `server-key.pem` (and `ca-cert.pem` with
/// `verify_peer`) from `dir` into a rustls server configuration. Errors
/// name the file.
pub fn load_server_config(dir: &Path, verify_peer: bool) -> io::Result<Arc<rustls::ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert_path = dir.join("server-cert.pem");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| bad(&cert_path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&cert_path, e))?;
    if certs.is_empty() {
        return Err(bad(&cert_path, "no certificate"));
    }
    let key_path = dir.join("server-key.pem");
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| bad(&key_path, e))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?;
    let builder = if verify_peer {
        let ca_path = dir.join("ca-cert.pem");
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&ca_path).map_err(|e| bad(&ca_path, e))? {
            roots
                .add(c.map_err(|e| bad(&ca_path, e))?)
                .map_err(|e| bad(&ca_path, e))?;
        }
        if roots.is_empty() {
            return Err(bad(&ca_path, "no CA certificate"));
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| bad(&ca_path, e))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| bad(&key_path, e))?;
    // No session tickets: nothing is sent after the handshake that the
    // client did not ask for, and no resumption state is kept per client.
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(cfg))
}

/// Run the server side of a TLS handshake on `raw`, finishing by
/// `deadline`.
pub(crate) fn accept<S: Socket>(
    mut raw: S,
    cfg: Arc<rustls::ServerConfig>,
    deadline: Instant,
) -> io::Result<TlsStream<S>> {
    let mut conn = ServerConnection::new(cfg).map_err(io::Error::other)?;
    loop {
        while conn.wants_write() {
            conn.write_tls(&mut raw)?;
        }
        if !conn.is_handshaking() {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        raw.set_timeout(Some(left))?;
        raw.set_send_timeout(Some(left))?;
        if conn.read_tls(&mut raw)? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        if let Err(e) = conn.process_new_packets() {
            // Tell the client why (the alert), then give up.
            let _ = conn.write_tls(&mut raw);
            return Err(io::Error::new(ErrorKind::InvalidData, e));
        }
    }
    Ok(TlsStream::new(raw, conn))
}

struct Shared {
    conn: Mutex<ServerConnection>,
    /// Held while records are written to the socket, so they go out in the
    /// order they were sealed.
    wire: Mutex<()>,
}

/// One TLS session over a [`Socket`]; clones share the session (one reads,
/// any writes).
pub struct TlsStream<S> {
    raw: S,
    shared: Arc<Shared>,
    /// Ciphertext read from the socket and not yet given to rustls.
    pending: Vec<u8>,
    at: usize,
}

/// Plaintext sealed per lock hold: bounds the ciphertext buffered per write.
const SEAL_CHUNK: usize = 256 * 1024;

impl<S: Socket> TlsStream<S> {
    fn new(raw: S, mut conn: ServerConnection) -> Self {
        // Writes are sealed SEAL_CHUNK at a time and sent at once; rustls's
        // own limit would turn a larger write into a short one.
        conn.set_buffer_limit(None);
        Self {
            raw,
            shared: Arc::new(Shared {
                conn: Mutex::new(conn),
                wire: Mutex::new(()),
            }),
            pending: Vec::new(),
            at: 0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ServerConnection> {
        self.shared.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the client sent a certificate that the verifier accepted.
    pub fn peer_verified(&self) -> bool {
        self.lock()
            .peer_certificates()
            .is_some_and(|c| !c.is_empty())
    }
}

impl<S: Socket> Read for TlsStream<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            {
                let shared = self.shared.clone();
                let mut c = shared.conn.lock().unwrap_or_else(|e| e.into_inner());
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.at < self.pending.len() {
                    let mut rest = &self.pending[self.at..];
                    let before = rest.len();
                    c.read_tls(&mut rest)?;
                    self.at += before - rest.len();
                    if let Err(e) = c.process_new_packets() {
                        return Err(io::Error::new(ErrorKind::InvalidData, e));
                    }
                    continue;
                }
            }
            // Nothing decrypted and nothing pending: read the socket
            // (without the session lock, so writers carry on).
            self.pending.resize(16 * 1024 + 512, 0);
            self.at = 0;
            let n = match self.raw.read(&mut self.pending) {
                Ok(n) => n,
                Err(e) => {
                    self.pending.clear();
                    return Err(e);
                }
            };
            self.pending.truncate(n);
            if n == 0 {
                return Ok(0);
            }
        }
    }
}

impl<S: Socket> Write for TlsStream<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        let shared = self.shared.clone();
        let _wire = shared.wire.lock().unwrap_or_else(|e| e.into_inner());
        let mut sealed = Vec::new();
        let mut chunks = buf.chunks(SEAL_CHUNK);
        loop {
            let piece = chunks.next();
            {
                let mut c = self.lock();
                if let Some(p) = piece {
                    c.writer().write_all(p)?;
                }
                while c.wants_write() {
                    c.write_tls(&mut sealed)?;
                }
            }
            self.raw.write_all(&sealed)?;
            sealed.clear();
            if piece.is_none() {
                return Ok(());
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<S: Socket> Socket for TlsStream<S> {
    fn clone_socket(&self) -> io::Result<Self> {
        Ok(Self {
            raw: self.raw.clone_socket()?,
            shared: self.shared.clone(),
            pending: Vec::new(),
            at: 0,
        })
    }
    fn shutdown_both(&self) {
        self.raw.shutdown_both();
    }
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.raw.set_timeout(t)
    }
    fn set_send_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.raw.set_send_timeout(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_mode_parses_and_prints_the_config_words() {
        for m in [TlsMode::Off, TlsMode::On, TlsMode::Require] {
            assert_eq!(m.to_string().parse::<TlsMode>(), Ok(m));
        }
        assert!("yes"
            .parse::<TlsMode>()
            .unwrap_err()
            .contains("off, on, require"));
    }
}
