//! Two network namespaces joined by a veth pair: the test and bench
//! topology for the MSL; and [`Topology`], the same pair with a LAN between
//! the servers (direct, or through a switch namespace that is also the
//! client host), which the daemon's end-to-end tests, the harness and the
//! benches share.
//!
//! Names carry the creating process's pid and a counter, so concurrent runs
//! never collide, and namespaces left by a process that was SIGKILLed are
//! swept by the next run (their pid is gone). Cleanup runs on drop (also
//! during a panic's unwinding) and from SIGINT/SIGTERM/SIGHUP/SIGQUIT
//! handlers, which use only async-signal-safe calls.

use std::io;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::sys;

/// Prefix of every namespace this module creates.
pub const NS_PREFIX: &str = "msl-t-";

/// Address of side A on the MSL veth (inside namespace A only).
pub const IP_A: &str = "10.79.0.1";
/// Address of side B on the MSL veth (inside namespace B only).
pub const IP_B: &str = "10.79.0.2";
/// Interface name of the MSL veth end in namespace A.
pub const IF_A: &str = "msla";
/// Interface name of the MSL veth end in namespace B.
pub const IF_B: &str = "mslb";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Two namespaces `<prefix><pid>-<n>-a` / `-b` joined by a veth pair
/// (`msla` <-> `mslb`, one queue each way, given MTU, addresses
/// `IP_A`/`IP_B` /24). Deleted on drop.
#[derive(Debug)]
pub struct VethPair {
    pub ns_a: String,
    pub ns_b: String,
    pub if_a: &'static str,
    pub if_b: &'static str,
    pub mtu: usize,
    slots: [usize; 2],
}

fn ip(args: &[&str]) -> io::Result<()> {
    ip_output(args).map(|_| ())
}

/// Run `ip ARGS`; its output, or an error naming the command and what it
/// said.
pub fn ip_output(args: &[&str]) -> io::Result<std::process::Output> {
    let out = Command::new("ip").args(args).output().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "running `ip {}`: {e} (install iproute2: scripts/setup.sh)",
                args.join(" ")
            ),
        )
    })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`ip {}` failed: {} (are you root?)",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

fn delete_ns(name: &str) {
    let _ = Command::new("ip")
        .args(["netns", "del", name])
        .stderr(std::process::Stdio::null())
        .status();
    // If `ip` is missing or failed, remove the bind mount ourselves.
    sys::netns_remove(&format!("/run/netns/{name}"));
}

/// Whether `pid` is a live process (a zombie counts as dead).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(true),
        Err(_) => false,
    }
}

/// Delete namespaces with our prefix whose creating process is gone
/// (left behind by a SIGKILL).
pub fn sweep_stale() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !process_alive(pid) {
            delete_ns(&name);
        }
    }
}

impl VethPair {
    /// Create the topology. Needs root. Any failure removes what was made.
    pub fn create(mtu: usize) -> io::Result<VethPair> {
        sys::install_cleanup_handlers();
        sweep_stale();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let ns_a = format!("{NS_PREFIX}{pid}-{n}-a");
        let ns_b = format!("{NS_PREFIX}{pid}-{n}-b");
        let mut pair = VethPair {
            ns_a: ns_a.clone(),
            ns_b: ns_b.clone(),
            if_a: IF_A,
            if_b: IF_B,
            mtu,
            slots: [usize::MAX; 2],
        };
        // Register before creating, so a signal during setup cleans up.
        pair.slots[0] = sys::register_cleanup(&format!("/run/netns/{ns_a}"));
        pair.slots[1] = sys::register_cleanup(&format!("/run/netns/{ns_b}"));
        let mtu_s = mtu.to_string();
        ip(&["netns", "add", &ns_a])?;
        ip(&["netns", "add", &ns_b])?;
        ip(&["-n", &ns_a, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns_b, "link", "set", "lo", "up"])?;
        ip(&[
            "link",
            "add",
            IF_A,
            "netns",
            &ns_a,
            "numtxqueues",
            "1",
            "numrxqueues",
            "1",
            "type",
            "veth",
            "peer",
            "name",
            IF_B,
            "netns",
            &ns_b,
            "numtxqueues",
            "1",
            "numrxqueues",
            "1",
        ])?;
        for (ns, ifn, addr) in [(&ns_a, IF_A, IP_A), (&ns_b, IF_B, IP_B)] {
            // No IPv6 chatter (router solicitations, DAD) on the MSL.
            let _ = ip(&[
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{ifn}.disable_ipv6=1"),
            ]);
            ip(&["-n", ns, "link", "set", ifn, "mtu", &mtu_s, "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", ifn])?;
        }
        Ok(pair)
    }

    /// Run `f` on a thread that has entered namespace `ns`. Sockets created
    /// there stay in that namespace wherever they are used later.
    pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(ns)?;
                Ok(f())
            })
            .join()
            .map_err(|_| io::Error::other(format!("thread in netns {ns} panicked")))?
        })
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        delete_ns(&self.ns_a);
        delete_ns(&self.ns_b);
        sys::unregister_cleanup(self.slots[0]);
        sys::unregister_cleanup(self.slots[1]);
    }
}

/// Whether the process can create namespaces and raw sockets.
pub fn is_root() -> bool {
    sys::is_root()
}

/// One named network namespace with the same guarantees as [`VethPair`]:
/// a unique name (`<prefix><pid>-<n>-<tag>`, swept by [`sweep_stale`] once
/// the creating process is gone), removed on drop and from
/// SIGINT/SIGTERM/SIGHUP/SIGQUIT. For topologies with more than two hosts
/// (e.g. a LAN switch namespace next to a `VethPair`).
#[derive(Debug)]
pub struct NetNs {
    pub name: String,
    slot: usize,
}

impl NetNs {
    /// Create `<prefix><pid>-<n>-<tag>` with loopback up. Needs root.
    pub fn create(tag: &str) -> io::Result<NetNs> {
        sys::install_cleanup_handlers();
        sweep_stale();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("{NS_PREFIX}{}-{n}-{tag}", std::process::id());
        // Register before creating, so a signal during setup cleans up.
        let ns = NetNs {
            slot: sys::register_cleanup(&format!("/run/netns/{name}")),
            name,
        };
        ip(&["netns", "add", &ns.name])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        delete_ns(&self.name);
        sys::unregister_cleanup(self.slot);
    }
}

/// Move the calling thread into namespace `ns` for good (for long-lived
/// threads, e.g. a client workload whose reconnects must happen there).
pub fn enter(ns: &str) -> io::Result<()> {
    let path = format!("/run/netns/{ns}");
    sys::setns_net(&path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("entering netns {ns}: {e} (are you root?)"),
        )
    })
}

/// Address of server 1 on the test LAN (adapter [`LAN_IF_A`]).
pub const LAN_A: &str = "10.77.1.1";
/// Address of server 2 on the test LAN (adapter [`LAN_IF_B`]).
pub const LAN_B: &str = "10.77.1.2";
/// The client host's address: on the bridge in the switch namespace of a
/// [`Lan::Switched`] topology.
pub const CLIENT_IP: &str = "10.77.1.50";
/// LAN adapter names inside the server namespaces.
pub const LAN_IF_A: &str = "a-lan";
pub const LAN_IF_B: &str = "b-lan";
/// The bridge in the switch namespace.
pub const BRIDGE: &str = "br0";
/// MTU of the MSL veth pair of a [`Topology`].
pub const TOPOLOGY_MSL_MTU: usize = 9000;

/// How the two servers of a [`Topology`] share their LAN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lan {
    /// One veth pair `a-lan` <-> `b-lan`. Downing one end drops the
    /// other's carrier too: a LAN failure on both sides.
    Direct,
    /// One veth per server into a bridge in a third namespace (the
    /// switch), which is also the client host ([`CLIENT_IP`] on the
    /// bridge): one server's LAN adapter can fail alone.
    Switched,
}

/// The test hosts of a server pair, each a network namespace:
///
/// ```text
///   ns_a (server 1)                 switch (Lan::Switched: bridge + client)   ns_b (server 2)
///   msla 10.79.0.1 <================ MSL veth pair ================> mslb 10.79.0.2
///   a-lan 10.77.1.1 <--veth--> pa -- br0 10.77.1.50 (client) -- pb <--veth--> b-lan 10.77.1.2
///   (Lan::Direct: a-lan 10.77.1.1 <------------ veth ------------> b-lan 10.77.1.2)
/// ```
///
/// The daemon's end-to-end tests, the harness and the benches all build
/// their hosts here. Every namespace has the guarantees of [`VethPair`]
/// (unique names, removed on drop and on signals, swept after a SIGKILL).
#[derive(Debug)]
pub struct Topology {
    /// Server namespaces and the MSL veth pair (`msla` / `mslb`).
    pub veth: VethPair,
    /// The switch and client host namespace (`Lan::Switched` only).
    pub switch: Option<NetNs>,
}

impl Topology {
    /// Build it. Needs root; any failure removes what was made.
    pub fn create(lan: Lan) -> io::Result<Topology> {
        let veth = VethPair::create(TOPOLOGY_MSL_MTU)?;
        let topo = match lan {
            Lan::Direct => {
                ip(&[
                    "link", "add", LAN_IF_A, "netns", &veth.ns_a, "type", "veth", "peer", "name",
                    LAN_IF_B, "netns", &veth.ns_b,
                ])?;
                Topology { veth, switch: None }
            }
            Lan::Switched => {
                let sw = NetNs::create("lan")?;
                let topo = Topology {
                    veth,
                    switch: Some(sw),
                };
                topo.wire_switch()?;
                topo
            }
        };
        for (ns, ifn, addr) in [
            (&topo.veth.ns_a, LAN_IF_A, LAN_A),
            (&topo.veth.ns_b, LAN_IF_B, LAN_B),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", ifn])?;
            ip(&["-n", ns, "link", "set", ifn, "up"])?;
        }
        Ok(topo)
    }

    /// The bridge (the client host's address on it) and one port per server.
    fn wire_switch(&self) -> io::Result<()> {
        let Some(l) = self.client_ns() else {
            return Ok(());
        };
        ip(&["-n", l, "link", "add", BRIDGE, "type", "bridge"])?;
        // No STP: ports forward at once.
        ip(&[
            "-n",
            l,
            "link",
            "set",
            BRIDGE,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        ip(&["-n", l, "link", "set", BRIDGE, "up"])?;
        ip(&[
            "-n",
            l,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            BRIDGE,
        ])?;
        for (ns, ifn, port) in [
            (&self.veth.ns_a, LAN_IF_A, "pa"),
            (&self.veth.ns_b, LAN_IF_B, "pb"),
        ] {
            ip(&[
                "link", "add", ifn, "netns", ns, "type", "veth", "peer", "name", port, "netns", l,
            ])?;
            ip(&["-n", l, "link", "set", port, "master", BRIDGE, "up"])?;
        }
        Ok(())
    }

    /// Namespace of server `node` (1 or 2).
    pub fn server_ns(&self, node: u16) -> &str {
        if node == 1 {
            &self.veth.ns_a
        } else {
            &self.veth.ns_b
        }
    }

    /// The client host's namespace (the switch; `None` with `Lan::Direct`).
    pub fn client_ns(&self) -> Option<&str> {
        self.switch.as_ref().map(|s| s.name.as_str())
    }

    /// LAN adapter of server `node`.
    pub fn lan_if(node: u16) -> &'static str {
        if node == 1 {
            LAN_IF_A
        } else {
            LAN_IF_B
        }
    }

    /// MSL interface of server `node`.
    pub fn msl_if(&self, node: u16) -> &'static str {
        if node == 1 {
            self.veth.if_a
        } else {
            self.veth.if_b
        }
    }

    /// `ip link set IF up|down` inside server `node`'s namespace.
    pub fn set_link(&self, node: u16, ifname: &str, up: bool) -> io::Result<()> {
        ip(&[
            "-n",
            self.server_ns(node),
            "link",
            "set",
            ifname,
            if up { "up" } else { "down" },
        ])
    }

    /// Whether server `node` holds IPv4 address `addr` on any interface
    /// (read with `ip -n NS addr`).
    pub fn has_address(&self, node: u16, addr: &str) -> io::Result<bool> {
        let out = ip_output(&["-n", self.server_ns(node), "-o", "addr", "show"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.contains(&format!("inet {addr}/"))))
    }
}

/// A command that runs `program` inside namespace `ns` (`ip netns exec`,
/// which also remounts /sys for that namespace).
pub fn command_in(ns: &str, program: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, program]);
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn require_root() {
        assert!(
            is_root(),
            "this test needs root (network namespaces): run it as root (CI does)"
        );
    }

    /// Whether a UDP datagram sent from namespace `from` reaches `addr`
    /// in namespace `to` (three tries, half a second each).
    fn reaches(from: &str, to: &str, addr: &str) -> bool {
        use std::net::UdpSocket;
        let Ok(Ok(rx)) = VethPair::in_ns(to, || UdpSocket::bind((addr, 0))) else {
            return false;
        };
        let tx = VethPair::in_ns(from, || UdpSocket::bind("0.0.0.0:0"))
            .expect("enter the namespace")
            .expect("bind a UDP socket");
        rx.set_read_timeout(Some(std::time::Duration::from_millis(500)))
            .unwrap();
        let to_addr = rx.local_addr().unwrap();
        let mut buf = [0u8; 8];
        (0..3).any(|_| tx.send_to(b"msl", to_addr).is_ok() && rx.recv(&mut buf).is_ok())
    }

    fn carrier(ns: &str, ifname: &str) -> bool {
        let out = ip_output(&["-n", ns, "link", "show", ifname]).expect("ip link show");
        !String::from_utf8_lossy(&out.stdout).contains("NO-CARRIER")
    }

    fn exists(ns: &str) -> bool {
        std::path::Path::new(&format!("/run/netns/{ns}")).exists()
    }

    /// Direct LAN: the servers reach each other on the LAN and the MSL;
    /// downing one end drops the other's carrier; nothing is left after
    /// drop.
    #[test]
    fn test_direct_lan_reaches_peer_and_shares_carrier_and_is_removed() {
        require_root();
        let t = Topology::create(Lan::Direct).expect("create the topology");
        let (a, b) = (t.server_ns(1).to_string(), t.server_ns(2).to_string());
        assert_eq!(t.client_ns(), None);
        assert!(reaches(&a, &b, LAN_B), "LAN a -> b");
        assert!(reaches(&b, &a, IP_A), "MSL b -> a");
        assert!(t.has_address(1, LAN_A).unwrap());
        assert!(!t.has_address(1, LAN_B).unwrap());
        t.set_link(1, Topology::lan_if(1), false).unwrap();
        assert!(!carrier(&b, LAN_IF_B), "a direct veth shares its carrier");
        drop(t);
        assert!(!exists(&a) && !exists(&b), "namespaces left behind");
    }

    /// Switched LAN: both servers reach the client host and each other
    /// through the bridge; one server's adapter can fail alone.
    #[test]
    fn test_switched_lan_has_client_host_and_independent_adapters() {
        require_root();
        let t = Topology::create(Lan::Switched).expect("create the topology");
        let client = t.client_ns().expect("a client namespace").to_string();
        let (a, b) = (t.server_ns(1), t.server_ns(2));
        assert!(reaches(&client, a, LAN_A) && reaches(&client, b, LAN_B));
        assert!(reaches(a, b, LAN_B), "server to server through the bridge");
        assert!(reaches(a, &client, CLIENT_IP), "server to client host");
        t.set_link(1, LAN_IF_A, false).unwrap();
        assert!(!reaches(&client, a, LAN_A), "a-lan is down");
        assert!(carrier(b, LAN_IF_B), "b-lan keeps its carrier");
        assert!(reaches(&client, b, LAN_B));
        drop(t);
        assert!(!exists(&client), "switch namespace left behind");
    }
}
