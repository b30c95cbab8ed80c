//! The Received: trace header a server puts on every message it accepts
//! (RFC 5321 section 4.4; RFC 5322 section 3.6.7 for its syntax; RFC 3848 for the
//! ESMTPS protocol name after STARTTLS).
//!
//! ```text
//! Received: from <helo> ([<ip>])
//! <TAB>by <hostname> (Sluice)
//! <TAB>with ESMTP[S] id <qid> [(<tls version> <cipher>)]
//! <TAB>[for <recipient>];
//! <TAB><date>
//! ```
//!
//! `<TAB>`: a tab folds each continuation line. Pure formatting: the caller supplies the
//! queue id and the date (the binding crate reads the clock), so the header is testable
//! byte for byte. The HELO name is the
//! client's to choose: it is reduced to printable ASCII without `(`, `)` and `;`, so it
//! cannot forge the structure of the header. Incoming bounces are matched to our queue ids
//! through the `by <host> (Sluice) with ... id <qid>` part (appliance/bounce_intake.py).

/// Longest HELO name or host name kept in the header (longer ones are cut).
const MAX_NAME: usize = 255;

/// What the header says about one accepted message.
#[derive(Clone, Copy, Debug)]
pub struct TraceInfo<'a> {
    /// The HELO/EHLO argument, if the client gave one.
    pub helo: Option<&'a str>,
    /// The client's address, without brackets (IPv6 gets the "IPv6:" tag here).
    pub peer_ip: &'a str,
    /// This host's name.
    pub hostname: &'a str,
    /// EHLO (ESMTP) rather than HELO (SMTP).
    pub esmtp: bool,
    /// "TLSv1.3 TLS13_AES_256_GCM_SHA384" once STARTTLS completed.
    pub tls: Option<&'a str>,
    pub qid: &'a str,
    /// Named in a `for` clause only when there is exactly one.
    pub recipients: &'a [String],
    /// An RFC 5322 date-time, e.g. "Thu, 03 Dec 2026 16:20:00 +0000".
    pub date: &'a str,
}

/// Printable ASCII except the characters that structure the header; at most 255.
fn clean(text: &str) -> String {
    text.chars()
        .take(MAX_NAME)
        .map(|c| {
            if ('\u{21}'..'\u{7f}').contains(&c) && !"();".contains(c) {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// The folded header, each line ending in CRLF.
pub fn received_header(info: &TraceInfo<'_>) -> Vec<u8> {
    let literal = if info.peer_ip.contains(':') {
        format!("IPv6:{}", info.peer_ip)
    } else {
        info.peer_ip.to_owned()
    };
    let helo = match info.helo {
        Some(name) if !name.is_empty() => clean(name),
        _ => "unknown".to_owned(),
    };
    let protocol = match (info.esmtp, info.tls.is_some()) {
        (true, true) => "ESMTPS",
        (true, false) => "ESMTP",
        (false, true) => "SMTPS",
        (false, false) => "SMTP",
    };
    let mut out = format!(
        "Received: from {helo} ([{literal}])\r\n\tby {} (Sluice)\r\n\twith {protocol} id {}",
        clean(info.hostname),
        info.qid
    );
    if let Some(tls) = info.tls {
        let words: Vec<String> = tls.split_whitespace().map(clean).collect();
        out.push_str(&format!(" ({})", words.join(" ")));
    }
    match info.recipients {
        [only] if !only.contains(['\r', '\n']) => {
            out.push_str(&format!("\r\n\tfor <{only}>;"));
        }
        _ => out.push(';'),
    }
    out.push_str(&format!("\r\n\t{}\r\n", info.date));
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info<'a>(recipients: &'a [String]) -> TraceInfo<'a> {
        TraceInfo {
            helo: Some("client.example"),
            peer_ip: "192.0.2.7",
            hostname: "mx.example.net",
            esmtp: true,
            tls: None,
            qid: "0VckpAbCdEfGhIjKlM",
            recipients,
            date: "Thu, 03 Dec 2026 16:20:00 +0000",
        }
    }

    #[test]
    fn one_recipient_is_named() {
        let rcpts = ["joe@example.org".to_owned()];
        assert_eq!(
            String::from_utf8(received_header(&info(&rcpts))).unwrap(),
            "Received: from client.example ([192.0.2.7])\r\n\
             \tby mx.example.net (Sluice)\r\n\
             \twith ESMTP id 0VckpAbCdEfGhIjKlM\r\n\
             \tfor <joe@example.org>;\r\n\
             \tThu, 03 Dec 2026 16:20:00 +0000\r\n"
        );
    }

    #[test]
    fn several_recipients_are_not_named_and_tls_is_shown() {
        let rcpts = ["a@example.org".to_owned(), "b@example.org".to_owned()];
        let mut i = info(&rcpts);
        i.tls = Some("TLSv1.3 TLS13_AES_256_GCM_SHA384");
        i.peer_ip = "2001:db8::1";
        let text = String::from_utf8(received_header(&i)).unwrap();
        assert_eq!(
            text,
            "Received: from client.example ([IPv6:2001:db8::1])\r\n\
             \tby mx.example.net (Sluice)\r\n\
             \twith ESMTPS id 0VckpAbCdEfGhIjKlM (TLSv1.3 TLS13_AES_256_GCM_SHA384);\r\n\
             \tThu, 03 Dec 2026 16:20:00 +0000\r\n"
        );
    }

    #[test]
    fn hostile_helo_cannot_shape_the_header() {
        let rcpts = ["a@b.example\r\nX-Evil: 1".to_owned()];
        let mut i = info(&rcpts);
        let helo = format!("evil (forged) by x; {}", "z".repeat(400));
        i.helo = Some(&helo);
        i.esmtp = false;
        let text = String::from_utf8(received_header(&i)).unwrap();
        let first = text.lines().next().unwrap();
        assert!(
            first.starts_with("Received: from evil??forged??by?x??zzz"),
            "{first}"
        );
        assert_eq!(
            first.len(),
            "Received: from ".len() + 255 + " ([192.0.2.7])".len()
        );
        assert!(text.contains("\twith SMTP id 0VckpAbCdEfGhIjKlM;\r\n"));
        assert!(
            !text.contains("X-Evil"),
            "a recipient with CRLF is never written"
        );
        assert_eq!(text.matches("\r\n").count(), 4);
    }

    #[test]
    fn no_helo_says_unknown() {
        let mut i = info(&[]);
        i.helo = None;
        assert!(received_header(&i).starts_with(b"Received: from unknown ([192.0.2.7])\r\n"));
        i.helo = Some("");
        assert!(received_header(&i).starts_with(b"Received: from unknown "));
    }
}
