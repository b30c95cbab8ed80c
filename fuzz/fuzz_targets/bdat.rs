//! BDAT dialog: chunks counted exactly whatever their octets, split invariant, the first message delivered or refused as the reference model says.
//! The check lives in `smtp_proto::fuzzing::bdat` so `cargo test` runs it as well.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    smtp_proto::fuzzing::bdat(data);
});
