//! The fuzz targets' property checks (`smtp_proto::fuzzing`, also run by cargo-fuzz from
//! `fuzz/`) as plain property tests: deterministic pseudo-random inputs built from SMTP
//! fragments and hostile bytes, so they run under `cargo test` on the stable toolchain.
//! `SLUICE_PROP_ROUNDS` raises the number of inputs per target (default 400).

use smtp_proto::fuzzing::{self, dialog, Rng};

fn rounds() -> usize {
    std::env::var("SLUICE_PROP_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

/// Address-like input: characters that matter to the grammar.
fn address_like(rng: &mut Rng) -> Vec<u8> {
    const ALPHABET: &[&[u8]] = &[
        b"<",
        b">",
        b"@",
        b"\"",
        b"\\",
        b"(",
        b")",
        b"[",
        b"]",
        b":",
        b",",
        b".",
        b" ",
        b"a",
        b"B",
        b"-",
        b"1",
        b"\x00",
        b"\x7f",
        b"\xc3\xa9",
        b"\xe2\x80\x8b",
        b"\xff",
        b"IPv6:",
        b"::1",
        b"192.0.2.1",
        b"example.com",
        b"Postmaster",
        b"!#$%&'*+/=?^_`{|}~",
    ];
    let mut input = Vec::new();
    for _ in 0..(rng.next() % 24) {
        input.extend_from_slice(ALPHABET[rng.next() % ALPHABET.len()]);
    }
    input
}

fn with_header(rng: &mut Rng, header: usize, body: Vec<u8>) -> Vec<u8> {
    let mut data: Vec<u8> = (0..header).map(|_| rng.byte()).collect();
    data.extend_from_slice(&body);
    data
}

#[test]
fn prop_session_split_invariant() {
    let mut rng = Rng(0x5e55_1011);
    for _ in 0..rounds() {
        let body = dialog(&mut rng);
        fuzzing::session(&with_header(&mut rng, 3, body));
    }
}

#[test]
fn prop_address_round_trip() {
    let mut rng = Rng(0x0add_2e55);
    for _ in 0..rounds() * 10 {
        fuzzing::address(&address_like(&mut rng));
    }
}

#[test]
fn prop_data_decoder() {
    let mut rng = Rng(0xda7a);
    for _ in 0..rounds() * 2 {
        let body = dialog(&mut rng);
        fuzzing::data_decoder(&with_header(&mut rng, 2, body));
    }
}

#[test]
fn prop_bdat() {
    let mut rng = Rng(0xbda7);
    for _ in 0..rounds() * 2 {
        let len = rng.next() % 200;
        let mut data: Vec<u8> = Vec::with_capacity(len);
        for _ in 0..len {
            // Mostly text, with line ends and dots to stress the literal handling.
            let b = match rng.next() % 10 {
                0 => b'\r',
                1 => b'\n',
                2 => b'.',
                _ => rng.byte(),
            };
            data.push(b);
        }
        fuzzing::bdat(&data);
    }
}

/// Inputs the fuzzers found or that pin a past mistake.
#[test]
fn prop_regressions() {
    fuzzing::session(b"\x40\x10\x00STARTTLS\r\nRSET\r\nMAIL FROM:<a@b.c>\r\n");
    fuzzing::session(b"\x00\x00\x00BDAT 3 LAST\r\nabc");
    fuzzing::bdat(b"\x00\xff\x43\r\n.\r\n");
    fuzzing::data_decoder(b"\x01\x00a\nb\r\n.\r\n");
    fuzzing::address(b"<\"a b\"@example.com>");
}
