//! Server session: any input, any split (one chunk, byte at a time, one cut) gives the same transcript; STARTTLS drops pipelined plaintext; buffered input stays bounded.
//! The check lives in `smtp_proto::fuzzing::session` so `cargo test` runs it as well.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    smtp_proto::fuzzing::session(data);
});
