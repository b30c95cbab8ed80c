//! DATA body decoder: split invariant; ends only at CRLF.CRLF; a kept body survives dot-stuffing and decoding unchanged.
//! The check lives in `smtp_proto::fuzzing::data_decoder` so `cargo test` runs it as well.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    smtp_proto::fuzzing::data_decoder(data);
});
