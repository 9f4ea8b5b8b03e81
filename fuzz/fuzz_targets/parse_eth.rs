//! Fuzz target `parse_eth`: msl_wire::parse_eth, then the frame inside it.
//! The body lives in `msl_wire::fuzz_support` so the stable test suite runs
//! it over the seed corpus too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    msl_wire::fuzz_support::fuzz_parse_eth(data);
});
