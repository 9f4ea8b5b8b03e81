//! TLS with real clients: a `require` export with client certificates
//! (made here with the openssl CLI), reached by nbdinfo, nbdcopy, qemu-img,
//! qemu-io and fio over `nbds://` / `tls-creds-x509`, and refused to a
//! client without a valid certificate; STARTTLS misuse with a hand-rolled
//! client (rustls on the client side).

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{plain, require, run, run_status, sh, sha256, Nbd, Pki, TestServer};
use msl_nbd::proto::*;
use msl_nbd::{FileBackend, ServerConfig, TlsMode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(60);

fn tls_cfg(pki: &Pki, mode: TlsMode, verify_peer: bool) -> ServerConfig {
    ServerConfig {
        tls: mode,
        tls_dir: pki.path("server"),
        tls_verify_peer: verify_peer,
        ..Default::default()
    }
}

fn server(
    dir: &std::path::Path,
    pki: &Pki,
    mode: TlsMode,
    verify: bool,
) -> (TestServer, std::path::PathBuf) {
    let path = dir.join("volume.img");
    let be = FileBackend::create(&path, 64 * MIB).expect("create backing file");
    (
        TestServer::start_checked(Arc::new(be), tls_cfg(pki, mode, verify)),
        path,
    )
}

fn nbds(port: u16, certs: &std::path::Path) -> String {
    format!(
        "nbds://127.0.0.1:{port}/{}?tls-certificates={}",
        common::EXPORT,
        certs.display()
    )
}

fn qemu_opts(port: u16) -> String {
    format!(
        "driver=nbd,host=127.0.0.1,port={port},export={},tls-creds=tls0",
        common::EXPORT
    )
}

fn qemu_creds(certs: &std::path::Path) -> String {
    format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        certs.display()
    )
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn real_clients_work_with_client_certificates_on_a_require_export() {
    for (t, p) in [
        ("nbdinfo", "libnbd-bin"),
        ("nbdcopy", "libnbd-bin"),
        ("qemu-img", "qemu-utils"),
        ("qemu-io", "qemu-utils"),
        ("fio", "fio"),
    ] {
        require(t, p);
    }
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (srv, vol) = server(dir.path(), &pki, TlsMode::Require, true);
    let client = pki.path("client");

    let o = run(Command::new("nbdinfo").arg(nbds(srv.port, &client)), T);
    let out = text(&o);
    assert!(out.contains(&format!("export-size: {}", 64 * MIB)), "{out}");
    assert!(out.contains("uri: nbds://"), "{out}");

    // nbdcopy: a pattern in, and back out identical.
    let src = dir.path().join("src.img");
    std::fs::write(&src, common::pattern(8 * MIB as usize, 7)).unwrap();
    run(
        Command::new("nbdcopy")
            .arg(&src)
            .arg(nbds(srv.port, &client)),
        T,
    );
    let back = dir.path().join("back.img");
    run(
        Command::new("nbdcopy")
            .arg(nbds(srv.port, &client))
            .arg(&back),
        T,
    );
    let back8 = std::fs::read(&back).unwrap();
    assert_eq!(
        &back8[..8 * MIB as usize],
        &std::fs::read(&src).unwrap()[..]
    );

    // qemu-io writes through TLS, qemu-img reads the result.
    run(
        Command::new("qemu-io")
            .arg("--object")
            .arg(qemu_creds(&client))
            .arg("--image-opts")
            .arg(qemu_opts(srv.port))
            .args(["-c", "write -P 0x5a 16M 1M", "-c", "read -P 0x5a 16M 1M"]),
        T,
    );
    let o = run(
        Command::new("qemu-img")
            .arg("info")
            .arg("--object")
            .arg(qemu_creds(&client))
            .arg("--image-opts")
            .arg(qemu_opts(srv.port)),
        T,
    );
    assert!(text(&o).contains("64 MiB"), "{}", text(&o));
    let img = dir.path().join("qemu.img");
    run(
        Command::new("qemu-img")
            .arg("convert")
            .arg("--object")
            .arg(qemu_creds(&client))
            .arg("--image-opts")
            .arg(qemu_opts(srv.port))
            .args(["-O", "raw"])
            .arg(&img),
        T,
    );
    assert_eq!(sha256(&img), sha256(&vol));

    // fio's nbd engine (libnbd underneath) with verify. libnbd refuses
    // `tls-certificates=` in a URI from fio (local file access, which fio
    // does not enable), so the certificates go where libnbd looks by
    // default: $HOME/.pki/libnbd, for a user other than root (root's is
    // /etc/pki/libnbd, which a test must not touch): as root, fio runs as
    // nobody.
    let home = tempfile::tempdir().unwrap();
    let libnbd = home.path().join(".pki/libnbd");
    std::fs::create_dir_all(&libnbd).unwrap();
    for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
        std::fs::copy(client.join(f), libnbd.join(f)).unwrap();
    }
    sh(&format!("chmod -R a+rX {}", home.path().display()));
    // SAFETY: geteuid has no preconditions.
    let mut fio = if unsafe { libc::geteuid() } == 0 {
        require("setpriv", "util-linux");
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "fio"]);
        c
    } else {
        Command::new("fio")
    };
    let o = run(
        fio.args([
            "--name=tls",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
            "--size=8m",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
        ])
        .arg(format!(
            "--uri=nbds://127.0.0.1:{}/{}",
            srv.port,
            common::EXPORT
        ))
        .env("HOME", home.path()),
        T,
    );
    assert!(!text(&o).contains("verify: bad"), "{}", text(&o));

    let s = srv.counters.snapshot();
    assert!(s.tls_handshakes >= 7, "{s:?}");
    assert_eq!(s.tls_failures, 0, "{s:?}");
    assert_eq!(s.tls_required_refusals, 0, "{s:?}");
}

#[test]
fn clients_without_a_valid_certificate_get_nothing_but_an_error() {
    require("nbdinfo", "libnbd-bin");
    require("qemu-img", "qemu-utils");
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = server(dir.path(), &pki, TlsMode::Require, true);
    let port = srv.port;

    // Plain text on a require export.
    let o = run_status(
        Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{port}/{}", common::EXPORT)),
        T,
    );
    assert!(!o.status.success(), "{}", text(&o));
    // TLS without a client certificate, and with one from another CA.
    for certs in ["nocert", "rogue"] {
        let o = run_status(Command::new("nbdinfo").arg(nbds(port, &pki.path(certs))), T);
        assert!(!o.status.success(), "{certs}: {}", text(&o));
        assert!(!text(&o).contains("export-size"), "{certs}: {}", text(&o));
        let o = run_status(
            Command::new("qemu-img")
                .arg("info")
                .arg("--object")
                .arg(qemu_creds(&pki.path(certs)))
                .arg("--image-opts")
                .arg(qemu_opts(port)),
            T,
        );
        assert!(!o.status.success(), "{certs}: {}", text(&o));
    }
    let s = srv.counters.snapshot();
    assert_eq!(s.handshakes_completed, 0, "{s:?}");
    // (qemu checks its own client certificate against ca-cert.pem and may
    // give up with the rogue one before it connects.)
    assert!(s.tls_failures >= 3, "{s:?}");
    assert!(s.tls_required_refusals >= 1, "{s:?}");
}

/// A rustls client with the test PKI's client certificate.
fn tls_client(
    pki: &Pki,
    tcp: std::net::TcpStream,
) -> Nbd<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.path("client/ca-cert.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let certs: Vec<_> = CertificateDer::pem_file_iter(pki.path("client/client-cert.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(pki.path("client/client-key.pem")).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .unwrap();
    let conn =
        rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("localhost").unwrap())
            .unwrap();
    Nbd {
        s: rustls::StreamOwned::new(conn, tcp),
    }
}

#[test]
fn starttls_misuse_and_plain_text_on_a_require_export() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = server(dir.path(), &pki, TlsMode::Require, true);

    // Before TLS every option but STARTTLS and ABORT is refused.
    let mut c = plain(srv.port);
    c.greet().unwrap();
    for opt in [OPT_LIST, OPT_INFO, OPT_STRUCTURED_REPLY, 999] {
        c.opt(opt, &[]).unwrap();
        assert_eq!(c.rep().unwrap(), (opt, REP_ERR_TLS_REQD, vec![]));
    }
    assert_eq!(c.go().unwrap(), REP_ERR_TLS_REQD);
    // STARTTLS with a payload is invalid, and negotiation goes on.
    c.opt(OPT_STARTTLS, b"x").unwrap();
    assert_eq!(c.rep().unwrap().1, REP_ERR_INVALID);
    // EXPORT_NAME has no error reply: the connection closes.
    c.opt(OPT_EXPORT_NAME, b"").unwrap();
    assert!(c.closed());

    // Requests sent as if the handshake were over: not understood.
    let mut c = plain(srv.port);
    c.greet().unwrap();
    c.req(0, CMD_READ, 1, 0, 4096, &[]).unwrap();
    assert!(c.closed());

    // A TLS handshake, then STARTTLS again: invalid; the session goes on
    // and reaches transmission.
    let mut c = plain(srv.port);
    c.greet().unwrap();
    c.opt(OPT_STARTTLS, &[]).unwrap();
    assert_eq!(c.rep().unwrap(), (OPT_STARTTLS, REP_ACK, vec![]));
    let mut t = tls_client(&pki, c.s);
    t.opt(OPT_STARTTLS, &[]).unwrap();
    assert_eq!(t.rep().unwrap(), (OPT_STARTTLS, REP_ERR_INVALID, vec![]));
    assert_eq!(t.go().unwrap(), REP_ACK);
    let data = common::pattern(300_000, 3);
    t.req(0, CMD_WRITE, 9, 4096, data.len() as u32, &data)
        .unwrap();
    assert_eq!(t.simple().unwrap(), (0, 9));
    t.req(0, CMD_READ, 10, 4096, data.len() as u32, &[])
        .unwrap();
    assert_eq!(t.simple().unwrap(), (0, 10));
    assert_eq!(t.rd(data.len()).unwrap(), data);
    let conns = srv.handle.connections();
    assert!(
        conns
            .iter()
            .any(|c| c.tls && c.phase == msl_nbd::ConnPhase::Transmission),
        "{conns:?}"
    );
    t.req(0, CMD_DISC, 11, 0, 0, &[]).unwrap();
    drop(t);

    // Garbage instead of a TLS ClientHello: the TLS handshake fails.
    let mut c = plain(srv.port);
    c.greet().unwrap();
    c.opt(OPT_STARTTLS, &[]).unwrap();
    assert_eq!(c.rep().unwrap().1, REP_ACK);
    c.s.write_all(&[0x16, 3, 1, 0, 5, 1, 2, 3, 4, 5, 0, 0, 0])
        .unwrap();
    let mut rest = Vec::new();
    let _ = c.s.read_to_end(&mut rest);

    let s = srv.counters.snapshot();
    assert!(s.tls_required_refusals >= 6, "{s:?}");
    assert_eq!(s.starttls_refused, 2, "{s:?}");
    assert_eq!(s.tls_handshakes, 1, "{s:?}");
    assert!(s.tls_failures >= 1, "{s:?}");
    assert_eq!(s.handshakes_completed, 1, "{s:?}");
}

#[test]
fn tls_on_serves_plain_and_tls_clients_and_off_refuses_starttls() {
    require("nbdinfo", "libnbd-bin");
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    // On, without client certificates: both kinds of client get in.
    let (srv, _) = server(dir.path(), &pki, TlsMode::On, false);
    run(
        Command::new("nbdinfo").arg(nbds(srv.port, &pki.path("nocert"))),
        T,
    );
    run(
        Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{}/{}", srv.port, common::EXPORT)),
        T,
    );
    let s = srv.counters.snapshot();
    assert_eq!(s.tls_handshakes, 1, "{s:?}");
    assert_eq!(s.handshakes_completed, 2, "{s:?}");

    // Missing files are an error naming the file.
    let bad = ServerConfig {
        tls: TlsMode::Require,
        tls_dir: dir.path().join("nowhere"),
        ..Default::default()
    };
    let e = msl_nbd::Export::with_tls(
        "x".into(),
        Arc::new(FileBackend::create(dir.path().join("b.img"), MIB).unwrap()),
        bad,
    )
    .err()
    .expect("no certificate files");
    assert!(e.to_string().contains("server-cert.pem"), "{e}");
}
