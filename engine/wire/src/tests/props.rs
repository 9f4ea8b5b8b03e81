//! Property tests: arbitrary valid messages round-trip; arbitrary bytes never
//! panic; fragment, shuffle, reassemble gives the original.

use proptest::prelude::*;

use super::*;
use crate::eth::parse_eth;
use crate::frag::{emit_fragment, fragment_count, Reassembler};
use crate::frame::{flags, Frame};
use crate::fuzz_support::{
    expected_completions, fuzz_parse_eth, fuzz_parse_frame, fuzz_reassemble,
};

fn arb_role() -> impl Strategy<Value = Role> {
    prop_oneof![
        Just(Role::Secondary),
        Just(Role::Primary),
        (2u8..).prop_map(Role::Unknown),
    ]
}

fn arb_disk() -> impl Strategy<Value = DiskState> {
    prop_oneof![
        Just(DiskState::UpToDate),
        Just(DiskState::Outdated),
        Just(DiskState::Inconsistent),
        Just(DiskState::Failed),
        (4u8..).prop_map(DiskState::Unknown),
    ]
}

fn arb_phase() -> impl Strategy<Value = RolePhase> {
    prop_oneof![
        Just(RolePhase::Handover),
        Just(RolePhase::Accepted),
        Just(RolePhase::Leaving),
        (4u8..).prop_map(RolePhase::Unknown),
        Just(RolePhase::Unknown(0)),
    ]
}

fn arb_adapter() -> impl Strategy<Value = AdapterHealth> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(link_up, carrier, reachable)| {
        AdapterHealth {
            link_up,
            carrier,
            reachable,
        }
    })
}

fn arb_sack() -> impl Strategy<Value = (u64, u64)> {
    (any::<u64>(), any::<u64>()).prop_map(|(a, b)| (a.min(b), a.max(b)))
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            arb_role(),
            arb_disk(),
            any::<u64>(),
            any::<u32>(),
            any::<[u64; 6]>(),
            0u8..=hello_flags::KNOWN,
            any::<u64>(),
            any::<[u64; 3]>(),
        )
            .prop_map(
                |(role, disk, volume_bytes, block_size, g, flags, dirty_blocks, s)| {
                    Message::Hello(Hello {
                        role,
                        disk,
                        volume_bytes,
                        block_size,
                        gens: Generations {
                            current: g[0],
                            bitmap: g[1],
                            history: [g[2], g[3], g[4], g[5]],
                        },
                        flags,
                        dirty_blocks,
                        session: s[0],
                        epoch: s[1],
                        counter: s[2],
                    })
                }
            ),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            0u8..=data_flags::KNOWN
        )
            .prop_map(|(write_id, offset, len, flags)| Message::Data(Data {
                write_id,
                offset,
                len,
                flags
            })),
        (
            any::<[u64; 3]>(),
            prop::array::uniform4(arb_sack()),
            0u8..=MAX_SACK as u8,
        )
            .prop_map(|(c, sack, sack_len)| Message::Ack(Ack {
                cumulative: c[0],
                applied: c[1],
                stable: c[2],
                sack,
                sack_len,
            })),
        (
            arb_role(),
            arb_disk(),
            any::<bool>(),
            any::<bool>(),
            prop::array::uniform4(arb_adapter()),
            0u8..=MAX_ADAPTERS as u8,
            any::<[u64; 2]>(),
        )
            .prop_map(
                |(role, disk, msl_up, in_sync, adapters, adapter_count, c)| {
                    Message::Heartbeat(Heartbeat {
                        role,
                        disk,
                        msl_up,
                        in_sync,
                        adapters,
                        adapter_count,
                        counter: c[0],
                        epoch: c[1],
                    })
                }
            ),
        (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(total_len, offset, image_crc)| {
            Message::StateImage(StateImageChunk {
                total_len,
                offset,
                image_crc,
            })
        }),
        (any::<u64>(), any::<u32>(), 0u8..=data_flags::KNOWN).prop_map(|(offset, len, flags)| {
            Message::ResyncData(ResyncData { offset, len, flags })
        }),
        any::<u64>().prop_map(|blocks_sent| Message::ResyncDone(ResyncDone { blocks_sent })),
        (arb_phase(), any::<u64>())
            .prop_map(|(phase, generation)| Message::RoleChange(RoleChange { phase, generation })),
        (any::<u64>(), any::<u32>(), 0u8..=verify_flags::KNOWN).prop_map(
            |(start_block, count, flags)| Message::VerifyReq(Verify {
                start_block,
                count,
                flags
            })
        ),
    ]
}

fn arb_header() -> impl Strategy<Value = Header> {
    (
        any::<u16>(),
        any::<[u64; 3]>(),
        prop_oneof![Just(0u8), Just(flags::MUST_UNDERSTAND)],
    )
        .prop_map(|(sender, v, fl)| Header {
            cluster_id: CLUSTER,
            sender,
            generation: v[0],
            seq: v[1],
            ack: v[2],
            flags: fl,
            frag_index: 0,
            frag_count: 1,
        })
}

/// A message, a payload it may carry, and a frag index/count valid for it.
fn arb_frame_parts() -> impl Strategy<Value = (Header, Message, Vec<u8>)> {
    (
        arb_header(),
        arb_message(),
        prop::collection::vec(any::<u8>(), 0..3000),
        any::<(u8, u8)>(),
    )
        .prop_map(|(mut h, m, mut payload, (a, b))| {
            if !m.msg_type().carries_payload() {
                payload.clear();
            } else if !payload.is_empty() {
                let count = a.max(1);
                h.frag_count = count;
                h.frag_index = b % count;
            }
            (h, m, payload)
        })
}

proptest! {
    #[test]
    fn prop_valid_frames_roundtrip(
        (h, m, payload) in arb_frame_parts(),
        keyed in any::<bool>(),
    ) {
        let key = keyed.then_some(&KEY);
        let bytes = emit_vec(&h, &m, &payload, key);
        prop_assert_eq!(bytes.len(), buffer_len(&m, payload.len(), keyed));
        let p = parse(&bytes, &expect(key)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let auth = if keyed { flags::AUTH } else { 0 };
        prop_assert_eq!(p.header, Header { flags: h.flags | auth, ..h });
        prop_assert_eq!(p.msg, m);
        prop_assert_eq!(p.payload, &payload[..]);
        // The other key setting refuses it.
        let other = if keyed { None } else { Some(&KEY) };
        prop_assert!(parse(&bytes, &expect(other)).is_err());
    }

    #[test]
    fn prop_any_single_byte_change_refused(
        (h, m, payload) in arb_frame_parts(),
        keyed in any::<bool>(),
        at in any::<prop::sample::Index>(),
        x in 1u8..,
    ) {
        let key = keyed.then_some(&KEY);
        let mut bytes = emit_vec(&h, &m, &payload, key);
        let i = at.index(bytes.len());
        bytes[i] ^= x;
        prop_assert!(parse(&bytes, &expect(key)).is_err(), "byte {} ^ {:#x} accepted", i, x);
    }

    #[test]
    fn prop_frame_under_another_key_bad_auth(
        (h, m, payload) in arb_frame_parts(),
        other in any::<[u8; 32]>(),
    ) {
        // Only the key's first MAC_KEY_LEN bytes key the MAC.
        prop_assume!(other[..crate::frame::MAC_KEY_LEN] != KEY.0[..crate::frame::MAC_KEY_LEN]);
        let bytes = emit_vec(&h, &m, &payload, Some(&KEY));
        prop_assert_eq!(parse(&bytes, &expect(Some(&Key(other)))).err(), Some(ParseError::BadAuth));
    }

    #[test]
    fn prop_arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = parse(&bytes, &expect(None));
        let _ = parse(&bytes, &expect(Some(&KEY)));
        let _ = parse_eth(&bytes);
        let _ = Frame::new_checked(&bytes[..]).map(|f| (f.body().len(), f.payload().len(), f.tag().len(), f.verify_tag(None)));
        fuzz_parse_frame(&bytes);
        fuzz_parse_eth(&bytes);
        fuzz_reassemble(&bytes);
    }

    #[test]
    fn prop_arbitrary_header_with_valid_magic_never_panics(
        mut bytes in prop::collection::vec(any::<u8>(), 48..400),
        t in 0u8..10,
    ) {
        // Get past magic and version so the length, tag and body checks run.
        bytes[0] = 0x4D;
        bytes[1] = 0x53;
        bytes[2] = crate::frame::VERSION;
        bytes[3] = t;
        fuzz_parse_frame(&bytes);
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        framed.extend_from_slice(&bytes);
        fuzz_reassemble(&framed);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn prop_fragment_shuffle_reassemble_roundtrip(
        kind in 0u8..3,
        payload in prop::collection::vec(any::<u8>(), 1..20_000),
        max_frame in prop_oneof![
            Just(1500 - 14),
            Just(3840 - 14),
            Just(9000 - 14),
            200usize..9000,
        ],
        keyed in any::<bool>(),
        seq in any::<u64>(),
        order_seed in any::<u64>(),
        dups in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
    ) {
        let len = payload.len() as u32;
        let m = match kind {
            0 => Message::Data(Data { write_id: seq, offset: 512, len, flags: 0 }),
            1 => Message::StateImage(StateImageChunk { total_len: u64::from(len), offset: 0, image_crc: 1 }),
            _ => Message::ResyncData(ResyncData { offset: 0, len, flags: data_flags::FUA }),
        };
        let key = keyed.then_some(&KEY);
        let h = header(seq);
        let n = fragment_count(&m, payload.len(), max_frame, keyed);
        prop_assume!(n <= 255);
        let frames: Vec<Vec<u8>> = (0..n).map(|i| {
            let mut out = vec![0u8; max_frame];
            let w = emit_fragment(&h, &m, &payload, i, max_frame, key, &mut out).unwrap();
            out.truncate(w);
            out
        }).collect();
        // Shuffle with a tiny xorshift (proptest shrinks the seed).
        let mut order: Vec<usize> = (0..n).collect();
        let mut s = order_seed | 1;
        for i in (1..n).rev() {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            order.swap(i, (s % (i as u64 + 1)) as usize);
        }
        // Duplicates anywhere, also after completion.
        for d in &dups {
            let f = order[d.index(n)];
            order.insert(d.index(order.len() + 1), f);
        }
        let mut r = Reassembler::new(3, 20_000);
        let mut got = Vec::new();
        for &i in &order {
            let p = parse(&frames[i], &expect(key)).unwrap();
            if let Some((gh, gm, gp)) = r.push(&p).unwrap() {
                got.push((gh, gm, gp.to_vec()));
            }
        }
        prop_assert_eq!(got.len(), expected_completions(&order, n));
        for (gh, gm, gp) in &got {
            prop_assert_eq!(gh.seq, seq);
            prop_assert_eq!(*gm, m);
            prop_assert_eq!(gp, &payload);
        }
    }
}
