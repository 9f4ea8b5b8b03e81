//! Gratuitous ARP through an `AF_PACKET` socket.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::{interface_index, interface_mac, Error, Result};

const ETH_P_ARP: u16 = 0x0806;
const BROADCAST: [u8; 6] = [0xff; 6];
/// Ethernet minimum frame size without FCS; some drivers do not pad.
const MIN_FRAME: usize = 60;

/// Default spacing between rounds in [`send_gratuitous_arp`].
pub const DEFAULT_GARP_INTERVAL: Duration = Duration::from_millis(100);

/// The two gratuitous-ARP styles. Hosts differ in which they honour, so
/// [`send_gratuitous_arp`] sends both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GarpKind {
    /// ARP request with sender IP = target IP = the announced address and an
    /// all-zero target MAC (RFC 5227 "ARP Announcement").
    Request,
    /// ARP reply with sender IP = target IP and target MAC = sender MAC.
    Reply,
}

/// Build a broadcast gratuitous-ARP Ethernet frame (padded to 60 bytes)
/// announcing that `ip` is at `mac`.
pub fn build_garp_frame(mac: [u8; 6], ip: Ipv4Addr, kind: GarpKind) -> [u8; MIN_FRAME] {
    let mut f = [0u8; MIN_FRAME];
    f[0..6].copy_from_slice(&BROADCAST);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    let a = &mut f[14..42];
    a[0..2].copy_from_slice(&1u16.to_be_bytes()); // htype Ethernet
    a[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // ptype IPv4
    a[4] = 6; // hlen
    a[5] = 4; // plen
    let (op, tha) = match kind {
        GarpKind::Request => (1u16, [0u8; 6]),
        GarpKind::Reply => (2u16, mac),
    };
    a[6..8].copy_from_slice(&op.to_be_bytes());
    a[8..14].copy_from_slice(&mac);
    a[14..18].copy_from_slice(&ip.octets());
    a[18..24].copy_from_slice(&tha);
    a[24..28].copy_from_slice(&ip.octets());
    f
}

/// Announce `ip` on `ifname` from the interface's MAC: `count` rounds, each
/// one request-style and one reply-style gratuitous ARP, rounds spaced by
/// [`DEFAULT_GARP_INTERVAL`]. `count == 0` sends nothing.
pub fn send_gratuitous_arp(ifname: &str, ip: Ipv4Addr, count: u32) -> Result<()> {
    send_gratuitous_arp_with_interval(ifname, ip, count, DEFAULT_GARP_INTERVAL)
}

/// [`send_gratuitous_arp`] with an explicit spacing between rounds.
pub fn send_gratuitous_arp_with_interval(
    ifname: &str,
    ip: Ipv4Addr,
    count: u32,
    interval: Duration,
) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    let index = interface_index(ifname)?;
    let mac = interface_mac(ifname)?;
    let err = |source: io::Error| Error::Os {
        op: "send gratuitous ARP",
        ifname: ifname.to_owned(),
        addr: Some(IpAddr::V4(ip)),
        source,
    };
    let sock = open_packet_socket().map_err(err)?;
    let ifindex = i32::try_from(index).map_err(|_| Error::Invalid(format!("ifindex {index}")))?;
    for round in 0..count {
        if round > 0 {
            std::thread::sleep(interval);
        }
        for kind in [GarpKind::Request, GarpKind::Reply] {
            let frame = build_garp_frame(mac, ip, kind);
            send_frame(&sock, ifindex, &frame).map_err(err)?;
        }
    }
    Ok(())
}

pub(crate) fn open_packet_socket() -> io::Result<OwnedFd> {
    // Protocol 0: send-only, the socket receives nothing.
    // SAFETY: plain socket(2) call with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send_frame(sock: &OwnedFd, ifindex: i32, frame: &[u8]) -> io::Result<()> {
    send_frame_to(sock, ifindex, ETH_P_ARP, BROADCAST, frame)
}

/// Send one complete Ethernet `frame` out of `ifindex`, addressed to `dst`
/// with EtherType `proto`.
pub(crate) fn send_frame_to(
    sock: &OwnedFd,
    ifindex: i32,
    proto: u16,
    dst: [u8; 6],
    frame: &[u8],
) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as libc::c_ushort;
    sll.sll_protocol = proto.to_be();
    sll.sll_ifindex = ifindex;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&dst);
    // SAFETY: the fd is a live AF_PACKET socket; `frame` and `sll` are valid
    // for the lengths passed and outlive the call.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != frame.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short send: {n} of {} bytes", frame.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_frames_have_the_right_layout() {
        let mac = [0x02, 0, 0, 0, 0, 0x0a];
        let ip = Ipv4Addr::new(10, 77, 1, 100);
        let req = build_garp_frame(mac, ip, GarpKind::Request);
        assert_eq!(&req[0..6], &BROADCAST);
        assert_eq!(&req[6..12], &mac);
        assert_eq!(&req[12..14], &[0x08, 0x06]);
        assert_eq!(&req[14..22], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&req[22..28], &mac);
        assert_eq!(&req[28..32], &[10, 77, 1, 100]);
        assert_eq!(&req[32..38], &[0; 6]);
        assert_eq!(&req[38..42], &[10, 77, 1, 100]);
        assert!(req[42..].iter().all(|&b| b == 0));
        let rep = build_garp_frame(mac, ip, GarpKind::Reply);
        assert_eq!(&rep[20..22], &[0, 2]);
        assert_eq!(&rep[32..38], &mac);
    }
}
