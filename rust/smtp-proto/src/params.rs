//! ESMTP parameters of MAIL and RCPT: syntax, and the checks of each supported keyword.
//!
//! Follows RFC 5321 section 4.1.2 (esmtp-param syntax), RFC 1870 (SIZE), RFC 6152 (BODY),
//! RFC 6531 section 3.4 (SMTPUTF8), RFC 3461 sections 4.1-4.4 (NOTIFY, ORCPT, RET, ENVID)
//! and its section 4 xtext encoding. Called by the server session for each MAIL / RCPT
//! command; the checked parameters go to policy in the `Query` and the `Envelope`.
//!
//! Keywords are case-insensitive and stored upper-cased. Values are stored as the client
//! sent them, except: RET and NOTIFY values are upper-cased (they are keywords), and the
//! xtext of ENVID and ORCPT is decoded ("+2B" becomes "+"), so policy and the bounce code
//! see the real text. A decoded value must be printable US-ASCII (RFC 3461 sections
//! 4.2 and 4.4), so it can go into a DSN header without escaping anything.

/// ESMTP parameters: keyword (upper-cased) and optional value.
pub type Params = Vec<(String, Option<String>)>;

/// A refused parameter list: the reply to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamError {
    pub code: u16,
    pub enhanced: &'static str,
    pub text: String,
}

fn syntax(text: impl Into<String>) -> ParamError {
    ParamError {
        code: 501,
        enhanced: "5.5.4",
        text: text.into(),
    }
}

/// Longest ENVID, in xtext-encoded characters (RFC 3461 section 4.4).
const MAX_ENVID: usize = 100;
/// Longest ORCPT value, in xtext-encoded characters (RFC 3461 section 4.2).
const MAX_ORCPT: usize = 500;

/// ```text
/// Mail-parameters = esmtp-param *(SP esmtp-param)
/// esmtp-param     = esmtp-keyword ["=" esmtp-value]
/// esmtp-keyword   = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
/// esmtp-value     = 1*(%d33-60 / %d62-126)
/// ```
/// Keywords are upper-cased (they are case-insensitive); a keyword given twice is an
/// error. Runs of white space between parameters are tolerated.
pub fn parse_params(rest: &[u8]) -> Result<Params, ParamError> {
    let mut params = Params::new();
    for item in rest
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|s| !s.is_empty())
    {
        let (key, value) = match item.iter().position(|&b| b == b'=') {
            Some(i) => (&item[..i], Some(&item[i + 1..])),
            None => (item, None),
        };
        let key_ok = key.first().is_some_and(|b| b.is_ascii_alphanumeric())
            && key.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-');
        if !key_ok {
            return Err(syntax("Syntax error in parameters"));
        }
        let value_ok = value.is_none_or(|v| {
            !v.is_empty() && v.iter().all(|&b| (33..=126).contains(&b) && b != b'=')
        });
        if !value_ok {
            return Err(syntax("Syntax error in parameter value"));
        }
        // Both checked to be printable ASCII above.
        let key = String::from_utf8_lossy(key).to_ascii_uppercase();
        if params.iter().any(|(k, _)| *k == key) {
            return Err(syntax(format!("Duplicate parameter {key}")));
        }
        let value = value.map(|v| String::from_utf8_lossy(v).into_owned());
        params.push((key, value));
    }
    Ok(params)
}

fn unsupported(command: &str, key: &str) -> ParamError {
    ParamError {
        code: 555,
        enhanced: "5.5.4",
        text: format!("Unsupported {command} parameter {key}"),
    }
}

/// Checks MAIL parameters and normalises their values. `max_size` is the SIZE limit.
pub fn check_mail_params(params: Params, max_size: u64) -> Result<Params, ParamError> {
    let mut out = Params::with_capacity(params.len());
    for (key, value) in params {
        let value = match (key.as_str(), value) {
            // RFC 1870: size-value = 1*20DIGIT. Advisory: the real size is enforced at
            // the end of the body whatever was declared here.
            ("SIZE", Some(v)) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                // A number too large for u64 is certainly too large for us.
                if v.parse::<u64>().map_or(true, |n| n > max_size) {
                    return Err(ParamError {
                        code: 552,
                        enhanced: "5.3.4",
                        text: "Message size exceeds fixed maximum message size".into(),
                    });
                }
                Some(v)
            }
            ("SIZE", _) => return Err(syntax("Syntax: SIZE=<number>")),
            // RFC 6152. BINARYMIME (RFC 3030) is not offered.
            ("BODY", Some(v))
                if v.eq_ignore_ascii_case("7BIT") || v.eq_ignore_ascii_case("8BITMIME") =>
            {
                Some(v)
            }
            ("BODY", _) => return Err(syntax("Syntax: BODY=7BIT or BODY=8BITMIME")),
            // RFC 6531 section 3.4: the keyword has no value.
            ("SMTPUTF8", None) => None,
            ("SMTPUTF8", Some(_)) => return Err(syntax("Syntax: SMTPUTF8 takes no value")),
            // RFC 3461 section 4.3: ret-value = "FULL" / "HDRS".
            ("RET", Some(v))
                if v.eq_ignore_ascii_case("FULL") || v.eq_ignore_ascii_case("HDRS") =>
            {
                Some(v.to_ascii_uppercase())
            }
            ("RET", _) => return Err(syntax("Syntax: RET=FULL or RET=HDRS")),
            // RFC 3461 section 4.4: envid-value = xtext, at most 100 characters.
            ("ENVID", Some(v)) if v.len() <= MAX_ENVID => {
                Some(decode_xtext(v.as_bytes()).ok_or_else(|| syntax("Syntax: ENVID=<xtext>"))?)
            }
            ("ENVID", _) => return Err(syntax("Syntax: ENVID=<xtext> (at most 100 characters)")),
            // RFC 4954 section 5: AUTH=<mailbox or <>>. Clients send it even to servers
            // that never offered AUTH (and "AUTH=<>" is the common case); we authenticate
            // nobody, so the claimed identity is untrusted: accept the syntax, drop the value
            // (a relay that cannot vouch for it must not pass it on).
            ("AUTH", Some(v)) if v == "<>" || decode_xtext(v.as_bytes()).is_some() => continue,
            ("AUTH", _) => return Err(syntax("Syntax: AUTH=<> or AUTH=<xtext>")),
            _ => return Err(unsupported("MAIL", &key)),
        };
        out.push((key, value));
    }
    Ok(out)
}

/// Checks RCPT parameters and normalises their values.
pub fn check_rcpt_params(params: Params) -> Result<Params, ParamError> {
    let mut out = Params::with_capacity(params.len());
    for (key, value) in params {
        let value = match (key.as_str(), value) {
            ("NOTIFY", Some(v)) => Some(notify_value(&v).ok_or_else(|| {
                syntax("Syntax: NOTIFY=NEVER or NOTIFY=SUCCESS,FAILURE,DELAY (any of them)")
            })?),
            ("NOTIFY", None) => {
                return Err(syntax(
                    "Syntax: NOTIFY=NEVER or NOTIFY=SUCCESS,FAILURE,DELAY (any of them)",
                ))
            }
            ("ORCPT", Some(v)) if v.len() <= MAX_ORCPT => {
                Some(orcpt_value(&v).ok_or_else(|| syntax("Syntax: ORCPT=<addr-type>;<xtext>"))?)
            }
            ("ORCPT", _) => {
                return Err(syntax(
                    "Syntax: ORCPT=<addr-type>;<xtext> (at most 500 characters)",
                ))
            }
            _ => return Err(unsupported("RCPT", &key)),
        };
        out.push((key, value));
    }
    Ok(out)
}

/// ```text
/// notify-esmtp-value  = "NEVER" / 1#notify-list-element
/// notify-list-element = "SUCCESS" / "FAILURE" / "DELAY"
/// ```
/// NEVER stands alone; an element given twice is an error. Upper-cased.
fn notify_value(v: &str) -> Option<String> {
    let v = v.to_ascii_uppercase();
    if v == "NEVER" {
        return Some(v);
    }
    let mut seen: Vec<&str> = Vec::with_capacity(3);
    for element in v.split(',') {
        if !matches!(element, "SUCCESS" | "FAILURE" | "DELAY") || seen.contains(&element) {
            return None;
        }
        seen.push(element);
    }
    Some(v)
}

/// ```text
/// orcpt-parameter = "ORCPT=" original-recipient-address
/// original-recipient-address = addr-type ";" xtext
/// addr-type = atom
/// ```
/// Stored as `addr-type;decoded-address`, addr-type as written.
fn orcpt_value(v: &str) -> Option<String> {
    let (addr_type, xtext) = v.split_once(';')?;
    let atom_ok = !addr_type.is_empty()
        && addr_type
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b));
    if !atom_ok || xtext.is_empty() {
        return None;
    }
    let address = decode_xtext(xtext.as_bytes())?;
    Some(format!("{addr_type};{address}"))
}

/// ```text
/// xtext   = *( xchar / hexchar )
/// xchar   = any ASCII CHAR between "!" (33) and "~" (126) inclusive, except "+" and "="
/// hexchar = ASCII "+" immediately followed by two upper case hexadecimal digits
/// ```
/// Lower-case hex digits are accepted too (the meaning is unambiguous). The decoded text
/// must be printable US-ASCII (space included): a "+0D+0A" never becomes a line end.
pub fn decode_xtext(s: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while let Some(&b) = s.get(i) {
        let decoded = match b {
            b'+' => {
                let hex = s.get(i + 1..i + 3)?;
                let text = std::str::from_utf8(hex).ok()?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                i += 3;
                u8::from_str_radix(text, 16).ok()?
            }
            b'=' => return None,
            33..=126 => {
                i += 1;
                b
            }
            _ => return None,
        };
        if !(0x20..0x7f).contains(&decoded) {
            return None;
        }
        out.push(char::from(decoded));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext() {
        assert_eq!(decode_xtext(b"abc").as_deref(), Some("abc"));
        assert_eq!(decode_xtext(b"a+2Bb+3d").as_deref(), Some("a+b="));
        assert_eq!(decode_xtext(b"+20").as_deref(), Some(" "));
        assert_eq!(decode_xtext(b"").as_deref(), Some(""));
        for bad in [
            &b"a+"[..],
            b"a+2",
            b"+GG",
            b"a=b",
            b"+0D+0A",
            b"+7F",
            b"+C3+A9",
            b"a b",
        ] {
            assert_eq!(decode_xtext(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn notify() {
        assert_eq!(notify_value("never").as_deref(), Some("NEVER"));
        assert_eq!(
            notify_value("Success,DELAY").as_deref(),
            Some("SUCCESS,DELAY")
        );
        for bad in [
            "NEVER,SUCCESS",
            "SUCCESS,SUCCESS",
            "",
            "SUCCESS,",
            ",DELAY",
            "X",
        ] {
            assert_eq!(notify_value(bad), None, "{bad}");
        }
    }

    #[test]
    fn orcpt() {
        assert_eq!(
            orcpt_value("rfc822;joe+2Bx@example.com").as_deref(),
            Some("rfc822;joe+x@example.com")
        );
        for bad in ["rfc822", ";a@b", "rfc822;", "rf c;a", "rfc822;a+ZZ"] {
            assert_eq!(orcpt_value(bad), None, "{bad}");
        }
    }
}
