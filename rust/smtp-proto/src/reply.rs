//! SMTP replies and their wire format.
//!
//! Follows RFC 5321 section 4.2 (reply lines: three digits, "-" on every line but the
//! last, " " on the last) and RFC 2034 / RFC 3463 (enhanced status codes after the basic
//! code on each line). Used by the server session for the replies it decides itself and
//! for the verdicts policy hands back through `ServerSession::answer`.
//!
//! Reply text may come from policy (Python) and so from configuration or even from data a
//! peer influenced: it must never be able to inject a line end into the stream. Text is
//! split on '\n' into lines and every other control character is dropped.

use std::fmt::Write as _;

/// One SMTP reply: basic code, enhanced status code ("" when there is none, as for the
/// greeting and the HELO/EHLO replies, RFC 2034 section 3) and text, possibly multi-line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: String,
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, enhanced: &str, text: &str) -> Reply {
        Reply {
            code,
            enhanced: enhanced.to_string(),
            text: text.to_string(),
        }
    }

    /// The reply as it goes on the wire: "250-2.0.0 a\r\n250 2.0.0 b\r\n" when the text
    /// holds '\n'. One trailing '\n' does not make an empty last line.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = String::with_capacity(self.text.len() + 16);
        // A code outside 100..=599 would make the line unparseable for the client; clamp
        // to a temporary local error rather than emit garbage.
        let code = if (100..=599).contains(&self.code) {
            self.code
        } else {
            451
        };
        let text = self.text.strip_suffix('\n').unwrap_or(&self.text);
        let enhanced: String = self
            .enhanced
            .chars()
            .filter(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let mut lines = text.split('\n').peekable();
        while let Some(line) = lines.next() {
            let sep = if lines.peek().is_some() { '-' } else { ' ' };
            let _ = write!(out, "{code:03}{sep}");
            let clean: String = line.chars().filter(|c| !c.is_control()).collect();
            match (enhanced.is_empty(), clean.is_empty()) {
                (true, _) => out.push_str(&clean),
                (false, true) => out.push_str(&enhanced),
                (false, false) => {
                    out.push_str(&enhanced);
                    out.push(' ');
                    out.push_str(&clean);
                }
            }
            out.push_str("\r\n");
        }
        out.into_bytes()
    }

    /// 2xx or 3xx: the command was accepted (or, for 354, may proceed).
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line() {
        let r = Reply::new(250, "2.1.0", "Sender OK");
        assert_eq!(r.to_bytes(), b"250 2.1.0 Sender OK\r\n");
    }

    #[test]
    fn multi_line_has_code_on_each_line() {
        let r = Reply::new(550, "5.7.1", "a\nb\nc");
        assert_eq!(
            r.to_bytes(),
            b"550-5.7.1 a\r\n550-5.7.1 b\r\n550 5.7.1 c\r\n".to_vec()
        );
    }

    #[test]
    fn no_enhanced_code() {
        let r = Reply::new(250, "", "mx.example\nPIPELINING");
        assert_eq!(
            r.to_bytes(),
            b"250-mx.example\r\n250 PIPELINING\r\n".to_vec()
        );
    }

    #[test]
    fn never_emits_cr_or_lf_from_text() {
        let r = Reply::new(250, "2.0.0", "x\r\n250 injected\r\ny\rz\u{0}");
        let b = r.to_bytes();
        assert_eq!(
            b,
            b"250-2.0.0 x\r\n250-2.0.0 250 injected\r\n250 2.0.0 yz\r\n".to_vec()
        );
        // Every CR is followed by LF and every LF is preceded by CR.
        for (i, &c) in b.iter().enumerate() {
            if c == b'\r' {
                assert_eq!(b.get(i + 1), Some(&b'\n'));
            }
            if c == b'\n' {
                assert_eq!(b[i - 1], b'\r');
            }
        }
    }

    #[test]
    fn trailing_newline_and_empty_text() {
        assert_eq!(
            Reply::new(221, "2.0.0", "bye\n").to_bytes(),
            b"221 2.0.0 bye\r\n"
        );
        assert_eq!(Reply::new(250, "2.0.0", "").to_bytes(), b"250 2.0.0\r\n");
        assert_eq!(Reply::new(7, "", "x").to_bytes(), b"451 x\r\n");
    }

    #[test]
    fn positive() {
        assert!(Reply::new(250, "", "").is_positive());
        assert!(Reply::new(354, "", "").is_positive());
        assert!(!Reply::new(450, "", "").is_positive());
        assert!(!Reply::new(550, "", "").is_positive());
    }
}
