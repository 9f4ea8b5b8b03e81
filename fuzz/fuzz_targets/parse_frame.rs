//! Fuzz target `parse_frame`: msl_wire::parse with and without a key (and
//! again with checksums fixed up so the body checks are reached); accepted
//! frames must re-emit byte for byte.
//! The body lives in `msl_wire::fuzz_support` so the stable test suite runs
//! it over the seed corpus too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    msl_wire::fuzz_support::fuzz_parse_frame(data);
});
