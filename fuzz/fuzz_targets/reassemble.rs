//! Fuzz target `reassemble`: msl_wire::Reassembler fed arbitrary fragment
//! sequences, and fragment / shuffle / reassemble of generated messages.
//! The body lives in `msl_wire::fuzz_support` so the stable test suite runs
//! it over the seed corpus too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    msl_wire::fuzz_support::fuzz_reassemble(data);
});
