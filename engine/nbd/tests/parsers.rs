//! The option and request parsers and a whole connection driven by
//! arbitrary client bytes, under proptest: the bodies of the cargo-fuzz
//! targets (`fuzz/fuzz_targets/nbd_*.rs`), run on stable in every test run.

use msl_nbd::fuzz_support::{fuzz_parsers, fuzz_session, seeds};
use msl_nbd::in_pieces;
use proptest::prelude::*;

#[test]
fn seeds_parse_and_serve() {
    for s in seeds() {
        fuzz_parsers(&s);
        fuzz_session(&s);
    }
    // The full seed session is answered: greeting, option replies, and a
    // reply to each request.
    let out = fuzz_session(&seeds()[0]);
    assert!(out.len() > 18 + 5 * 20, "{}", out.len());
}

fn mutated() -> impl Strategy<Value = Vec<u8>> {
    (
        0..seeds().len(),
        prop::collection::vec((any::<u16>(), any::<u8>()), 0..8),
    )
        .prop_map(|(i, edits)| {
            let mut s = seeds()[i].clone();
            for (at, b) in edits {
                let n = s.len();
                if n > 0 {
                    s[at as usize % n] = b;
                }
            }
            s
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn parsers_accept_only_what_they_reencode(data in prop::collection::vec(any::<u8>(), 0..200)) {
        fuzz_parsers(&data);
    }

    #[test]
    fn mutated_sessions_never_panic(data in mutated()) {
        fuzz_parsers(&data);
        fuzz_session(&data);
    }

    #[test]
    fn random_sessions_never_panic(data in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut s = 3u32.to_be_bytes().to_vec();
        s.extend_from_slice(&data);
        fuzz_session(&s);
    }

    #[test]
    fn pieces_cover_the_range_exactly(off in 0u64..1 << 40, len in 0u64..1 << 26, piece in 4096u64..1 << 24) {
        let mut next = off;
        let mut calls = 0;
        in_pieces(off, len, piece, |o, n| {
            assert_eq!(o, next);
            assert!(n <= piece);
            // Every cut but the range's own ends falls on a multiple.
            if o != off {
                assert_eq!(o % piece, 0);
            }
            next = o + n;
            calls += 1;
            Ok(())
        })
        .unwrap();
        prop_assert_eq!(next, off + len);
        prop_assert!(calls <= len / piece + 2);
    }
}
