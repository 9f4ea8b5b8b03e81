//! Fuzz target `nbd_parse`: the NBD option header, OPT_INFO/OPT_GO and
//! meta-context payload, and request header parsers; what one accepts must
//! re-encode to the same bytes.
//! The body lives in `msl_nbd::fuzz_support` so the stable test suite runs
//! it under proptest too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    msl_nbd::fuzz_support::fuzz_parsers(data);
});
