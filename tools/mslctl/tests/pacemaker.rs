//! A real two-node Pacemaker/Corosync cluster drives an msld pair through
//! the OCF agent dist/ocf/msld (`ocf:msl:msld`, a promotable clone).
//!
//! Each server namespace of a harness pair runs corosync (knet on the
//! pair's LAN addresses, `two_node: 1`) and pacemakerd in a private mount,
//! UTS and PID namespace (`ip netns exec NS unshare -mup`): its own
//! /etc/corosync, /var/lib/{corosync,pacemaker}, /var/log/{corosync,
//! pacemaker}, /run and a tmpfs /dev/shm (libqb IPC), its own hostname,
//! and the agent mounted at /usr/lib/ocf/resource.d/msl/msld. The
//! cluster is configured with cibadmin and crm_attribute only (the recipe
//! in dist/README.md). Checked: Pacemaker promotes exactly one node, whose
//! msld is primary with the other secondary in sync; a client writes
//! through NBD to the service address all along; kill -9 of the primary's
//! msld (one test) or of every process of the primary node (the other)
//! makes Pacemaker promote the other node, writes go on and no
//! acknowledged write is lost; the killed node comes back as secondary,
//! resyncs, and both volumes are identical. Each test prints its timings
//! (dist/README.md quotes them).
//!
//! Needs root and the cluster packages (`bash scripts/setup.sh` installs
//! corosync, pacemaker and pacemaker-cli-utils). Everything runs in
//! namespaces made for the run; dropping a node kills its PID namespace's
//! first process, which ends every process in it and frees its mounts.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use msl_harness::topology::{LAN_A, LAN_B};
use msl_harness::{wait_for, Pair, PairOptions, SERVICE_IP};
use serde_json::Value;

/// The first process of a node's namespaces: private mounts, hostname,
/// the agent under the OCF root; then it stays, reaping orphans (msld,
/// started in the background by the agent, is one).
const NODE_INIT: &str = r#"set -eu
R=$1 NAME=$2 CONFIG=$3 AGENT=$4
mount --make-rprivate /
mount -t tmpfs -o mode=1777 shm /dev/shm
for d in etc/corosync var/lib/corosync var/lib/pacemaker var/log/corosync var/log/pacemaker run; do
    mkdir -p "$R/$d"
    mount --bind "$R/$d" "/$d"
done
mkdir -p /var/lib/pacemaker/cib /var/lib/pacemaker/pengine /var/lib/pacemaker/blackbox \
    /var/lib/pacemaker/cores /var/log/pacemaker/bundles
chown -R hacluster:haclient /var/lib/pacemaker /var/log/pacemaker
chmod 750 /var/lib/pacemaker/*
chmod 770 /var/log/pacemaker
mkdir -p "$R/ocf/msl"
cp "$AGENT" "$R/ocf/msl/msld"
chmod 755 "$R/ocf/msl/msld"
for p in /usr/lib/ocf/resource.d/*; do
    n=${p##*/}
    [ "$n" = msl ] && continue
    mkdir -p "$R/ocf/$n"
    mount --bind "$p" "$R/ocf/$n"
done
mount --rbind "$R/ocf" /usr/lib/ocf/resource.d
mkdir -p /run/msl
ln -sfn "$CONFIG" /run/msl/msl.toml
hostname "$NAME"
touch "$R/ready"
while :; do sleep 3600 & wait $! || true; done
"#;

/// One cluster node: corosync and pacemakerd in their namespaces.
struct Node {
    name: String,
    root: PathBuf,
    /// `ip netns exec NS unshare ...`: parent of `init`.
    unshare: Child,
    /// The PID namespace's first process (host pid).
    init: u32,
    daemons: Vec<Child>,
}

impl Node {
    fn start(pair: &Pair, id: u16, cluster: &str, dir: &Path) -> Node {
        let name = format!("{cluster}-n{id}");
        let root = dir.join(format!("cluster-n{id}"));
        fs::create_dir_all(root.join("etc/corosync")).unwrap();
        fs::write(
            root.join("etc/corosync/corosync.conf"),
            corosync_conf(cluster),
        )
        .unwrap();
        let script = dir.join("cluster-node-init.sh");
        fs::write(&script, NODE_INIT).unwrap();
        let agent = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/ocf/msld");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", pair.topo.server_ns(id)])
            .args([
                "unshare",
                "--mount",
                "--uts",
                "--pid",
                "--fork",
                "--mount-proc",
            ])
            .args(["--kill-child", "bash"])
            .arg(&script)
            .arg(&root)
            .arg(&name)
            .arg(pair.config_path(id))
            .arg(&agent)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(root.join("init.err")).unwrap());
        // SAFETY: prctl only asks the kernel to SIGKILL unshare if this
        // test dies; unshare then kills the namespace's first process
        // (--kill-child), which ends the whole PID namespace.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let unshare = cmd.spawn().expect("run ip netns exec ... unshare");
        let mut node = Node {
            name,
            root,
            unshare,
            init: 0,
            daemons: Vec::new(),
        };
        let upid = node.unshare.id();
        wait_for(
            &format!("node {id}'s namespaces set up"),
            Duration::from_secs(10),
            || node.root.join("ready").exists(),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}: {}",
                fs::read_to_string(node.root.join("init.err")).unwrap_or_default()
            )
        });
        node.init = fs::read_to_string(format!("/proc/{upid}/task/{upid}/children"))
            .unwrap()
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("unshare's child");
        for (prog, args, log) in [
            ("corosync", &["-f"][..], "corosync.out"),
            ("pacemakerd", &[][..], "pacemakerd.out"),
        ] {
            let out = fs::File::create(node.root.join(log)).unwrap();
            let child = node
                .command(prog)
                .args(args)
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {prog}: {e}"));
            node.daemons.push(child);
            if prog == "corosync" {
                // pacemakerd wants corosync's IPC up.
                let n = &node;
                wait_for("corosync answering", Duration::from_secs(15), || {
                    n.run("corosync-cfgtool", &["-s"]).status.success()
                })
                .unwrap_or_else(|e| panic!("{e}\n{}", n.logs()));
            }
        }
        node
    }

    /// `program` inside this node's namespaces.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args([
            "-t",
            &self.init.to_string(),
            "-m",
            "-u",
            "-n",
            "-p",
            "--",
            program,
        ]);
        c
    }

    fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {program} on {}: {e}", self.name))
    }

    /// Run a cluster tool that must succeed; its stdout.
    fn must(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} on {}: {}\n{}{}",
            self.name,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn crm_mon(&self) -> String {
        let out = self.run("crm_mon", &["--one-shot", "--inactive"]);
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// The tails of this node's corosync and pacemaker logs.
    fn logs(&self) -> String {
        let tail = |p: PathBuf, n: usize| {
            let s = fs::read_to_string(&p).unwrap_or_default();
            let l: Vec<&str> = s.lines().filter(|l| !l.contains("info:")).collect();
            format!(
                "--- {}:\n{}\n",
                p.display(),
                l[l.len().saturating_sub(n)..].join("\n")
            )
        };
        tail(self.root.join("var/log/corosync/corosync.log"), 15)
            + &tail(self.root.join("var/log/pacemaker/pacemaker.log"), 60)
            + &tail(self.root.join("pacemakerd.out"), 10)
    }

    /// What the scheduler decided when it was this node's DC, and what
    /// interrupted its transitions (pacemaker.log).
    fn decisions(&self) -> String {
        let log = fs::read_to_string(self.root.join("var/log/pacemaker/pacemaker.log"))
            .unwrap_or_default();
        log.lines()
            .filter(|l| l.contains("notice: Actions:") || l.contains("aborted by"))
            .map(|l| format!("{l}\n"))
            .collect()
    }

    /// The pid (in this node's PID namespace) of the msld the agent runs.
    fn msld_pid(&self) -> Option<String> {
        let dir = self.root.join("run/resource-agents");
        fs::read_dir(dir).ok()?.flatten().find_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            (n.starts_with("msld-") && n.ends_with(".pid"))
                .then(|| fs::read_to_string(e.path()).ok())
                .flatten()
                .map(|s| s.trim().to_string())
        })
    }
}

impl Node {
    /// SIGKILL the node's PID namespace (corosync, pacemaker, the agent,
    /// msld: a node that dies) and reap what this test started.
    fn kill(&mut self) {
        if self.init != 0 {
            // SAFETY: kill has no memory preconditions; `init` is the
            // child of our own unshare, not reaped while unshare lives.
            unsafe { libc::kill(self.init as libc::pid_t, libc::SIGKILL) };
            self.init = 0;
        }
        for c in self
            .daemons
            .iter_mut()
            .chain(std::iter::once(&mut self.unshare))
        {
            let t = Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if t.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn corosync_conf(cluster: &str) -> String {
    format!(
        "totem {{\n  version: 2\n  cluster_name: {cluster}\n  transport: knet\n  \
         crypto_cipher: none\n  crypto_hash: none\n}}\n\
         logging {{\n  to_logfile: yes\n  logfile: /var/log/corosync/corosync.log\n  \
         to_stderr: no\n  to_syslog: no\n  timestamp: on\n}}\n\
         quorum {{\n  provider: corosync_votequorum\n  two_node: 1\n}}\n\
         nodelist {{\n  node {{\n    name: {cluster}-n1\n    nodeid: 1\n    ring0_addr: {a}\n  }}\n  \
         node {{\n    name: {cluster}-n2\n    nodeid: 2\n    ring0_addr: {b}\n  }}\n}}\n",
        a = ip_only(LAN_A),
        b = ip_only(LAN_B),
    )
}

fn ip_only(a: &str) -> &str {
    a.split('/').next().unwrap()
}

/// The promotable clone of ocf:msl:msld (the recipe in dist/README.md;
/// the short monitor intervals make the test quick).
fn clone_xml(msld: &Path, mslctl: &str) -> String {
    format!(
        r#"<clone id="msl-clone">
  <meta_attributes id="msl-clone-meta">
    <nvpair id="msl-clone-promotable" name="promotable" value="true"/>
    <nvpair id="msl-clone-promoted-max" name="promoted-max" value="1"/>
    <nvpair id="msl-clone-clone-max" name="clone-max" value="2"/>
    <nvpair id="msl-clone-notify" name="notify" value="true"/>
  </meta_attributes>
  <primitive id="msl" class="ocf" provider="msl" type="msld">
    <instance_attributes id="msl-params">
      <nvpair id="msl-config" name="config" value="/run/msl/msl.toml"/>
      <nvpair id="msl-msld" name="msld" value="{msld}"/>
      <nvpair id="msl-mslctl" name="mslctl" value="{mslctl}"/>
    </instance_attributes>
    <operations>
      <op id="msl-start" name="start" interval="0s" timeout="40s"/>
      <op id="msl-stop" name="stop" interval="0s" timeout="100s"/>
      <op id="msl-promote" name="promote" interval="0s" timeout="90s"/>
      <op id="msl-demote" name="demote" interval="0s" timeout="90s"/>
      <op id="msl-monitor-promoted" name="monitor" interval="2s" role="Promoted" timeout="20s"/>
      <op id="msl-monitor-unpromoted" name="monitor" interval="3s" role="Unpromoted" timeout="20s"/>
    </operations>
  </primitive>
</clone>"#,
        msld = msld.display()
    )
}

/// A client on the LAN writing 4 KiB blocks through NBD to the service
/// address, one qemu-io per write (each bounded by `timeout`), each to a
/// new block with its own pattern; the acknowledged ones are recorded.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(u64, u8, Instant)>>>,
    failed: Arc<Mutex<u64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const BLOCK: u64 = 4096;

fn pattern(i: u64) -> u8 {
    (i % 250 + 1) as u8
}

fn nbd_url(pair: &Pair) -> String {
    format!("nbd://{SERVICE_IP}:{}", pair.opts.nbd_port)
}

impl Writer {
    fn start(pair: &Pair, client_ns: String) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(Mutex::new(0));
        let blocks = pair.opts.volume_bytes / BLOCK;
        let url = nbd_url(pair);
        let (s, a, f) = (stop.clone(), acked.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            let mut i = 0;
            while !s.load(Ordering::Relaxed) && i < blocks {
                let cmd = format!("write -P {} {} {BLOCK}", pattern(i), i * BLOCK);
                let out = Command::new("ip")
                    .args(["netns", "exec", &client_ns, "timeout", "5", "qemu-io"])
                    .args(["-f", "raw", "-c", &cmd, "-c", "flush", &url])
                    .output();
                let ok = out.as_ref().is_ok_and(|o| {
                    o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("failed")
                });
                if ok {
                    a.lock().unwrap().push((i, pattern(i), Instant::now()));
                    std::thread::sleep(Duration::from_millis(25));
                } else {
                    *f.lock().unwrap() += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                i += 1;
            }
        });
        Writer {
            stop,
            acked,
            failed,
            thread: Some(thread),
        }
    }

    fn acked(&self) -> Vec<(u64, u8, Instant)> {
        self.acked.lock().unwrap().clone()
    }

    /// Stop; the acknowledged writes and the number that failed.
    fn finish(mut self) -> (Vec<(u64, u8, Instant)>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let failed = *self.failed.lock().unwrap();
        (self.acked(), failed)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn require(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        || Path::new("/usr/sbin").join(program).is_file();
    assert!(
        found,
        "{program} missing: run `bash scripts/setup.sh` as root (installs {package})"
    );
}

/// Which node's msld is primary (None while neither answers as one);
/// fails the test if both do.
fn primary_of(pair: &Pair) -> Option<u16> {
    let role = |id| pair.status(id).ok().map(|s: Value| s["role"] == "primary");
    match (role(1), role(2)) {
        (Some(true), Some(true)) => panic!("two primaries:\n{}", pair.diagnostics()),
        (Some(true), _) => Some(1),
        (_, Some(true)) => Some(2),
        _ => None,
    }
}

/// A harness pair (msld with `role_control = "cluster"`) under a two-node
/// cluster configured with the recipe of dist/README.md, one node
/// promoted and the other in sync.
struct Cluster {
    // Dropped first: the cluster (and the msld it runs) before the pair's
    // namespaces.
    nodes: Vec<Node>,
    pair: Pair,
    name: String,
    t0: Instant,
    /// The promoted node.
    p: u16,
}

impl Cluster {
    fn up() -> Cluster {
        for (p, pkg) in [
            ("corosync", "corosync"),
            ("pacemakerd", "pacemaker"),
            ("cibadmin", "pacemaker-cli-utils"),
            ("crm_attribute", "pacemaker-cli-utils"),
            ("crm_mon", "pacemaker-cli-utils"),
            ("qemu-io", "qemu-utils"),
            ("nsenter", "util-linux"),
        ] {
            require(p, pkg);
        }
        assert!(
            Path::new("/usr/lib/ocf/lib/heartbeat/ocf-shellfuncs").exists(),
            "ocf-shellfuncs missing: run `bash scripts/setup.sh` (resource-agents)"
        );
        let t0 = Instant::now();
        let pair = Pair::new(
            PairOptions {
                volume_bytes: 16 << 20,
                ..PairOptions::default()
            }
            .tunable("role_control", "\"cluster\""),
        )
        .expect("build the pair (run as root)");
        let msld = msl_harness::bins::binary("msld").unwrap();
        let mslctl = env!("CARGO_BIN_EXE_mslctl");
        for (id, args) in [(1, &["--initial-primary"][..]), (2, &[][..])] {
            let out = Command::new(mslctl)
                .arg("create-md")
                .args(args)
                .arg("--config")
                .arg(pair.config_path(id))
                .output()
                .unwrap();
            assert!(out.status.success(), "create-md on node {id}: {out:?}");
        }
        // Unique to the run: the test's pid and the run directory's suffix.
        let tag = pair
            .dir()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let name = format!(
            "msl{}{}",
            std::process::id(),
            tag.rsplit('-').next().unwrap().to_lowercase()
        );
        let nodes = vec![
            Node::start(&pair, 1, &name, pair.dir()),
            Node::start(&pair, 2, &name, pair.dir()),
        ];
        let mut c = Cluster {
            nodes,
            pair,
            name,
            t0,
            p: 0,
        };
        let formed = c.wait_online(1);
        eprintln!("cluster formed: {:.1} s", formed.as_secs_f64());

        // The configuration: the recipe of dist/README.md.
        let n = &c.nodes[0];
        for (name, value) in [("stonith-enabled", "false"), ("no-quorum-policy", "ignore")] {
            n.must(
                "crm_attribute",
                &["--type", "crm_config", "--name", name, "--update", value],
            );
        }
        n.must(
            "cibadmin",
            &[
                "--create",
                "--scope",
                "resources",
                "--xml-text",
                &clone_xml(&msld, mslctl),
            ],
        );

        // Exactly one node promoted (either: both are in sync once node 2
        // has resynced from node 1, the only one with up-to-date data at
        // first).
        let t = Instant::now();
        c.wait("Pacemaker promotes one node", 40, |c| {
            primary_of(&c.pair).is_some()
        });
        c.p = primary_of(&c.pair).unwrap();
        let (p, q) = (c.p, 3 - c.p);
        c.pair
            .wait_in_sync(p, Duration::from_secs(40))
            .unwrap_or_else(|e| panic!("{e}\n{}", c.diag()));
        eprintln!(
            "node {p} promoted, node {q} secondary in sync: {:.1} s after the configuration",
            t.elapsed().as_secs_f64()
        );
        c.roles_shown(p, q);
        for id in [1, 2] {
            assert_eq!(c.pair.status(id).unwrap()["role_control"], "cluster");
        }
        assert!(c.pair.topo.holds_service_address(p).unwrap());
        assert!(!c.pair.topo.holds_service_address(q).unwrap());
        c
    }

    fn node(&self, id: u16) -> &Node {
        &self.nodes[usize::from(id - 1)]
    }

    /// Wait (at most `secs`) for `f`; on time-out fail with the cluster's
    /// and the pair's state.
    fn wait(&self, what: &str, secs: u64, f: impl Fn(&Cluster) -> bool) -> Duration {
        wait_for(what, Duration::from_secs(secs), || f(self))
            .unwrap_or_else(|e| panic!("{e}\n{}", self.diag()))
    }

    /// Wait until node `id` sees both nodes online, with a DC.
    fn wait_online(&self, id: u16) -> Duration {
        let want = format!("Online: [ {}-n1 {}-n2 ]", self.name, self.name);
        self.wait("both nodes online with a DC", 60, |c| {
            let m = c.node(id).crm_mon();
            m.contains("partition with quorum") && m.contains(&want)
        })
    }

    fn diag(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            if n.init != 0 {
                s += &n.crm_mon();
                s += &n.logs();
            }
        }
        s + &self.pair.diagnostics()
    }

    /// crm_mon (run on node `promoted`) shows this promotion once no
    /// action is pending (it lists instances one by one meanwhile); its
    /// output.
    fn roles_shown(&self, promoted: u16, unpromoted: u16) -> String {
        let (p, u) = (&self.node(promoted).name, &self.node(unpromoted).name);
        let want = [format!("Promoted: [ {p} ]"), format!("Unpromoted: [ {u} ]")];
        let shown = |mon: &str| want.iter().all(|w| mon.contains(w.as_str()));
        let what = format!("crm_mon showing {p} promoted and {u} unpromoted");
        self.wait(&what, 20, |c| shown(&c.node(promoted).crm_mon()));
        self.node(promoted).crm_mon()
    }

    /// A client writes all along; `kill` takes the primary down; Pacemaker
    /// promotes the other node, writes go on, and every acknowledged
    /// write reads back from the new primary. Prints the timings.
    fn fail_over(&mut self, what: &str, kill: impl FnOnce(&mut Cluster)) {
        let (p, q) = (self.p, 3 - self.p);
        let writer = Writer::start(&self.pair, self.pair.topo.client_ns().to_string());
        self.wait("20 writes acknowledged", 20, |_| writer.acked().len() >= 20);
        let killed = Instant::now();
        kill(self);
        let promoted = self.wait(&format!("Pacemaker promotes node {q}"), 40, |c| {
            primary_of(&c.pair) == Some(q)
        });
        eprintln!(
            "{what} of node {p} -> node {q} primary: {:.2} s; the scheduler:\n{}",
            promoted.as_secs_f64(),
            self.node(q).decisions()
        );
        let after = Instant::now();
        self.wait("20 writes acknowledged after the failover", 30, |_| {
            writer.acked().iter().filter(|w| w.2 > after).count() >= 20
        });
        let first_after = writer
            .acked()
            .iter()
            .find(|w| w.2 > killed)
            .map(|w| w.2 - killed)
            .unwrap();
        let (acked, failed) = writer.finish();
        eprintln!(
            "writes: {} acknowledged, {failed} failed; the first acknowledged after the kill {:.2} s later",
            acked.len(),
            first_after.as_secs_f64()
        );
        let mut reads = Vec::new();
        for (i, p, _) in &acked {
            reads.push("-c".to_string());
            reads.push(format!("read -P {p} {} {BLOCK}", i * BLOCK));
        }
        let out = self
            .pair
            .topo
            .client_command("qemu-io")
            .args(["-f", "raw"])
            .args(&reads)
            .arg(nbd_url(&self.pair))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !text.contains("failed"),
            "acknowledged writes lost after the failover:\n{text}"
        );
        assert!(self.pair.topo.holds_service_address(q).unwrap());
        self.p = q;
    }

    /// The old primary `old` is back as secondary, resynced: both volumes
    /// identical, crm_mon shows the new roles, all within the deadline.
    fn rejoined(&self, old: u16) {
        let p = self.p;
        self.pair
            .wait_in_sync(p, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}\n{}", self.diag()));
        assert!(self.pair.topo.holds_service_address(p).unwrap());
        assert!(!self.pair.topo.holds_service_address(old).unwrap());
        assert_eq!(
            self.pair.sha256(1).unwrap(),
            self.pair.sha256(2).unwrap(),
            "volumes differ after the resync"
        );
        let mon = self.roles_shown(p, old);
        eprintln!("{mon}");
        let total = self.t0.elapsed();
        eprintln!("total: {:.1} s", total.as_secs_f64());
        let deadline = Duration::from_secs(150);
        assert!(total < deadline, "took {total:?}, over {deadline:?}");
    }
}

#[test]
fn test_pacemaker_promotes_one_node_fails_over_after_kill9_and_resyncs_the_killed_one() {
    let mut c = Cluster::up();
    let old = c.p;
    c.fail_over("kill -9 of msld", |c| {
        let n = c.node(c.p);
        let pid = n.msld_pid().expect("the agent's pid file for msld");
        n.must("kill", &["-9", &pid]);
    });
    // Pacemaker restarts msld there; it comes back as secondary.
    c.rejoined(old);
}

#[test]
fn test_pacemaker_promotes_the_peer_when_the_primary_node_dies_and_takes_it_back_as_secondary() {
    let mut c = Cluster::up();
    let old = c.p;
    c.fail_over(
        "SIGKILL of every process (corosync, pacemaker, msld)",
        |c| {
            c.nodes[usize::from(c.p - 1)].kill();
        },
    );
    // The node boots again: a fresh /run (the agent's pid file is gone),
    // then corosync and pacemaker; Pacemaker starts msld as secondary.
    let i = usize::from(old - 1);
    let root = c.nodes[i].root.clone();
    fs::remove_dir_all(root.join("run")).unwrap();
    fs::remove_file(root.join("ready")).unwrap();
    c.nodes[i] = Node::start(&c.pair, old, &c.name, c.pair.dir());
    c.wait_online(old);
    c.rejoined(old);
}
