//! msl wire format.
//!
//! * `msg`: typed message representations used by the protocol core.
//! * `frame`: the versioned frame layout, checked and authenticated by one
//!   AEGIS-128X4 MAC;
//!   `emit` / `parse` between `msg` types and bytes. Parsing untrusted bytes
//!   never panics and never allocates.
//! * `eth`: the Ethernet II header around MSL frames (EtherType 0x88B5).
//! * `frag`: splitting a message into frames that fit an MTU, and
//!   reassembling them into a fixed number of slots of bounded size, whose
//!   finished payloads can be taken over without a copy.
//! * `fuzz_support`: the fuzz targets' bodies and seed corpus, shared by the
//!   cargo-fuzz targets in `fuzz/` and the stable corpus test.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod eth;
pub mod frag;
pub mod frame;
pub mod fuzz_support;
pub mod msg;

pub use eth::{emit_eth, parse_eth, EthHeader, ETH_HEADER_LEN};
pub use frag::{
    emit_fragment, emit_fragment_head, fragment_count, max_payload_per_frame, try_fragment_count,
    Reassembled, Reassembler, ReassemblyError, MAX_FRAGMENTS,
};
pub use frame::{
    body_len, buffer_len, emit, emit_head, flags, parse, Domain, EmitError, Expect, Frame, Key,
    ParseError, Parsed, RxCounters, HEADER_LEN, KEYLESS_MAC_KEY, MAC_KEY_LEN, TAG_LEN, VERSION,
};
pub use msg::*;

/// EtherType of MSL frames.
pub const ETHERTYPE_MSL: u16 = 0x88B5;

#[cfg(test)]
mod tests;
