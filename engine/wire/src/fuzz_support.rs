//! Bodies of the fuzz targets and their seed corpus.
//!
//! The cargo-fuzz targets in `fuzz/` are one-line wrappers around the
//! `fuzz_*` functions here, so that the stable test suite can run the same
//! code over the committed seed corpus (and mutations of it) without a
//! nightly toolchain. Each function panics only when it finds a bug: a parse
//! that accepts something that does not re-emit to the same bytes, a
//! reassembly that returns the wrong payload, and so on.
//!
//! This module allocates freely; it is test support, not the data path.

use crate::eth::{emit_eth, parse_eth, ETH_HEADER_LEN};
use crate::frag::{emit_fragment, fragment_count, Reassembler};
use crate::frame::{self, emit, flags, parse, Expect, Frame, Key, Parsed};
use crate::msg::*;

/// Cluster id the fuzz targets expect (and the seeds carry).
pub const FUZZ_CLUSTER: u64 = 0x6d73_6c2d_6675_7a7a;
/// Key the keyed fuzz runs use.
pub const FUZZ_KEY: Key = Key([0x5a; 32]);
/// Frame size limit for the structured reassembly mode.
pub const FUZZ_REASM_MAX_PAYLOAD: usize = 16 * 1024;

/// If `buf` holds exactly one frame by its header's lengths, rewrite its
/// tag so that the fuzzer can reach the checks after it: under `key` if the
/// AUTH flag is set, under `KEYLESS_MAC_KEY` if it is not. A frame with the
/// AUTH flag but no `key` is left alone. Returns whether the tag was
/// rewritten.
pub fn fix_checksums(buf: &mut [u8], key: Option<&Key>) -> bool {
    let Ok(f) = Frame::new_checked(&*buf) else {
        return false;
    };
    if f.total_len() != buf.len() {
        return false;
    }
    let key = match (f.has_auth(), key) {
        (true, Some(k)) => Some(k),
        (true, None) => return false,
        (false, _) => None,
    };
    let tag = f.compute_tag(key);
    let at = f.tag_offset();
    buf[at..].copy_from_slice(&tag);
    true
}

/// Every accessor of the checked view, to prove none of them panics.
fn touch_view(data: &[u8]) {
    let f = Frame::new_unchecked(data);
    let _ = (
        f.magic(),
        f.version(),
        f.msg_type(),
        f.flags(),
        f.frag_index(),
        f.frag_count(),
        f.reserved(),
        f.cluster_id(),
        f.sender(),
        f.body_len(),
        f.payload_len(),
        f.generation(),
        f.seq(),
        f.ack(),
        f.body().len(),
        f.payload().len(),
        f.tag().len(),
        f.authenticated().len(),
        f.total_len(),
        f.verify_tag(None),
    );
    let _ = Frame::new_checked(data).map(|f| f.compute_tag(Some(&FUZZ_KEY)));
}

/// A frame `parse` accepted must re-emit to exactly the same bytes (the
/// encoding is canonical), and its payload must be a slice of the input.
fn check_accepted(p: &Parsed<'_>, data: &[u8], key: Option<&Key>) {
    let mut out = vec![0u8; data.len()];
    let n = emit(&p.header, &p.msg, p.payload, key, &mut out)
        .unwrap_or_else(|e| panic!("parsed frame does not re-emit: {e}; {p:?}"));
    assert_eq!(n, data.len(), "re-emitted length differs: {p:?}");
    assert_eq!(out, data, "re-emitted bytes differ: {p:?}");
    assert_eq!(p.header.flags & flags::AUTH != 0, key.is_some());
    assert_eq!(p.header.cluster_id, FUZZ_CLUSTER);
}

fn parse_checked(data: &[u8], key: Option<&Key>) {
    let expect = Expect {
        cluster_id: FUZZ_CLUSTER,
        key,
    };
    match parse(data, &expect) {
        Ok(p) => check_accepted(&p, data, key),
        Err(e) => {
            // Every error has a counter and a message.
            assert!(e.counter_name().starts_with("rx_"));
            assert!(!e.to_string().is_empty());
        }
    }
}

/// Fuzz target `parse_frame`: parse with and without a key, then again
/// with the checksums fixed up.
pub fn fuzz_parse_frame(data: &[u8]) {
    touch_view(data);
    parse_checked(data, None);
    parse_checked(data, Some(&FUZZ_KEY));
    let mut fixed = data.to_vec();
    if fix_checksums(&mut fixed, Some(&FUZZ_KEY)) {
        parse_checked(&fixed, None);
        parse_checked(&fixed, Some(&FUZZ_KEY));
    }
}

/// Fuzz target `parse_eth`: the Ethernet header, then the frame inside.
pub fn fuzz_parse_eth(data: &[u8]) {
    match parse_eth(data) {
        Ok((h, rest)) => {
            assert_eq!(h.ethertype, crate::ETHERTYPE_MSL);
            assert_eq!(rest.len() + ETH_HEADER_LEN, data.len());
            let mut again = vec![0u8; ETH_HEADER_LEN];
            assert_eq!(emit_eth(h.dst, h.src, &mut again), Ok(ETH_HEADER_LEN));
            assert_eq!(again[..], data[..ETH_HEADER_LEN]);
            fuzz_parse_frame(rest);
        }
        Err(e) => assert!(e.counter_name().starts_with("rx_")),
    }
}

/// Fuzz target `reassemble`. The first byte picks the mode:
///
/// * even: `data[1..]` is a sequence of records `[len: u16 BE][frame]`;
///   each frame (checksums fixed up) is parsed and pushed into one
///   `Reassembler` with few, small slots. Whatever comes out must be
///   consistent.
/// * odd: `data[1..]` describes a message, a frame size and a delivery
///   order; the message is fragmented, the fragments are delivered in that
///   order with duplicates, and the reassembled payload must equal the
///   original exactly once.
pub fn fuzz_reassemble(data: &[u8]) {
    match data.split_first() {
        Some((m, rest)) if m & 1 == 0 => reassemble_records(rest),
        Some((_, rest)) => reassemble_structured(rest),
        None => {}
    }
}

fn reassemble_records(mut data: &[u8]) {
    const MAX: usize = 4096;
    let mut r = Reassembler::new(3, MAX);
    let expect = Expect {
        cluster_id: FUZZ_CLUSTER,
        key: None,
    };
    let mut frames = 0;
    while data.len() >= 2 && frames < 512 {
        frames += 1;
        let len = usize::from(u16::from_be_bytes([data[0], data[1]]));
        let len = len.min(data.len() - 2);
        let mut frame = data[2..2 + len].to_vec();
        data = &data[2 + len..];
        fix_checksums(&mut frame, None);
        let Ok(p) = parse(&frame, &expect) else {
            continue;
        };
        if let Ok(Some((h, msg, payload))) = r.push(&p) {
            assert!(payload.len() <= MAX);
            assert_eq!((h.frag_index, h.frag_count), (0, 1));
            assert_eq!(msg, p.msg);
            assert_eq!(
                (h.sender, h.generation, h.seq),
                (p.header.sender, p.header.generation, p.header.seq)
            );
        }
        assert!(r.in_progress() <= 3);
    }
}

/// Cursor over fuzz bytes that yields zeros once exhausted.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
}

fn reassemble_structured(data: &[u8]) {
    let mut b = Bytes(data);
    let max_frame = 200 + usize::from(b.u16()) % 9000;
    let len = usize::from(b.u16()) % (FUZZ_REASM_MAX_PAYLOAD + 1);
    let keyed = b.u8() & 1 == 1;
    let key = keyed.then_some(&FUZZ_KEY);
    let fill = b.u8();
    let payload: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(fill))
        .collect();
    let msg = match b.u8() % 3 {
        0 => Message::Data(Data {
            write_id: 7,
            offset: 4096,
            len: len as u32,
            flags: data_flags::FUA,
        }),
        1 => Message::StateImage(StateImageChunk {
            total_len: len as u64,
            offset: 0,
            // Checked by the core after reassembly, not by the wire.
            image_crc: u32::from(fill),
        }),
        _ => Message::ResyncData(ResyncData {
            offset: 1 << 20,
            len: len as u32,
            flags: 0,
        }),
    };
    let header = Header {
        cluster_id: FUZZ_CLUSTER,
        sender: 2,
        generation: 9,
        seq: u64::from(b.u16()),
        ack: 0,
        flags: 0,
        frag_index: 0,
        frag_count: 1,
    };
    let n = fragment_count(&msg, len, max_frame, keyed);
    if n > crate::frag::MAX_FRAGMENTS {
        let mut out = vec![0u8; max_frame];
        assert!(emit_fragment(&header, &msg, &payload, 0, max_frame, key, &mut out).is_err());
        return;
    }
    let mut frames = Vec::with_capacity(n);
    for i in 0..n {
        let mut out = vec![0u8; max_frame];
        let w = emit_fragment(&header, &msg, &payload, i, max_frame, key, &mut out)
            .unwrap_or_else(|e| panic!("emit_fragment {i}/{n}: {e}"));
        assert!(w <= max_frame);
        out.truncate(w);
        frames.push(out);
    }
    // Delivery order: a Fisher-Yates shuffle driven by the input, then a
    // few duplicates.
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = usize::from(b.u16()) % (i + 1);
        order.swap(i, j);
    }
    let dups = usize::from(b.u8() % 4).min(n);
    for k in 0..dups {
        let at = usize::from(b.u8()) % (order.len() + 1);
        order.insert(at, order[k % n]);
    }
    let expect = Expect {
        cluster_id: FUZZ_CLUSTER,
        key,
    };
    let mut r = Reassembler::new(2, FUZZ_REASM_MAX_PAYLOAD);
    let mut delivered = 0;
    for &i in &order {
        let p = parse(&frames[i], &expect)
            .unwrap_or_else(|e| panic!("own fragment {i}/{n} refused: {e}"));
        match r.push(&p) {
            Ok(Some((h, m, got))) => {
                delivered += 1;
                assert_eq!(m, msg);
                assert_eq!(h.seq, header.seq);
                assert_eq!(got, &payload[..], "reassembled payload differs");
            }
            Ok(None) => {}
            Err(e) => panic!("reassembly of own fragments failed: {e}"),
        }
    }
    assert_eq!(delivered, expected_completions(&order, n));
}

/// How often a reassembler should deliver a message of `n` fragments that
/// arrive in `order`: duplicates within one reassembly are ignored; once all
/// `n` arrived the message is delivered and later copies start over.
pub fn expected_completions(order: &[usize], n: usize) -> usize {
    let mut seen = vec![false; n];
    let (mut have, mut done) = (0, 0);
    for &i in order {
        if !seen[i] {
            seen[i] = true;
            have += 1;
        }
        if have == n {
            done += 1;
            seen.iter_mut().for_each(|s| *s = false);
            have = 0;
        }
    }
    done
}

// ---------------------------------------------------------------------------
// Seeds.
// ---------------------------------------------------------------------------

/// One valid message of every type (with payload where allowed).
pub fn sample_messages() -> Vec<(&'static str, Message, Vec<u8>)> {
    let gens = Generations {
        current: 0x1111,
        bitmap: 0x0fff,
        history: [0x0eee, 0x0ddd, 0, 0],
    };
    let mut adapters = [AdapterHealth::default(); MAX_ADAPTERS];
    adapters[0] = AdapterHealth {
        link_up: true,
        carrier: true,
        reachable: true,
    };
    adapters[1] = AdapterHealth {
        link_up: true,
        carrier: false,
        reachable: false,
    };
    let block: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    vec![
        (
            "hello",
            Message::Hello(Hello {
                role: Role::Primary,
                disk: DiskState::UpToDate,
                volume_bytes: 1 << 30,
                block_size: 4096,
                gens,
                flags: hello_flags::CRASHED_PRIMARY,
                dirty_blocks: 12,
                session: 0xdead_beef,
                epoch: 3,
                counter: 41,
            }),
            vec![],
        ),
        (
            "data",
            Message::Data(Data {
                write_id: 42,
                offset: 8192,
                len: 4096,
                flags: data_flags::FUA,
            }),
            block.clone(),
        ),
        (
            "data-flush",
            Message::Data(Data {
                write_id: 43,
                offset: 0,
                len: 0,
                flags: data_flags::FLUSH,
            }),
            vec![],
        ),
        (
            "ack",
            Message::Ack(Ack {
                cumulative: 100,
                applied: 98,
                stable: 90,
                sack: [(102, 105), (110, 110), (0, 0), (0, 0)],
                sack_len: 2,
            }),
            vec![],
        ),
        (
            "heartbeat",
            Message::Heartbeat(Heartbeat {
                role: Role::Secondary,
                disk: DiskState::Outdated,
                msl_up: false,
                in_sync: false,
                adapters,
                adapter_count: 2,
                counter: 77,
                epoch: 3,
            }),
            vec![],
        ),
        (
            "state-image",
            Message::StateImage(StateImageChunk {
                total_len: 300,
                offset: 0,
                image_crc: 0x1234_5678,
            }),
            vec![0xab; 300],
        ),
        (
            "resync-data",
            Message::ResyncData(ResyncData {
                offset: 1 << 20,
                len: 512,
                flags: 0,
            }),
            block[..512].to_vec(),
        ),
        (
            "resync-done",
            Message::ResyncDone(ResyncDone { blocks_sent: 4096 }),
            vec![],
        ),
        (
            "role-change",
            Message::RoleChange(RoleChange {
                phase: RolePhase::Handover,
                generation: 0x2222,
            }),
            vec![],
        ),
        (
            "verify-req",
            Message::VerifyReq(Verify {
                start_block: 256,
                count: 256,
                flags: 0,
            }),
            vec![],
        ),
        (
            "verify-reply",
            Message::VerifyReply(Verify {
                start_block: 256,
                count: 4,
                flags: 0,
            }),
            (0u8..32).collect(),
        ),
        (
            "verify-req-zero-range",
            Message::VerifyReq(Verify {
                start_block: 1 << 20,
                count: 1 << 18,
                flags: verify_flags::ZERO_RANGE,
            }),
            vec![],
        ),
        (
            "verify-reply-zero-range",
            Message::VerifyReply(Verify {
                start_block: 1 << 20,
                count: 4096,
                flags: verify_flags::ZERO_RANGE,
            }),
            vec![],
        ),
    ]
}

fn sample_header(msg: &Message, seq: u64) -> Header {
    Header {
        cluster_id: FUZZ_CLUSTER,
        sender: 1,
        generation: 0x1111,
        seq: if msg.is_reliable() { seq } else { 0 },
        ack: 5,
        flags: flags::MUST_UNDERSTAND,
        frag_index: 0,
        frag_count: 1,
    }
}

fn emit_vec(h: &Header, m: &Message, payload: &[u8], key: Option<&Key>) -> Vec<u8> {
    let mut out = vec![0u8; frame::buffer_len(m, payload.len(), key.is_some())];
    let n = emit(h, m, payload, key, &mut out).unwrap_or_else(|e| panic!("seed: {e}"));
    out.truncate(n);
    out
}

fn records(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut v = vec![0u8]; // mode byte: records
    for f in frames {
        v.extend_from_slice(&(f.len() as u16).to_be_bytes());
        v.extend_from_slice(f);
    }
    v
}

/// The seed corpus: `(target, file name, bytes)`. `examples/gen_corpus.rs`
/// writes these to `fuzz/corpus/<target>/<file name>`; the corpus test
/// checks the committed files are current.
pub fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let msgs = sample_messages();
    for (i, (name, m, payload)) in msgs.iter().enumerate() {
        let h = sample_header(m, 10 + i as u64);
        let plain = emit_vec(&h, m, payload, None);
        let keyed = emit_vec(&h, m, payload, Some(&FUZZ_KEY));
        let mut eth = vec![0u8; ETH_HEADER_LEN];
        let _ = emit_eth([0x02, 0, 0, 0, 0, 2], [0x02, 0, 0, 0, 0, 1], &mut eth);
        eth.extend_from_slice(&plain);
        out.push(("parse_frame", format!("seed-{name}"), plain));
        out.push(("parse_frame", format!("seed-{name}-keyed"), keyed));
        out.push(("parse_eth", format!("seed-{name}"), eth));
    }
    // Fragmented messages as record sequences, in order and reversed.
    for (name, m, payload) in msgs.iter().filter(|(_, _, p)| p.len() > 1000) {
        let h = sample_header(m, 500);
        let max_frame = 600;
        let n = fragment_count(m, payload.len(), max_frame, false);
        let mut frames: Vec<Vec<u8>> = (0..n)
            .map(|i| {
                let mut f = vec![0u8; max_frame];
                let w = emit_fragment(&h, m, payload, i, max_frame, None, &mut f)
                    .unwrap_or_else(|e| panic!("seed fragment: {e}"));
                f.truncate(w);
                f
            })
            .collect();
        out.push(("reassemble", format!("seed-{name}-frags"), records(&frames)));
        frames.reverse();
        out.push((
            "reassemble",
            format!("seed-{name}-frags-reversed"),
            records(&frames),
        ));
    }
    // Structured mode: [mode, max_frame - 200: u16, len: u16, keyed, fill,
    // type, seq: u16, shuffle bytes...].
    let structured: [(&str, [u8; 12]); 3] = [
        // 4096-byte DATA at 1500 - 14: three fragments.
        (
            "mtu1500",
            [1, 0x05, 0x06, 0x10, 0x00, 0, 0x33, 0, 0, 7, 3, 9],
        ),
        // 4096-byte STATE_IMAGE, keyed, at 3840 - 14: two fragments.
        (
            "mtu3840",
            [1, 0x0e, 0x2a, 0x10, 0x00, 1, 0x44, 1, 0, 8, 2, 1],
        ),
        // 2048-byte RESYNC_DATA, keyed, in 264-byte frames: twelve.
        (
            "tiny-frames",
            [1, 0x00, 0x40, 0x08, 0x00, 1, 0x55, 2, 0, 2, 3, 4],
        ),
    ];
    for (name, bytes) in structured {
        out.push((
            "reassemble",
            format!("seed-structured-{name}"),
            bytes.to_vec(),
        ));
    }
    out
}
