//! Fuzz target `nbd_session`: one whole NBD connection (handshake, then
//! transmission against a 1 MiB in-memory export) whose client sends the
//! input; no panic, no hang, no backend call outside the export.
//! The body lives in `msl_nbd::fuzz_support` so the stable test suite runs
//! it under proptest too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    msl_nbd::fuzz_support::fuzz_session(data);
});
