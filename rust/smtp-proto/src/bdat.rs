//! The BDAT body accumulator: the octets of the chunks of one message (RFC 3030).
//!
//! Follows RFC 3030 section 2 (CHUNKING): a chunk is exactly as many octets as its BDAT
//! command declared, taken literally: no dot-stuffing, no terminator, a "\r\n.\r\n" in a
//! chunk is message content. Owned by the server session, which counts the octets of each
//! chunk off the input and hands them here; the binding never sees it.
//!
//! Line ends: RFC 3030 lets BDAT carry any octets, but this gateway relays with DATA as
//! often as not, and DESIGN.md says a bare LF (or bare CR) is never relayed. So a BDAT body
//! gets the same policy as a DATA body: under Reject a bare LF / bare CR is recorded and
//! the message is refused at BDAT LAST; under Normalise each one is stored as CRLF. A CR
//! at the end of one chunk and a LF at the start of the next are one CRLF: chunk
//! boundaries do not change the meaning of the octets. Unlike a DATA body, a BDAT body
//! need not end with CRLF; it is stored as sent (dot-stuffing adds the final CRLF when
//! the message is relayed with DATA).
//!
//! Memory is bounded by `max_size`, however large the declared chunk sizes: past the
//! limit (or after a bare line end under Reject) nothing more is stored, but every octet
//! is still counted and consumed so the command stream stays in sync.

use crate::data::{BodySink, DataOutcome};
use crate::stuffing::find_cr_or_lf;

/// Collects the chunks of one BDAT message.
#[derive(Debug)]
pub struct BdatBody {
    /// The last octet seen was a CR whose fate (CRLF or bare CR) depends on the next one.
    pending_cr: bool,
    sink: BodySink,
}

impl BdatBody {
    /// `max_size`: body octets allowed. `normalise`: store bare LF / bare CR as CRLF.
    pub fn new(max_size: u64, normalise: bool) -> Self {
        BdatBody {
            pending_cr: false,
            sink: BodySink::new(max_size, normalise),
        }
    }

    /// Appends chunk octets (any split).
    pub fn feed(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            if self.pending_cr {
                self.pending_cr = false;
                if input[0] == b'\n' {
                    self.emit(b"\r\n");
                    input = &input[1..];
                    continue;
                }
                self.bare_cr();
            }
            match find_cr_or_lf(input) {
                None => {
                    self.emit(input);
                    return;
                }
                Some(k) => {
                    self.emit(&input[..k]);
                    if input[k] == b'\r' {
                        self.pending_cr = true;
                    } else {
                        self.bare_lf();
                    }
                    input = &input[k + 1..];
                }
            }
        }
    }

    /// Body octets seen so far (saturating; a normalised line end counts as two).
    pub fn size(&self) -> u64 {
        self.sink.size()
    }

    /// The body after BDAT LAST. A CR at the very end is a bare CR.
    pub fn finish(mut self) -> DataOutcome {
        if self.pending_cr {
            self.pending_cr = false;
            self.sink.bare_cr();
        }
        self.sink.finish()
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.sink.emit(bytes);
    }

    fn bare_lf(&mut self) {
        self.sink.bare_lf();
    }

    fn bare_cr(&mut self) {
        self.sink.bare_cr();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds the chunks as given and the same octets one at a time; both must agree.
    fn collect(chunks: &[&[u8]], max: u64, normalise: bool) -> DataOutcome {
        let mut a = BdatBody::new(max, normalise);
        for c in chunks {
            a.feed(c);
        }
        let mut b = BdatBody::new(max, normalise);
        for c in chunks {
            for byte in c.iter() {
                b.feed(std::slice::from_ref(byte));
            }
        }
        let (a, b) = (a.finish(), b.finish());
        assert_eq!(a.body, b.body);
        assert_eq!(
            (a.size, a.too_big, a.bare_lf, a.bare_cr),
            (b.size, b.too_big, b.bare_lf, b.bare_cr)
        );
        a
    }

    #[test]
    fn literal_octets_no_dot_handling() {
        let o = collect(&[b"a\r\n.\r\n", b"..b\r\n"], 100, false);
        assert_eq!(o.body, b"a\r\n.\r\n..b\r\n");
        assert!(!o.bare_lf && !o.bare_cr && !o.too_big);
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_end() {
        let o = collect(&[b"a\r", b"\nb"], 100, false);
        assert_eq!(o.body, b"a\r\nb");
        assert!(!o.bare_cr);
    }

    #[test]
    fn bare_line_ends() {
        let o = collect(&[b"a\nb"], 100, false);
        assert!(o.bare_lf && o.body.is_empty());
        let o = collect(&[b"a\r", b"b"], 100, false);
        assert!(o.bare_cr && o.body.is_empty());
        let o = collect(&[b"a\r"], 100, false);
        assert!(o.bare_cr, "a CR at the very end is bare");
        let o = collect(&[b"a\nb\r", b"c\r\r\n\r"], 100, true);
        assert!(o.bare_lf && o.bare_cr);
        assert_eq!(o.body, b"a\r\nb\r\nc\r\n\r\n\r\n");
    }

    #[test]
    fn size_limit_stops_storing() {
        let o = collect(&[b"0123456789", b"x"], 10, false);
        assert!(o.too_big && o.body.is_empty());
        assert_eq!(o.size, 11);
        let o = collect(&[b"0123456789"], 10, false);
        assert!(!o.too_big);
        assert_eq!(o.body, b"0123456789");
    }
}
