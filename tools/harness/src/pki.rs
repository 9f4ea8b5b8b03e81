//! Certificates for NBD over TLS, made with the openssl CLI the way the
//! README's recipe does: a CA, one server certificate for the service
//! name and address (the same on both nodes, so clients reconnect after a
//! takeover unchanged), a client certificate, and a client directory
//! without one.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A throw-away PKI: `server/` (msld's `nbd_tls_dir`: ca-cert.pem,
/// server-cert.pem, server-key.pem), `client/` (ca-cert.pem,
/// client-cert.pem, client-key.pem: libnbd's `tls-certificates=` and qemu's
/// `tls-creds-x509,dir=` layout) and `nocert/` (ca-cert.pem only).
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Make the files; the server certificate names `nbd.example` and
    /// `service_ip`.
    pub fn new(service_ip: &str) -> Result<Pki, String> {
        let dir = tempfile::Builder::new()
            .prefix("msl-pki-")
            .tempdir()
            .map_err(|e| format!("creating the PKI directory: {e}"))?;
        let script = format!(
            r#"set -e
mkdir server client nocert
key() {{ openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }}
key ca-key.pem
openssl req -x509 -new -key ca-key.pem -days 30 -subj "/CN=msl CA" -out ca-cert.pem \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
leaf() {{ # name extensions
  key $1-key.pem
  openssl req -new -key $1-key.pem -subj "/CN=$1" -out $1.csr
  printf '%s\n' "$2" basicConstraints=critical,CA:FALSE keyUsage=digitalSignature,keyEncipherment > $1.ext
  openssl x509 -req -in $1.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial -days 30 \
    -extfile $1.ext -out $1-cert.pem 2>/dev/null; }}
leaf server "subjectAltName=DNS:nbd.example,IP:{service_ip}
extendedKeyUsage=serverAuth"
leaf client extendedKeyUsage=clientAuth
cp ca-cert.pem server-cert.pem server-key.pem server/
chmod 600 server/server-key.pem
cp ca-cert.pem client-cert.pem client-key.pem client/
cp ca-cert.pem nocert/
"#
        );
        let out = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .current_dir(dir.path())
            .output()
            .map_err(|e| format!("running openssl (apt-get install openssl): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "making the certificates failed (apt-get install openssl): {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(Pki { dir })
    }

    /// `server`, `client` or `nocert`.
    pub fn path(&self, which: &str) -> PathBuf {
        self.dir.path().join(which)
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }
}
