//! The DATA body decoder: a byte-level state machine fed whatever the socket delivered.
//!
//! Follows RFC 5321 section 4.1.1.4 (the mail data ends with CRLF "." CRLF; the CRLF that
//! ends the DATA command counts as the first CRLF, so a first line of "." ends an empty
//! message) and section 4.5.2 (transparency: a line that begins with "." loses that first
//! dot). Owned by the server session; the binding never sees it.
//!
//! Smuggling safety (DESIGN.md, "SMTP smuggling"): only CRLF "." CRLF ends the body.
//! `LF "." LF`, `CRLF "." LF` and `LF "." CRLF` do not, because a next hop that treats them
//! differently would see a second message inside this one. A line start is therefore only
//! the start of the body or the octet after a real CRLF; a bare LF or bare CR does not
//! start a line. Bare LF and bare CR anywhere are recorded: the session refuses such a
//! message (Reject) or they are stored as CRLF (Normalise), so they are never relayed.
//!
//! Memory is bounded by `max_size`: past the limit the decoder stops storing (and frees
//! what it held) but keeps scanning for the terminator, so the session can answer 552
//! at the right place in the stream.

use crate::stuffing::find_cr_or_lf;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a line: start of body or just after CRLF.
    LineStart,
    /// A "." at the start of a line (not stored: it is either stuffing or the terminator).
    Dot,
    /// "." CR at the start of a line: LF now ends the body.
    DotCr,
    /// Inside a line.
    Middle,
    /// Inside a line, just after a CR: LF now ends the line.
    Cr,
}

/// What the decoder found once the terminator has been seen.
#[derive(Debug, Default)]
pub struct DataOutcome {
    /// Unstuffed body (CRLF line ends when normalising). Empty when `too_big` or, under
    /// the reject policy, when a bare line end was seen: such a body is never used.
    pub body: Vec<u8>,
    /// Unstuffed body octets seen (saturating).
    pub size: u64,
    /// `size` went past the limit.
    pub too_big: bool,
    /// A LF not preceded by CR was seen.
    pub bare_lf: bool,
    /// A CR not followed by LF was seen.
    pub bare_cr: bool,
}

/// Decodes one message body. Feed it with [`DataDecoder::feed`] until it reports the end.
#[derive(Debug)]
pub struct DataDecoder {
    state: State,
    sink: BodySink,
}

/// Where decoded body octets go, for DATA and BDAT alike: counts every octet, stores them
/// while the body can still be accepted, and records bare line ends. Memory is bounded by
/// `max_size`: past it, or at a bare line end under the reject policy, storing stops.
#[derive(Debug)]
pub(crate) struct BodySink {
    max_size: u64,
    normalise: bool,
    /// Stop storing (the body will be refused anyway): too big, or a bare line end under
    /// the reject policy.
    discarding: bool,
    out: DataOutcome,
}

impl BodySink {
    /// `max_size`: body octets allowed. `normalise`: store bare LF / bare CR as CRLF
    /// (otherwise they are only recorded and the body is dropped).
    pub(crate) fn new(max_size: u64, normalise: bool) -> Self {
        BodySink {
            max_size,
            normalise,
            discarding: false,
            out: DataOutcome::default(),
        }
    }

    pub(crate) fn size(&self) -> u64 {
        self.out.size
    }

    pub(crate) fn finish(self) -> DataOutcome {
        self.out
    }

    /// A LF not preceded by CR.
    pub(crate) fn bare_lf(&mut self) {
        self.out.bare_lf = true;
        self.bare_line_end();
    }

    /// A CR not followed by LF.
    pub(crate) fn bare_cr(&mut self) {
        self.out.bare_cr = true;
        self.bare_line_end();
    }

    fn bare_line_end(&mut self) {
        if self.normalise {
            self.emit(b"\r\n");
        } else {
            // The message will be refused: keep counting for the size check, stop storing.
            self.out.size = self.out.size.saturating_add(1);
            self.drop_body();
        }
    }

    pub(crate) fn emit(&mut self, bytes: &[u8]) {
        self.out.size = self.out.size.saturating_add(bytes.len() as u64);
        if self.discarding {
            return;
        }
        if self.out.size > self.max_size {
            self.drop_body();
            return;
        }
        self.out.body.extend_from_slice(bytes);
    }

    fn drop_body(&mut self) {
        if self.out.size > self.max_size {
            self.out.too_big = true;
        }
        if !self.discarding {
            self.discarding = true;
            self.out.body = Vec::new();
        }
    }
}

impl DataDecoder {
    /// `max_size`: unstuffed body octets allowed. `normalise`: store bare LF / bare CR as
    /// CRLF (otherwise they are only recorded and the body is dropped).
    pub fn new(max_size: u64, normalise: bool) -> Self {
        DataDecoder {
            state: State::LineStart,
            sink: BodySink::new(max_size, normalise),
        }
    }

    /// Consumes bytes of `input`. Returns `Some(n)` when the terminator ended at `input[n-1]`
    /// (the bytes after it belong to the command stream), `None` when all of `input` was
    /// consumed and the body goes on.
    pub fn feed(&mut self, input: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Middle => {
                    // Hot path: copy everything up to the next CR or LF in one go.
                    let rest = &input[i..];
                    match find_cr_or_lf(rest) {
                        None => {
                            self.emit(rest);
                            return None;
                        }
                        Some(k) => {
                            self.emit(&rest[..k]);
                            i += k;
                            // rest[k] is CR or LF.
                            if input[i] == b'\r' {
                                self.state = State::Cr;
                            } else {
                                self.bare_lf();
                            }
                            i += 1;
                        }
                    }
                }
                State::LineStart => {
                    let b = input[i];
                    i += 1;
                    match b {
                        b'.' => self.state = State::Dot,
                        b'\r' => self.state = State::Cr,
                        b'\n' => self.bare_lf(),
                        _ => {
                            self.emit(&[b]);
                            self.state = State::Middle;
                        }
                    }
                }
                State::Dot => {
                    // The dot at line start is dropped whatever follows (RFC 5321 4.5.2).
                    let b = input[i];
                    i += 1;
                    match b {
                        b'\r' => self.state = State::DotCr,
                        b'\n' => self.bare_lf(),
                        _ => {
                            self.emit(&[b]);
                            self.state = State::Middle;
                        }
                    }
                }
                State::DotCr => {
                    let b = input[i];
                    i += 1;
                    match b {
                        b'\n' => return Some(i),
                        b'\r' => {
                            // The first CR was bare; the second may still start a CRLF.
                            self.bare_cr();
                            self.state = State::Cr;
                        }
                        _ => {
                            self.bare_cr();
                            self.emit(&[b]);
                        }
                    }
                }
                State::Cr => {
                    let b = input[i];
                    i += 1;
                    match b {
                        b'\n' => {
                            self.emit(b"\r\n");
                            self.state = State::LineStart;
                        }
                        b'\r' => {
                            // The first CR was bare; the second may still start a CRLF.
                            self.bare_cr();
                            self.state = State::Cr;
                        }
                        _ => {
                            self.bare_cr();
                            self.emit(&[b]);
                            self.state = State::Middle;
                        }
                    }
                }
            }
        }
        None
    }

    /// The result; call after `feed` returned `Some`.
    pub fn finish(self) -> DataOutcome {
        self.sink.finish()
    }

    /// Unstuffed octets seen so far.
    pub fn size(&self) -> u64 {
        self.sink.size()
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.sink.emit(bytes);
    }

    /// A bare LF: stored as CRLF (Normalise) or recorded. It does not start a new line,
    /// so "\n.\r\n" can never end the body. The state after it is `Middle`.
    fn bare_lf(&mut self) {
        self.sink.bare_lf();
        self.state = State::Middle;
    }

    /// A bare CR (one not followed by LF); same rules as a bare LF.
    fn bare_cr(&mut self) {
        self.sink.bare_cr();
        self.state = State::Middle;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` whole, byte by byte and split in the middle; all must agree.
    /// Returns the outcome and the count of bytes consumed (None: not ended).
    fn decode(input: &[u8], max: u64, normalise: bool) -> (DataOutcome, Option<usize>) {
        crate::fuzzing::decode_all_ways(input, max, normalise, input.len() / 2)
    }

    #[test]
    fn simple_body() {
        let (o, end) = decode(b"Subject: x\r\n\r\nhello\r\n.\r\nQUIT\r\n", 1000, false);
        assert_eq!(end, Some(24));
        assert_eq!(o.body, b"Subject: x\r\n\r\nhello\r\n");
        assert_eq!(o.size, 21);
        assert!(!o.bare_lf && !o.bare_cr && !o.too_big);
    }

    #[test]
    fn empty_message_at_body_start() {
        let (o, end) = decode(b".\r\nNOOP\r\n", 1000, false);
        assert_eq!(end, Some(3));
        assert!(o.body.is_empty());
    }

    #[test]
    fn unstuffing() {
        let (o, _) = decode(b"..x\r\n..\r\n...\r\na.b\r\n.\r\n", 1000, false);
        assert_eq!(o.body, b".x\r\n.\r\n..\r\na.b\r\n");
    }

    #[test]
    fn lone_lf_dot_variants_do_not_end() {
        for input in [
            &b"a\n.\nb"[..],
            b"a\r\n.\nb",
            b"a\n.\r\nb",
            b"a\r.\rb",
            b"a\r\n.\rb",
            b".\n",
            b"\n.\r\n",
        ] {
            let (o, end) = decode(input, 1000, false);
            assert_eq!(end, None, "{input:?}");
            assert!(o.bare_lf || o.bare_cr);
        }
    }

    #[test]
    fn bare_line_ends_detected() {
        let (o, end) = decode(b"a\nb\r\n.\r\n", 1000, false);
        assert_eq!(end, Some(8));
        assert!(o.bare_lf && !o.bare_cr);
        assert!(o.body.is_empty(), "refused body is not kept");
        let (o, _) = decode(b"a\rb\r\n.\r\n", 1000, false);
        assert!(!o.bare_lf && o.bare_cr);
        let (o, _) = decode(b"a\r\r\n.\r\n", 1000, false);
        assert!(o.bare_cr);
        let (o, _) = decode(b".\rx\r\n.\r\n", 1000, false);
        assert!(o.bare_cr);
    }

    #[test]
    fn bare_cr_then_crlf_is_one_bare_cr_and_a_line_end() {
        // "\r\r\n": the first CR is bare, the second starts a real CRLF, so the "." line
        // after it ends the message.
        let (out, end) = decode(b"a\r\r\n.\r\n", 100, true);
        assert_eq!(end, Some(7));
        assert_eq!(out.body, b"a\r\n\r\n");
        assert!(out.bare_cr && !out.bare_lf);
    }

    #[test]
    fn normalise_converts_to_crlf() {
        let (o, end) = decode(b"a\nb\rc\r\r\nd\n.\nx\r\n.\r\n", 1000, true);
        assert!(end.is_some());
        assert!(o.bare_lf && o.bare_cr);
        assert_eq!(o.body, b"a\r\nb\r\nc\r\n\r\nd\r\n.\r\nx\r\n");
    }

    #[test]
    fn size_limit_bounds_memory_and_still_finds_end() {
        let mut input = vec![b'x'; 5000];
        input.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
        let (o, end) = decode(&input, 1000, false);
        assert_eq!(end, Some(5005));
        assert!(o.too_big);
        assert!(o.body.is_empty());
        assert_eq!(o.size, 5002);
    }

    #[test]
    fn exactly_at_limit_is_fine() {
        let (o, _) = decode(b"abc\r\n.\r\n", 5, false);
        assert!(!o.too_big);
        assert_eq!(o.body, b"abc\r\n");
        let (o, _) = decode(b"abcd\r\n.\r\n", 5, false);
        assert!(o.too_big);
    }

    #[test]
    fn long_line_is_body() {
        let mut input = vec![b'y'; 1 << 20];
        input.extend_from_slice(b"\r\n.\r\n");
        let (o, end) = decode(&input, 10 << 20, false);
        assert_eq!(end, Some(input.len()));
        assert_eq!(o.body.len(), (1 << 20) + 2);
    }
}
