//! Envelope paths: the argument of MAIL FROM and RCPT TO.
//!
//! Follows RFC 5321 section 4.1.2 (Path, Mailbox, Local-part, Domain, address literals),
//! section 4.1.3 (address literals), section 4.5.3.1 (size limits: local part 64 octets,
//! domain 255, path 256) and RFC 6531 section 3.3 (UTF-8 in addresses, only when the
//! caller allows it). Called by the server session for each MAIL / RCPT command, and by
//! Python through the binding (`parse_path`) so that configuration and tools use the same
//! parser as the listener. Peer input: every byte is checked, nothing panics.
//!
//! Two modes:
//! - `Strict`: the Path grammar of RFC 5321 only: angle brackets required, no comments, no
//!   display names, no white space inside the brackets. Source routes are accepted and
//!   dropped (RFC 5321 section 4.1.2 says they MUST be accepted and SHOULD be ignored).
//! - `Loose`, the appliance default, tolerates what real clients send, as the IronPort
//!   appliance does in its loose mode: no brackets (`joe@foo.com`), a quoted whole address
//!   (`"joe@foo.com"`), a display name (`<"Joe Sixpack" <joe@foo.com>>`), comments
//!   (`<(joe@bar.com) otherjoe@foo.com>`), white space inside the brackets, and local parts
//!   with leading, trailing or doubled dots (some mobile carriers hand those out).
//!
//! In both modes white space between "FROM:" / "TO:" and the path is skipped: it lies
//! outside the Path rule and almost every client library sends it.
//!
//! What comes out is always a plain RFC 5321 mailbox: the local part exactly as written
//! (a quoted local part keeps its quotes and escapes, so `"x;rm -rf ~"` stays data and is
//! never unquoted into something a later stage might interpret), the domain or address
//! literal as written (the "IPv6:" tag spelled canonically).

use std::fmt;
use std::net::Ipv6Addr;

/// Maximum octets of a local part (RFC 5321 section 4.5.3.1.1).
pub const MAX_LOCAL_PART: usize = 64;
/// Maximum octets of a domain (RFC 5321 section 4.5.3.1.2).
pub const MAX_DOMAIN: usize = 255;
/// Maximum octets of a path, brackets included (RFC 5321 section 4.5.3.1.3).
pub const MAX_PATH: usize = 256;
/// Maximum octets of one domain label (RFC 1035 section 2.3.4).
const MAX_LABEL: usize = 63;
/// Nesting of angle brackets accepted in loose mode (`<"name" <a@b>>` is depth 1).
const MAX_ANGLE_DEPTH: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressMode {
    Loose,
    Strict,
}

/// An envelope mailbox. `local` is as written (a quoted local part keeps its quotes);
/// `domain` is None only for the bare `<Postmaster>` (RFC 5321 section 4.5.1). Address
/// literals keep their brackets: `"[192.0.2.1]"`, `"[IPv6:2001:db8::1]"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mailbox {
    pub local: String,
    pub domain: Option<String>,
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.domain {
            Some(d) => write!(f, "{}@{}", self.local, d),
            None => f.write_str(&self.local),
        }
    }
}

/// A reverse or forward path: the null path `<>` or a mailbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Path {
    Null,
    Mailbox(Mailbox),
}

/// `path.to_string()` gives "" for the null path and the mailbox otherwise.
impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Null => Ok(()),
            Path::Mailbox(m) => m.fmt(f),
        }
    }
}

/// Why an address was refused, in words fit for a reply text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressError {
    pub reason: String,
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason)
    }
}

impl std::error::Error for AddressError {}

fn error(reason: impl Into<String>) -> AddressError {
    AddressError {
        reason: reason.into(),
    }
}

type R<T> = Result<T, AddressError>;

/// Parses the text after "MAIL FROM:" / "RCPT TO:" up to (not including) the parameters.
/// Returns the path and the rest of the line (the ESMTP parameters, unparsed; empty or
/// starting with white space).
///
/// ```text
/// Reverse-path   = Path / "<>"
/// Forward-path   = Path
/// Path           = "<" [ A-d-l ":" ] Mailbox ">"
/// ```
/// plus, for RCPT, `"<Postmaster>"` (RFC 5321 section 4.1.1.3). The caller decides whether
/// the null path or a mailbox without domain is allowed for its command.
pub fn parse_path(
    input: &[u8],
    mode: AddressMode,
    utf8_allowed: bool,
) -> Result<(Path, &[u8]), AddressError> {
    let mut p = Parser {
        s: input,
        pos: 0,
        loose: mode == AddressMode::Loose,
        utf8: utf8_allowed,
    };
    p.skip_wsp();
    let path = match p.peek() {
        None => return Err(error("empty address")),
        Some(b'<') => p.angle(0)?,
        Some(_) if !p.loose => return Err(error("address must be enclosed in <>")),
        Some(_) => p.unbracketed()?,
    };
    match p.peek() {
        None | Some(b' ') | Some(b'\t') => {}
        Some(_) => return Err(p.unexpected("after the address")),
    }
    Ok((path, &input[p.pos..]))
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
    loose: bool,
    utf8: bool,
}

/// atext from RFC 5322 section 3.2.3, used by RFC 5321's Atom:
/// ```text
/// atext = ALPHA / DIGIT / "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" / "-" / "/" /
///         "=" / "?" / "^" / "_" / "`" / "{" / "|" / "}" / "~"
/// ```
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b)
}

/// Characters that render as nothing or reorder text: a mailbox holding one can look like
/// another mailbox to a person (RFC 6531 leaves this to the receiver; RFC 8264 disallows
/// these in identifiers). C1 controls are controls like their ASCII siblings. The list is
/// Unicode's Default_Ignorable_Code_Point set plus the bidi controls, the line and
/// paragraph separators and the interlinear annotation characters.
fn is_forbidden_char(c: char) -> bool {
    matches!(c,
        '\u{0080}'..='\u{009F}'
        | '\u{00AD}'
        | '\u{034F}'
        | '\u{061C}'
        | '\u{115F}'..='\u{1160}'
        | '\u{17B4}'..='\u{17B5}'
        | '\u{180B}'..='\u{180F}'
        | '\u{200B}'..='\u{200F}'
        | '\u{2028}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}'
        | '\u{3164}'
        | '\u{FE00}'..='\u{FE0F}'
        | '\u{FEFF}'
        | '\u{FFA0}'
        | '\u{FFF0}'..='\u{FFFB}'
        | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0000}'..='\u{E0FFF}'
    )
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.pos).copied()
    }

    fn peek_is(&self, b: u8) -> bool {
        self.peek() == Some(b)
    }

    fn expect(&mut self, b: u8, what: &str) -> R<()> {
        if self.peek_is(b) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.unexpected(what))
        }
    }

    /// A reason naming the offending byte at the current position.
    fn unexpected(&self, context: &str) -> AddressError {
        match self.peek() {
            None => error(format!("unexpected end of address {context}")),
            Some(b) if b < 0x20 || b == 0x7f => {
                error(format!("control character 0x{b:02X} in address"))
            }
            Some(b) if b >= 0x80 && !self.utf8 => {
                error("non-ASCII character in address (SMTPUTF8 not in use)")
            }
            Some(b) if b >= 0x80 => error(format!("unexpected non-ASCII character {context}")),
            Some(b) => error(format!("unexpected '{}' {context}", b as char)),
        }
    }

    /// If the current byte starts a UTF-8 character that may appear in an address, steps
    /// over it. RFC 6531 section 3.3: `UTF8-non-ascii` extends atext, qtextSMTP and
    /// sub-domain. Only when the caller allows UTF-8; it must be valid and not a format
    /// character.
    fn utf8_char(&mut self) -> R<()> {
        let lead = self.peek().unwrap_or(0);
        if !self.utf8 {
            return Err(error(
                "non-ASCII character in address (SMTPUTF8 not in use)",
            ));
        }
        let len = match lead {
            0xC2..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF4 => 4,
            _ => return Err(error("invalid UTF-8 in address")),
        };
        let bytes = self
            .s
            .get(self.pos..self.pos + len)
            .ok_or_else(|| error("invalid UTF-8 in address"))?;
        let c = std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.chars().next())
            .ok_or_else(|| error("invalid UTF-8 in address"))?;
        if is_forbidden_char(c) {
            return Err(error(format!(
                "invisible or control character U+{:04X} in address",
                c as u32
            )));
        }
        self.pos += len;
        Ok(())
    }

    /// Spaces and tabs.
    fn skip_wsp(&mut self) {
        while matches!(self.peek(), Some(b' ') | Some(b'\t')) {
            self.pos += 1;
        }
    }

    /// Loose mode only: white space and comments.
    /// ```text
    /// CFWS    = (1*([FWS] comment) [FWS]) / FWS          (RFC 5322 3.2.2)
    /// comment = "(" *([FWS] ccontent) [FWS] ")"
    /// ccontent = ctext / quoted-pair / comment
    /// ```
    fn skip_cfws(&mut self) -> R<()> {
        if !self.loose {
            return Ok(());
        }
        loop {
            self.skip_wsp();
            if !self.peek_is(b'(') {
                return Ok(());
            }
            self.skip_comment()?;
        }
    }

    fn skip_comment(&mut self) -> R<()> {
        // Nesting is counted, not recursed, so deep nesting costs nothing.
        let mut depth = 0usize;
        loop {
            match self.peek() {
                None => return Err(error("unterminated comment in address")),
                Some(b'(') => depth += 1,
                Some(b')') => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        self.pos += 1;
                        return Ok(());
                    }
                }
                Some(b'\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some(b) if (0x20..0x7f).contains(&b) => {}
                        Some(b) if b >= 0x80 => {
                            self.utf8_char()?;
                            continue;
                        }
                        _ => return Err(self.unexpected("after '\\' in comment")),
                    }
                }
                Some(b) if b >= 0x80 => {
                    self.utf8_char()?;
                    continue;
                }
                Some(b) if (b < 0x20 && b != b'\t') || b == 0x7f => {
                    return Err(self.unexpected("in comment"));
                }
                Some(_) => {}
            }
            self.pos += 1;
        }
    }

    /// ```text
    /// Path  = "<" [ A-d-l ":" ] Mailbox ">"
    /// A-d-l = At-domain *( "," At-domain )
    /// ```
    /// Loose additions: CFWS inside the brackets, a display name before a nested
    /// `<mailbox>`, and a nested `<mailbox>` alone.
    fn angle(&mut self, depth: u8) -> R<Path> {
        self.pos += 1; // the '<'
        self.skip_cfws()?;
        match self.peek() {
            Some(b'>') => {
                self.pos += 1;
                return Ok(Path::Null);
            }
            Some(b'<') if self.loose && depth < MAX_ANGLE_DEPTH => {
                let inner = self.angle(depth + 1)?;
                self.close_angle()?;
                return Ok(inner);
            }
            Some(b'@') => {
                self.adl()?;
                if self.peek_is(b'>') {
                    // `<@example.com>`: read as a route, but it is a mailbox without local part.
                    return Err(error("empty local part"));
                }
                self.expect(b':', "after the source route")?;
                self.skip_cfws()?;
            }
            _ => {}
        }
        if self.loose && depth < MAX_ANGLE_DEPTH {
            if let Some(at) = self.display_name_end() {
                // `"Joe Sixpack" <joe@foo.com>`: the phrase is dropped, the inner path used.
                self.pos = at;
                let inner = self.angle(depth + 1)?;
                self.close_angle()?;
                return Ok(inner);
            }
        }
        let mailbox = self.mailbox(true)?;
        self.close_angle()?;
        Ok(Path::Mailbox(mailbox))
    }

    fn close_angle(&mut self) -> R<()> {
        self.skip_cfws()?;
        if self.peek().is_none() {
            return Err(error("missing '>' at the end of the address"));
        }
        self.expect(b'>', "where '>' should end the address")
    }

    /// Loose mode: is what follows a display name, i.e. is there a '<' outside quotes and
    /// comments before the next '>' (or the end)? Returns the position of that '<'.
    fn display_name_end(&self) -> Option<usize> {
        let mut i = self.pos;
        let mut comment = 0usize;
        let mut quoted = false;
        while let Some(&b) = self.s.get(i) {
            match b {
                b'\\' if quoted || comment > 0 => i += 1,
                b'"' if comment == 0 => quoted = !quoted,
                b'(' if !quoted => comment += 1,
                b')' if !quoted && comment > 0 => comment -= 1,
                b'<' if !quoted && comment == 0 => return Some(i),
                b'>' if !quoted && comment == 0 => return None,
                _ => {}
            }
            i += 1;
        }
        None
    }

    /// Loose mode, no angle brackets: `joe@foo.com`, `"joe@foo.com"`, `Postmaster`, or a
    /// display name followed by `<path>`. The path ends at white space.
    fn unbracketed(&mut self) -> R<Path> {
        let start = self.pos;
        let first = match self.mailbox(true) {
            Ok(m) if matches!(self.peek(), None | Some(b' ') | Some(b'\t')) => {
                return Ok(Path::Mailbox(m));
            }
            Ok(_) => self.unexpected("after the address"),
            Err(e) => e,
        };
        // `Joe Sixpack <joe@foo.com>` or `"Joe" <joe@foo.com>`.
        self.pos = start;
        if let Some(at) = self.display_name_end() {
            self.pos = at;
            return self.angle(1);
        }
        Err(first)
    }

    /// ```text
    /// A-d-l     = At-domain *( "," At-domain )
    /// At-domain = "@" Domain
    /// ```
    /// Parsed to check it, then dropped (RFC 5321 section 4.1.2: SHOULD ignore).
    fn adl(&mut self) -> R<()> {
        loop {
            self.expect(b'@', "in the source route")?;
            self.domain()?;
            if !self.peek_is(b',') {
                return Ok(());
            }
            self.pos += 1;
        }
    }

    /// ```text
    /// Mailbox    = Local-part "@" ( Domain / address-literal )
    /// Local-part = Dot-string / Quoted-string
    /// ```
    /// plus `Postmaster` alone (RFC 5321 section 4.1.1.3) and, in loose mode, a quoted
    /// string holding a whole address (`"joe@foo.com"` is joe@foo.com) when
    /// `whole_quoted` allows it.
    fn mailbox(&mut self, whole_quoted: bool) -> R<Mailbox> {
        let start = self.pos;
        let quoted = self.peek_is(b'"');
        if quoted {
            self.quoted_string()?;
        } else {
            self.dot_string()?;
        }
        let local = &self.s[start..self.pos];
        if !self.peek_is(b'@') {
            if quoted && self.loose && whole_quoted && local.contains(&b'@') {
                return self.whole_quoted_address(local);
            }
            if local.eq_ignore_ascii_case(b"postmaster") {
                return Ok(Mailbox {
                    local: to_string(local)?,
                    domain: None,
                });
            }
            let after_space = self.s[self.pos..]
                .iter()
                .find(|&&b| b != b' ' && b != b'\t')
                .copied();
            return match (self.peek(), after_space) {
                (Some(b' ') | Some(b'\t'), Some(b'<')) => Err(error(
                    "display names are not allowed in strict address mode",
                )),
                (Some(b' ') | Some(b'\t'), Some(b'@')) => {
                    Err(error("white space before '@' in address"))
                }
                (None | Some(b'>') | Some(b' ') | Some(b'\t'), _) => Err(error(
                    "domain missing: expected '@domain' after the local part",
                )),
                _ => Err(self.unexpected("in the local part")),
            };
        }
        self.pos += 1; // '@'
        if quoted && local.len() <= 2 {
            return Err(error("empty local part"));
        }
        if local.len() > MAX_LOCAL_PART {
            return Err(error(format!(
                "local part longer than {MAX_LOCAL_PART} octets"
            )));
        }
        let domain = self.domain()?;
        if local.len() + 1 + domain.len() + 2 > MAX_PATH {
            return Err(error(format!("path longer than {MAX_PATH} octets")));
        }
        Ok(Mailbox {
            local: to_string(local)?,
            domain: Some(domain),
        })
    }

    /// `"joe@foo.com"`: unquote, then parse the content as a plain mailbox (once; a quoted
    /// address inside it is not unwrapped again).
    fn whole_quoted_address(&self, quoted: &[u8]) -> R<Mailbox> {
        let inner = quoted.get(1..quoted.len().saturating_sub(1)).unwrap_or(b"");
        let mut content = Vec::with_capacity(inner.len());
        let mut escaped = false;
        for &b in inner {
            if b == b'\\' && !escaped {
                escaped = true;
            } else {
                content.push(b);
                escaped = false;
            }
        }
        let mut sub = Parser {
            s: &content,
            pos: 0,
            loose: self.loose,
            utf8: self.utf8,
        };
        let m = sub.mailbox(false)?;
        if sub.peek().is_some() {
            return Err(sub.unexpected("in the quoted address"));
        }
        if m.domain.is_none() {
            return Err(error("domain missing in the quoted address"));
        }
        Ok(m)
    }

    /// ```text
    /// Dot-string = Atom *("."  Atom)
    /// Atom       = 1*atext
    /// ```
    /// Loose mode also takes leading, trailing and doubled dots.
    fn dot_string(&mut self) -> R<()> {
        let start = self.pos;
        let mut atext_seen = false;
        let mut prev_dot = true; // a dot at the start is a "doubled" dot
        loop {
            match self.peek() {
                Some(b'.') => {
                    if prev_dot && !self.loose {
                        return Err(error(if self.pos == start {
                            "local part starts with '.'"
                        } else {
                            "'..' in local part"
                        }));
                    }
                    prev_dot = true;
                    self.pos += 1;
                }
                Some(b) if is_atext(b) => {
                    atext_seen = true;
                    prev_dot = false;
                    self.pos += 1;
                }
                Some(b) if b >= 0x80 => {
                    self.utf8_char()?;
                    atext_seen = true;
                    prev_dot = false;
                }
                _ => break,
            }
        }
        if !atext_seen {
            return match self.peek() {
                None | Some(b'@') | Some(b'>') => Err(error("empty local part")),
                _ => Err(self.unexpected("in the local part")),
            };
        }
        if prev_dot && !self.loose {
            return Err(error("local part ends with '.'"));
        }
        Ok(())
    }

    /// ```text
    /// Quoted-string   = DQUOTE *QcontentSMTP DQUOTE
    /// QcontentSMTP    = qtextSMTP / quoted-pairSMTP
    /// quoted-pairSMTP = %d92 %d32-126
    /// qtextSMTP       = %d32-33 / %d35-91 / %d93-126
    /// ```
    fn quoted_string(&mut self) -> R<()> {
        self.pos += 1; // opening DQUOTE
        loop {
            match self.peek() {
                None => return Err(error("unterminated quoted local part")),
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(());
                }
                Some(b'\\') => {
                    self.pos += 1;
                    match self.peek() {
                        Some(b) if (32..=126).contains(&b) => self.pos += 1,
                        Some(b) if b >= 0x80 => self.utf8_char()?,
                        _ => return Err(self.unexpected("after '\\' in the quoted local part")),
                    }
                }
                Some(b) if (32..=126).contains(&b) => self.pos += 1,
                Some(b) if b >= 0x80 => self.utf8_char()?,
                Some(_) => return Err(self.unexpected("in the quoted local part")),
            }
        }
    }

    /// ```text
    /// Domain     = sub-domain *("." sub-domain)
    /// sub-domain = Let-dig [Ldh-str]
    /// Let-dig    = ALPHA / DIGIT
    /// Ldh-str    = *( ALPHA / DIGIT / "-" ) Let-dig
    /// ```
    /// or an address literal. RFC 6531 adds U-labels (UTF-8) when UTF-8 is allowed.
    fn domain(&mut self) -> R<String> {
        if self.peek_is(b'[') {
            return self.address_literal();
        }
        let start = self.pos;
        loop {
            let label = self.pos;
            let mut last = 0u8;
            loop {
                match self.peek() {
                    Some(b) if b.is_ascii_alphanumeric() => self.pos += 1,
                    Some(b'-') if self.pos > label => self.pos += 1,
                    Some(b) if b >= 0x80 => self.utf8_char()?,
                    _ => break,
                }
                last = self.s[self.pos - 1];
            }
            if self.pos == label {
                return Err(if self.pos == start {
                    match self.peek() {
                        None | Some(b'>') | Some(b' ') => error("domain missing after @"),
                        _ => self.unexpected("at the start of the domain"),
                    }
                } else if self.peek_is(b'.') {
                    error("empty label ('..') in domain")
                } else if matches!(self.peek(), None | Some(b'>') | Some(b' ')) {
                    error("domain ends with '.'")
                } else {
                    self.unexpected("in the domain")
                });
            }
            if last == b'-' {
                return Err(error("domain label ends with '-'"));
            }
            if self.pos - label > MAX_LABEL {
                return Err(error(format!(
                    "domain label longer than {MAX_LABEL} octets"
                )));
            }
            if !self.peek_is(b'.') {
                break;
            }
            self.pos += 1;
        }
        let domain = &self.s[start..self.pos];
        if domain.len() > MAX_DOMAIN {
            return Err(error(format!("domain longer than {MAX_DOMAIN} octets")));
        }
        to_string(domain)
    }

    /// ```text
    /// address-literal      = "[" ( IPv4-address-literal / IPv6-address-literal /
    ///                              General-address-literal ) "]"
    /// IPv4-address-literal = Snum 3("."  Snum)
    /// IPv6-address-literal = "IPv6:" IPv6-addr
    /// dcontent             = %d33-90 / %d94-126
    /// ```
    /// A General-address-literal (a tag with no defined meaning) is refused: nothing
    /// could deliver to it.
    fn address_literal(&mut self) -> R<String> {
        let open = self.pos;
        self.pos += 1;
        while let Some(b) = self.peek() {
            if (33..=90).contains(&b) || (94..=126).contains(&b) {
                self.pos += 1;
            } else {
                break;
            }
        }
        if !self.peek_is(b']') {
            return Err(if self.peek().is_none() {
                error("unterminated address literal")
            } else {
                self.unexpected("in the address literal")
            });
        }
        let content = &self.s[open + 1..self.pos];
        self.pos += 1;
        let text = std::str::from_utf8(content).map_err(|_| error("invalid address literal"))?;
        let tag = text.get(..5).unwrap_or("");
        if tag.eq_ignore_ascii_case("IPv6:") {
            let addr = text.get(5..).unwrap_or("");
            if addr.contains('%') || addr.parse::<Ipv6Addr>().is_err() {
                return Err(error(format!("invalid IPv6 address literal [{text}]")));
            }
            return Ok(format!("[IPv6:{addr}]"));
        }
        if text.contains(':') {
            return Err(error(format!("unsupported address literal [{text}]")));
        }
        if !is_ipv4_literal(text) {
            return Err(error(format!("invalid IPv4 address literal [{text}]")));
        }
        Ok(format!("[{text}]"))
    }
}

/// ```text
/// IPv4-address-literal = Snum 3("."  Snum)
/// Snum = 1*3DIGIT   ; representing a decimal integer value in the range 0 through 255
/// ```
fn is_ipv4_literal(text: &str) -> bool {
    let mut count = 0;
    for snum in text.split('.') {
        count += 1;
        let ok = (1..=3).contains(&snum.len())
            && snum.bytes().all(|b| b.is_ascii_digit())
            && snum.parse::<u16>().is_ok_and(|n| n <= 255);
        if !ok {
            return false;
        }
    }
    count == 4
}

/// The parser only lets ASCII or checked UTF-8 through, so this does not fail in practice;
/// it still reports rather than panics.
fn to_string(b: &[u8]) -> R<String> {
    String::from_utf8(b.to_vec()).map_err(|_| error("invalid UTF-8 in address"))
}
