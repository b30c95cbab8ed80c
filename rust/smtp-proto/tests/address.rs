//! Envelope path parser: every seed form in loose and strict mode, the refusals and their
//! reasons, size limits, UTF-8 rules and the Display round trip.

use smtp_proto::{parse_path, AddressMode, Mailbox, Path};
use AddressMode::{Loose, Strict};

fn mb(local: &str, domain: Option<&str>) -> Path {
    Path::Mailbox(Mailbox {
        local: local.to_string(),
        domain: domain.map(str::to_string),
    })
}

/// Parses and returns (path, rest as text).
fn parse(input: &str, mode: AddressMode) -> Result<(Path, String), String> {
    parse_path(input.as_bytes(), mode, false)
        .map(|(p, rest)| (p, String::from_utf8_lossy(rest).into_owned()))
        .map_err(|e| e.reason)
}

fn ok(input: &str, mode: AddressMode) -> Path {
    match parse(input, mode) {
        Ok((p, rest)) => {
            assert_eq!(rest, "", "rest of {input:?}");
            p
        }
        Err(e) => panic!("{input:?} in {mode:?}: {e}"),
    }
}

fn err(input: &str, mode: AddressMode) -> String {
    match parse(input, mode) {
        Ok((p, _)) => panic!("{input:?} in {mode:?} parsed as {p:?}"),
        Err(e) => e,
    }
}

#[test]
fn plain_bracketed_both_modes() {
    for mode in [Loose, Strict] {
        assert_eq!(ok("<joe@foo.com>", mode), mb("joe", Some("foo.com")));
        assert_eq!(
            ok("<a.b+tag@sub.foo-bar.com>", mode),
            mb("a.b+tag", Some("sub.foo-bar.com"))
        );
    }
}

#[test]
fn no_brackets_loose_only() {
    assert_eq!(ok("joe@foo.com", Loose), mb("joe", Some("foo.com")));
    assert_eq!(err("joe@foo.com", Strict), "address must be enclosed in <>");
}

#[test]
fn quoted_whole_address_loose_only() {
    assert_eq!(ok("\"joe@foo.com\"", Loose), mb("joe", Some("foo.com")));
    assert_eq!(ok("<\"joe@foo.com\">", Loose), mb("joe", Some("foo.com")));
    assert!(err("<\"joe@foo.com\">", Strict).starts_with("domain missing"));
    // The content must itself be a valid address.
    assert_eq!(err("\"joe@\"", Loose), "domain missing after @");
}

#[test]
fn display_name_loose_only() {
    assert_eq!(
        ok("<\"Joe Sixpack\" <joe@foo.com>>", Loose),
        mb("joe", Some("foo.com"))
    );
    assert_eq!(
        ok("<Joe Sixpack <joe@foo.com>>", Loose),
        mb("joe", Some("foo.com"))
    );
    assert_eq!(
        ok("\"Joe Sixpack\" <joe@foo.com>", Loose),
        mb("joe", Some("foo.com"))
    );
    assert_eq!(
        ok("<joe@foo.com <joe@foo.com>>", Loose),
        mb("joe", Some("foo.com"))
    );
    assert_eq!(ok("<<joe@foo.com>>", Loose), mb("joe", Some("foo.com")));
    assert_eq!(
        err("<\"Joe Sixpack\" <joe@foo.com>>", Strict),
        "display names are not allowed in strict address mode"
    );
    // Nesting is bounded.
    assert!(parse("<<<<joe@foo.com>>>>", Loose).is_err());
}

#[test]
fn comments_loose_only() {
    assert_eq!(
        ok("<(joe@bar.com) otherjoe@foo.com>", Loose),
        mb("otherjoe", Some("foo.com"))
    );
    assert_eq!(
        ok("<(a (nested) \\) comment)x@foo.com (trailing)>", Loose),
        mb("x", Some("foo.com"))
    );
    assert_eq!(
        err("<(unterminated x@foo.com>", Loose),
        "unterminated comment in address"
    );
    assert!(parse("<(joe@bar.com) otherjoe@foo.com>", Strict).is_err());
}

#[test]
fn white_space() {
    // After the colon: both modes.
    for mode in [Loose, Strict] {
        assert_eq!(ok(" <a@b.example>", mode), mb("a", Some("b.example")));
        assert_eq!(ok("  \t<a@b.example>", mode), mb("a", Some("b.example")));
    }
    // Inside the brackets: loose only.
    assert_eq!(ok("< a@b.example >", Loose), mb("a", Some("b.example")));
    assert!(parse("< a@b.example>", Strict).is_err());
}

#[test]
fn quoted_local_part_kept_quoted() {
    for mode in [Loose, Strict] {
        assert_eq!(
            ok("<\"x y\"@example.com>", mode),
            mb("\"x y\"", Some("example.com"))
        );
        assert_eq!(
            ok("<\"x;rm -rf ~\"@example.com>", mode),
            mb("\"x;rm -rf ~\"", Some("example.com"))
        );
        assert_eq!(
            ok("<\"a\\\"b\"@example.com>", mode),
            mb("\"a\\\"b\"", Some("example.com"))
        );
        assert_eq!(
            ok("<\"joe@foo.com\"@bar.com>", mode),
            mb("\"joe@foo.com\"", Some("bar.com"))
        );
    }
    assert_eq!(
        ok("\"x y\"@example.com", Loose),
        mb("\"x y\"", Some("example.com"))
    );
    assert_eq!(
        err("<\"x@example.com>", Loose),
        "unterminated quoted local part"
    );
    assert_eq!(err("<\"\"@example.com>", Strict), "empty local part");
}

#[test]
fn source_routes_stripped() {
    for mode in [Loose, Strict] {
        assert_eq!(ok("<@a,@b:user@c>", mode), mb("user", Some("c")));
        assert_eq!(
            ok("<@a.example:user@c.example>", mode),
            mb("user", Some("c.example"))
        );
        assert!(parse("<@a,b:user@c>", mode).is_err());
        assert!(parse("<@a user@c>", mode).is_err());
        assert!(parse("<@:user@c>", mode).is_err());
    }
}

#[test]
fn address_literals() {
    for mode in [Loose, Strict] {
        assert_eq!(ok("<u@[192.0.2.1]>", mode), mb("u", Some("[192.0.2.1]")));
        assert_eq!(
            ok("<u@[IPv6:2001:db8::1]>", mode),
            mb("u", Some("[IPv6:2001:db8::1]"))
        );
        assert_eq!(
            ok("<u@[ipv6:2001:db8::1]>", mode),
            mb("u", Some("[IPv6:2001:db8::1]"))
        );
        assert_eq!(
            ok("<u@[IPv6:::ffff:192.0.2.1]>", mode),
            mb("u", Some("[IPv6:::ffff:192.0.2.1]"))
        );
        assert_eq!(ok("<u@[010.0.0.1]>", mode), mb("u", Some("[010.0.0.1]")));
        for bad in [
            "<u@[192.0.2.256]>",
            "<u@[192.0.2]>",
            "<u@[192.0.2.1.5]>",
            "<u@[1234.0.2.1]>",
            "<u@[IPv6:2001:db8::g]>",
            "<u@[IPv6:2001:db8::1%eth0]>",
            "<u@[IPv6:192.0.2.1]>",
            "<u@[x-tag:abc]>",
            "<u@[]>",
            "<u@[192.0.2.1>",
            "<u@[192.0.2.1]x>",
        ] {
            assert!(parse(bad, mode).is_err(), "{bad} accepted");
        }
    }
    assert_eq!(
        err("<u@[192.0.2.256]>", Strict),
        "invalid IPv4 address literal [192.0.2.256]"
    );
}

#[test]
fn null_path() {
    for mode in [Loose, Strict] {
        assert_eq!(ok("<>", mode), Path::Null);
        assert_eq!(Path::Null.to_string(), "");
    }
    assert_eq!(ok("< >", Loose), Path::Null);
    assert_eq!(ok("<<>>", Loose), Path::Null);
}

#[test]
fn postmaster_without_domain() {
    for mode in [Loose, Strict] {
        assert_eq!(ok("<Postmaster>", mode), mb("Postmaster", None));
        assert_eq!(ok("<postMASTER>", mode), mb("postMASTER", None));
        assert!(err("<joe>", mode).starts_with("domain missing"));
    }
    assert_eq!(ok("postmaster", Loose), mb("postmaster", None));
}

#[test]
fn parameters_are_returned_unparsed() {
    for mode in [Loose, Strict] {
        let (p, rest) = parse("<a@b.example> SIZE=10 BODY=8BITMIME", mode).unwrap();
        assert_eq!(p, mb("a", Some("b.example")));
        assert_eq!(rest, " SIZE=10 BODY=8BITMIME");
        let (_, rest) = parse("<> SIZE=10", mode).unwrap();
        assert_eq!(rest, " SIZE=10");
    }
    let (p, rest) = parse("a@b.example SIZE=10", Loose).unwrap();
    assert_eq!(p, mb("a", Some("b.example")));
    assert_eq!(rest, " SIZE=10");
    assert_eq!(
        err("<a@b.example>SIZE=10", Strict),
        "unexpected 'S' after the address"
    );
}

#[test]
fn local_part_dots() {
    for bad in ["<.a@b.example>", "<a.@b.example>", "<a..b@b.example>"] {
        assert!(parse(bad, Strict).is_err(), "{bad}");
        // Loose keeps them as written (mobile carriers issue such addresses).
        let local = bad[1..].split('@').next().unwrap();
        assert_eq!(ok(bad, Loose), mb(local, Some("b.example")));
    }
    assert_eq!(err("<.@b.example>", Loose), "empty local part");
}

#[test]
fn refusals_with_reasons() {
    for mode in [Loose, Strict] {
        assert_eq!(err("", mode), "empty address");
        assert_eq!(err("<@b.example>", mode), "empty local part");
        assert_eq!(err("<a@>", mode), "domain missing after @");
        assert_eq!(err("<a@b..example>", mode), "empty label ('..') in domain");
        assert_eq!(err("<a@b.example.>", mode), "domain ends with '.'");
        assert_eq!(
            err("<a@-b.example>", mode),
            "unexpected '-' at the start of the domain"
        );
        assert_eq!(err("<a@b-.example>", mode), "domain label ends with '-'");
        assert_eq!(
            err("<a@b_c.example>", mode),
            "unexpected '_' where '>' should end the address"
        );
        assert_eq!(
            err("<a@b.example", mode),
            "missing '>' at the end of the address"
        );
        assert_eq!(
            err("<a\x00@b.example>", mode),
            "control character 0x00 in address"
        );
        assert_eq!(
            err("<a@b.example\x7f>", mode),
            "control character 0x7F in address"
        );
        assert_eq!(
            err("<\"a\tb\"@b.example>", mode),
            "control character 0x09 in address"
        );
        assert_eq!(
            err("<jo\u{e9}@b.example>", mode),
            "non-ASCII character in address (SMTPUTF8 not in use)"
        );
        assert_eq!(
            err("<a@b@c>", mode),
            "unexpected '@' where '>' should end the address"
        );
    }
}

#[test]
fn length_limits() {
    let local64 = "l".repeat(64);
    let label63 = "d".repeat(63);
    for mode in [Loose, Strict] {
        ok(&format!("<{local64}@x.example>"), mode);
        assert_eq!(
            err(&format!("<{local64}l@x.example>"), mode),
            "local part longer than 64 octets"
        );
        ok(&format!("<a@{label63}.example>"), mode);
        assert_eq!(
            err(&format!("<a@{label63}d.example>"), mode),
            "domain label longer than 63 octets"
        );
        // 4 labels of 63 + 3 dots = 255: fine as a domain, path = 1+1+255+2 = 259 > 256.
        let d255 = [label63.as_str(); 4].join(".");
        assert_eq!(
            err(&format!("<a@{d255}>"), mode),
            "path longer than 256 octets"
        );
        let d256 = format!("{d255}x");
        assert_eq!(
            err(&format!("<a@{d256}>"), mode),
            "domain label longer than 63 octets"
        );
        let d257 = format!("{}.{}", d255, "e");
        assert_eq!(
            err(&format!("<a@{d257}>"), mode),
            "domain longer than 255 octets"
        );
        // Path exactly 256: local 1, domain 252.
        let d252 = format!("{}.{}.{}.{}", label63, label63, label63, "e".repeat(60));
        assert_eq!(d252.len(), 252);
        ok(&format!("<a@{d252}>"), mode);
    }
}

#[test]
fn utf8_only_when_allowed() {
    let input = "<jos\u{e9}@b\u{fc}cher.example>".as_bytes();
    assert!(parse_path(input, Loose, false).is_err());
    let (p, _) = parse_path(input, Loose, true).unwrap();
    assert_eq!(p, mb("jos\u{e9}", Some("b\u{fc}cher.example")));
    for bad in [
        "\u{200b}", "\u{200f}", "\u{2028}", "\u{202e}", "\u{2060}", "\u{2064}", "\u{feff}",
        "\u{85}",
    ] {
        let s = format!("<a{bad}b@example.com>");
        let e = parse_path(s.as_bytes(), Strict, true).unwrap_err();
        assert!(
            e.reason.contains("invisible or control character U+"),
            "{bad:?}: {}",
            e.reason
        );
        let s = format!("<ab@exa{bad}mple.com>");
        assert!(parse_path(s.as_bytes(), Loose, true).is_err());
    }
    // Invalid UTF-8: a lone continuation byte, a truncated sequence, an overlong form.
    for bad in [
        &b"<a\x80@example.com>"[..],
        b"<a\xc3@example.com>",
        b"<a\xc0\xaf@example.com>",
        b"<a\xed\xa0\x80@example.com>",
    ] {
        let e = parse_path(bad, Loose, true).unwrap_err();
        assert_eq!(e.reason, "invalid UTF-8 in address");
    }
}

#[test]
fn display_round_trips() {
    let seeds = [
        "<joe@foo.com>",
        "joe@foo.com",
        "\"joe@foo.com\"",
        "<\"Joe Sixpack\" <joe@foo.com>>",
        "<(joe@bar.com) otherjoe@foo.com>",
        " <a@b.example>",
        "<\"x y\"@example.com>",
        "<\"x;rm -rf ~\"@example.com>",
        "<\"a\\\"b\"@example.com>",
        "<@a,@b:user@c>",
        "<u@[192.0.2.1]>",
        "<u@[ipv6:2001:db8::1]>",
        "<Postmaster>",
        "<a..b@example.com>",
    ];
    for seed in seeds {
        let Path::Mailbox(m) = ok(seed, Loose) else {
            panic!("{seed}")
        };
        let shown = m.to_string();
        assert_eq!(
            ok(&shown, Loose),
            Path::Mailbox(m.clone()),
            "{seed} -> {shown}"
        );
        if let Ok((Path::Mailbox(strict), _)) = parse(seed, Strict) {
            assert_eq!(ok(&format!("<{strict}>"), Strict), Path::Mailbox(strict));
        }
    }
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap deterministic fuzz: every short combination of interesting bytes.
    let alphabet: &[u8] = b"<>@\"\\()[]:,. a-\x00\x80\xc3\xa9";
    let mut input = Vec::new();
    for a in alphabet {
        for b in alphabet {
            for c in alphabet {
                for d in alphabet {
                    input.clear();
                    input.extend_from_slice(&[*a, *b, *c, *d]);
                    for mode in [Loose, Strict] {
                        for utf8 in [false, true] {
                            let _ = parse_path(&input, mode, utf8);
                        }
                    }
                }
            }
        }
    }
}
