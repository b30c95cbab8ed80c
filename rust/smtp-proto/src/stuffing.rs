//! Dot-stuffing for a message body sent to the next hop (RFC 5321 section 4.5.2).
//!
//! Used by the delivery side (and by Python through the binding) when it transmits a body
//! with DATA: every line that begins with "." gets one more ".", and the body is closed by
//! the end-of-data line ".\r\n".
//!
//! A bare LF or bare CR is never relayed (DESIGN.md: smuggling safety): each one is written
//! as CRLF, and the line after it counts as a new line, so a "." there is stuffed too. A
//! body that does not end with a line end gets a final CRLF, so the terminator always
//! stands on a line of its own.

/// Dot-stuffs `body` and appends the end-of-data line. The result ends in CRLF "." CRLF
/// (or is just ".\r\n" for an empty body).
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    // Worst realistic case is a few extra dots; reserve a little headroom once.
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 8);
    let mut at_line_start = true;
    let mut rest = body;
    while !rest.is_empty() {
        if at_line_start && rest.first() == Some(&b'.') {
            out.push(b'.');
        }
        // Copy up to the next CR or LF in one piece.
        let stop = find_cr_or_lf(rest).unwrap_or(rest.len());
        let (chunk, tail) = rest.split_at(stop);
        out.extend_from_slice(chunk);
        rest = tail;
        match rest {
            [b'\r', b'\n', tail @ ..] | [b'\r', tail @ ..] | [b'\n', tail @ ..] => {
                out.extend_from_slice(b"\r\n");
                at_line_start = true;
                rest = tail;
            }
            _ => at_line_start = false,
        }
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Position of the first CR or LF. Checks 16 bytes at a time without branching inside the
/// block, which the compiler turns into vector compares; the hot path of body copying.
pub(crate) fn find_cr_or_lf(s: &[u8]) -> Option<usize> {
    const BLOCK: usize = 16;
    let mut base = 0;
    let mut blocks = s.chunks_exact(BLOCK);
    for block in &mut blocks {
        let hit = block
            .iter()
            .fold(false, |acc, &b| acc | (b == b'\r') | (b == b'\n'));
        if hit {
            return block
                .iter()
                .position(|&b| b == b'\r' || b == b'\n')
                .map(|i| base + i);
        }
        base += BLOCK;
    }
    blocks
        .remainder()
        .iter()
        .position(|&b| b == b'\r' || b == b'\n')
        .map(|i| base + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stuffs_leading_dots() {
        assert_eq!(
            dot_stuff(b".x\r\nab\r\n.\r\n..\r\n"),
            b"..x\r\nab\r\n..\r\n...\r\n.\r\n".to_vec()
        );
    }

    #[test]
    fn dot_in_middle_untouched() {
        assert_eq!(dot_stuff(b"a.b\r\n"), b"a.b\r\n.\r\n".to_vec());
    }

    #[test]
    fn adds_final_crlf() {
        assert_eq!(dot_stuff(b"abc"), b"abc\r\n.\r\n".to_vec());
        assert_eq!(dot_stuff(b"."), b"..\r\n.\r\n".to_vec());
    }

    #[test]
    fn empty_body() {
        assert_eq!(dot_stuff(b""), b".\r\n".to_vec());
    }

    #[test]
    fn bare_line_ends_become_crlf() {
        assert_eq!(
            dot_stuff(b"a\n.\nb\r.c\r\n"),
            b"a\r\n..\r\nb\r\n..c\r\n.\r\n".to_vec()
        );
    }

    #[test]
    fn finder() {
        assert_eq!(find_cr_or_lf(b""), None);
        assert_eq!(find_cr_or_lf(b"abc"), None);
        let mut long = vec![b'a'; 100];
        assert_eq!(find_cr_or_lf(&long), None);
        long[37] = b'\n';
        assert_eq!(find_cr_or_lf(&long), Some(37));
        long[5] = b'\r';
        assert_eq!(find_cr_or_lf(&long), Some(5));
        long[5] = b'a';
        long[37] = b'a';
        long[99] = b'\r';
        assert_eq!(find_cr_or_lf(&long), Some(99));
    }
}
