//! The test hosts: two servers and a LAN switch, each a network namespace.
//!
//! ```text
//!   ns_a (server 1)                 ns_lan (switch + client host)            ns_b (server 2)
//!   msla 10.79.0.1 <================ MSL veth pair ================> mslb 10.79.0.2
//!   a-lan 10.77.1.1 <--veth--> pa -- br0 10.77.1.50 (client) -- pb <--veth--> b-lan 10.77.1.2
//! ```
//!
//! The LAN goes through a Linux bridge so that downing one server's LAN
//! adapter leaves the other's carrier up (with a direct a-lan<->b-lan veth,
//! downing one end drops the other's carrier too, and scenario 4 could not
//! be told apart from a LAN failure on both sides).
//!
//! Namespaces come from `msl_transport::netns` (unique names, removed on
//! drop and on SIGINT/SIGTERM, swept after a SIGKILL).

use std::io;
use std::process::Command;

use msl_transport::netns::{NetNs, VethPair};

/// Address of server 1 on the LAN.
pub const LAN_A: &str = "10.77.1.1";
/// Address of server 2 on the LAN.
pub const LAN_B: &str = "10.77.1.2";
/// The client host's address (on the bridge in the LAN namespace).
pub const CLIENT_IP: &str = "10.77.1.50";
/// The floating service address (held by the primary).
pub const SERVICE_IP: &str = "10.77.1.100";
/// LAN adapter names inside the server namespaces.
pub const LAN_IF_A: &str = "a-lan";
pub const LAN_IF_B: &str = "b-lan";
/// The bridge in the LAN namespace.
pub const BRIDGE: &str = "br0";

pub use msl_transport::netns::ip_output as ip;

/// Two server namespaces joined by the MSL veth pair, plus the LAN switch
/// namespace with the client host. Everything is removed on drop.
#[derive(Debug)]
pub struct Topology {
    /// Server namespaces and the MSL veth pair (`msla` / `mslb`).
    pub veth: VethPair,
    /// The LAN switch and client host namespace.
    pub lan: NetNs,
}

impl Topology {
    /// Build it. Needs root; any failure removes what was made.
    pub fn create() -> io::Result<Topology> {
        let veth = VethPair::create(9000)?;
        let lan = NetNs::create("lan")?;
        let topo = Topology { veth, lan };
        topo.wire_lan()?;
        Ok(topo)
    }

    fn wire_lan(&self) -> io::Result<()> {
        let l = self.lan.name.as_str();
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
        for (ns, ifn, port, addr) in [
            (&self.veth.ns_a, LAN_IF_A, "pa", LAN_A),
            (&self.veth.ns_b, LAN_IF_B, "pb", LAN_B),
        ] {
            ip(&[
                "link", "add", ifn, "netns", ns, "type", "veth", "peer", "name", port, "netns", l,
            ])?;
            ip(&["-n", l, "link", "set", port, "master", BRIDGE, "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", ifn])?;
            ip(&["-n", ns, "link", "set", ifn, "up"])?;
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

    /// The client host's namespace.
    pub fn client_ns(&self) -> &str {
        &self.lan.name
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
        .map(|_| ())
    }

    /// Whether server `node` holds the service address on its LAN adapter
    /// (read with `ip -n NS addr`).
    pub fn holds_service_address(&self, node: u16) -> io::Result<bool> {
        let out = ip(&["-n", self.server_ns(node), "-o", "addr", "show"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.contains(&format!("inet {SERVICE_IP}/"))))
    }

    /// A command that runs `program` inside namespace `ns`
    /// (`ip netns exec`, which also remounts /sys for that namespace).
    pub fn command_in(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// A command that runs `program` on the client host.
    pub fn client_command(&self, program: &str) -> Command {
        Self::command_in(self.client_ns(), program)
    }

    /// Run `f` on a thread inside the client namespace (sockets it creates
    /// stay there).
    pub fn in_client_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        VethPair::in_ns(self.client_ns(), f)
    }
}
