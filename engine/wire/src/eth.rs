//! Ethernet II header around MSL frames.
//!
//! MSL frames are raw Ethernet with EtherType `ETHERTYPE_MSL` (0x88B5, the
//! IEEE "local experimental" EtherType). No VLAN tag: the MSL is a dedicated
//! point-to-point link.

use crate::frame::{EmitError, Field, ParseError};
use crate::ETHERTYPE_MSL;

/// Length of the Ethernet II header (dst, src, EtherType).
pub const ETH_HEADER_LEN: usize = 14;

/// Byte offsets of the Ethernet II header fields.
pub mod field {
    use super::Field;
    /// Destination MAC.
    pub const DST: Field = 0..6;
    /// Source MAC.
    pub const SRC: Field = 6..12;
    /// EtherType.
    pub const ETHERTYPE: Field = 12..14;
}

/// A parsed Ethernet II header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EthHeader {
    /// Destination MAC address.
    pub dst: [u8; 6],
    /// Source MAC address.
    pub src: [u8; 6],
    /// EtherType (always `ETHERTYPE_MSL` after `parse_eth` succeeds).
    pub ethertype: u16,
}

/// Write an Ethernet II header with EtherType `ETHERTYPE_MSL` into the first
/// `ETH_HEADER_LEN` bytes of `out`; returns `ETH_HEADER_LEN`.
pub fn emit_eth(dst: [u8; 6], src: [u8; 6], out: &mut [u8]) -> Result<usize, EmitError> {
    let have = out.len();
    let Some(h) = out.get_mut(..ETH_HEADER_LEN) else {
        return Err(EmitError::BufferTooSmall {
            need: ETH_HEADER_LEN,
            have,
        });
    };
    h[field::DST].copy_from_slice(&dst);
    h[field::SRC].copy_from_slice(&src);
    h[field::ETHERTYPE].copy_from_slice(&ETHERTYPE_MSL.to_be_bytes());
    Ok(ETH_HEADER_LEN)
}

/// Split an Ethernet II frame into its header and the bytes after it.
///
/// Refuses frames shorter than the header (`Truncated`) and frames of any
/// other EtherType (`BadEtherType`). Never panics, never copies.
pub fn parse_eth(bytes: &[u8]) -> Result<(EthHeader, &[u8]), ParseError> {
    if bytes.len() < ETH_HEADER_LEN {
        return Err(ParseError::Truncated {
            need: ETH_HEADER_LEN,
            have: bytes.len(),
        });
    }
    let (h, rest) = bytes.split_at(ETH_HEADER_LEN);
    let mut dst = [0u8; 6];
    let mut src = [0u8; 6];
    let mut et = [0u8; 2];
    dst.copy_from_slice(&h[field::DST]);
    src.copy_from_slice(&h[field::SRC]);
    et.copy_from_slice(&h[field::ETHERTYPE]);
    let ethertype = u16::from_be_bytes(et);
    if ethertype != ETHERTYPE_MSL {
        return Err(ParseError::BadEtherType(ethertype));
    }
    Ok((
        EthHeader {
            dst,
            src,
            ethertype,
        },
        rest,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_eth_roundtrip() {
        let mut buf = [0u8; 20];
        buf[14..].copy_from_slice(b"abcdef");
        let n = emit_eth([1; 6], [2; 6], &mut buf).unwrap();
        assert_eq!(n, ETH_HEADER_LEN);
        let (h, rest) = parse_eth(&buf).unwrap();
        assert_eq!(h.dst, [1; 6]);
        assert_eq!(h.src, [2; 6]);
        assert_eq!(h.ethertype, 0x88B5);
        assert_eq!(rest, b"abcdef");
    }

    #[test]
    fn test_eth_short_buffer_refused() {
        let mut buf = [0u8; 13];
        assert_eq!(
            emit_eth([1; 6], [2; 6], &mut buf),
            Err(EmitError::BufferTooSmall { need: 14, have: 13 })
        );
        assert_eq!(
            parse_eth(&buf),
            Err(ParseError::Truncated { need: 14, have: 13 })
        );
    }

    #[test]
    fn test_eth_wrong_ethertype_refused() {
        let mut buf = [0u8; 14];
        emit_eth([1; 6], [2; 6], &mut buf).unwrap();
        buf[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let e = parse_eth(&buf).unwrap_err();
        assert_eq!(e, ParseError::BadEtherType(0x0800));
        assert_eq!(e.counter_name(), "rx_bad_ethertype");
    }
}
