//! Envelope address parser: no panic; parse -> format -> parse gives the same mailbox; strict acceptance implies the same loose reading.
//! The check lives in `smtp_proto::fuzzing::address` so `cargo test` runs it as well.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    smtp_proto::fuzzing::address(data);
});
