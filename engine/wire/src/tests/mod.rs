//! Crate tests. One test binary (modules here, not `tests/*.rs`) keeps
//! builds lean.

mod corpus;
mod frag;
mod frame;
mod props;

use crate::frame::{buffer_len, emit, parse, Expect, Key, ParseError, Parsed};
use crate::fuzz_support::{sample_messages, FUZZ_CLUSTER};
use crate::msg::*;

pub(crate) const CLUSTER: u64 = FUZZ_CLUSTER;
pub(crate) const KEY: Key = Key([7; 32]);

pub(crate) fn header(seq: u64) -> Header {
    Header {
        cluster_id: CLUSTER,
        sender: 1,
        generation: 3,
        seq,
        ack: 2,
        flags: 0,
        frag_index: 0,
        frag_count: 1,
    }
}

pub(crate) fn expect(key: Option<&Key>) -> Expect<'_> {
    Expect {
        cluster_id: CLUSTER,
        key,
    }
}

pub(crate) fn emit_vec(h: &Header, m: &Message, payload: &[u8], key: Option<&Key>) -> Vec<u8> {
    let mut out = vec![0u8; buffer_len(m, payload.len(), key.is_some())];
    let n = emit(h, m, payload, key, &mut out).expect("emit");
    assert_eq!(n, out.len());
    out
}

pub(crate) fn parse_plain(bytes: &[u8]) -> Result<Parsed<'_>, ParseError> {
    parse(bytes, &expect(None))
}

pub(crate) fn sample(name: &str) -> (Message, Vec<u8>) {
    sample_messages()
        .into_iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, m, p)| (m, p))
        .expect("sample name")
}
