//! Real NBD clients (libnbd's nbdinfo/nbdcopy, qemu-io, qemu-img, fio's nbd
//! engine) against FileBackend on a temp file, over 127.0.0.1. A missing
//! client is a failure naming its Debian package.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{pattern, require, run, run_status, sha256, TestServer};
use msl_nbd::{FileBackend, ServerConfig};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(60);

fn file_server(dir: &Path, size: u64, cfg: ServerConfig) -> (TestServer, std::path::PathBuf) {
    let path = dir.join("volume.img");
    let be = FileBackend::create(&path, size).expect("create backing file");
    (TestServer::start(Arc::new(be), cfg), path)
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn nbdinfo_sees_size_and_block_sizes() {
    require("nbdinfo", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = file_server(dir.path(), 64 * MIB, ServerConfig::default());
    let out = stdout(&run(Command::new("nbdinfo").arg(srv.uri()), T));
    println!("{out}");
    assert!(out.contains(&format!("export-size: {}", 64 * MIB)), "{out}");
    assert!(out.contains("block_size_minimum: 1"), "{out}");
    assert!(out.contains("block_size_preferred: 4096"), "{out}");
    assert!(
        out.contains(&format!("block_size_maximum: {}", 32 * MIB)),
        "{out}"
    );
    assert!(out.contains("can_fua: true"), "{out}");
    assert!(out.contains("can_trim: true"), "{out}");
    assert!(out.contains("can_zero: true"), "{out}");
    assert!(out.contains("can_flush: true"), "{out}");
    assert!(out.contains("can_multi_conn: true"), "{out}");
    assert!(out.contains("base:allocation"), "{out}");

    // --list: OPT_LIST, then OPT_INFO for each export.
    let out = stdout(&run(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(format!("nbd://127.0.0.1:{}", srv.port)),
        T,
    ));
    println!("{out}");
    assert!(
        out.contains("export=\"msl\"") || out.contains("msl"),
        "{out}"
    );

    // Wrong export name: NBD_REP_ERR_UNKNOWN, a clean client error.
    let o = run_status(
        Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{}/nope", srv.port)),
        T,
    );
    assert!(!o.status.success());

    // Read-only export.
    let (ro, _) = file_server(
        &dir.path().join(""),
        MIB,
        ServerConfig {
            read_only: true,
            ..Default::default()
        },
    );
    let out = stdout(&run(Command::new("nbdinfo").arg(ro.uri()), T));
    assert!(out.contains("is_read_only: true"), "{out}");
    let snap = srv.counters.snapshot();
    assert_eq!(snap.handshake_failures, 0, "{snap:?}");
}

#[test]
fn qemu_io_pattern_write_read_zero_discard() {
    require("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let (srv, path) = file_server(dir.path(), 16 * MIB, ServerConfig::default());
    let out = stdout(&run(
        Command::new("qemu-io")
            .args(["-f", "raw", &srv.uri()])
            .args(["-c", "write -P 0xab 0 1M"])
            .args(["-c", "read -P 0xab 0 1M"])
            .args(["-c", "write -P 0xcd 1M 3M"])
            .args(["-c", "write -z 2M 512k"])
            .args(["-c", "read -P 0 2M 512k"])
            .args(["-c", "read -P 0xcd 1M 1M"])
            .args(["-c", "aio_write -P 0x11 8M 64k"])
            .args(["-c", "aio_write -P 0x22 9M 64k"])
            .args(["-c", "aio_flush"])
            .args(["-c", "read -P 0x11 8M 64k"])
            .args(["-c", "read -P 0x22 9M 64k"])
            .args(["-c", "discard 12M 1M"])
            .args(["-c", "flush"]),
        T,
    ));
    println!("{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.to_lowercase().contains("error"), "{out}");
    let data = std::fs::read(&path).unwrap();
    let m = MIB as usize;
    assert!(data[..m].iter().all(|&b| b == 0xab));
    assert!(data[m..2 * m].iter().all(|&b| b == 0xcd));
    assert!(data[2 * m..2 * m + m / 2].iter().all(|&b| b == 0));
    assert!(data[2 * m + m / 2..4 * m].iter().all(|&b| b == 0xcd));
    assert!(data[8 * m..8 * m + 65536].iter().all(|&b| b == 0x11));
    assert!(data[9 * m..9 * m + 65536].iter().all(|&b| b == 0x22));
    let s = srv.counters.snapshot();
    assert!(
        s.req_write >= 4 && s.req_write_zeroes >= 1 && s.req_trim >= 1,
        "{s:?}"
    );
    assert_eq!(
        s.err_einval + s.err_eio + s.err_enospc + s.err_eperm,
        0,
        "{s:?}"
    );
}

/// A 32 MiB random image with a zero run in the middle (so clients use
/// WRITE_ZEROES), copied in and out by qemu-img and by nbdcopy.
#[test]
fn qemu_img_and_nbdcopy_round_trip_sha256() {
    require("qemu-img", "qemu-utils");
    require("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    let mut src = pattern(size as usize, 0x5eed);
    src[(8 * MIB) as usize..(12 * MIB) as usize].fill(0);
    let src_path = dir.path().join("src.img");
    std::fs::write(&src_path, &src).unwrap();
    let want = sha256(&src_path);

    // qemu-img in and out.
    let (srv, vol) = file_server(dir.path(), size, ServerConfig::default());
    run(
        Command::new("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src_path)
            .arg(srv.uri()),
        T,
    );
    assert_eq!(sha256(&vol), want, "backing file after qemu-img convert in");
    let out1 = dir.path().join("out-qemu.img");
    run(
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(srv.uri())
            .arg(&out1),
        T,
    );
    assert_eq!(sha256(&out1), want, "qemu-img convert out");
    let s = srv.counters.snapshot();
    println!("qemu-img: {s:?}");
    assert!(s.req_write_zeroes >= 1 && s.req_block_status >= 1, "{s:?}");
    drop(srv);

    // nbdcopy in and out, on a fresh volume.
    let sub = dir.path().join("b");
    std::fs::create_dir(&sub).unwrap();
    let (srv, vol) = file_server(&sub, size, ServerConfig::default());
    run(Command::new("nbdcopy").arg(&src_path).arg(srv.uri()), T);
    assert_eq!(sha256(&vol), want, "backing file after nbdcopy in");
    let out2 = dir.path().join("out-nbdcopy.img");
    run(Command::new("nbdcopy").arg(srv.uri()).arg(&out2), T);
    assert_eq!(sha256(&out2), want, "nbdcopy out");
    let s = srv.counters.snapshot();
    println!("nbdcopy: {s:?}");
    assert!(s.req_write_zeroes >= 1 && s.req_block_status >= 1, "{s:?}");
    assert!(s.req_write > 0 && s.req_read > 0, "{s:?}");
    assert_eq!(
        s.err_einval + s.err_eio + s.err_enospc + s.err_eperm,
        0,
        "{s:?}"
    );
}

#[test]
fn fio_randwrite_verify_flush_and_trim() {
    require("fio", "fio");
    let dir = tempfile::tempdir().unwrap();
    let (srv, _) = file_server(dir.path(), 96 * MIB, ServerConfig::default());
    // Two jobs = two connections (CAN_MULTI_CONN), disjoint 32 MiB regions,
    // 4 KiB random writes at iodepth 16, FLUSH every 8 writes, then verify.
    let out = stdout(&run(
        Command::new("fio")
            .args(["--name=randwrite", "--ioengine=nbd"])
            .arg(format!("--uri={}", srv.uri()))
            .args(["--rw=randwrite", "--bs=4k", "--iodepth=16", "--fsync=8"])
            .args(["--size=32M", "--numjobs=2", "--offset_increment=32M"])
            .args([
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
            ])
            .args(["--runtime=20", "--group_reporting"]),
        Duration::from_secs(120),
    ));
    println!("{out}");
    assert!(out.contains("err= 0"), "{out}");
    // Trim job over a third region.
    let out = stdout(&run(
        Command::new("fio")
            .args(["--name=trim", "--ioengine=nbd"])
            .arg(format!("--uri={}", srv.uri()))
            .args(["--rw=randtrim", "--bs=64k", "--iodepth=16", "--size=16M"])
            .args(["--offset=64M", "--runtime=10"]),
        Duration::from_secs(60),
    ));
    println!("{out}");
    assert!(out.contains("err= 0"), "{out}");
    let s = srv.counters.snapshot();
    println!("{}", s.prometheus("msl_nbd_"));
    assert!(s.req_write >= 16384, "{s:?}");
    assert!(s.req_flush >= 2048, "{s:?}");
    assert!(s.req_trim >= 256, "{s:?}");
    assert!(s.req_read >= 16384, "{s:?}");
    assert_eq!(
        s.err_einval + s.err_eio + s.err_enospc + s.err_eperm,
        0,
        "{s:?}"
    );
}
