//! What the primary does to the LAN: hold the floating service address,
//! announce it with gratuitous ARP, drop it on demotion, and watch the LAN
//! adapter's link state.
//!
//! Everything acts on the network namespace of the *calling thread* (netlink
//! and packet sockets are bound to the namespace they are created in), so it
//! works for a daemon started with `ip netns exec`, and for a thread that
//! called `setns(2)`.
//!
//! Addresses and links go through rtnetlink messages (`netlink-packet-route`
//! over a synchronous `netlink-sys` socket); no shell commands, no tokio.
//! Gratuitous ARP (IPv4) and unsolicited neighbour advertisements (IPv6)
//! go out through an `AF_PACKET` socket.

#![warn(missing_docs)]

mod arp;
mod ndisc;
mod nl;

use std::io;
use std::net::IpAddr;

pub use arp::{
    build_garp_frame, send_gratuitous_arp, send_gratuitous_arp_with_interval, GarpKind,
    DEFAULT_GARP_INTERVAL,
};
pub use ndisc::{
    build_unsolicited_na_frame, icmpv6_checksum, send_unsolicited_na,
    send_unsolicited_na_with_interval, ALL_NODES, NA_FRAME_LEN,
};

/// Announce that `ip` is at `ifname`'s MAC, `count` times spaced by
/// [`DEFAULT_GARP_INTERVAL`]: gratuitous ARP (request and reply style) for
/// IPv4, unsolicited neighbour advertisements with Override for IPv6.
pub fn announce_address(ifname: &str, ip: IpAddr, count: u32) -> Result<()> {
    match ip {
        IpAddr::V4(v4) => send_gratuitous_arp(ifname, v4, count),
        IpAddr::V6(v6) => send_unsolicited_na(ifname, v6, count),
    }
}

/// Errors from this crate. Every variant names the interface (and address,
/// where there is one) and carries the OS error, whose text gives the errno
/// meaning (for example "No such device (os error 19)").
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The interface does not exist in this network namespace.
    #[error("interface {ifname:?}: no such interface in this network namespace ({source})")]
    NoSuchInterface {
        /// Interface name asked for.
        ifname: String,
        /// The kernel's answer (ENODEV).
        source: io::Error,
    },
    /// The kernel refused or failed an operation.
    #[error("{op} on interface {ifname:?}{}: {source}", addr.map(|a| format!(" address {a}")).unwrap_or_default())]
    Os {
        /// What was attempted ("add address", "send gratuitous ARP", ...).
        op: &'static str,
        /// Interface name.
        ifname: String,
        /// The address involved, if any.
        addr: Option<IpAddr>,
        /// The OS error (errno).
        source: io::Error,
    },
    /// The caller passed something unusable.
    #[error("{0}")]
    Invalid(String),
    /// The kernel answered with something this crate could not decode.
    #[error("interface {ifname:?}: unexpected netlink answer: {detail}")]
    Protocol {
        /// Interface name.
        ifname: String,
        /// What was wrong.
        detail: String,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Link state of one adapter, as the kernel reports it over rtnetlink
/// (`IFLA_OPERSTATE`, `IFLA_CARRIER`, `IFF_UP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LinkHealth {
    /// The interface exists in this namespace. When false, the other fields
    /// are false.
    pub exists: bool,
    /// Administratively up (`IFF_UP`, `ip link set X up`).
    pub admin_up: bool,
    /// Operational state is `UP` (RFC 2863 operstate).
    pub oper_up: bool,
    /// The physical (or veth peer) carrier is present.
    pub carrier: bool,
}

impl LinkHealth {
    /// The adapter can carry traffic: exists, operationally up and with carrier.
    pub fn is_healthy(&self) -> bool {
        self.exists && self.oper_up && self.carrier
    }
}

/// Index of the interface `ifname` in the calling thread's namespace.
pub fn interface_index(ifname: &str) -> Result<u32> {
    Ok(nl::get_link(ifname)?.index)
}

/// Hardware (MAC) address of `ifname`.
pub fn interface_mac(ifname: &str) -> Result<[u8; 6]> {
    let link = nl::get_link(ifname)?;
    match link.mac {
        Some(m) if m.len() == 6 => {
            let mut out = [0u8; 6];
            out.copy_from_slice(&m);
            Ok(out)
        }
        other => Err(Error::Protocol {
            ifname: ifname.to_owned(),
            detail: format!("no 6-byte hardware address (got {other:?})"),
        }),
    }
}

/// Link health of `ifname`. A missing interface is reported as
/// `exists: false`, not as an error.
pub fn link_health(ifname: &str) -> Result<LinkHealth> {
    match nl::get_link(ifname) {
        Ok(l) => Ok(LinkHealth {
            exists: true,
            admin_up: l.admin_up,
            oper_up: l.oper_up,
            carrier: l.carrier,
        }),
        Err(Error::NoSuchInterface { .. }) => Ok(LinkHealth::default()),
        Err(e) => Err(e),
    }
}

/// Add `ip/prefix` to `ifname`. Adding an address that is already there
/// (same address and prefix) is Ok. IPv6 addresses are added with `nodad`,
/// so they are usable at once.
pub fn add_address(ifname: &str, ip: IpAddr, prefix: u8) -> Result<()> {
    nl::change_address(ifname, ip, prefix, true)
}

/// Remove `ip/prefix` from `ifname`. Removing an address that is not there
/// is Ok. A missing interface is an error.
pub fn remove_address(ifname: &str, ip: IpAddr, prefix: u8) -> Result<()> {
    nl::change_address(ifname, ip, prefix, false)
}

/// Whether `ip` is assigned to `ifname` (with any prefix length).
pub fn has_address(ifname: &str, ip: IpAddr) -> Result<bool> {
    nl::has_address(ifname, ip)
}

fn check_prefix(ip: IpAddr, prefix: u8) -> Result<()> {
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if prefix > max {
        return Err(Error::Invalid(format!(
            "prefix length {prefix} is too long for {ip} (max {max})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_error_names_interface_address_and_errno() {
        let e = Error::Os {
            op: "add address",
            ifname: "lan0".into(),
            addr: Some("10.77.1.100".parse().unwrap()),
            source: io::Error::from_raw_os_error(libc::EPERM),
        };
        let s = e.to_string();
        assert!(s.starts_with("add address on interface \"lan0\" address 10.77.1.100: "));
        assert!(s.contains("Operation not permitted"), "{s}");
    }

    #[test]
    fn prefix_is_checked() {
        assert!(check_prefix("10.77.1.1".parse().unwrap(), 32).is_ok());
        assert!(check_prefix("10.77.1.1".parse().unwrap(), 33).is_err());
        assert!(check_prefix("::1".parse().unwrap(), 128).is_ok());
        assert!(check_prefix("::1".parse().unwrap(), 129).is_err());
    }
}
