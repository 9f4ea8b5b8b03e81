//! The `qemu-mirror` anchor of `msl-bench nbd`: QEMU's synchronous mirror,
//! the other way a user could mirror a disk over NBD on two Linux hosts.
//!
//! qemu-storage-daemon in the primary's namespace exports the source image
//! over NBD on the primary's LAN address and runs `blockdev-mirror` with
//! `copy-mode: write-blocking` to an NBD target (qemu-nbd) in the peer's
//! namespace, reached over the same MSL veth pair msl uses (10.79.0.x). Once
//! the job is ready (`query-block-jobs`), every guest write completes only
//! after it is written to the target too: the same promise as msl's
//! synchronous mode. Both processes run with the page cache and FLUSH =
//! fdatasync, like the other anchors.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fio::{command_in, Proc};

/// The mirror's NBD target in the peer's namespace.
const TARGET_PORT: u16 = 10813;

pub struct QemuMirror {
    daemon: Proc,
    target: Proc,
}

/// Make a file of `size` bytes (sparse).
fn image(path: &Path, size: u64) -> Result<(), String> {
    let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(size)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn spawn(mut c: std::process::Command, what: &str) -> Result<Proc, String> {
    c.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map(Proc)
        .map_err(|e| format!("starting {what}: {e} (bash scripts/setup.sh)"))
}

/// A QMP connection: greeting read, capabilities negotiated.
struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Qmp {
    fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t.elapsed() > timeout => {
                    return Err(format!("QMP {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        let mut q = Qmp { w: s, r };
        q.read()?; // greeting
        q.call("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        self.r
            .read_line(&mut line)
            .map_err(|e| format!("QMP read: {e}"))?;
        serde_json::from_str(&line).map_err(|e| format!("QMP reply {line:?}: {e}"))
    }

    /// Run `cmd`; its `return` value (events in between are skipped).
    fn call(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let msg = json!({"execute": cmd, "arguments": args});
        writeln!(self.w, "{msg}").map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {cmd}: {e}"));
            }
        }
    }
}

impl QemuMirror {
    /// Start the target in `peer_ns` (listening on `peer_ip`) and the
    /// mirrored export in `ns` (listening on `ip:port`), then wait until
    /// the mirror job is ready (the initial copy done, writes blocking).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        ns: &str,
        ip: &str,
        port: u16,
        peer_ns: &str,
        peer_ip: &str,
        dir: &Path,
        size: u64,
    ) -> Result<QemuMirror, String> {
        let (src, tgt) = (
            dir.join("qemu-mirror-src.img"),
            dir.join("qemu-mirror-tgt.img"),
        );
        image(&src, size)?;
        image(&tgt, size)?;
        let mut c = command_in(peer_ns, "qemu-nbd");
        c.args([
            "-t",
            "-f",
            "raw",
            "--cache=writeback",
            "--aio=threads",
            "-b",
            peer_ip,
            "-p",
        ])
        .arg(TARGET_PORT.to_string())
        .arg(&tgt);
        let target = spawn(c, "qemu-nbd (mirror target)")?;
        let qmp_path = dir.join("qemu-mirror.qmp");
        let mut c = command_in(ns, "qemu-storage-daemon");
        c.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={},cache.direct=off,aio=threads",
                src.display()
            ))
            .args(["--blockdev", "driver=raw,node-name=src,file=file0"])
            .arg("--nbd-server")
            .arg(format!("addr.type=inet,addr.host={ip},addr.port={port}"))
            .args([
                "--export",
                "type=nbd,id=exp0,node-name=src,name=src,writable=on",
            ])
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                qmp_path.display()
            ))
            .args(["--monitor", "chardev=qmp0"]);
        let daemon = spawn(c, "qemu-storage-daemon")?;
        let m = QemuMirror { daemon, target };
        let mut q = Qmp::connect(&qmp_path, Duration::from_secs(20))?;
        // The target: an NBD client node to qemu-nbd over the MSL veth.
        let t = Instant::now();
        loop {
            let r = q.call(
                "blockdev-add",
                json!({
                    "driver": "nbd", "node-name": "tgt",
                    "server": {"type": "inet", "host": peer_ip, "port": TARGET_PORT.to_string()},
                }),
            );
            match r {
                Ok(_) => break,
                Err(e) if t.elapsed() > Duration::from_secs(20) => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        q.call(
            "blockdev-mirror",
            json!({
                "job-id": "m0", "device": "src", "target": "tgt",
                "sync": "full", "copy-mode": "write-blocking",
            }),
        )?;
        let t = Instant::now();
        loop {
            let jobs = q.call("query-block-jobs", json!({}))?;
            let ready = jobs
                .as_array()
                .and_then(|a| a.iter().find(|j| j["device"] == "m0"))
                .is_some_and(|j| j["ready"] == true);
            if ready {
                break;
            }
            if t.elapsed() > Duration::from_secs(300) {
                return Err(format!("qemu mirror not ready after 300 s: {jobs}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(m)
    }

    /// Process ids of the mirror's two halves (source daemon, target).
    pub fn pids(&self) -> [u32; 2] {
        [self.daemon.0.id(), self.target.0.id()]
    }
}
