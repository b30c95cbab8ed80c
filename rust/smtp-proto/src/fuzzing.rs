//! Property checks for fuzzing: each function takes arbitrary bytes, must never panic
//! except through its own assertions, and asserts an invariant of this crate.
//!
//! Called by the cargo-fuzz targets in `fuzz/` at the repository root (one target per
//! function) and by the property tests in `tests/fuzz_props.rs`, which run them on
//! deterministic pseudo-random inputs under plain `cargo test` on a stable toolchain.
//! Not part of the API the binding uses (hidden from the docs).
//!
//! - [`session`]: any input gives the same transcript fed in one chunk, one byte at a time,
//!   or split at an arbitrary point, and buffered input stays bounded.
//! - [`address`]: the address parser never panics; a parsed mailbox, formatted and parsed
//!   again, is the same mailbox; what strict mode accepts, loose mode accepts alike.
//! - [`data_decoder`]: the DATA decoder agrees with itself however the input is split, and
//!   a body it produced survives dot-stuffing and decoding unchanged.
//! - [`bdat`]: a BDAT dialog built from the input keeps the stream in sync and delivers
//!   the chunk octets exactly (or refuses them for the documented reasons).
//!
//! [`Rng`], [`FRAGMENTS`] and [`dialog`] make the deterministic inputs the property tests
//! feed them (and the random-dialog test in `tests/dialog.rs`).

use crate::address::{parse_path, AddressMode, Path};
use crate::data::{DataDecoder, DataOutcome};
use crate::reply::Reply;
use crate::server::{BareLinefeedPolicy, Query, ServerConfig, ServerSession, Step};
use crate::stuffing::dot_stuff;

/// A session configuration chosen by two input bytes.
pub fn config_from(a: u8, b: u8) -> ServerConfig {
    ServerConfig {
        hostname: "mx.fuzz.example".to_string(),
        max_line_length: if a & 0x80 != 0 {
            4096
        } else {
            8 + usize::from(a & 0x3f)
        },
        max_message_size: u64::from(b & 0x0f) * 8,
        max_recipients: 1 + usize::from(a & 0x03),
        require_helo: a & 0x04 != 0,
        bare_lf_ends_command: a & 0x08 == 0,
        bare_linefeed: if a & 0x10 != 0 {
            BareLinefeedPolicy::Normalise
        } else {
            BareLinefeedPolicy::Reject
        },
        address_mode: if a & 0x20 != 0 {
            AddressMode::Strict
        } else {
            AddressMode::Loose
        },
        max_bad_commands: u32::from(b >> 5),
        starttls: a & 0x40 != 0 || b & 0x10 != 0,
    }
}

/// A deterministic policy that says yes, no and go away depending on the question.
pub fn policy(q: &Query) -> Reply {
    match q {
        Query::Mail { reverse_path, .. } => match reverse_path.to_string().len() % 5 {
            0 => Reply::new(550, "5.7.1", "Sender refused"),
            _ => Reply::new(250, "2.1.0", "Sender OK"),
        },
        Query::Rcpt { forward_path, .. } => match forward_path.to_string().len() % 7 {
            0 => Reply::new(450, "4.2.0", "Try later"),
            3 => Reply::new(421, "4.3.2", "Shutting down"),
            _ => Reply::new(250, "2.1.5", "Recipient OK"),
        },
        Query::Message(env) => match env.body.len() % 3 {
            0 => Reply::new(451, "4.3.0", "Not now"),
            _ => Reply::new(250, "2.0.0", "Queued"),
        },
    }
}

/// One line per Ask in a transcript.
fn describe(q: &Query) -> String {
    match q {
        Query::Mail {
            reverse_path,
            params,
        } => format!("?MAIL <{reverse_path}> {params:?}\n"),
        Query::Rcpt {
            forward_path,
            params,
        } => format!("?RCPT <{forward_path}> {params:?}\n"),
        Query::Message(env) => format!(
            "?MESSAGE <{}> {:?} {:?} {:?}\n",
            env.reverse_path, env.mail_params, env.recipients, env.body
        ),
    }
}

/// Drives a session: `parts` are what the client sends in the clear and then, after a
/// `Step::StartTls`, inside TLS (each a list of reads). Plaintext still unread when
/// STARTTLS succeeds would go to the TLS handshake, so it is dropped here too. Returns
/// the transcript: replies, Ask lines, "(starttls)", "(close)".
pub fn drive(
    config: &ServerConfig,
    parts: &[Vec<&[u8]>],
    policy: &dyn Fn(&Query) -> Reply,
) -> String {
    drive_with(config, parts, policy, &describe)
}

/// `drive`, with the caller's rendering of each Ask (the dialog tests' golden transcripts
/// use a more readable one than the fuzz targets).
pub fn drive_with(
    config: &ServerConfig,
    parts: &[Vec<&[u8]>],
    policy: &dyn Fn(&Query) -> Reply,
    describe: &dyn Fn(&Query) -> String,
) -> String {
    let mut s = ServerSession::new(config.clone());
    let mut t = String::new();
    let mut part = 0;
    'parts: while let Some(chunks) = parts.get(part) {
        part += 1;
        let bound = config.max_line_length + chunks.iter().map(|c| c.len()).max().unwrap_or(0);
        for chunk in chunks {
            s.receive(chunk);
            loop {
                match s.step() {
                    Step::Write(b) => t.push_str(&String::from_utf8_lossy(&b)),
                    Step::Ask(q) => {
                        t.push_str(&describe(&q));
                        let held = s.buffered();
                        assert!(matches!(s.step(), Step::NeedInput), "step during an Ask");
                        assert_eq!(s.buffered(), held, "input consumed during an Ask");
                        s.answer(policy(&q));
                    }
                    Step::Close => {
                        t.push_str("(close)\n");
                        return t;
                    }
                    Step::StartTls => {
                        t.push_str("(starttls)\n");
                        // Anything fed now is plaintext after the 220: never executed.
                        s.receive(b"RSET\r\n");
                        assert!(matches!(s.step(), Step::NeedInput));
                        s.tls_started();
                        assert!(s.is_tls());
                        assert_eq!(s.buffered(), 0);
                        continue 'parts;
                    }
                    Step::NeedInput => break,
                }
            }
            assert!(s.buffered() <= bound, "buffered {} > {bound}", s.buffered());
        }
    }
    t
}

/// The transcript of `input` (and of `secure`, sent after STARTTLS) fed in one chunk;
/// asserts that one byte at a time and a split at `cut` give the same.
pub fn split_invariant(
    config: &ServerConfig,
    input: &[u8],
    secure: &[u8],
    cut: usize,
    policy: &dyn Fn(&Query) -> Reply,
) -> String {
    let whole = drive(config, &[vec![input], vec![secure]], policy);
    let bytes = drive(
        config,
        &[input.chunks(1).collect(), secure.chunks(1).collect()],
        policy,
    );
    assert_eq!(whole, bytes, "one chunk vs byte at a time");
    let cut = cut % (input.len() + 1);
    let (a, b) = input.split_at(cut);
    let cut2 = cut % (secure.len() + 1);
    let (c, d) = secure.split_at(cut2);
    let split = drive(config, &[vec![a, b], vec![c, d]], policy);
    assert_eq!(whole, split, "split at {cut} differs");
    whole
}

/// Session target: bytes 0-1 choose the configuration, byte 2 a split point, the rest is
/// what the client sends; after a successful STARTTLS the same bytes are sent again
/// inside TLS.
pub fn session(data: &[u8]) {
    let [a, b, c, input @ ..] = data else {
        return;
    };
    let config = config_from(*a, *b);
    split_invariant(&config, input, input, usize::from(*c) * 7, &policy);
}

/// Address target: byte 0 chooses nothing but is skipped so the corpus of the session
/// target can be reused; the rest is the text after "MAIL FROM:".
pub fn address(data: &[u8]) {
    for utf8 in [false, true] {
        let strict = check_round_trip(data, AddressMode::Strict, utf8);
        let loose = check_round_trip(data, AddressMode::Loose, utf8);
        if let Some((path, rest)) = strict {
            // Strict is a subset of loose, with the same reading.
            assert_eq!(
                loose,
                Some((path, rest)),
                "strict accepted {data:?} but loose read it differently"
            );
        }
    }
}

/// Parses; if a mailbox comes out, formats it as `<mailbox>` and parses that again.
fn check_round_trip(data: &[u8], mode: AddressMode, utf8: bool) -> Option<(Path, usize)> {
    let (path, rest) = parse_path(data, mode, utf8).ok()?;
    assert!(
        rest.is_empty() || rest[0] == b' ' || rest[0] == b'\t',
        "rest must start with white space: {rest:?}"
    );
    let shown = format!("<{path}>");
    match parse_path(shown.as_bytes(), mode, utf8) {
        Ok((again, tail)) => {
            assert_eq!(again, path, "{data:?} -> {shown:?} ({mode:?}, utf8 {utf8})");
            assert!(tail.is_empty(), "{shown:?} left {tail:?}");
        }
        Err(e) => panic!(
            "{data:?} parsed as {shown:?} which does not parse: {}",
            e.reason
        ),
    }
    Some((path, rest.len()))
}

/// Decodes whole, byte by byte and split at `cut`; all must agree. Returns the outcome
/// and the count of bytes consumed (None: not ended). Also used by `data`'s unit tests.
pub(crate) fn decode_all_ways(
    input: &[u8],
    max: u64,
    normalise: bool,
    cut: usize,
) -> (DataOutcome, Option<usize>) {
    let mut whole = DataDecoder::new(max, normalise);
    let end = whole.feed(input);
    let mut bytes = DataDecoder::new(max, normalise);
    let mut end_bytes = None;
    for (i, b) in input.iter().enumerate() {
        if let Some(n) = bytes.feed(std::slice::from_ref(b)) {
            assert_eq!(n, 1);
            end_bytes = Some(i + 1);
            break;
        }
    }
    assert_eq!(end, end_bytes, "whole vs byte at a time: end");
    let cut = cut % (input.len() + 1);
    let mut split = DataDecoder::new(max, normalise);
    let end_split = match split.feed(&input[..cut]) {
        Some(n) => Some(n),
        None => split.feed(&input[cut..]).map(|n| n + cut),
    };
    assert_eq!(end, end_split, "split at {cut}: end");
    let (a, b, c) = (whole.finish(), bytes.finish(), split.finish());
    for other in [&b, &c] {
        assert_eq!(a.body, other.body);
        assert_eq!(
            (a.size, a.too_big, a.bare_lf, a.bare_cr),
            (other.size, other.too_big, other.bare_lf, other.bare_cr)
        );
    }
    (a, end)
}

/// DATA decoder target: byte 0 chooses size limit and policy, byte 1 a split point.
pub fn data_decoder(data: &[u8]) {
    let [a, cut, input @ ..] = data else {
        return;
    };
    let normalise = a & 1 != 0;
    let max = if a & 2 != 0 {
        u64::MAX
    } else {
        u64::from(a >> 2) * 4
    };
    let (outcome, end) = decode_all_ways(input, max, normalise, usize::from(*cut));
    let Some(end) = end else {
        return;
    };
    // The body ended at CRLF "." CRLF (or "." CRLF first thing).
    let consumed = &input[..end];
    assert!(
        consumed == b".\r\n" || consumed.ends_with(b"\r\n.\r\n"),
        "ended at {consumed:?}"
    );
    if outcome.too_big || ((outcome.bare_lf || outcome.bare_cr) && !normalise) {
        assert!(outcome.body.is_empty(), "a refused body is not kept");
        return;
    }
    assert!(outcome.size <= max);
    assert_eq!(outcome.size, outcome.body.len() as u64);
    // What comes out has only CRLF line ends and survives stuffing + decoding.
    let stuffed = dot_stuff(&outcome.body);
    let (again, end) = decode_all_ways(&stuffed, u64::MAX, false, usize::from(*cut));
    assert_eq!(end, Some(stuffed.len()));
    assert!(
        !again.bare_lf && !again.bare_cr,
        "normalised body has bare line ends"
    );
    assert_eq!(again.body, outcome.body);
}

/// Reference model of the bare-line-end policy for BDAT: a CR followed by LF is a line
/// end; every other CR or LF is bare. Returns (body with bare ones as CRLF, any bare).
fn normalise_reference(octets: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::with_capacity(octets.len());
    let mut bare = false;
    let mut i = 0;
    while i < octets.len() {
        match (octets[i], octets.get(i + 1)) {
            (b'\r', Some(b'\n')) => {
                out.extend_from_slice(b"\r\n");
                i += 2;
                continue;
            }
            (b'\r' | b'\n', _) => {
                bare = true;
                out.extend_from_slice(b"\r\n");
            }
            (c, _) => out.push(c),
        }
        i += 1;
    }
    (out, bare)
}

/// BDAT target: byte 0-1 choose the configuration, then each op byte k: chunk size
/// k & 0x1f octets taken from the input, LAST when k & 0x40, a NOOP before it when k & 0x80
/// (a NOOP between chunks changes nothing). The first message must come out as the
/// reference model says; the dialog must be split invariant.
pub fn bdat(data: &[u8]) {
    let [a, b, rest @ ..] = data else {
        return;
    };
    let mut rest: &[u8] = rest;
    let mut config = config_from(*a, *b);
    config.require_helo = false;
    config.max_line_length = 4096;
    config.max_bad_commands = 0;
    config.max_message_size = u64::from(*b) * 2;
    let mut input = b"MAIL FROM:<a@b.example>\r\nRCPT TO:<rcpt@d.example>\r\n".to_vec();
    let mut first: Vec<u8> = Vec::new();
    let mut first_done = false;
    let mut chunks_after = 0usize;
    while let [k, tail @ ..] = rest {
        let n = usize::from(k & 0x1f).min(tail.len());
        let (content, tail) = tail.split_at(n);
        rest = tail;
        if k & 0x80 != 0 {
            input.extend_from_slice(b"NOOP\r\n");
        }
        let last = k & 0x40 != 0;
        let marker = if last { " LAST" } else { "" };
        input.extend_from_slice(format!("BDAT {n}{marker}\r\n").as_bytes());
        input.extend_from_slice(content);
        if first_done {
            chunks_after += 1;
        } else {
            first.extend_from_slice(content);
            first_done = last;
        }
    }
    let accept_all = |q: &Query| match q {
        Query::Mail { .. } => Reply::new(250, "2.1.0", "Sender OK"),
        Query::Rcpt { .. } => Reply::new(250, "2.1.5", "Recipient OK"),
        Query::Message(env) => Reply::new(250, "2.0.0", &format!("Queued {:?}", env.body)),
    };
    let t = split_invariant(&config, &input, b"", usize::from(*a), &accept_all);
    assert!(!t.contains("(close)"), "valid BDAT dialog closed: {t}");
    if !first_done {
        assert!(!t.contains("?MESSAGE"));
        return;
    }
    let (normalised, bare) = normalise_reference(&first);
    let normalise = config.bare_linefeed == BareLinefeedPolicy::Normalise;
    let stored_size = if normalise {
        normalised.len()
    } else {
        first.len()
    } as u64;
    let expected_reply = if stored_size > config.max_message_size && (normalise || !bare) {
        "552 5.3.4 ".to_string()
    } else if bare && !normalise {
        // Under Reject the size is not checked against the limit once a bare line end
        // stopped storing, unless it was already over: both refusals are acceptable.
        if t.contains("552 5.3.4 ") {
            "552 5.3.4 ".to_string()
        } else {
            "550 5.6.0 ".to_string()
        }
    } else {
        let body = if normalise { normalised } else { first };
        format!("250 2.0.0 Queued {body:?}")
    };
    assert!(
        t.contains(&expected_reply),
        "expected {expected_reply}: {t}"
    );
    // Every chunk after the first message is refused for want of a transaction.
    assert_eq!(
        t.matches("503 5.5.1 Need MAIL command").count(),
        chunks_after,
        "{t}"
    );
}

// ---- inputs for the property tests (tests/fuzz_props.rs, tests/dialog.rs) ----

/// A small deterministic generator (PCG-style LCG), so failures reproduce.
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)] // not an Iterator: it never ends
    pub fn next(&mut self) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as usize
    }

    pub fn byte(&mut self) -> u8 {
        (self.next() & 0xff) as u8
    }
}

/// SMTP commands, line ends and hostile bytes that dialogs are built from.
pub const FRAGMENTS: &[&[u8]] = &[
    b"EHLO x\r\n",
    b"HELO y\n",
    b"STARTTLS\r\n",
    b"STARTTLS x\r\n",
    b"MAIL FROM:<a@example.org>\r\n",
    b"MAIL FROM:<> SIZE=10 RET=HDRS ENVID=a+2Bb\r\n",
    b"MAIL FROM:<j\xc3\xb6rg@ex\xc3\xa4mple.de> SMTPUTF8\r\n",
    b"MAIL FROM:<j\xc3\xb6rg@example.de>\r\n",
    b"mail from:\"q@x.y\" size=99999999999999999999999\r\n",
    b"RCPT TO:<b@example.com>\r\n",
    b"RCPT TO:<b@example.com> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b+40x\r\n",
    b"RCPT TO:<\xc3\xbc@example.com>\r\n",
    b"RCPT TO:<Postmaster>\r\n",
    b"RCPT TO:<>\r\n",
    b"RCPT TO:<a\xe2\x80\x8bb@example.com>\r\n",
    b"DATA\r\n",
    b"BDAT 5\r\n",
    b"BDAT 3 LAST\r\n",
    b"BDAT 0 LAST\r\n",
    b"BDAT 99999999999999999999999\r\n",
    b"BDAT x\r\n",
    b".\r\n",
    b"\r\n.\r\n",
    b"..\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b".",
    b"\n.\n",
    b"\x00\xff\xc3",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"VRFY z\r\n",
    b"HELP\r\n",
    b"QUIT\r\n",
    b"text",
    b"<(x)@[1.2.3.4]>",
];

/// A dialog-like input: fragments with the odd random byte.
pub fn dialog(rng: &mut Rng) -> Vec<u8> {
    let mut input = Vec::new();
    for _ in 0..(rng.next() % 30) {
        if rng.next().is_multiple_of(8) {
            input.push(rng.byte());
        } else {
            input.extend_from_slice(FRAGMENTS[rng.next() % FRAGMENTS.len()]);
        }
    }
    input
}
