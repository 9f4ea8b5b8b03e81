//! `msld --check` refuses NBD settings that could not work, naming the key
//! and the file: TLS without its files, a bad allow-list entry. `--check`
//! also looks the interfaces up, so it runs in node 1's namespace of a
//! test topology (root).

mod common;

use std::process::Command;

use common::{require_root, topology, Topology};

fn check(topo: &Topology, dir: &std::path::Path, extra: &str) -> (bool, String) {
    let text = format!(
        r#"node_id = 1
peer_id = 2
cluster_id = 0x6d736c00
insecure_no_auth = true
service_address = "10.77.1.100/24"
service_interface = "a-lan"
log_file = "{d}/n1.log"
{extra}
[msl]
interface = "{msl}"
[[lan]]
interface = "a-lan"
address = "10.77.1.1"
peer_address = "10.77.1.2"
[volume]
path = "{d}/v.img"
size_bytes = 1048576
metadata = "{d}/v.meta"
"#,
        d = dir.display(),
        msl = topo.msl_if(1),
    );
    let cfg = dir.join("n1.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = common::command_in(topo.server_ns(1), env!("CARGO_BIN_EXE_msld"))
        .arg("--config")
        .arg(&cfg)
        .arg("--check")
        .arg("--create")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn test_check_names_missing_tls_files_and_bad_allow_entries() {
    require_root();
    let topo = topology();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ok, out) = check(&topo, d, "nbd_allow = [\"10.77.1.0/24\", \"::1/128\"]");
    assert!(ok, "{out}");
    let (ok, out) = check(&topo, d, "nbd_allow = [\"10.77.1.0/24\", \"10.77.1.0/40\"]");
    assert!(!ok && out.contains("`nbd_allow[1]`"), "{out}");
    let (ok, out) = check(&topo, d, "nbd_tls = \"require\"");
    assert!(!ok && out.contains("`nbd_tls_dir`"), "{out}");
    let pki = d.join("pki");
    let (ok, out) = check(
        &topo,
        d,
        &format!("nbd_tls = \"require\"\nnbd_tls_dir = \"{}\"", pki.display()),
    );
    assert!(
        !ok && out.contains("`nbd_tls_dir`") && out.contains("server-cert.pem"),
        "{out}"
    );
    // A certificate and key, but client certificates asked for and no CA.
    std::fs::create_dir(&pki).unwrap();
    let o = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "30", "-subj", "/CN=nbd.example"])
        .args(["-keyout", "server-key.pem", "-out", "server-cert.pem"])
        .current_dir(&pki)
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(o.status.success(), "{o:?}");
    let tls = format!("nbd_tls = \"require\"\nnbd_tls_dir = \"{}\"", pki.display());
    let (ok, out) = check(&topo, d, &tls);
    assert!(ok, "{out}");
    let (ok, out) = check(&topo, d, &format!("{tls}\nnbd_tls_verify_peer = true"));
    assert!(!ok && out.contains("ca-cert.pem"), "{out}");
}
