//! Fragmentation budget and reassembly.

use super::*;
use crate::eth::ETH_HEADER_LEN;
use crate::frag::{
    emit_fragment, fragment_count, max_payload_per_frame, try_fragment_count, Reassembler,
    ReassemblyError, MAX_FRAGMENTS, SLOT_CHUNKS_KEPT,
};
use crate::frame::EmitError;

const MTU_1500: usize = 1500 - ETH_HEADER_LEN;
const MTU_9000: usize = 9000 - ETH_HEADER_LEN;
const AF_XDP_3840: usize = 3840 - ETH_HEADER_LEN;

fn data_msg(len: u32) -> Message {
    Message::Data(Data {
        write_id: 1,
        offset: 0,
        len,
        flags: 0,
    })
}

fn block(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 13 + i / 256) as u8).collect()
}

/// Emit every fragment; check each fits `max_frame`.
fn fragments(
    h: &Header,
    m: &Message,
    payload: &[u8],
    max_frame: usize,
    key: Option<&Key>,
) -> Vec<Vec<u8>> {
    let n = fragment_count(m, payload.len(), max_frame, key.is_some());
    (0..n)
        .map(|i| {
            let mut out = vec![0u8; max_frame];
            let w = emit_fragment(h, m, payload, i, max_frame, key, &mut out).expect("fragment");
            assert!(w <= max_frame, "fragment {i} is {w} > {max_frame}");
            out.truncate(w);
            out
        })
        .collect()
}

fn reassemble_in(
    r: &mut Reassembler,
    frames: &[Vec<u8>],
    order: &[usize],
    key: Option<&Key>,
) -> Vec<(Header, Message, Vec<u8>)> {
    let mut done = Vec::new();
    for &i in order {
        let p = parse(&frames[i], &expect(key)).expect("parse fragment");
        if let Some((h, m, pl)) = r.push(&p).expect("push") {
            done.push((h, m, pl.to_vec()));
        }
    }
    done
}

#[test]
fn test_mtu9000_data_4096_one_frame() {
    let m = data_msg(4096);
    for keyed in [false, true] {
        assert_eq!(fragment_count(&m, 4096, MTU_9000, keyed), 1);
    }
    let frames = fragments(&header(1), &m, &block(4096), MTU_9000, Some(&KEY));
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].len(), 48 + 24 + 4096 + 16);
}

#[test]
fn test_mtu1500_data_4096_three_frames() {
    let m = data_msg(4096);
    // Header, DATA body and tag, keyed or not.
    assert_eq!(max_payload_per_frame(&m, MTU_1500, false), 1486 - 88);
    assert_eq!(max_payload_per_frame(&m, MTU_1500, true), 1486 - 88);
    for keyed in [false, true] {
        assert_eq!(fragment_count(&m, 4096, MTU_1500, keyed), 3);
    }
    let payload = block(4096);
    let frames = fragments(&header(1), &m, &payload, MTU_1500, Some(&KEY));
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[0].len(), MTU_1500);
    let mut r = Reassembler::new(4, 64 * 1024);
    let done = reassemble_in(&mut r, &frames, &[0, 1, 2], Some(&KEY));
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].2, payload);
    assert_eq!(done[0].1, m);
    assert_eq!((done[0].0.frag_index, done[0].0.frag_count), (0, 1));
}

#[test]
fn test_af_xdp_3840_data_4096_two_frames() {
    let m = data_msg(4096);
    for keyed in [false, true] {
        assert_eq!(fragment_count(&m, 4096, AF_XDP_3840, keyed), 2);
    }
    let payload = block(4096);
    let frames = fragments(&header(2), &m, &payload, AF_XDP_3840, None);
    assert_eq!(frames.len(), 2);
    assert!(frames.iter().all(|f| f.len() + ETH_HEADER_LEN <= 3840));
    let mut r = Reassembler::new(4, 64 * 1024);
    let done = reassemble_in(&mut r, &frames, &[1, 0], None);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].2, payload);
}

#[test]
fn test_fragments_share_header_and_body() {
    let m = data_msg(10_000);
    let frames = fragments(&header(33), &m, &block(10_000), MTU_1500, None);
    let n = frames.len();
    assert_eq!(n, 8);
    for (i, f) in frames.iter().enumerate() {
        let p = parse_plain(f).unwrap();
        assert_eq!(p.header.seq, 33);
        assert_eq!(usize::from(p.header.frag_index), i);
        assert_eq!(usize::from(p.header.frag_count), n);
        assert_eq!(p.msg, m);
        assert!(p.is_fragment());
    }
}

#[test]
fn test_last_fragment_first_reassembles() {
    let m = data_msg(5000);
    let payload = block(5000);
    let frames = fragments(&header(4), &m, &payload, MTU_1500, None);
    assert_eq!(frames.len(), 4);
    let mut r = Reassembler::new(1, 5000);
    let done = reassemble_in(&mut r, &frames, &[3, 1, 2, 0], None);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].2, payload);
}

#[test]
fn test_duplicate_fragments_ignored() {
    let m = data_msg(4096);
    let payload = block(4096);
    let frames = fragments(&header(4), &m, &payload, MTU_1500, None);
    let mut r = Reassembler::new(2, 8192);
    let done = reassemble_in(&mut r, &frames, &[0, 0, 2, 2, 0, 1], None);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].2, payload);
    assert_eq!(r.in_progress(), 0);
}

#[test]
fn test_interleaved_messages_reassemble() {
    let (a, b) = (block(4000), block(3000));
    let fa = fragments(&header(10), &data_msg(4000), &a, MTU_1500, None);
    let fb = fragments(&header(11), &data_msg(3000), &b, MTU_1500, None);
    let mut r = Reassembler::new(2, 8192);
    let mut got = Vec::new();
    for (x, y) in fa.iter().zip(fb.iter().chain(std::iter::repeat(&fb[0]))) {
        for f in [x, y] {
            let p = parse_plain(f).unwrap();
            if let Some((h, _, pl)) = r.push(&p).unwrap() {
                got.push((h.seq, pl.to_vec()));
            }
        }
    }
    assert_eq!(got.len(), 2);
    assert_eq!(got[0], (10, a));
    assert_eq!(got[1], (11, b));
}

#[test]
fn test_all_slots_busy_oldest_evicted() {
    let mut r = Reassembler::new(2, 8192);
    let msgs: Vec<_> = (0..3u64)
        .map(|s| fragments(&header(s), &data_msg(4096), &block(4096), MTU_1500, None))
        .collect();
    // First fragment of messages 0, 1, 2: message 0 is evicted.
    for m in &msgs {
        assert!(r.push(&parse_plain(&m[0]).unwrap()).unwrap().is_none());
    }
    assert_eq!(r.evicted(), 1);
    assert_eq!(r.in_progress(), 2);
    // Message 2 still completes; message 0 starts over.
    let done = reassemble_in(&mut r, &msgs[2], &[1, 2], None);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].0.seq, 2);
    let done = reassemble_in(&mut r, &msgs[0], &[1, 2], None);
    assert!(done.is_empty());
}

#[test]
fn test_body_mismatch_resets_slot() {
    let payload = block(4096);
    let old = fragments(&header(7), &data_msg(4096), &payload, MTU_1500, None);
    let new_msg = Message::Data(Data {
        write_id: 2,
        offset: 4096,
        len: 4096,
        flags: 0,
    });
    let new = fragments(&header(7), &new_msg, &payload, MTU_1500, None);
    let mut r = Reassembler::new(2, 8192);
    assert!(reassemble_in(&mut r, &old, &[0, 1], None).is_empty());
    // Same seq, other body: the slot restarts with the new message.
    let done = reassemble_in(&mut r, &new, &[2, 0], None);
    assert!(done.is_empty());
    assert_eq!(r.resets(), 1);
    let done = reassemble_in(&mut r, &new, &[1], None);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].1, new_msg);
    assert_eq!(done[0].2, payload);
}

#[test]
fn test_count_mismatch_resets_slot() {
    let payload = block(4096);
    let small = fragments(&header(7), &data_msg(4096), &payload, MTU_1500, None);
    let big = fragments(&header(7), &data_msg(4096), &payload, AF_XDP_3840, None);
    let mut r = Reassembler::new(2, 8192);
    assert!(reassemble_in(&mut r, &small, &[0], None).is_empty());
    let done = reassemble_in(&mut r, &big, &[0, 1], None);
    assert_eq!(r.resets(), 1);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].2, payload);
}

#[test]
fn test_message_larger_than_slot_refused() {
    let frames = fragments(&header(1), &data_msg(8000), &block(8000), MTU_1500, None);
    let mut r = Reassembler::new(2, 4096);
    let e = r.push(&parse_plain(&frames[0]).unwrap()).unwrap_err();
    assert!(
        matches!(e, ReassemblyError::TooLarge { max: 4096, .. }),
        "{e}"
    );
    assert_eq!(r.in_progress(), 0);
    // Last fragment first: refused once the size is known.
    let mut r = Reassembler::new(2, 4096);
    let last = frames.len() - 1;
    assert!(r
        .push(&parse_plain(&frames[last]).unwrap())
        .unwrap()
        .is_none());
    assert!(matches!(
        r.push(&parse_plain(&frames[0]).unwrap()),
        Err(ReassemblyError::TooLarge { .. })
    ));
    // Unfragmented frames larger than a slot too.
    let one = emit_vec(&header(1), &data_msg(5000), &block(5000), None);
    assert!(matches!(
        r.push(&parse_plain(&one).unwrap()),
        Err(ReassemblyError::TooLarge { need: 5000, .. })
    ));
}

#[test]
fn test_unequal_fragment_sizes_inconsistent() {
    let p1 = block(4096);
    let a = fragments(&header(1), &data_msg(4096), &p1, MTU_1500, None);
    // Same message sent with a smaller frame size (same count: 3).
    let b = fragments(&header(1), &data_msg(4096), &p1, 1486 - 20, None);
    assert_eq!(a.len(), b.len());
    let mut r = Reassembler::new(2, 8192);
    assert!(r.push(&parse_plain(&a[0]).unwrap()).unwrap().is_none());
    let e = r.push(&parse_plain(&b[1]).unwrap()).unwrap_err();
    assert_eq!(
        e,
        ReassemblyError::Inconsistent("non-last fragments of different sizes")
    );
    assert_eq!(r.in_progress(), 0);
    assert_eq!(e.counter_name(), "reasm_inconsistent");
}

#[test]
fn test_unfragmented_frame_passes_through() {
    let (m, payload) = sample("state-image");
    let b = emit_vec(&header(3), &m, &payload, None);
    let mut r = Reassembler::new(1, 1024);
    let p = parse_plain(&b).unwrap();
    let (h, got_m, got) = r.push(&p).unwrap().expect("complete");
    assert_eq!(h, p.header);
    assert_eq!(got_m, m);
    assert_eq!(got, &payload[..]);
    let (m, _) = sample("heartbeat");
    let b = emit_vec(&header(0), &m, &[], None);
    let got = r
        .push(&parse_plain(&b).unwrap())
        .unwrap()
        .expect("complete");
    assert_eq!(got.2, &[] as &[u8]);
}

#[test]
fn test_handmade_bad_fragment_refused() {
    let (m, payload) = sample("data");
    let b = emit_vec(&header(3), &m, &payload, None);
    let mut p = parse_plain(&b).unwrap();
    p.header.frag_count = 0;
    let mut r = Reassembler::new(1, 8192);
    assert!(matches!(r.push(&p), Err(ReassemblyError::BadFragment(_))));
    p.header.frag_count = 2;
    p.header.frag_index = 2;
    assert!(matches!(r.push(&p), Err(ReassemblyError::BadFragment(_))));
}

#[test]
fn test_emit_fragment_refusals() {
    let m = data_msg(4096);
    let payload = block(4096);
    let mut out = vec![0u8; 2000];
    assert_eq!(
        emit_fragment(&header(1), &m, &payload, 3, MTU_1500, None, &mut out),
        Err(EmitError::FragmentIndex { index: 3, count: 3 })
    );
    assert!(matches!(
        emit_fragment(&header(1), &m, &payload, 0, 50, None, &mut out),
        Err(EmitError::FrameTooSmall { max_frame: 50, .. })
    ));
    // 255 fragments at most (100 payload bytes in a 188-byte frame).
    let big = vec![0u8; 300 * 100];
    assert!(fragment_count(&m, big.len(), 188, false) > MAX_FRAGMENTS);
    assert!(matches!(
        emit_fragment(&header(1), &m, &big, 0, 188, None, &mut out),
        Err(EmitError::PayloadTooLarge { .. })
    ));
    assert_eq!(try_fragment_count(&m, 255 * 100, 188, false), Ok(255));
    let (hb, _) = sample("heartbeat");
    assert_eq!(
        emit_fragment(&header(1), &hb, &[1], 0, MTU_1500, None, &mut out),
        Err(EmitError::PayloadNotAllowed(MsgType::Heartbeat))
    );
    assert_eq!(max_payload_per_frame(&hb, MTU_1500, false), 0);
    assert_eq!(fragment_count(&hb, 0, MTU_1500, false), 1);
}

#[test]
fn test_clear_drops_partial_messages() {
    let frames = fragments(&header(1), &data_msg(4096), &block(4096), MTU_1500, None);
    let mut r = Reassembler::new(2, 8192);
    assert!(reassemble_in(&mut r, &frames, &[0, 1], None).is_empty());
    r.clear();
    assert_eq!(r.in_progress(), 0);
    assert!(reassemble_in(&mut r, &frames, &[2], None).is_empty());
    assert_eq!(r.max_message_payload(), 8192);
}

/// A frame sent gathered (header and body, the payload where it lies,
/// the tag) is byte for byte the frame `emit` / `emit_fragment` writes,
/// keyed or not, whole or in fragments.
#[test]
fn test_gathered_frames_equal_copied_frames() {
    use crate::frag::emit_fragment_head;
    for (len, max_frame) in [
        (0usize, MTU_9000),
        (4096, MTU_9000),
        (65536, MTU_9000),
        (4096, MTU_1500),
        (10_000, AF_XDP_3840),
    ] {
        let m = data_msg(len as u32);
        let payload = block(len);
        for key in [None, Some(&KEY)] {
            let whole = fragments(&header(7), &m, &payload, max_frame, key);
            for (i, expect) in whole.iter().enumerate() {
                let mut head = [0u8; 256];
                let (n, range, tag) =
                    emit_fragment_head(&header(7), &m, &payload, i, max_frame, key, &mut head)
                        .expect("head");
                let mut got = head[..n].to_vec();
                got.extend_from_slice(&payload[range]);
                got.extend_from_slice(&tag);
                assert_eq!(&got, expect, "len {len} frame {i} keyed {}", key.is_some());
            }
            if whole.len() == 1 {
                let mut head = [0u8; 256];
                let (n, tag) = crate::frame::emit_head(&header(7), &m, &payload, key, &mut head)
                    .expect("head");
                assert_eq!(&whole[0][..n], &head[..n]);
                assert_eq!(&whole[0][whole[0].len() - crate::TAG_LEN..], &tag);
            }
        }
    }
    // A head buffer too short for the header and body is refused.
    let mut tiny = [0u8; 8];
    assert!(matches!(
        crate::frame::emit_head(&header(7), &data_msg(4), &[1, 2, 3, 4], None, &mut tiny),
        Err(EmitError::BufferTooSmall { .. })
    ));
}

/// A message reassembled from fragments can be taken over without a
/// copy, in any arrival order; the slot then reassembles the next message
/// in a new buffer, and there is nothing to take after any other push.
#[test]
fn test_completed_payload_is_handed_over() {
    let mut r = Reassembler::new(2, 1 << 20);
    for (k, order) in [vec![0usize, 1, 2, 3], vec![3, 1, 0, 2], vec![2, 3, 0, 1]]
        .into_iter()
        .enumerate()
    {
        let payload: Vec<u8> = block(30_000).iter().map(|b| b ^ k as u8).collect();
        let m = data_msg(payload.len() as u32);
        let frames = fragments(&header(10 + k as u64), &m, &payload, MTU_9000, Some(&KEY));
        assert_eq!(frames.len(), 4);
        for (j, &i) in order.iter().enumerate() {
            let p = parse(&frames[i], &expect(Some(&KEY))).expect("parse");
            let done = r.push(&p).expect("push").is_some();
            assert_eq!(done, j + 1 == order.len());
            if !done {
                assert_eq!(r.take_completed(), None, "nothing finished yet");
            }
        }
        let got = r.take_completed();
        assert_eq!(got.as_deref(), Some(&payload[..]), "order {order:?}");
        assert_eq!(r.take_completed(), None, "taken once");
    }
    // A frame that is not a fragment leaves nothing to take.
    let mut out = vec![0u8; MTU_9000];
    let n = crate::frame::emit(&header(20), &data_msg(4), &[1, 2, 3, 4], None, &mut out).unwrap();
    let p = parse(&out[..n], &expect(None)).expect("parse");
    assert!(r.push(&p).unwrap().is_some());
    assert_eq!(r.take_completed(), None);
}

/// Finished messages are cut from a few chunks reused in turn: no
/// allocation per message, whether each is dropped at once or a window of
/// them is held (the peer's volume writes in flight), and a held payload
/// is never written over.
#[test]
fn test_taken_payloads_reuse_chunks_without_allocating() {
    const LEN: usize = 64 * 1024;
    let mut r = Reassembler::new(2, 1 << 20);
    let mut seq = 0u64;
    let mut next = |r: &mut Reassembler| {
        seq += 1;
        let payload: Vec<u8> = block(LEN).iter().map(|b| b ^ seq as u8).collect();
        let m = data_msg(LEN as u32);
        let frames = fragments(&header(seq), &m, &payload, MTU_9000, Some(&KEY));
        assert!(frames.len() > 1);
        for f in &frames {
            r.push(&parse(f, &expect(Some(&KEY))).expect("parse"))
                .expect("push");
        }
        let got = r.take_completed().expect("complete");
        assert_eq!(got[..], payload[..]);
        (got, payload)
    };
    for _ in 0..1000 {
        next(&mut r);
    }
    assert_eq!(r.allocations(), 1, "dropped at once: one chunk");
    let mut held = std::collections::VecDeque::new();
    for _ in 0..1000 {
        held.push_back(next(&mut r));
        if held.len() > 8 {
            let (got, want) = held.pop_front().unwrap();
            assert_eq!(got[..], want[..], "a held payload was written over");
        }
    }
    assert!(
        r.allocations() <= 1 + SLOT_CHUNKS_KEPT as u64,
        "8 held: {} chunks",
        r.allocations()
    );
}

/// The largest messages a 9000-byte MTU carries (1 MiB in 118 fragments)
/// fit a chunk too: no buffer of their own per message.
#[test]
fn test_one_mib_messages_share_chunks() {
    const LEN: usize = 1 << 20;
    let mut r = Reassembler::new(16, 64 << 20);
    let payload = block(LEN);
    let m = data_msg(LEN as u32);
    for seq in 1..=20u64 {
        let frames = fragments(&header(seq), &m, &payload, MTU_9000, Some(&KEY));
        assert!(frames.len() > 100);
        for f in &frames {
            r.push(&parse(f, &expect(Some(&KEY))).expect("parse"))
                .expect("push");
        }
        assert_eq!(r.take_completed().as_deref(), Some(&payload[..]));
    }
    assert_eq!(r.allocations(), 1);
}
