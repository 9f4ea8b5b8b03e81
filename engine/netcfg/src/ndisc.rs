//! Unsolicited IPv6 neighbour advertisements (the IPv6 counterpart of
//! gratuitous ARP) through an `AF_PACKET` socket.

use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use crate::arp::{open_packet_socket, send_frame_to};
use crate::{interface_index, interface_mac, Error, Result};

const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMPV6: u8 = 58;
const ND_NEIGHBOR_ADVERT: u8 = 136;
/// Override flag in the first byte of the NA flags word (R=0x80, S=0x40).
const NA_FLAG_OVERRIDE: u8 = 0x20;
/// Target Link-Layer Address option type.
const OPT_TARGET_LLADDR: u8 = 2;
/// All-nodes multicast ff02::1.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// Ethernet address for ff02::1 (33:33 + low 32 bits).
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
/// NA body (24) + one 8-byte Target Link-Layer Address option.
const ICMP_LEN: usize = 32;
/// Ethernet header + IPv6 header + NA with option.
pub const NA_FRAME_LEN: usize = 14 + 40 + ICMP_LEN;

/// ICMPv6 checksum (RFC 4443 2.3) of `icmp` from `src` to `dst`, over the
/// IPv6 pseudo-header. The checksum field in `icmp` must be zero.
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for c in bytes.chunks(2) {
            let hi = u32::from(c[0]) << 8;
            let lo = c.get(1).copied().map(u32::from).unwrap_or(0);
            sum += hi | lo;
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, IPPROTO_ICMPV6]);
    add(icmp);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Build an unsolicited neighbour advertisement frame announcing that `ip`
/// is at `mac`: to ff02::1 (33:33:00:00:00:01), hop limit 255, Override
/// set, Solicited clear, with a Target Link-Layer Address option. The IPv6
/// source is `ip` itself, so the frame needs nothing else from the host.
pub fn build_unsolicited_na_frame(mac: [u8; 6], ip: Ipv6Addr) -> [u8; NA_FRAME_LEN] {
    let mut f = [0u8; NA_FRAME_LEN];
    f[0..6].copy_from_slice(&ALL_NODES_MAC);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    let h = &mut f[14..54];
    h[0] = 0x60; // version 6, traffic class 0, flow label 0
    h[4..6].copy_from_slice(&(ICMP_LEN as u16).to_be_bytes());
    h[6] = IPPROTO_ICMPV6;
    h[7] = 255; // hop limit: receivers drop ND with any other value
    h[8..24].copy_from_slice(&ip.octets());
    h[24..40].copy_from_slice(&ALL_NODES.octets());
    let m = &mut f[54..];
    m[0] = ND_NEIGHBOR_ADVERT;
    m[1] = 0; // code
    m[4] = NA_FLAG_OVERRIDE;
    m[8..24].copy_from_slice(&ip.octets());
    m[24] = OPT_TARGET_LLADDR;
    m[25] = 1; // option length in units of 8 bytes
    m[26..32].copy_from_slice(&mac);
    let ck = icmpv6_checksum(ip, ALL_NODES, m);
    m[2..4].copy_from_slice(&ck.to_be_bytes());
    f
}

/// Announce `ip` on `ifname` from the interface's MAC: `count` unsolicited
/// neighbour advertisements spaced by `interval`. `count == 0` sends
/// nothing.
pub fn send_unsolicited_na_with_interval(
    ifname: &str,
    ip: Ipv6Addr,
    count: u32,
    interval: Duration,
) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    let index = interface_index(ifname)?;
    let mac = interface_mac(ifname)?;
    let err = |source: io::Error| Error::Os {
        op: "send neighbour advertisement",
        ifname: ifname.to_owned(),
        addr: Some(IpAddr::V6(ip)),
        source,
    };
    let sock = open_packet_socket().map_err(err)?;
    let ifindex = i32::try_from(index).map_err(|_| Error::Invalid(format!("ifindex {index}")))?;
    let frame = build_unsolicited_na_frame(mac, ip);
    for round in 0..count {
        if round > 0 {
            std::thread::sleep(interval);
        }
        send_frame_to(&sock, ifindex, ETH_P_IPV6, ALL_NODES_MAC, &frame).map_err(err)?;
    }
    Ok(())
}

/// [`send_unsolicited_na_with_interval`] with
/// [`crate::DEFAULT_GARP_INTERVAL`] between rounds.
pub fn send_unsolicited_na(ifname: &str, ip: Ipv6Addr, count: u32) -> Result<()> {
    send_unsolicited_na_with_interval(ifname, ip, count, crate::DEFAULT_GARP_INTERVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn na_frame_layout_and_checksum() {
        let mac = [0x02, 0, 0, 0, 0, 0x0a];
        let ip: Ipv6Addr = "fd77:1::100".parse().unwrap();
        let f = build_unsolicited_na_frame(mac, ip);
        assert_eq!(&f[0..6], &ALL_NODES_MAC);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!(f[14] >> 4, 6);
        assert_eq!(&f[18..20], &[0, 32]);
        assert_eq!(f[20], 58);
        assert_eq!(f[21], 255);
        assert_eq!(&f[22..38], &ip.octets());
        assert_eq!(&f[38..54], &ALL_NODES.octets());
        assert_eq!(f[54], 136);
        assert_eq!(f[55], 0);
        assert_eq!(&f[58..62], &[0x20, 0, 0, 0]);
        assert_eq!(&f[62..78], &ip.octets());
        assert_eq!(&f[78..80], &[2, 1]);
        assert_eq!(&f[80..86], &mac);
        // Summing over the message with its checksum in place gives 0.
        assert_eq!(icmpv6_checksum(ip, ALL_NODES, &f[54..]), 0);
        let mut zeroed = f;
        zeroed[56..58].fill(0);
        let ck = icmpv6_checksum(ip, ALL_NODES, &zeroed[54..]);
        assert_eq!(ck.to_be_bytes(), [f[56], f[57]]);
        assert_ne!(ck, 0);
    }

    #[test]
    fn checksum_matches_a_known_value() {
        // Odd-length input pads with a zero byte; all-zero data from :: to
        // :: with length 1 sums to 1 + 58 and inverts.
        let z = Ipv6Addr::UNSPECIFIED;
        assert_eq!(icmpv6_checksum(z, z, &[0]), !(1u16 + 58));
    }
}
