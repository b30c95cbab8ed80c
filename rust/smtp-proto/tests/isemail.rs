//! The isemail corpus (dominicsayers/isemail test set, in ../shared/corpora/isemail) run
//! through the envelope address parser in loose and strict mode.
//!
//! Each case's address is an RFC 5322 addr-spec; it is parsed as the path `<address>`
//! with UTF-8 not allowed, as it would arrive in MAIL FROM without SMTPUTF8. A case counts
//! as accepted when a mailbox with a domain comes out and nothing is left over (the null
//! path `<>` and a bare `<Postmaster>` are not addresses here).
//!
//! The expected result of every case is written down below: a default per diagnosis and
//! per-case exceptions, each with its reason. Rules the tables must keep (checked):
//! - ISEMAIL_VALID_CATEGORY and ISEMAIL_RFC5321 cases: strict mode accepts (RFC 5321 is
//!   what an envelope needs), unless an exception says why not.
//! - ISEMAIL_ERR cases: both modes refuse, unless a lenient exception says why not.
//!
//! The corpus must be present (CI has it): a missing file fails the test, it never skips.
//! `SLUICE_WRITE_ISEMAIL_DOC=1 cargo test -p smtp-proto --test isemail` rewrites
//! docs/isemail.md from the results; otherwise the test checks that file is current.

use std::collections::BTreeMap;
use std::path::PathBuf;

use smtp_proto::{parse_path, AddressMode, Path};

struct Case {
    id: u32,
    address: String,
    category: String,
    diagnosis: String,
}

fn corpus_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpora/isemail/tests.xml")
}

/// The text between `<tag>` and `</tag>` in `block` ("" for `<tag/>`).
fn element<'a>(block: &'a str, tag: &str) -> Option<&'a str> {
    if block.contains(&format!("<{tag}/>")) {
        return Some("");
    }
    let open = format!("<{tag}>");
    let start = block.find(&open)? + open.len();
    let end = start + block[start..].find(&format!("</{tag}>"))?;
    Some(&block[start..end])
}

/// XML character references and the five named entities; then the corpus convention:
/// U+2400 + n stands for the control character n (README of the corpora).
fn decode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let tail = &rest[amp..];
        let semi = tail.find(';').expect("unterminated entity");
        let name = &tail[1..semi];
        let c = match name {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(hex) = name.strip_prefix("#x") {
                    u32::from_str_radix(hex, 16)
                } else if let Some(dec) = name.strip_prefix('#') {
                    dec.parse()
                } else {
                    panic!("unknown entity &{name};")
                };
                char::from_u32(code.expect("bad character reference")).expect("bad code point")
            }
        };
        out.push(c);
        rest = &tail[semi + 1..];
    }
    out.push_str(rest);
    out.chars()
        .map(|c| match c as u32 {
            n @ 0x2400..=0x241F => char::from_u32(n - 0x2400).unwrap_or(c),
            _ => c,
        })
        .collect()
}

fn load() -> Vec<Case> {
    let path = corpus_path();
    let xml = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "isemail corpus missing at {} ({e}); it lives in the shared corpora \
             (../shared/corpora/isemail/tests.xml from the repository root) and CI has it",
            path.display()
        )
    });
    let mut cases = Vec::new();
    let mut rest = xml.as_str();
    while let Some(start) = rest.find("<test id=\"") {
        let block_start = &rest[start + 10..];
        let end = block_start.find("</test>").expect("unterminated <test>");
        let block = &block_start[..end];
        let id: u32 = block[..block.find('"').expect("id")]
            .parse()
            .expect("numeric id");
        cases.push(Case {
            id,
            address: decode(element(block, "address").expect("address")),
            category: element(block, "category").expect("category").to_string(),
            diagnosis: element(block, "diagnosis").expect("diagnosis").to_string(),
        });
        rest = &block_start[end..];
    }
    assert_eq!(cases.len(), 164, "the corpus README promises 164 cases");
    cases
}

/// Expected (loose accepts, strict accepts) per diagnosis, with why.
const BY_DIAGNOSIS: &[(&str, bool, bool, &str)] = &[
    ("ISEMAIL_VALID", true, true, "a plain RFC 5321 mailbox"),
    ("ISEMAIL_RFC5321_TLD", true, true, "a domain of one label is valid syntax"),
    ("ISEMAIL_RFC5321_TLDNUMERIC", true, true, "all-digit labels are valid Domain syntax"),
    ("ISEMAIL_RFC5321_QUOTEDSTRING", true, true, "Quoted-string local part, kept quoted"),
    ("ISEMAIL_RFC5321_ADDRESSLITERAL", true, true, "IPv4 / IPv6 address literal"),
    (
        "ISEMAIL_RFC5321_IPV6DEPRECATED",
        true,
        true,
        "'::' standing for one group: the IPv6 parser takes it (RFC 4291 allows it; RFC 5952 only advises against)",
    ),
    (
        "ISEMAIL_CFWS_COMMENT",
        true,
        false,
        "loose mode drops comments (IronPort leniency); strict follows the Path grammar, which has none",
    ),
    (
        "ISEMAIL_CFWS_FWS",
        false,
        false,
        "folding white space holds CR LF, which a command line cannot carry",
    ),
    (
        "ISEMAIL_DEPREC_CFWS_NEAR_AT",
        false,
        false,
        "white space or comments next to '@' or inside the domain: obsolete RFC 5322 syntax",
    ),
    ("ISEMAIL_DEPREC_COMMENT", false, false, "a comment inside the local part: obsolete syntax"),
    ("ISEMAIL_DEPREC_CTEXT", false, false, "a control character in a comment"),
    ("ISEMAIL_DEPREC_FWS", false, false, "obsolete folding white space"),
    ("ISEMAIL_DEPREC_LOCALPART", false, false, "obs-local-part: quoted words joined by dots"),
    ("ISEMAIL_DEPREC_QP", false, false, "a quoted pair of a control character"),
    ("ISEMAIL_DEPREC_QTEXT", false, false, "a control character in a quoted string"),
    ("ISEMAIL_RFC5322_DOMAIN", false, false, "RFC 5322 atext in a domain is not an RFC 5321 Domain"),
    (
        "ISEMAIL_RFC5322_DOMAINLITERAL",
        false,
        false,
        "a domain literal that is no IPv4 / IPv6 address: nothing could deliver to it",
    ),
    ("ISEMAIL_RFC5322_DOMAIN_TOOLONG", false, false, "domain over 255 octets"),
    ("ISEMAIL_RFC5322_DOMLIT_OBSDTEXT", false, false, "obsolete dtext in a domain literal"),
    ("ISEMAIL_RFC5322_IPV6_2X2XCOLON", false, false, "two '::' in an IPv6 literal"),
    ("ISEMAIL_RFC5322_IPV6_BADCHAR", false, false, "a non-hex digit in an IPv6 literal"),
    ("ISEMAIL_RFC5322_IPV6_COLONEND", false, false, "an IPv6 literal ending in one ':'"),
    ("ISEMAIL_RFC5322_IPV6_COLONSTRT", false, false, "an IPv6 literal starting with one ':'"),
    ("ISEMAIL_RFC5322_IPV6_GRPCOUNT", false, false, "wrong number of IPv6 groups"),
    ("ISEMAIL_RFC5322_IPV6_MAXGRPS", false, false, "'::' with eight groups besides"),
    ("ISEMAIL_RFC5322_LABEL_TOOLONG", false, false, "domain label over 63 octets"),
    ("ISEMAIL_RFC5322_LOCAL_TOOLONG", false, false, "local part over 64 octets"),
    ("ISEMAIL_RFC5322_TOOLONG", false, false, "path over 256 octets"),
    ("ISEMAIL_ERR_ATEXT_AFTER_CFWS", false, false, "error"),
    ("ISEMAIL_ERR_ATEXT_AFTER_DOMLIT", false, false, "error"),
    ("ISEMAIL_ERR_ATEXT_AFTER_QS", false, false, "error"),
    ("ISEMAIL_ERR_BACKSLASHEND", false, false, "error"),
    ("ISEMAIL_ERR_CONSECUTIVEDOTS", false, false, "error"),
    ("ISEMAIL_ERR_CR_NO_LF", false, false, "error"),
    ("ISEMAIL_ERR_DOMAINHYPHENEND", false, false, "error"),
    ("ISEMAIL_ERR_DOMAINHYPHENSTART", false, false, "error"),
    ("ISEMAIL_ERR_DOT_END", false, false, "error"),
    ("ISEMAIL_ERR_DOT_START", false, false, "error"),
    ("ISEMAIL_ERR_EXPECTING_ATEXT", false, false, "error"),
    ("ISEMAIL_ERR_EXPECTING_CTEXT", false, false, "error"),
    ("ISEMAIL_ERR_EXPECTING_DTEXT", false, false, "error"),
    ("ISEMAIL_ERR_EXPECTING_QPAIR", false, false, "error"),
    ("ISEMAIL_ERR_EXPECTING_QTEXT", false, false, "error"),
    ("ISEMAIL_ERR_FWS_CRLF_END", false, false, "error"),
    ("ISEMAIL_ERR_FWS_CRLF_X2", false, false, "error"),
    ("ISEMAIL_ERR_NODOMAIN", false, false, "error"),
    ("ISEMAIL_ERR_NOLOCALPART", false, false, "error"),
    ("ISEMAIL_ERR_UNCLOSEDCOMMENT", false, false, "error"),
    ("ISEMAIL_ERR_UNCLOSEDDOMLIT", false, false, "error"),
    ("ISEMAIL_ERR_UNCLOSEDQUOTEDSTR", false, false, "error"),
];

/// Cases whose expected result differs from their diagnosis' default: (id, loose,
/// strict, why). Every one is a deliberate choice.
const EXCEPTIONS: &[(u32, bool, bool, &str)] = &[
    (
        15,
        true,
        false,
        "lenient: '.test@iana.org', a leading dot in the local part, is taken in loose mode \
         (some mobile carriers hand out such addresses; the local part is kept as written)",
    ),
    (
        16,
        true,
        false,
        "lenient: 'test.@iana.org', a trailing dot in the local part, is taken in loose mode \
         (same reason as case 15)",
    ),
    (
        43,
        false,
        false,
        "strict refusal: '\"\"@iana.org', an empty quoted local part, names no mailbox; \
         RFC 5321's grammar allows it but no receiving system defines one, and an empty \
         user is what a downstream parser may misread",
    ),
    (
        157,
        true,
        false,
        "lenient: ' test@iana.org' is a space (no CR LF) before the address inside the \
         brackets, tolerated in loose mode",
    ),
    (
        158,
        true,
        false,
        "lenient: 'test@iana.org ' is a space after the address inside the brackets, \
         tolerated in loose mode",
    ),
];

fn accepts(address: &str, mode: AddressMode) -> bool {
    let path = format!("<{address}>");
    matches!(
        parse_path(path.as_bytes(), mode, false),
        Ok((Path::Mailbox(m), rest)) if m.domain.is_some() && rest.is_empty()
    )
}

/// (loose, strict, whether it is an exception).
fn expected(case: &Case) -> (bool, bool, bool) {
    if let Some(&(_, l, s, _)) = EXCEPTIONS.iter().find(|e| e.0 == case.id) {
        return (l, s, true);
    }
    let &(_, l, s, _) = BY_DIAGNOSIS
        .iter()
        .find(|d| d.0 == case.diagnosis)
        .unwrap_or_else(|| {
            panic!(
                "case {}: diagnosis {} has no expected result; add it to BY_DIAGNOSIS",
                case.id, case.diagnosis
            )
        });
    (l, s, false)
}

fn offline_cases() -> Vec<Case> {
    // DNSWARN needs live DNS to mean anything (corpus README).
    load()
        .into_iter()
        .filter(|c| c.category != "ISEMAIL_DNSWARN")
        .collect()
}

#[test]
fn every_case_gives_its_expected_result() {
    let mut failures = Vec::new();
    for case in offline_cases() {
        let (loose, strict, exception) = expected(&case);
        let got = (
            accepts(&case.address, AddressMode::Loose),
            accepts(&case.address, AddressMode::Strict),
        );
        if got != (loose, strict) {
            failures.push(format!(
                "case {} {:?} ({}): expected loose {loose} strict {strict}, got loose {} strict {}",
                case.id, case.address, case.diagnosis, got.0, got.1
            ));
        }
        // The rules of the tables: deviations are explicit exceptions with a reason.
        let valid = case.category == "ISEMAIL_VALID_CATEGORY" || case.category == "ISEMAIL_RFC5321";
        if valid && !strict {
            assert!(
                exception,
                "case {}: RFC 5321-valid but refused by strict mode without an exception",
                case.id
            );
        }
        if case.category == "ISEMAIL_ERR" && (loose || strict) {
            assert!(
                exception,
                "case {}: an error case accepted without an exception",
                case.id
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn tables_are_consistent() {
    let cases = offline_cases();
    for &(id, l, s, why) in EXCEPTIONS {
        let case = cases
            .iter()
            .find(|c| c.id == id)
            .unwrap_or_else(|| panic!("exception for unknown case {id}"));
        let &(_, dl, ds, _) = BY_DIAGNOSIS
            .iter()
            .find(|d| d.0 == case.diagnosis)
            .expect("diagnosis listed");
        assert_ne!((l, s), (dl, ds), "exception {id} repeats its default");
        assert!(why.len() > 20, "exception {id} needs a reason");
    }
    for &(diagnosis, l, s, _) in BY_DIAGNOSIS {
        assert!(
            cases.iter().any(|c| c.diagnosis == diagnosis),
            "{diagnosis} is not in the corpus"
        );
        if diagnosis.starts_with("ISEMAIL_ERR") {
            assert!(
                !l && !s,
                "{diagnosis}: error default must refuse in both modes"
            );
        }
        if diagnosis == "ISEMAIL_VALID" || diagnosis.starts_with("ISEMAIL_RFC5321") {
            assert!(
                s,
                "{diagnosis}: valid default must be accepted in strict mode"
            );
        }
    }
}

/// The per-category and per-diagnosis table of what each mode accepts, as Markdown.
fn table() -> String {
    let cases = offline_cases();
    let mut by_category: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    let mut by_diagnosis: BTreeMap<(&str, &str), (usize, usize, usize)> = BTreeMap::new();
    for case in &cases {
        let loose = usize::from(accepts(&case.address, AddressMode::Loose));
        let strict = usize::from(accepts(&case.address, AddressMode::Strict));
        for row in [
            by_category.entry(&case.category).or_default(),
            by_diagnosis
                .entry((&case.category, &case.diagnosis))
                .or_default(),
        ] {
            row.0 += 1;
            row.1 += loose;
            row.2 += strict;
        }
    }
    let mut md = String::from(
        "# The isemail corpus through the envelope address parser\n\n\
         Generated by `rust/smtp-proto/tests/isemail.rs` (run it with \
         `SLUICE_WRITE_ISEMAIL_DOC=1 cargo test -p smtp-proto --test isemail` to rewrite \
         this file; the test fails when the file is out of date). Do not edit by hand.\n\n\
         Input: `../shared/corpora/isemail/tests.xml` (dominicsayers/isemail, 164 cases; \
         control characters written as U+2400 + code are mapped back). Each address is \
         parsed as `<address>` without SMTPUTF8; accepted means a mailbox with a domain \
         came out and nothing was left. The ISEMAIL_DNSWARN category (8 cases) needs \
         live DNS and is skipped.\n\n## Per category\n\n\
         | category | cases | loose accepts | strict accepts |\n| --- | ---: | ---: | ---: |\n",
    );
    for (category, (n, l, s)) in &by_category {
        md.push_str(&format!("| {category} | {n} | {l} | {s} |\n"));
    }
    md.push_str(
        "\n## Per diagnosis\n\n| category | diagnosis | cases | loose accepts | strict accepts |\n\
         | --- | --- | ---: | ---: | ---: |\n",
    );
    for ((category, diagnosis), (n, l, s)) in &by_diagnosis {
        md.push_str(&format!("| {category} | {diagnosis} | {n} | {l} | {s} |\n"));
    }
    md.push_str(
        "\n## Cases that differ from their diagnosis' default\n\n\
         The expected result of every case is in the test: a default per diagnosis and \
         these exceptions.\n\n| case | loose | strict | why |\n| ---: | --- | --- | --- |\n",
    );
    for &(id, l, s, why) in EXCEPTIONS {
        let word = |b: bool| if b { "accepts" } else { "refuses" };
        md.push_str(&format!("| {id} | {} | {} | {why} |\n", word(l), word(s)));
    }
    md
}

#[test]
fn doc_table_is_current() {
    let doc = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/isemail.md");
    let table = table();
    if std::env::var_os("SLUICE_WRITE_ISEMAIL_DOC").is_some() {
        std::fs::create_dir_all(doc.parent().expect("docs dir")).expect("create docs/");
        std::fs::write(&doc, &table).expect("write docs/isemail.md");
    }
    println!("{table}");
    let current = std::fs::read_to_string(&doc).unwrap_or_default();
    assert_eq!(
        current, table,
        "docs/isemail.md is out of date: run SLUICE_WRITE_ISEMAIL_DOC=1 cargo test -p smtp-proto --test isemail"
    );
}
