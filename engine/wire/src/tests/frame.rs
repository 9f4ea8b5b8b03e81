//! emit / parse: round trips per type, every `ParseError` from a targeted
//! corruption, checksum and authentication.

use super::*;
use crate::frame::{
    body, body_len, field, flags, EmitError, Frame, RxCounters, HEADER_LEN, KEYLESS_MAC_KEY,
    MAC_KEY_LEN, TAG_LEN, VERSION,
};
use crate::fuzz_support::fix_checksums;
use crate::Domain;

// ----- layout snapshot -----------------------------------------------------

#[test]
fn test_layout_sizes_frozen() {
    // Changing any of these is a wire format change: bump VERSION.
    assert_eq!(VERSION, 4);
    assert_eq!(HEADER_LEN, 48);
    assert_eq!(TAG_LEN, 16);
    assert_eq!(MAC_KEY_LEN, 16);
    assert_eq!(&KEYLESS_MAC_KEY, b"msl keyless mac\0");
    assert_eq!(body_len(MsgType::Hello), 96);
    assert_eq!(body_len(MsgType::Data), 24);
    assert_eq!(body_len(MsgType::Ack), 96);
    assert_eq!(body_len(MsgType::Heartbeat), 40);
    assert_eq!(body_len(MsgType::StateImage), 24);
    assert_eq!(body_len(MsgType::ResyncData), 16);
    assert_eq!(body_len(MsgType::ResyncDone), 8);
    assert_eq!(body_len(MsgType::RoleChange), 16);
    assert_eq!(body_len(MsgType::VerifyReq), 16);
    assert_eq!(body_len(MsgType::VerifyReply), 16);
    assert_eq!(body_len(MsgType::Unknown(11)), 0);
    for code in 1..=10u8 {
        assert_eq!(MsgType::from_u8(code).to_u8(), code);
        assert!(!matches!(MsgType::from_u8(code), MsgType::Unknown(_)));
    }
    assert_eq!(MsgType::from_u8(0), MsgType::Unknown(0));
    assert_eq!(MsgType::from_u8(11), MsgType::Unknown(11));
}

#[test]
fn test_golden_bytes_data_frame() {
    // A frozen frame: if this changes, old and new nodes cannot talk.
    let h = Header {
        cluster_id: 0x0102_0304_0506_0708,
        sender: 0x0a0b,
        generation: 0x1112_1314_1516_1718,
        seq: 0x2122_2324_2526_2728,
        ack: 0x3132_3334_3536_3738,
        flags: flags::MUST_UNDERSTAND,
        frag_index: 0,
        frag_count: 1,
    };
    let m = Message::Data(Data {
        write_id: 0x4142_4344_4546_4748,
        offset: 0x5152_5354_5556_5758,
        len: 2,
        flags: data_flags::FUA,
    });
    let hex = |b: &[u8]| -> String { b.iter().map(|b| format!("{b:02x}")).collect() };
    let bytes = emit_vec(&h, &m, &[0xee, 0xff], None);
    // The tag is AEGISMAC-128X4 (128-bit tag, zero nonce) of everything
    // before it under the keyless key; frozen below as well.
    let (covered, tag) = bytes.split_at(bytes.len() - TAG_LEN);
    let mut mac = aegis::aegis128x4::Aegis128X4Mac::<16>::new(&KEYLESS_MAC_KEY);
    mac.update(covered);
    assert_eq!(tag, mac.finalize());
    let expected = format!(
        "4d53040280000100\
         0102030405060708\
         0a0b0018\
         00000002\
         1112131415161718\
         2122232425262728\
         3132333435363738\
         4142434445464748\
         5152535455565758\
         00000002\
         01000000\
         eeff\
         {GOLDEN_TAG}"
    );
    assert_eq!(hex(&bytes), expected);
    // Under a key: the same bytes but the AUTH flag, and another tag.
    let keyed = emit_vec(&h, &m, &[0xee, 0xff], Some(&KEY));
    assert_eq!(keyed[field::FLAGS], flags::MUST_UNDERSTAND | flags::AUTH);
    assert_eq!(
        keyed[field::FLAGS + 1..covered.len()],
        covered[field::FLAGS + 1..]
    );
    assert_eq!(hex(&keyed[covered.len()..]), GOLDEN_KEYED_TAG);
}

/// Tags of `test_golden_bytes_data_frame`'s frame, keyless and under `KEY`.
const GOLDEN_TAG: &str = "16d0f15697f763c64554b04de424bfdb";
const GOLDEN_KEYED_TAG: &str = "f492e04cda8acaa95029a4dfca7b38a4";

// ----- round trips ---------------------------------------------------------

fn roundtrip(name: &str) {
    let (m, payload) = sample(name);
    for key in [None, Some(&KEY)] {
        let h = Header {
            flags: flags::MUST_UNDERSTAND,
            ..header(9)
        };
        let bytes = emit_vec(&h, &m, &payload, key);
        assert_eq!(
            bytes.len(),
            HEADER_LEN + body_len(m.msg_type()) + payload.len() + TAG_LEN,
            "{name}"
        );
        let p = parse(&bytes, &expect(key)).expect(name);
        let auth = if key.is_some() { flags::AUTH } else { 0 };
        assert_eq!(
            p.header,
            Header {
                flags: flags::MUST_UNDERSTAND | auth,
                ..h
            }
        );
        assert_eq!(p.msg, m, "{name}");
        assert_eq!(p.payload, &payload[..], "{name}");
        assert!(!p.is_fragment());
        // The payload is borrowed from the input, not copied.
        if !payload.is_empty() {
            let at = HEADER_LEN + body_len(m.msg_type());
            assert!(core::ptr::eq(p.payload.as_ptr(), bytes[at..].as_ptr()));
        }
    }
}

#[test]
fn test_hello_roundtrip() {
    roundtrip("hello");
}

#[test]
fn test_data_roundtrip() {
    roundtrip("data");
}

#[test]
fn test_data_flush_without_payload_roundtrip() {
    roundtrip("data-flush");
}

#[test]
fn test_ack_roundtrip() {
    roundtrip("ack");
}

#[test]
fn test_heartbeat_roundtrip() {
    roundtrip("heartbeat");
}

#[test]
fn test_state_image_roundtrip() {
    roundtrip("state-image");
}

#[test]
fn test_resync_data_roundtrip() {
    roundtrip("resync-data");
}

#[test]
fn test_resync_done_roundtrip() {
    roundtrip("resync-done");
}

#[test]
fn test_role_change_roundtrip() {
    roundtrip("role-change");
}

#[test]
fn test_verify_roundtrip() {
    roundtrip("verify-req");
    roundtrip("verify-reply");
}

#[test]
fn test_verify_zero_range_roundtrip_and_flag_byte() {
    for name in ["verify-req-zero-range", "verify-reply-zero-range"] {
        roundtrip(name);
        let (m, _) = sample(name);
        let b = emit_vec(&header(1), &m, &[], None);
        assert_eq!(
            b[HEADER_LEN + body::verify::FLAGS],
            verify_flags::ZERO_RANGE
        );
        assert!(all_zero_bytes(
            &b[HEADER_LEN + body::verify::RESERVED.start..][..3]
        ));
    }
}

fn all_zero_bytes(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

#[test]
fn test_unknown_enum_codes_kept() {
    let m = Message::Heartbeat(Heartbeat {
        role: Role::Unknown(9),
        disk: DiskState::Unknown(200),
        msl_up: true,
        in_sync: true,
        adapters: [AdapterHealth::default(); MAX_ADAPTERS],
        adapter_count: 0,
        counter: 1,
        epoch: 1,
    });
    let bytes = emit_vec(&header(0), &m, &[], None);
    assert_eq!(parse_plain(&bytes).unwrap().msg, m);
    let m = Message::RoleChange(RoleChange {
        phase: RolePhase::Unknown(0),
        generation: 5,
    });
    let bytes = emit_vec(&header(1), &m, &[], None);
    assert_eq!(parse_plain(&bytes).unwrap().msg, m);
}

#[test]
fn test_frame_view_accessors() {
    let (m, payload) = sample("data");
    let bytes = emit_vec(&header(77), &m, &payload, Some(&KEY));
    let f = Frame::new_checked(&bytes[..]).unwrap();
    assert_eq!(f.magic(), 0x4D53);
    assert_eq!(f.version(), VERSION);
    assert_eq!(f.msg_type(), MsgType::Data);
    assert_eq!(f.flags(), flags::AUTH);
    assert_eq!((f.frag_index(), f.frag_count(), f.reserved()), (0, 1, 0));
    assert_eq!(f.cluster_id(), CLUSTER);
    assert_eq!(f.sender(), 1);
    assert_eq!(usize::from(f.body_len()), body::data::LEN);
    assert_eq!(f.payload_len() as usize, payload.len());
    assert_eq!((f.generation(), f.seq(), f.ack()), (3, 77, 2));
    assert_eq!(f.payload(), &payload[..]);
    assert_eq!(f.tag_offset(), bytes.len() - TAG_LEN);
    assert_eq!(f.tag(), &bytes[bytes.len() - TAG_LEN..]);
    assert_eq!(f.authenticated(), &bytes[..bytes.len() - TAG_LEN]);
    assert_eq!(f.tag(), f.compute_tag(Some(&KEY)));
    assert_ne!(f.tag(), f.compute_tag(None));
    assert!(f.verify_tag(Some(&KEY)));
    assert!(!f.verify_tag(None));
    assert!(!f.verify_tag(Some(&Key([8; 32]))));
    assert_eq!(f.total_len(), bytes.len());
    // A view over a short buffer answers without panicking.
    let short = Frame::new_unchecked(&bytes[..10]);
    assert_eq!(short.body(), &[] as &[u8]);
    assert_eq!(short.payload(), &[] as &[u8]);
    assert_eq!(short.tag(), &[] as &[u8]);
    assert!(!short.verify_tag(Some(&KEY)));
    assert!(Frame::new_checked(&bytes[..10]).is_err());
}

// ----- every ParseError from a targeted corruption --------------------------

fn data_frame() -> Vec<u8> {
    let (m, payload) = sample("data");
    emit_vec(&header(5), &m, &payload, None)
}

fn heartbeat_frame() -> Vec<u8> {
    let (m, payload) = sample("heartbeat");
    emit_vec(&header(0), &m, &payload, None)
}

/// Apply `f` to the bytes, fix the (keyless) tag, parse without a key.
fn corrupt_and_fix(mut bytes: Vec<u8>, f: impl FnOnce(&mut Vec<u8>)) -> ParseError {
    f(&mut bytes);
    assert!(fix_checksums(&mut bytes, None), "corruption broke lengths");
    parse_plain(&bytes).expect_err("corrupt frame accepted")
}

#[test]
fn test_short_buffer_truncated() {
    let b = data_frame();
    assert_eq!(
        parse_plain(&b[..HEADER_LEN - 1]),
        Err(ParseError::Truncated {
            need: HEADER_LEN,
            have: HEADER_LEN - 1
        })
    );
    assert_eq!(
        parse_plain(&b[..b.len() - 1]),
        Err(ParseError::Truncated {
            need: b.len(),
            have: b.len() - 1
        })
    );
    assert_eq!(
        parse_plain(&[]),
        Err(ParseError::Truncated {
            need: HEADER_LEN,
            have: 0
        })
    );
}

#[test]
fn test_bad_magic_refused() {
    let mut b = data_frame();
    b[0] = b'X';
    assert_eq!(parse_plain(&b), Err(ParseError::BadMagic(0x5853)));
}

#[test]
fn test_other_version_refused_and_counted_saying_what_to_upgrade() {
    let mut rx = RxCounters::default();
    // Version 3 (AEGIS-128L), version 2 (CRC32C and keyed BLAKE3) and
    // version 1 frames are refused, with or without a key, before any other
    // check.
    for old in [1u8, 2, 3] {
        for key in [None, Some(&KEY)] {
            let (m, payload) = sample("heartbeat");
            let mut b = emit_vec(&header(0), &m, &payload, key);
            b[field::VERSION] = old;
            let r = parse(&b, &expect(key));
            rx.record(&r);
            let e = r.expect_err("old version accepted");
            assert_eq!(e, ParseError::BadVersion(old));
            assert_eq!(e.counter_name(), "rx_bad_version");
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("wire version {old} refused")),
                "{msg}"
            );
            assert!(msg.contains("speaks version 4"), "{msg}");
            assert!(msg.contains("upgrade the node that sent it"), "{msg}");
        }
    }
    assert_eq!(rx.bad_version, 6);
    assert_eq!(rx.dropped(), 6);
    // A newer version: this node is the one to upgrade.
    let mut b = data_frame();
    b[field::VERSION] = 5;
    let e = parse_plain(&b).expect_err("newer version accepted");
    assert_eq!(e, ParseError::BadVersion(5));
    assert!(e.to_string().contains("upgrade this node"), "{e}");
}

#[test]
fn test_trailing_bytes_bad_length() {
    let mut b = data_frame();
    b.push(0);
    assert!(matches!(parse_plain(&b), Err(ParseError::BadLength(_))));
}

#[test]
fn test_wrong_body_len_bad_length() {
    // Move one byte from payload to body: total unchanged, body size wrong.
    let mut b = data_frame();
    let f = Frame::new_checked(&b[..]).unwrap();
    let (bl, pl) = (f.body_len(), f.payload_len());
    b[field::BODY_LEN].copy_from_slice(&(bl + 1).to_be_bytes());
    b[field::PAYLOAD_LEN].copy_from_slice(&(pl - 1).to_be_bytes());
    assert!(matches!(parse_plain(&b), Err(ParseError::BadLength(_))));
}

#[test]
fn test_payload_on_heartbeat_bad_length() {
    let mut b = heartbeat_frame();
    let tag_at = b.len() - TAG_LEN;
    b.insert(tag_at, 0xaa);
    b[field::PAYLOAD_LEN].copy_from_slice(&1u32.to_be_bytes());
    assert!(fix_checksums(&mut b, None));
    assert_eq!(
        parse_plain(&b),
        Err(ParseError::BadLength(
            "payload on a message type without payload"
        ))
    );
}

#[test]
fn test_payload_bit_flip_bad_checksum() {
    let mut b = data_frame();
    b[HEADER_LEN + 30] ^= 0x10;
    assert_eq!(parse_plain(&b), Err(ParseError::BadChecksum));
    let mut rx = RxCounters::default();
    rx.record(&parse_plain(&b));
    assert_eq!((rx.bad_checksum, rx.dropped()), (1, 1));
}

#[test]
fn test_every_single_bit_flip_detected() {
    for key in [None, Some(&KEY)] {
        for name in ["resync-data", "hello", "ack"] {
            let (m, payload) = sample(name);
            let good = emit_vec(&header(3), &m, &payload, key);
            for bit in 0..good.len() * 8 {
                let mut b = good.clone();
                b[bit / 8] ^= 1 << (bit % 8);
                let r = parse(&b, &expect(key));
                assert!(r.is_err(), "{name}: bit {bit} flip accepted");
                let byte = bit / 8;
                // Flips outside the fields that frame the bytes (magic,
                // version, type, lengths) fail the tag check: under the
                // key for a keyed frame, under the keyless key otherwise.
                // Flipping the AUTH flag moves the frame to the other key.
                let framing = byte < field::FLAGS
                    || (field::BODY_LEN.start..field::PAYLOAD_LEN.end).contains(&byte);
                let auth_flag = byte == field::FLAGS && 1 << (bit % 8) == flags::AUTH;
                let want = match (key.is_some(), auth_flag) {
                    (true, false) => ParseError::BadAuth,
                    (true, true) => ParseError::BadChecksum,
                    (false, false) => ParseError::BadChecksum,
                    (false, true) => ParseError::UnexpectedAuth,
                };
                if !framing {
                    assert_eq!(r, Err(want), "{name}: bit {bit}");
                }
            }
        }
    }
}

#[test]
fn test_key_configured_untagged_frame_missing_auth() {
    let b = data_frame();
    assert_eq!(parse(&b, &expect(Some(&KEY))), Err(ParseError::MissingAuth));
}

#[test]
fn test_no_key_tagged_frame_unexpected_auth() {
    let (m, payload) = sample("data");
    let b = emit_vec(&header(5), &m, &payload, Some(&KEY));
    assert_eq!(parse_plain(&b), Err(ParseError::UnexpectedAuth));
}

#[test]
fn test_wrong_key_bad_auth() {
    let (m, payload) = sample("ack");
    let b = emit_vec(&header(0), &m, &payload, Some(&KEY));
    let other = Key([8; 32]);
    assert_eq!(parse(&b, &expect(Some(&other))), Err(ParseError::BadAuth));
    assert!(parse(&b, &expect(Some(&KEY))).is_ok());
}

#[test]
fn test_domain_keys_differ_and_a_lan_packet_never_verifies_as_an_msl_frame() {
    let master = [3u8; 32];
    let msl = Key::derive(&master, Domain::Msl);
    let lan = Key::derive(&master, Domain::Lan);
    let witness = Key::derive(&master, Domain::Witness);
    assert_ne!(msl.0, lan.0);
    assert_ne!(msl.0, witness.0);
    assert_ne!(lan.0, witness.0);
    assert_ne!(msl.0, master);
    // Deterministic: both nodes derive the same key from the same master.
    assert_eq!(Key::derive(&master, Domain::Lan).0, lan.0);
    let (m, payload) = sample("heartbeat");
    let on_lan = emit_vec(&header(0), &m, &payload, Some(&lan));
    assert!(parse(&on_lan, &expect(Some(&lan))).is_ok());
    assert_eq!(
        parse(&on_lan, &expect(Some(&msl))),
        Err(ParseError::BadAuth)
    );
    let on_msl = emit_vec(&header(0), &m, &payload, Some(&msl));
    assert_eq!(
        parse(&on_msl, &expect(Some(&lan))),
        Err(ParseError::BadAuth)
    );
}

#[test]
fn test_tampered_keyed_frame_with_keyless_tag_refused() {
    // An attacker without the key can compute tags under the well-known
    // keyless key, but a keyed receiver takes none of them.
    let (m, payload) = sample("role-change");
    let mut b = emit_vec(&header(1), &m, &payload, Some(&KEY));
    b[HEADER_LEN + body::role_change::GENERATION.end - 1] ^= 1;
    let at = b.len() - TAG_LEN;
    let keyless = Frame::new_checked(&b[..]).unwrap().compute_tag(None);
    b[at..].copy_from_slice(&keyless);
    // AUTH still set: the keyless tag does not verify under the key.
    assert_eq!(parse(&b, &expect(Some(&KEY))), Err(ParseError::BadAuth));
    // AUTH cleared and the keyless tag redone: a valid keyless frame,
    // which a keyed receiver refuses.
    b[field::FLAGS] &= !flags::AUTH;
    assert!(fix_checksums(&mut b, None));
    assert!(parse_plain(&b).is_ok());
    assert_eq!(parse(&b, &expect(Some(&KEY))), Err(ParseError::MissingAuth));
}

#[test]
fn test_damaged_keyless_frame_at_keyed_receiver_bad_checksum() {
    // A keyless frame damaged on the way is a checksum error, not a
    // missing key: the MissingAuth message would blame the configuration.
    let mut b = data_frame();
    assert_eq!(parse(&b, &expect(Some(&KEY))), Err(ParseError::MissingAuth));
    b[HEADER_LEN + 100] ^= 4;
    assert_eq!(parse(&b, &expect(Some(&KEY))), Err(ParseError::BadChecksum));
}

#[test]
fn test_other_cluster_refused() {
    let (m, payload) = sample("hello");
    let h = Header {
        cluster_id: 99,
        ..header(1)
    };
    let b = emit_vec(&h, &m, &payload, None);
    assert_eq!(parse_plain(&b), Err(ParseError::WrongCluster(99)));
}

#[test]
fn test_unknown_type_refused_with_must_understand() {
    for (fl, mu) in [(0u8, false), (flags::MUST_UNDERSTAND, true)] {
        let e = corrupt_and_fix(heartbeat_frame(), |b| {
            b[field::MSG_TYPE] = 42;
            b[field::FLAGS] = fl;
        });
        assert_eq!(
            e,
            ParseError::UnknownType {
                code: 42,
                must_understand: mu
            }
        );
    }
}

#[test]
fn test_unknown_type_any_body_len_accepted_up_to_type_check() {
    // A future type with another body size gets as far as UnknownType.
    let e = corrupt_and_fix(data_frame(), |b| {
        b[field::MSG_TYPE] = 200;
        b[field::BODY_LEN].copy_from_slice(&30u16.to_be_bytes());
        let pl = u32::from_be_bytes(b[field::PAYLOAD_LEN].try_into().unwrap());
        b[field::PAYLOAD_LEN].copy_from_slice(&(pl - 6).to_be_bytes());
    });
    assert!(matches!(e, ParseError::UnknownType { code: 200, .. }));
}

#[test]
fn test_bad_fields_refused() {
    let hb = HEADER_LEN;
    type Corruption = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Vec<u8>, Corruption)> = vec![
        (
            "header reserved byte",
            data_frame(),
            Box::new(|b| b[field::RESERVED] = 1),
        ),
        (
            "header flags: undefined bits set",
            data_frame(),
            Box::new(|b| b[field::FLAGS] |= 0x01),
        ),
        (
            "frag_count is 0",
            data_frame(),
            Box::new(|b| b[field::FRAG_COUNT] = 0),
        ),
        (
            "frag_index >= frag_count",
            data_frame(),
            Box::new(|b| {
                b[field::FRAG_INDEX] = 2;
                b[field::FRAG_COUNT] = 2;
            }),
        ),
        (
            "fragmented message of a type without payload",
            heartbeat_frame(),
            Box::new(|b| b[field::FRAG_COUNT] = 2),
        ),
        (
            "data reserved bytes",
            data_frame(),
            Box::new(move |b| b[hb + body::data::RESERVED.start] = 1),
        ),
        (
            "data flags: undefined bits set",
            data_frame(),
            Box::new(move |b| b[hb + body::data::FLAGS] |= 0x80),
        ),
        (
            "heartbeat msl_up",
            heartbeat_frame(),
            Box::new(move |b| b[hb + body::heartbeat::MSL_UP] = 2),
        ),
        (
            "heartbeat adapter carrier",
            heartbeat_frame(),
            Box::new(move |b| b[hb + body::heartbeat::ADAPTERS + 1] = 0xff),
        ),
        (
            "heartbeat adapter_count > MAX_ADAPTERS",
            heartbeat_frame(),
            Box::new(move |b| b[hb + body::heartbeat::ADAPTER_COUNT] = 5),
        ),
        (
            "heartbeat reserved bytes",
            heartbeat_frame(),
            Box::new(move |b| b[hb + body::heartbeat::RESERVED.start] = 1),
        ),
    ];
    for (want, frame, f) in cases {
        let e = corrupt_and_fix(frame, f);
        assert_eq!(e, ParseError::BadField(want));
    }

    let (ack, _) = sample("ack");
    let ackb = emit_vec(&header(0), &ack, &[], None);
    let e = corrupt_and_fix(ackb.clone(), |b| b[hb + body::ack::SACK_LEN] = 5);
    assert_eq!(e, ParseError::BadField("ack sack_len > MAX_SACK"));
    let e = corrupt_and_fix(ackb, |b| {
        // first range (102, 105) -> first = 2^56 + 102 > last
        b[hb + body::ack::SACK] = 1;
    });
    assert_eq!(e, ParseError::BadField("ack sack range first > last"));

    let (hello, _) = sample("hello");
    let hel = emit_vec(&header(1), &hello, &[], None);
    let e = corrupt_and_fix(hel.clone(), |b| b[hb + body::hello::RESERVED] = 1);
    assert_eq!(e, ParseError::BadField("hello reserved byte"));
    let e = corrupt_and_fix(hel, |b| b[hb + body::hello::FLAGS] = 0x80);
    assert_eq!(e, ParseError::BadField("hello flags: undefined bits set"));

    let (rc, _) = sample("role-change");
    let rcb = emit_vec(&header(1), &rc, &[], None);
    let e = corrupt_and_fix(rcb, |b| b[hb + body::role_change::RESERVED.start] = 1);
    assert_eq!(e, ParseError::BadField("role change reserved bytes"));

    let (v, _) = sample("verify-req");
    let vb = emit_vec(&header(1), &v, &[], None);
    let e = corrupt_and_fix(vb.clone(), |b| b[hb + body::verify::FLAGS] = 0x02);
    assert_eq!(e, ParseError::BadField("verify flags: undefined bits set"));
    let e = corrupt_and_fix(vb, |b| b[hb + body::verify::RESERVED.start] = 1);
    assert_eq!(e, ParseError::BadField("verify reserved bytes"));
}

#[test]
fn test_fragment_with_empty_payload_bad_field() {
    let (m, _) = sample("data-flush");
    let b = emit_vec(&header(1), &m, &[], None);
    let e = corrupt_and_fix(b, |b| b[field::FRAG_COUNT] = 2);
    assert_eq!(e, ParseError::BadField("fragment with empty payload"));
}

#[test]
fn test_parse_checks_in_documented_order() {
    // A frame wrong in every way reports the earliest check.
    let mut b = data_frame();
    b[field::RESERVED] = 1; // BadField
    b[field::CLUSTER_ID.start] ^= 1; // WrongCluster
    b[HEADER_LEN] ^= 1; // BadChecksum
    assert_eq!(parse_plain(&b), Err(ParseError::BadChecksum));
    b[field::VERSION] = 0;
    assert_eq!(parse_plain(&b), Err(ParseError::BadVersion(0)));
    b[0] = 0;
    assert!(matches!(parse_plain(&b), Err(ParseError::BadMagic(_))));
    let mut b = data_frame();
    b[field::RESERVED] = 1;
    b[field::CLUSTER_ID.start] ^= 1;
    assert!(fix_checksums(&mut b, None));
    assert!(matches!(parse_plain(&b), Err(ParseError::WrongCluster(_))));
}

// ----- errors, counters, emit refusals --------------------------------------

#[test]
fn test_error_messages_say_what_was_wrong() {
    let e = ParseError::BadChecksum;
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
    assert!(ParseError::BadVersion(7).to_string().contains("version 7"));
    assert!(ParseError::WrongCluster(0xab)
        .to_string()
        .contains("0x00000000000000ab"));
    assert!(EmitError::BufferTooSmall { need: 10, have: 3 }
        .to_string()
        .contains("need 10 bytes, have 3"));
    let _: &dyn std::error::Error = &e;
}

#[test]
fn test_counters_one_name_per_variant() {
    let all = [
        ParseError::Truncated { need: 1, have: 0 },
        ParseError::BadMagic(0),
        ParseError::BadVersion(0),
        ParseError::BadLength(""),
        ParseError::BadChecksum,
        ParseError::MissingAuth,
        ParseError::UnexpectedAuth,
        ParseError::BadAuth,
        ParseError::WrongCluster(0),
        ParseError::UnknownType {
            code: 0,
            must_understand: false,
        },
        ParseError::BadField(""),
        ParseError::BadEtherType(0),
    ];
    let mut c = RxCounters::default();
    c.record(&Ok::<(), _>(()));
    for (i, e) in all.iter().enumerate() {
        for _ in 0..=i {
            c.record(&Err::<(), _>(*e));
        }
    }
    let snap = c.snapshot();
    assert_eq!(snap[0], ("rx_ok", 1));
    for (i, e) in all.iter().enumerate() {
        assert_eq!(snap[i + 1], (e.counter_name(), i as u64 + 1));
    }
    let mut names: Vec<_> = snap.iter().map(|(n, _)| *n).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), RxCounters::LEN);
    assert_eq!(c.dropped(), (1..=all.len() as u64).sum::<u64>());
}

#[test]
fn test_key_debug_redacted() {
    let s = format!("{:?}", Key([0x41; 32]));
    assert!(!s.contains("65") && !s.contains("41"), "{s}");
}

#[test]
fn test_emit_small_buffer_refused() {
    let (m, payload) = sample("data");
    let need = buffer_len(&m, payload.len(), true);
    let mut out = vec![0u8; need - 1];
    assert_eq!(
        emit(&header(1), &m, &payload, Some(&KEY), &mut out),
        Err(EmitError::BufferTooSmall {
            need,
            have: need - 1
        })
    );
    // A larger buffer is fine; only `need` bytes are written.
    let mut out = vec![0xcc; need + 10];
    assert_eq!(
        emit(&header(1), &m, &payload, Some(&KEY), &mut out),
        Ok(need)
    );
    assert!(out[need..].iter().all(|&b| b == 0xcc));
}

#[test]
fn test_emit_invalid_values_refused() {
    let mut out = vec![0u8; 4096];
    let (hb, _) = sample("heartbeat");
    assert_eq!(
        emit(&header(0), &hb, &[1], None, &mut out),
        Err(EmitError::PayloadNotAllowed(MsgType::Heartbeat))
    );
    let Message::Ack(mut ack) = sample("ack").0 else {
        unreachable!()
    };
    ack.sack_len = 5;
    assert!(matches!(
        emit(&header(0), &Message::Ack(ack), &[], None, &mut out),
        Err(EmitError::InvalidField(_))
    ));
    let Message::Heartbeat(mut h) = hb else {
        unreachable!()
    };
    h.role = Role::Unknown(1); // a known code disguised as unknown
    assert!(matches!(
        emit(&header(0), &Message::Heartbeat(h), &[], None, &mut out),
        Err(EmitError::InvalidField(_))
    ));
    let bad_verify = Message::VerifyReq(Verify {
        start_block: 0,
        count: 1,
        flags: 0x40,
    });
    assert_eq!(
        emit(&header(1), &bad_verify, &[], None, &mut out),
        Err(EmitError::InvalidField("verify flags: undefined bits set"))
    );
    let bad_headers = [
        Header {
            flags: 0x01,
            ..header(0)
        },
        Header {
            frag_count: 0,
            ..header(0)
        },
        Header {
            frag_index: 1,
            frag_count: 1,
            ..header(0)
        },
    ];
    let (rd, _) = sample("resync-done");
    for h in bad_headers {
        assert!(matches!(
            emit(&h, &rd, &[], None, &mut out),
            Err(EmitError::InvalidField(_))
        ));
    }
}

#[test]
fn test_emit_auth_flag_follows_key() {
    let (m, _) = sample("resync-done");
    let h = Header {
        flags: flags::AUTH,
        ..header(1)
    };
    let b = emit_vec(&h, &m, &[], None);
    assert_eq!(b[field::FLAGS] & flags::AUTH, 0);
    assert!(parse_plain(&b).is_ok());
    let b = emit_vec(&header(1), &m, &[], Some(&KEY));
    assert_eq!(b[field::FLAGS] & flags::AUTH, flags::AUTH);
}

#[test]
fn test_state_image_offsets_past_4gib_roundtrip_and_layout() {
    // An image longer than 4 GiB: both positions are 64-bit, big-endian,
    // followed by the CRC and four reserved zero bytes.
    let m = Message::StateImage(StateImageChunk {
        total_len: 0x0000_0012_3456_789a,
        offset: 0x0000_0001_0000_0400,
        image_crc: 0xdead_beef,
    });
    let bytes = emit_vec(&header(3), &m, &[1, 2, 3], None);
    let body: String = bytes[HEADER_LEN..HEADER_LEN + 24]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(body, "000000123456789a0000000100000400deadbeef00000000");
    let p = parse(&bytes, &expect(None)).unwrap();
    assert_eq!(p.msg, m);
    assert_eq!(p.payload, &[1, 2, 3][..]);
}
