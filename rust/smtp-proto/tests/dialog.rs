//! Dialog tests for the server session: golden transcripts, byte-level smuggling cases,
//! limits and sequencing. Every dialog is run by `transcript`, which feeds the input in
//! one chunk, one byte at a time and (for short inputs) split in two at every offset, and
//! requires the same transcript from each.

use smtp_proto::fuzzing::{dialog, Rng};
use smtp_proto::{
    AddressMode, BareLinefeedPolicy, Path, Query, Reply, ServerConfig, ServerSession, Step,
};

type Policy<'a> = &'a dyn Fn(&Query) -> Reply;

/// Accepts everything, with the replies a real policy would give.
fn accept(q: &Query) -> Reply {
    match q {
        Query::Mail { .. } => Reply::new(250, "2.1.0", "Sender OK"),
        Query::Rcpt { .. } => Reply::new(250, "2.1.5", "Recipient OK"),
        Query::Message(_) => Reply::new(250, "2.0.0", "Queued"),
    }
}

fn config() -> ServerConfig {
    ServerConfig {
        hostname: "mx.example.net".to_string(),
        ..ServerConfig::default()
    }
}

fn params_text(params: &[(String, Option<String>)]) -> String {
    params
        .iter()
        .map(|(k, v)| match v {
            Some(v) => format!(" {k}={v}"),
            None => format!(" {k}"),
        })
        .collect()
}

/// One line per Ask, in the byte stream where it happened.
fn describe(q: &Query) -> String {
    match q {
        Query::Mail {
            reverse_path,
            params,
        } => format!("?MAIL <{reverse_path}>{}\n", params_text(params)),
        Query::Rcpt {
            forward_path,
            params,
        } => format!("?RCPT <{forward_path}>{}\n", params_text(params)),
        Query::Message(env) => {
            let rcpts: Vec<String> = env
                .recipients
                .iter()
                .map(|(p, _)| format!("<{p}>"))
                .collect();
            format!(
                "?MESSAGE helo={:?} from=<{}>{} to={} body={:?}\n",
                env.helo.as_deref().unwrap_or(""),
                env.reverse_path,
                params_text(&env.mail_params),
                rcpts.join(","),
                String::from_utf8_lossy(&env.body)
            )
        }
    }
}

/// Drives a session over `chunks`; returns the transcript (reply bytes, Ask lines,
/// "(starttls)" and "(close)") and checks that buffered input stays bounded outside an Ask.
fn drive(config: &ServerConfig, chunks: &[&[u8]], policy: Policy) -> String {
    drive_parts(config, &[chunks.to_vec()], policy)
}

/// Like `drive`, with input in parts: the first is sent in the clear, each later one
/// inside the TLS session a `Step::StartTls` started (the crate's shared driver, which
/// also checks that nothing moves during an Ask and input stays bounded).
fn drive_parts(config: &ServerConfig, parts: &[Vec<&[u8]>], policy: Policy) -> String {
    smtp_proto::fuzzing::drive_with(config, parts, policy, &describe)
}

/// The transcript of `input`, identical however the input is split.
fn transcript_with(config: &ServerConfig, input: &[u8], policy: Policy) -> String {
    transcript_tls(config, input, b"", policy)
}

/// `plain` in the clear, then `secure` after a STARTTLS handshake (if the session asks
/// for one): one chunk each, one byte at a time, and (for short inputs) split in two at
/// every offset; every way must give the same transcript.
fn transcript_tls(config: &ServerConfig, plain: &[u8], secure: &[u8], policy: Policy) -> String {
    let whole = drive_parts(config, &[vec![plain], vec![secure]], policy);
    let bytes = drive_parts(
        config,
        &[plain.chunks(1).collect(), secure.chunks(1).collect()],
        policy,
    );
    assert_eq!(whole, bytes, "byte at a time differs");
    if plain.len() + secure.len() <= 600 {
        for cut in 1..plain.len() {
            let (a, b) = plain.split_at(cut);
            let split = drive_parts(config, &[vec![a, b], vec![secure]], policy);
            assert_eq!(whole, split, "split at {cut} differs");
        }
        for cut in 1..secure.len() {
            let (a, b) = secure.split_at(cut);
            let split = drive_parts(config, &[vec![plain], vec![a, b]], policy);
            assert_eq!(whole, split, "split at {cut} after TLS differs");
        }
    }
    whole
}

fn transcript(input: &[u8]) -> String {
    transcript_with(&config(), input, &accept)
}

/// Replies only (no Ask lines), for tests that look at codes.
fn codes(t: &str) -> Vec<&str> {
    t.lines()
        .filter(|l| !l.starts_with('?') && !l.starts_with('('))
        .map(|l| l.get(..3).unwrap_or(l))
        .collect()
}

#[test]
fn greeting() {
    let s = ServerSession::new(config());
    assert_eq!(
        s.greeting().to_bytes(),
        b"220 mx.example.net ESMTP Sluice\r\n".to_vec()
    );
}

#[test]
fn golden_esmtp_session() {
    let t = transcript(
        b"EHLO client.example.org\r\n\
          MAIL FROM:<alice@example.org> SIZE=100 BODY=8BITMIME\r\n\
          RCPT TO:<bob@example.com>\r\n\
          RCPT TO:<carol@example.com>\r\n\
          DATA\r\n\
          Subject: hi\r\n\
          \r\n\
          Hello.\r\n\
          .\r\n\
          QUIT\r\n",
    );
    assert_eq!(
        t,
        "250-mx.example.net\r\n\
         250-PIPELINING\r\n\
         250-SIZE 10485760\r\n\
         250-8BITMIME\r\n\
         250-ENHANCEDSTATUSCODES\r\n\
         250-SMTPUTF8\r\n\
         250-DSN\r\n\
         250 CHUNKING\r\n\
         ?MAIL <alice@example.org> SIZE=100 BODY=8BITMIME\n\
         250 2.1.0 Sender OK\r\n\
         ?RCPT <bob@example.com>\n\
         250 2.1.5 Recipient OK\r\n\
         ?RCPT <carol@example.com>\n\
         250 2.1.5 Recipient OK\r\n\
         354 2.0.0 End data with <CR><LF>.<CR><LF>\r\n\
         ?MESSAGE helo=\"client.example.org\" from=<alice@example.org> SIZE=100 BODY=8BITMIME \
         to=<bob@example.com>,<carol@example.com> body=\"Subject: hi\\r\\n\\r\\nHello.\\r\\n\"\n\
         250 2.0.0 Queued\r\n\
         221 2.0.0 mx.example.net closing connection\r\n\
         (close)\n"
    );
}

#[test]
fn ehlo_advertises_only_what_works() {
    let t = transcript(b"EHLO x\r\n");
    for absent in ["STARTTLS", "AUTH", "BINARYMIME", "ETRN"] {
        assert!(!t.contains(absent), "{absent} advertised");
    }
    for present in [
        "\r\n250-SMTPUTF8\r\n",
        "\r\n250-DSN\r\n",
        "\r\n250 CHUNKING\r\n",
    ] {
        assert!(t.contains(present), "{present} not advertised");
    }
    let cfg = ServerConfig {
        max_message_size: 12345,
        ..config()
    };
    assert!(transcript_with(&cfg, b"EHLO x\r\n", &accept).contains("250-SIZE 12345\r\n"));
}

#[test]
fn golden_helo_session_several_messages() {
    let t = transcript(
        b"HELO client\r\n\
          MAIL FROM:<a@example.org>\r\n\
          RCPT TO:<b@example.com>\r\n\
          DATA\r\n\
          one\r\n\
          .\r\n\
          MAIL FROM:<>\r\n\
          RCPT TO:<c@example.com>\r\n\
          DATA\r\n\
          two\r\n\
          .\r\n",
    );
    assert_eq!(
        t,
        "250 mx.example.net\r\n\
         ?MAIL <a@example.org>\n\
         250 2.1.0 Sender OK\r\n\
         ?RCPT <b@example.com>\n\
         250 2.1.5 Recipient OK\r\n\
         354 2.0.0 End data with <CR><LF>.<CR><LF>\r\n\
         ?MESSAGE helo=\"client\" from=<a@example.org> to=<b@example.com> body=\"one\\r\\n\"\n\
         250 2.0.0 Queued\r\n\
         ?MAIL <>\n\
         250 2.1.0 Sender OK\r\n\
         ?RCPT <c@example.com>\n\
         250 2.1.5 Recipient OK\r\n\
         354 2.0.0 End data with <CR><LF>.<CR><LF>\r\n\
         ?MESSAGE helo=\"client\" from=<> to=<c@example.com> body=\"two\\r\\n\"\n\
         250 2.0.0 Queued\r\n"
    );
}

#[test]
fn helo_not_required_by_default() {
    let t = transcript(b"MAIL FROM:<a@example.org>\r\n");
    assert_eq!(t, "?MAIL <a@example.org>\n250 2.1.0 Sender OK\r\n");
}

#[test]
fn helo_required_when_configured() {
    let cfg = ServerConfig {
        require_helo: true,
        ..config()
    };
    let t = transcript_with(
        &cfg,
        b"MAIL FROM:<a@example.org>\r\nHELO x\r\nMAIL FROM:<a@example.org>\r\n",
        &accept,
    );
    assert_eq!(
        t,
        "503 5.5.1 Send HELO or EHLO first\r\n\
         250 mx.example.net\r\n\
         ?MAIL <a@example.org>\n\
         250 2.1.0 Sender OK\r\n"
    );
}

#[test]
fn helo_and_ehlo_need_a_name() {
    let t = transcript(b"HELO\r\nEHLO \r\nEHLO a\x01b\r\n");
    assert_eq!(
        t,
        "501 Syntax: HELO hostname\r\n501 Syntax: EHLO hostname\r\n501 Syntax: EHLO hostname\r\n"
    );
}

#[test]
fn bare_lf_ends_command_by_default() {
    let t = transcript(b"NOOP\nRSET\r\nQUIT\n");
    assert_eq!(
        t,
        "250 2.0.0 OK\r\n250 2.0.0 OK\r\n221 2.0.0 mx.example.net closing connection\r\n(close)\n"
    );
}

#[test]
fn bare_lf_does_not_end_command_when_configured() {
    let cfg = ServerConfig {
        bare_lf_ends_command: false,
        ..config()
    };
    let t = transcript_with(&cfg, b"NOOP\nQUIT\r\nNOOP\r\n", &accept);
    assert_eq!(
        t,
        "500 5.5.2 Bare CR or LF in command line\r\n250 2.0.0 OK\r\n"
    );
}

#[test]
fn over_long_line_is_refused_and_stream_resyncs() {
    let mut input = b"NOOP ".to_vec();
    input.extend_from_slice(&[b'x'; 10_000]);
    input.extend_from_slice(b"\r\nNOOP\r\n");
    let t = transcript(&input);
    assert_eq!(t, "500 5.5.2 Line too long\r\n250 2.0.0 OK\r\n");
}

#[test]
fn line_length_limit_counts_the_crlf() {
    let cfg = ServerConfig {
        max_line_length: 10,
        ..config()
    };
    // "NOOP 1234\r\n" is 11 octets; "NOOP 123\r\n" is 10.
    let t = transcript_with(&cfg, b"NOOP 123\r\nNOOP 1234\r\nNOOP\r\n", &accept);
    assert_eq!(
        t,
        "250 2.0.0 OK\r\n500 5.5.2 Line too long\r\n250 2.0.0 OK\r\n"
    );
    // With a bare LF ending the line, "NOOP 1234\n" is 10.
    let t = transcript_with(&cfg, b"NOOP 1234\nNOOP 12345\nNOOP\n", &accept);
    assert_eq!(
        t,
        "250 2.0.0 OK\r\n500 5.5.2 Line too long\r\n250 2.0.0 OK\r\n"
    );
}

#[test]
fn over_long_line_keeps_memory_bounded() {
    let mut s = ServerSession::new(config());
    let chunk = vec![b'a'; 1000];
    for _ in 0..1000 {
        s.receive(&chunk);
        while let Step::Write(_) = s.step() {}
        assert!(s.buffered() <= 4096 + 1000);
    }
    s.receive(b"\r\nNOOP\r\n");
    match s.step() {
        Step::Write(b) => assert_eq!(b, b"250 2.0.0 OK\r\n"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn commands_and_keywords_are_case_insensitive() {
    let t = transcript(
        b"ehlo x\r\nmail from:<a@example.org> size=10 body=8bitmime\r\n\
          Rcpt To:<b@example.com>\r\ndata\r\n.\r\nnoop\r\nrSeT\r\nvrfy x\r\nquit\r\n",
    );
    assert!(t.contains("?MAIL <a@example.org> SIZE=10 BODY=8bitmime\n"));
    assert!(t.contains("?RCPT <b@example.com>\n"));
    assert!(t.contains("?MESSAGE "));
    assert!(t.ends_with("250 2.0.0 OK\r\n250 2.0.0 OK\r\n252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n221 2.0.0 mx.example.net closing connection\r\n(close)\n"));
}

#[test]
fn ehlo_mid_transaction_resets_it() {
    let t = transcript(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nEHLO again\r\nDATA\r\n\
          RCPT TO:<b@example.com>\r\nMAIL FROM:<c@example.org>\r\n",
    );
    assert_eq!(
        codes(&t),
        [
            "250", "250", "250", "250", "250", "250", "250", "250", "250", "250", "503", "503",
            "250"
        ]
    );
    assert!(t.contains("503 5.5.1 Need MAIL command\r\n503 5.5.1 Need MAIL before RCPT\r\n"));
}

#[test]
fn rset_clears_envelope_but_keeps_greeting() {
    let cfg = ServerConfig {
        require_helo: true,
        ..config()
    };
    let t = transcript_with(
        &cfg,
        b"EHLO x\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nRSET\r\n\
          DATA\r\nMAIL FROM:<c@example.org>\r\nRSET now\r\n",
        &accept,
    );
    assert!(t.ends_with(
        "250 2.0.0 OK\r\n503 5.5.1 Need MAIL command\r\n?MAIL <c@example.org>\n\
         250 2.1.0 Sender OK\r\n501 5.5.4 Syntax: RSET\r\n"
    ));
}

#[test]
fn noop_changes_nothing() {
    let t = transcript(
        b"MAIL FROM:<a@example.org>\r\nNOOP\r\nRCPT TO:<b@example.com>\r\nNOOP hello\r\nDATA\r\nx\r\n.\r\n",
    );
    assert!(
        t.contains("?MESSAGE helo=\"\" from=<a@example.org> to=<b@example.com> body=\"x\\r\\n\"")
    );
}

#[test]
fn vrfy_expn_help() {
    let t = transcript(b"VRFY root\r\nEXPN staff\r\nVRFY\r\nHELP\r\n");
    assert_eq!(
        t,
        "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n\
         252 2.5.0 Cannot EXPN list, but will accept message and attempt delivery\r\n\
         501 5.5.4 Argument required\r\n\
         214-2.0.0 Sluice SMTP server\r\n\
         214-2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY EXPN HELP\r\n\
         214 2.0.0 See RFC 5321\r\n"
    );
}

#[test]
fn unknown_and_unimplemented_commands() {
    // STARTTLS is not offered unless configured.
    let t = transcript(b"FOO\r\nSTARTTLS\r\nAUTH PLAIN x\r\nTURN\r\n\r\n");
    assert_eq!(
        t,
        "500 5.5.2 Command unrecognized\r\n\
         502 5.5.1 Command not implemented\r\n\
         502 5.5.1 Command not implemented\r\n\
         502 5.5.1 Command not implemented\r\n\
         500 5.5.2 Command unrecognized\r\n"
    );
}

#[test]
fn mail_size_parameter() {
    let cfg = ServerConfig {
        max_message_size: 1000,
        ..config()
    };
    let t = transcript_with(
        &cfg,
        b"MAIL FROM:<a@example.org> SIZE=1001\r\n\
          MAIL FROM:<a@example.org> SIZE=99999999999999999999999999999\r\n\
          MAIL FROM:<a@example.org> SIZE=x\r\n\
          MAIL FROM:<a@example.org> SIZE\r\n\
          MAIL FROM:<a@example.org> SIZE=1000\r\n",
        &accept,
    );
    assert_eq!(
        t,
        "552 5.3.4 Message size exceeds fixed maximum message size\r\n\
         552 5.3.4 Message size exceeds fixed maximum message size\r\n\
         501 5.5.4 Syntax: SIZE=<number>\r\n\
         501 5.5.4 Syntax: SIZE=<number>\r\n\
         ?MAIL <a@example.org> SIZE=1000\n\
         250 2.1.0 Sender OK\r\n"
    );
}

/// RFC 4954 section 5: AUTH= on MAIL is accepted even though AUTH is not offered, and
/// dropped, since nobody authenticated here can vouch for it.
#[test]
fn mail_auth_parameter_is_accepted_and_dropped() {
    let t = transcript(
        b"MAIL FROM:<> AUTH=<>\r\n\
          RSET\r\n\
          MAIL FROM:<a@example.org> AUTH=a+2Bb@example.org SIZE=10\r\n",
    );
    assert_eq!(
        t,
        "?MAIL <>\n\
         250 2.1.0 Sender OK\r\n\
         250 2.0.0 OK\r\n\
         ?MAIL <a@example.org> SIZE=10\n\
         250 2.1.0 Sender OK\r\n"
    );
}

#[test]
fn mail_body_and_unknown_parameters() {
    let t = transcript(
        b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\n\
          MAIL FROM:<a@example.org> AUTH=+ZZ\r\n\
          MAIL FROM:<a@example.org> NOTIFY=NEVER\r\n\
          MAIL FROM:<a@example.org> BODY=7BIT BODY=7BIT\r\n\
          MAIL FROM:<a@example.org> =x\r\n\
          MAIL FROM:<a@example.org> BODY=7BIT\r\n\
          RCPT TO:<b@example.com> RET=FULL\r\n\
          RCPT TO:<b@example.com>  \r\n",
    );
    assert_eq!(
        t,
        "501 5.5.4 Syntax: BODY=7BIT or BODY=8BITMIME\r\n\
         501 5.5.4 Syntax: AUTH=<> or AUTH=<xtext>\r\n\
         555 5.5.4 Unsupported MAIL parameter NOTIFY\r\n\
         501 5.5.4 Duplicate parameter BODY\r\n\
         501 5.5.4 Syntax error in parameters\r\n\
         ?MAIL <a@example.org> BODY=7BIT\n\
         250 2.1.0 Sender OK\r\n\
         555 5.5.4 Unsupported RCPT parameter RET\r\n\
         ?RCPT <b@example.com>\n\
         250 2.1.5 Recipient OK\r\n"
    );
}

#[test]
fn sequencing_errors() {
    let t = transcript(
        b"RCPT TO:<b@example.com>\r\nDATA\r\n\
          MAIL FROM:<a@example.org>\r\nMAIL FROM:<a@example.org>\r\nDATA\r\nDATA x\r\n",
    );
    assert_eq!(
        t,
        "503 5.5.1 Need MAIL before RCPT\r\n\
         503 5.5.1 Need MAIL command\r\n\
         ?MAIL <a@example.org>\n\
         250 2.1.0 Sender OK\r\n\
         503 5.5.1 Nested MAIL command\r\n\
         503 5.5.1 No valid recipients\r\n\
         503 5.5.1 No valid recipients\r\n"
    );
}

#[test]
fn data_after_only_refused_recipients() {
    let policy = |q: &Query| match q {
        Query::Rcpt { .. } => Reply::new(550, "5.1.1", "No such user"),
        other => accept(other),
    };
    let t = transcript_with(
        &config(),
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<x@example.com>\r\nDATA\r\nbody\r\n.\r\n",
        &policy,
    );
    assert_eq!(
        codes(&t),
        ["250", "550", "503", "500", "500"],
        "DATA refused, body lines become commands: {t}"
    );
}

#[test]
fn pipelined_refusals_keep_order() {
    let policy = |q: &Query| match q {
        Query::Rcpt { forward_path, .. } if forward_path.to_string().starts_with("bad") => {
            Reply::new(550, "5.1.1", "No such user")
        }
        other => accept(other),
    };
    let t = transcript_with(
        &config(),
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<bad@example.com>\r\nRCPT TO:<good@example.com>\r\n\
          NOOP\r\nDATA\r\nx\r\n.\r\n",
        &policy,
    );
    assert_eq!(
        t,
        "?MAIL <a@example.org>\n250 2.1.0 Sender OK\r\n\
         ?RCPT <bad@example.com>\n550 5.1.1 No such user\r\n\
         ?RCPT <good@example.com>\n250 2.1.5 Recipient OK\r\n\
         250 2.0.0 OK\r\n\
         354 2.0.0 End data with <CR><LF>.<CR><LF>\r\n\
         ?MESSAGE helo=\"\" from=<a@example.org> to=<good@example.com> body=\"x\\r\\n\"\n\
         250 2.0.0 Queued\r\n"
    );
}

#[test]
fn pipelined_replies_are_coalesced() {
    let mut s = ServerSession::new(config());
    s.receive(b"NOOP\r\nNOOP\r\nRSET\r\nVRFY x\r\n");
    match s.step() {
        Step::Write(b) => assert_eq!(b.iter().filter(|&&c| c == b'\n').count(), 4),
        other => panic!("{other:?}"),
    }
    assert!(matches!(s.step(), Step::NeedInput));
}

#[test]
fn replies_before_an_ask_go_out_first() {
    let mut s = ServerSession::new(config());
    s.receive(b"NOOP\r\nMAIL FROM:<a@example.org>\r\nNOOP\r\n");
    assert!(matches!(s.step(), Step::Write(b) if b == b"250 2.0.0 OK\r\n"));
    assert!(matches!(s.step(), Step::Ask(Query::Mail { .. })));
    assert!(matches!(s.step(), Step::NeedInput));
    assert!(matches!(s.step(), Step::NeedInput));
    s.answer(Reply::new(451, "4.3.0", "Try later"));
    assert!(matches!(s.step(), Step::Write(b) if b == b"451 4.3.0 Try later\r\n250 2.0.0 OK\r\n"));
    assert!(
        s.reverse_path().is_none(),
        "a 4xx does not open a transaction"
    );
    // A stray answer is ignored.
    s.answer(Reply::new(250, "2.0.0", "stray"));
    assert!(matches!(s.step(), Step::NeedInput));
}

#[test]
fn session_accessors() {
    let mut s = ServerSession::new(config());
    s.receive(b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\n");
    assert!(matches!(s.step(), Step::Write(_)));
    assert!(matches!(s.step(), Step::Ask(_)));
    s.answer(Reply::new(250, "2.1.0", "ok"));
    assert_eq!(s.helo(), Some("client.example"));
    assert!(s.esmtp());
    assert_eq!(
        s.reverse_path().map(|p| p.to_string()).as_deref(),
        Some("a@example.org")
    );
}

#[test]
fn too_many_recipients() {
    let cfg = ServerConfig {
        max_recipients: 100,
        ..config()
    };
    let mut input = b"MAIL FROM:<a@example.org>\r\n".to_vec();
    for i in 0..1000 {
        input.extend_from_slice(format!("RCPT TO:<user{i}@example.com>\r\n").as_bytes());
    }
    input.extend_from_slice(b"DATA\r\nx\r\n.\r\n");
    let t = transcript_with(&cfg, &input, &accept);
    assert_eq!(t.matches("?RCPT").count(), 100);
    assert_eq!(t.matches("452 4.5.3 Too many recipients\r\n").count(), 900);
    assert!(t.contains("?RCPT <user99@example.com>\n250 2.1.5 Recipient OK\r\n452 4.5.3"));
    assert!(!t.contains("user100@"));
    let message = t.lines().find(|l| l.starts_with("?MESSAGE")).unwrap();
    assert_eq!(message.matches("@example.com>").count(), 100);
    assert!(!t.contains("(close)"), "452 is not a bad command");
}

#[test]
fn too_many_bad_commands_close() {
    let cfg = ServerConfig {
        max_bad_commands: 3,
        ..config()
    };
    let t = transcript_with(
        &cfg,
        b"FOO\r\nNOOP\r\nBAR\r\nRCPT TO:<a@b.c>\r\nNOOP\r\n",
        &accept,
    );
    assert_eq!(
        t,
        "500 5.5.2 Command unrecognized\r\n\
         250 2.0.0 OK\r\n\
         500 5.5.2 Command unrecognized\r\n\
         503 5.5.1 Need MAIL before RCPT\r\n\
         421 4.7.0 Too many errors, closing connection\r\n\
         (close)\n"
    );
}

#[test]
fn quit_closes_and_ignores_the_rest() {
    let t = transcript(b"QUIT\r\nMAIL FROM:<a@example.org>\r\n");
    assert_eq!(
        t,
        "221 2.0.0 mx.example.net closing connection\r\n(close)\n"
    );
}

#[test]
fn policy_421_closes() {
    let policy = |q: &Query| match q {
        Query::Mail { .. } => Reply::new(421, "4.7.0", "Go away"),
        other => accept(other),
    };
    let t = transcript_with(&config(), b"MAIL FROM:<a@example.org>\r\nNOOP\r\n", &policy);
    assert_eq!(t, "?MAIL <a@example.org>\n421 4.7.0 Go away\r\n(close)\n");
}

#[test]
fn address_errors_in_dialog() {
    let t = transcript(
        b"MAIL FROM:<a@>\r\n\
          MAIL FROM:<Postmaster>\r\n\
          MAIL FROM:\r\n\
          MAIL TO:<a@example.org>\r\n\
          MAIL FROM:<a\x01@example.org>\r\n\
          MAIL FROM: <a@example.org>\r\n\
          RCPT TO:<>\r\n\
          RCPT TO:<b@-example.com>\r\n\
          RCPT TO:<PostMaster>\r\n",
    );
    assert_eq!(
        t,
        "501 5.1.7 domain missing after @\r\n\
         501 5.1.7 domain missing after the local part\r\n\
         501 5.1.7 empty address\r\n\
         501 5.5.4 Syntax: MAIL FROM:<address>\r\n\
         501 5.1.7 control character 0x01 in address\r\n\
         ?MAIL <a@example.org>\n\
         250 2.1.0 Sender OK\r\n\
         501 5.1.3 the null path <> is not a recipient\r\n\
         501 5.1.3 unexpected '-' at the start of the domain\r\n\
         ?RCPT <PostMaster>\n\
         250 2.1.5 Recipient OK\r\n"
    );
}

#[test]
fn loose_and_strict_modes_in_dialog() {
    let input =
        b"MAIL FROM:a@example.org SIZE=5\r\nRSET\r\nMAIL FROM:<\"Joe\" <j@example.org>>\r\n";
    let t = transcript(input);
    assert!(t.contains("?MAIL <a@example.org> SIZE=5\n"));
    assert!(t.contains("?MAIL <j@example.org>\n"));
    let strict = ServerConfig {
        address_mode: AddressMode::Strict,
        ..config()
    };
    let t = transcript_with(&strict, input, &accept);
    assert!(!t.contains("?MAIL"));
    assert_eq!(codes(&t), ["501", "250", "501"]);
}

// ---- DATA ----

const START: &[u8] = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n";
const PREFIX: &str = "?MAIL <a@example.org>\n250 2.1.0 Sender OK\r\n\
                      ?RCPT <b@example.com>\n250 2.1.5 Recipient OK\r\n\
                      354 2.0.0 End data with <CR><LF>.<CR><LF>\r\n";

fn data_transcript(cfg: &ServerConfig, body: &[u8]) -> String {
    let mut input = START.to_vec();
    input.extend_from_slice(body);
    let t = transcript_with(cfg, &input, &accept);
    t.strip_prefix(PREFIX)
        .unwrap_or_else(|| panic!("unexpected start: {t}"))
        .to_string()
}

fn normalising() -> ServerConfig {
    ServerConfig {
        bare_linefeed: BareLinefeedPolicy::Normalise,
        ..config()
    }
}

#[test]
fn empty_message_right_after_354() {
    let t = data_transcript(&config(), b".\r\nNOOP\r\n");
    assert_eq!(
        t,
        "?MESSAGE helo=\"\" from=<a@example.org> to=<b@example.com> body=\"\"\n\
         250 2.0.0 Queued\r\n250 2.0.0 OK\r\n"
    );
}

#[test]
fn dot_unstuffing() {
    let t = data_transcript(&config(), b"..x\r\n..\r\n...\r\ny.\r\n.\r\n");
    assert!(t.starts_with(
        "?MESSAGE helo=\"\" from=<a@example.org> to=<b@example.com> body=\".x\\r\\n.\\r\\n..\\r\\ny.\\r\\n\"\n"
    ));
}

#[test]
fn in_data_reports_body_reading() {
    let mut s = ServerSession::new(config());
    s.receive(START);
    while let Step::Ask(_) | Step::Write(_) = {
        let st = s.step();
        if let Step::Ask(q) = &st {
            s.answer(accept(q));
        }
        st
    } {}
    assert!(s.in_data());
    s.receive(b"x\r\n.\r\n");
    assert!(matches!(s.step(), Step::Ask(Query::Message(_))));
    assert!(!s.in_data());
}

const SMUGGLE: &[u8] = b"first body\n.\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n\
                         DATA\r\nsecond\r\n.\r\n";

#[test]
fn smuggling_lf_dot_crlf_is_one_message_reject() {
    let t = data_transcript(&config(), SMUGGLE);
    assert_eq!(
        t,
        "550 5.6.0 Message refused: bare LF or bare CR in the message; lines must end with CRLF (RFC 5321 section 2.3.8)\r\n"
    );
}

#[test]
fn smuggling_lf_dot_crlf_is_one_message_normalise() {
    let t = data_transcript(&normalising(), SMUGGLE);
    assert_eq!(
        t,
        "?MESSAGE helo=\"\" from=<a@example.org> to=<b@example.com> body=\"first body\\r\\n.\\r\\n\
         MAIL FROM:<a@example.org>\\r\\nRCPT TO:<b@example.com>\\r\\nDATA\\r\\nsecond\\r\\n\"\n\
         250 2.0.0 Queued\r\n"
    );
    assert_eq!(t.matches("?MAIL").count(), 0);
}

#[test]
fn smuggling_lf_dot_lf_does_not_end() {
    for cfg in [config(), normalising()] {
        let t = data_transcript(&cfg, b"body\n.\nQUIT\r\n");
        assert_eq!(t, "", "nothing ends, QUIT is body");
        let t = data_transcript(&cfg, b"body\r\n.\nQUIT\r\n");
        assert_eq!(t, "");
        let t = data_transcript(&cfg, b"body\r.\rQUIT\r\n");
        assert_eq!(t, "");
    }
}

#[test]
fn bare_lf_in_body() {
    let t = data_transcript(&config(), b"a\nb\r\n.\r\nNOOP\r\n");
    assert!(t.starts_with("550 5.6.0 "));
    assert!(t.ends_with("250 2.0.0 OK\r\n"));
    let t = data_transcript(&normalising(), b"a\nb\rc\r\n.\r\n");
    assert!(t.contains("body=\"a\\r\\nb\\r\\nc\\r\\n\""));
    // Under Reject the transaction is over after the 550.
    let t = data_transcript(&config(), b"a\rb\r\n.\r\nDATA\r\n");
    assert!(t.ends_with("503 5.5.1 Need MAIL command\r\n"));
}

#[test]
fn message_too_big() {
    let cfg = ServerConfig {
        max_message_size: 100,
        ..config()
    };
    let mut body = vec![b'z'; 5000];
    body.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
    let t = data_transcript(&cfg, &body);
    assert_eq!(
        t,
        "552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.0.0 OK\r\n"
    );
}

#[test]
fn one_mebibyte_line_in_data_is_body() {
    let mut body = vec![b'q'; 1 << 20];
    body.extend_from_slice(b"\r\n.\r\n");
    let t = data_transcript(&config(), &body);
    assert!(t.starts_with("?MESSAGE"));
    assert!(t.ends_with("250 2.0.0 Queued\r\n"));
}

#[test]
fn message_answer_ends_transaction_whatever_it_says() {
    let policy = |q: &Query| match q {
        Query::Message(_) => Reply::new(451, "4.3.0", "Try again"),
        other => accept(other),
    };
    let mut input = START.to_vec();
    input.extend_from_slice(b"x\r\n.\r\nRCPT TO:<c@example.com>\r\n");
    let t = transcript_with(&config(), &input, &policy);
    assert!(t.ends_with("451 4.3.0 Try again\r\n503 5.5.1 Need MAIL before RCPT\r\n"));
}

#[test]
fn envelope_contents() {
    let mut s = ServerSession::new(config());
    s.receive(b"HELO h\r\nMAIL FROM:<a@example.org> body=7bit\r\nRCPT TO:<b@example.com>\r\nDATA\r\nx\r\n.\r\n");
    loop {
        match s.step() {
            Step::Ask(Query::Message(env)) => {
                assert_eq!(env.helo.as_deref(), Some("h"));
                assert_eq!(
                    env.mail_params,
                    vec![("BODY".to_string(), Some("7bit".to_string()))]
                );
                assert_eq!(env.recipients.len(), 1);
                assert!(matches!(&env.recipients[0].0, Path::Mailbox(m) if m.local == "b"));
                assert_eq!(env.body, b"x\r\n");
                return;
            }
            Step::Ask(q) => s.answer(accept(&q)),
            Step::Write(_) => {}
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn discard_needs_crlf_when_bare_lf_does_not_end_lines() {
    let cfg = ServerConfig {
        max_line_length: 10,
        bare_lf_ends_command: false,
        ..config()
    };
    let t = transcript_with(&cfg, b"NOOP 1234567890\nNOOP\r\nNOOP\r\n", &accept);
    assert_eq!(t, "500 5.5.2 Line too long\r\n250 2.0.0 OK\r\n");
}

/// Deterministic pseudo-random dialogs (the fuzz targets' fragments and hostile bytes): the
/// session must not panic, and one-chunk and byte-at-a-time feeding must agree.
#[test]
fn random_dialogs_never_panic_and_split_invariant() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let policy = |q: &Query| match q {
        Query::Rcpt { forward_path, .. } if forward_path.to_string().starts_with('P') => {
            Reply::new(550, "5.1.1", "no\r\nthanks")
        }
        other => accept(other),
    };
    for round in 0..300 {
        let cfg = ServerConfig {
            max_line_length: 16 + round % 40,
            max_message_size: (round % 7) as u64 * 10,
            max_recipients: 1 + round % 3,
            require_helo: round % 2 == 0,
            bare_lf_ends_command: round % 3 != 0,
            bare_linefeed: if round % 2 == 0 {
                BareLinefeedPolicy::Reject
            } else {
                BareLinefeedPolicy::Normalise
            },
            address_mode: if round % 5 == 0 {
                AddressMode::Strict
            } else {
                AddressMode::Loose
            },
            max_bad_commands: (round % 6) as u32,
            ..config()
        };
        let input = dialog(&mut rng);
        let whole = drive(&cfg, &[&input], &policy);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(whole, drive(&cfg, &bytes, &policy), "round {round}");
        let cut = rng.next() % (input.len() + 1);
        let (a, b) = input.split_at(cut);
        assert_eq!(
            whole,
            drive(&cfg, &[a, b], &policy),
            "round {round} cut {cut}"
        );
    }
}

// ---- STARTTLS (RFC 3207) ----

fn tls_config() -> ServerConfig {
    ServerConfig {
        starttls: true,
        ..config()
    }
}

const EHLO_TLS: &str = "250-mx.example.net\r\n250-PIPELINING\r\n250-SIZE 10485760\r\n\
                        250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250-DSN\r\n\
                        250-CHUNKING\r\n250 STARTTLS\r\n";
const EHLO_PLAIN: &str = "250-mx.example.net\r\n250-PIPELINING\r\n250-SIZE 10485760\r\n\
                          250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250-DSN\r\n\
                          250 CHUNKING\r\n";

#[test]
fn golden_starttls_session() {
    let t = transcript_tls(
        &tls_config(),
        b"EHLO client.example.org\r\nSTARTTLS\r\n",
        b"EHLO client.example.org\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n\
          DATA\r\nsecret\r\n.\r\nSTARTTLS\r\nQUIT\r\n",
        &accept,
    );
    assert_eq!(
        t,
        format!(
            "{EHLO_TLS}220 2.0.0 Ready to start TLS\r\n(starttls)\n{EHLO_PLAIN}\
             ?MAIL <a@example.org>\n250 2.1.0 Sender OK\r\n\
             ?RCPT <b@example.com>\n250 2.1.5 Recipient OK\r\n\
             354 2.0.0 End data with <CR><LF>.<CR><LF>\r\n\
             ?MESSAGE helo=\"client.example.org\" from=<a@example.org> to=<b@example.com> body=\"secret\\r\\n\"\n\
             250 2.0.0 Queued\r\n\
             503 5.5.1 TLS already active\r\n\
             221 2.0.0 mx.example.net closing connection\r\n(close)\n"
        )
    );
}

/// CVE-2011-0411 class: commands pipelined after STARTTLS in the clear never run, whether
/// they arrived in the same read as STARTTLS or after the 220.
#[test]
fn starttls_discards_pipelined_plaintext() {
    let t = transcript_tls(
        &tls_config(),
        b"EHLO c\r\nSTARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.org>\r\nQUIT\r\n",
        b"NOOP\r\n",
        &accept,
    );
    assert_eq!(
        t,
        format!("{EHLO_TLS}220 2.0.0 Ready to start TLS\r\n(starttls)\n250 2.0.0 OK\r\n")
    );

    // The same at the API level, as the binding sees it.
    let mut s = ServerSession::new(tls_config());
    s.receive(b"NOOP\r\nSTARTTLS\r\nRSET\r\n");
    match s.step() {
        Step::Write(b) => assert_eq!(b, b"250 2.0.0 OK\r\n220 2.0.0 Ready to start TLS\r\n"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(s.step(), Step::StartTls));
    // Plaintext that arrives before the handshake is done is dropped too.
    s.receive(b"MAIL FROM:<evil@example.org>\r\n");
    assert!(matches!(s.step(), Step::NeedInput));
    assert!(matches!(s.step(), Step::NeedInput));
    assert!(!s.is_tls());
    s.tls_started();
    assert!(s.is_tls());
    assert_eq!(s.buffered(), 0);
    assert!(matches!(s.step(), Step::NeedInput));
    s.receive(b"RSET\r\n");
    assert!(matches!(s.step(), Step::Write(b) if b == b"250 2.0.0 OK\r\n"));
    assert!(matches!(s.step(), Step::NeedInput));
}

#[test]
fn starttls_refusals() {
    // Parameters, inside a transaction, and not offered.
    let t = transcript_with(
        &tls_config(),
        b"STARTTLS now\r\nMAIL FROM:<a@example.org>\r\nSTARTTLS\r\nRCPT TO:<b@example.com>\r\n\
          STARTTLS\r\nRSET\r\nSTARTTLS\r\n",
        &accept,
    );
    assert_eq!(
        t,
        "501 5.5.4 Syntax: STARTTLS\r\n\
         ?MAIL <a@example.org>\n250 2.1.0 Sender OK\r\n\
         503 5.5.1 STARTTLS not allowed in a mail transaction; send RSET first\r\n\
         ?RCPT <b@example.com>\n250 2.1.5 Recipient OK\r\n\
         503 5.5.1 STARTTLS not allowed in a mail transaction; send RSET first\r\n\
         250 2.0.0 OK\r\n\
         220 2.0.0 Ready to start TLS\r\n(starttls)\n"
    );
    assert_eq!(
        transcript(b"STARTTLS\r\n"),
        "502 5.5.1 Command not implemented\r\n"
    );
    let cfg = ServerConfig {
        require_helo: true,
        ..tls_config()
    };
    assert_eq!(
        transcript_with(&cfg, b"STARTTLS\r\n", &accept),
        "503 5.5.1 Send EHLO first\r\n"
    );
}

#[test]
fn tls_started_resets_to_after_greeting() {
    let cfg = ServerConfig {
        require_helo: true,
        ..tls_config()
    };
    // The greeting name is forgotten (RFC 3207 section 4.2): MAIL needs a new EHLO.
    let t = transcript_tls(
        &cfg,
        b"EHLO c\r\nSTARTTLS\r\n",
        b"MAIL FROM:<a@example.org>\r\nHELP\r\nEHLO c2\r\nMAIL FROM:<a@example.org>\r\n",
        &accept,
    );
    assert_eq!(
        t,
        format!(
            "{EHLO_TLS}220 2.0.0 Ready to start TLS\r\n(starttls)\n\
             503 5.5.1 Send HELO or EHLO first\r\n\
             214-2.0.0 Sluice SMTP server\r\n\
             214-2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY EXPN HELP\r\n\
             214 2.0.0 See RFC 5321\r\n\
             {EHLO_PLAIN}?MAIL <a@example.org>\n250 2.1.0 Sender OK\r\n"
        )
    );
    let help = transcript_with(&tls_config(), b"HELP\r\n", &accept);
    assert!(help.contains("Commands: HELO EHLO STARTTLS MAIL"));

    let mut s = ServerSession::new(tls_config());
    s.receive(b"EHLO c\r\nSTARTTLS\r\n");
    assert!(matches!(s.step(), Step::Write(_)));
    assert!(matches!(s.step(), Step::StartTls));
    assert_eq!(s.helo(), Some("c"));
    s.tls_started();
    assert_eq!(s.helo(), None);
    assert!(!s.esmtp());
    assert!(s.reverse_path().is_none());
}

#[test]
fn implicit_tls_marks_session() {
    let mut s = ServerSession::new(tls_config());
    s.tls_started();
    s.receive(b"EHLO c\r\nSTARTTLS\r\n");
    match s.step() {
        Step::Write(b) => assert_eq!(
            String::from_utf8_lossy(&b),
            format!("{EHLO_PLAIN}503 5.5.1 TLS already active\r\n")
        ),
        other => panic!("{other:?}"),
    }
}

// ---- SMTPUTF8 (RFC 6531) ----

#[test]
fn golden_smtputf8_session() {
    let t = transcript(
        "EHLO c\r\nMAIL FROM:<jörg@exämple.de> SMTPUTF8\r\nRCPT TO:<müller@bücher.example>\r\n\
         RCPT TO:<ascii@example.com>\r\nDATA\r\nSubject: grüße\r\n.\r\n"
            .as_bytes(),
    );
    assert_eq!(
        t,
        format!(
            "{EHLO_PLAIN}?MAIL <jörg@exämple.de> SMTPUTF8\n250 2.1.0 Sender OK\r\n\
             ?RCPT <müller@bücher.example>\n250 2.1.5 Recipient OK\r\n\
             ?RCPT <ascii@example.com>\n250 2.1.5 Recipient OK\r\n\
             354 2.0.0 End data with <CR><LF>.<CR><LF>\r\n\
             ?MESSAGE helo=\"c\" from=<jörg@exämple.de> SMTPUTF8 \
             to=<müller@bücher.example>,<ascii@example.com> body=\"Subject: grüße\\r\\n\"\n\
             250 2.0.0 Queued\r\n"
        )
    );
}

#[test]
fn utf8_address_needs_smtputf8() {
    let t = transcript(
        "MAIL FROM:<jörg@exämple.de>\r\n\
         MAIL FROM:<(jörg) j@example.de>\r\n\
         MAIL FROM:<a@example.org> SMTPUTF8=yes\r\n\
         MAIL FROM:<a@example.org>\r\n\
         RCPT TO:<müller@example.com>\r\n\
         RCPT TO:<m@bücher.example>\r\n\
         RCPT TO:<b@example.com> SMTPUTF8\r\n\
         RCPT TO:<b@example.com>\r\n"
            .as_bytes(),
    );
    assert_eq!(
        t,
        "553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on MAIL\r\n\
         553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on MAIL\r\n\
         501 5.5.4 Syntax: SMTPUTF8 takes no value\r\n\
         ?MAIL <a@example.org>\n250 2.1.0 Sender OK\r\n\
         553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on MAIL\r\n\
         553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter on MAIL\r\n\
         555 5.5.4 Unsupported RCPT parameter SMTPUTF8\r\n\
         ?RCPT <b@example.com>\n250 2.1.5 Recipient OK\r\n"
    );
}

#[test]
fn smtputf8_refuses_invisible_and_control_characters() {
    let t = transcript(
        "MAIL FROM:<a\u{200b}b@example.org> SMTPUTF8\r\n\
         MAIL FROM:<ab@exa\u{200d}mple.org> SMTPUTF8\r\n\
         MAIL FROM:<a\u{85}b@example.org> SMTPUTF8\r\n\
         MAIL FROM:<a\u{202e}b@example.org> SMTPUTF8\r\n\
         MAIL FROM:<a\u{feff}b@example.org> SMTPUTF8\r\n\
         MAIL FROM:<a\u{fe0f}b@example.org> SMTPUTF8\r\n\
         MAIL FROM:<a\u{e0041}b@example.org> SMTPUTF8\r\n\
         MAIL FROM:<a\u{3164}b@example.org> SMTPUTF8\r\n\
         MAIL FROM:<zoë@example.org> SMTPUTF8\r\n\
         RCPT TO:<x\u{2060}y@example.com>\r\n"
            .as_bytes(),
    );
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 11, "{t}");
    for (line, code) in lines[..8].iter().zip([
        "U+200B", "U+200D", "U+0085", "U+202E", "U+FEFF", "U+FE0F", "U+E0041", "U+3164",
    ]) {
        assert_eq!(
            *line,
            format!("501 5.1.7 invisible or control character {code} in address")
        );
    }
    assert_eq!(lines[8], "?MAIL <zoë@example.org> SMTPUTF8");
    assert_eq!(
        lines[10],
        "501 5.1.3 invisible or control character U+2060 in address"
    );
}

// ---- CHUNKING / BDAT (RFC 3030) ----

const TX: &[u8] = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n";
const TX_REPLIES: &str = "?MAIL <a@example.org>\n250 2.1.0 Sender OK\r\n\
                          ?RCPT <b@example.com>\n250 2.1.5 Recipient OK\r\n";

fn bdat_transcript(cfg: &ServerConfig, rest: &[u8]) -> String {
    let mut input = TX.to_vec();
    input.extend_from_slice(rest);
    let t = transcript_with(cfg, &input, &accept);
    t.strip_prefix(TX_REPLIES)
        .unwrap_or_else(|| panic!("unexpected start: {t}"))
        .to_string()
}

#[test]
fn golden_bdat_session() {
    let t = transcript(
        b"EHLO c\r\nMAIL FROM:<a@example.org> BODY=8BITMIME\r\nRCPT TO:<b@example.com>\r\n\
          BDAT 14\r\nSubject: x\r\n\r\nBDAT 0\r\nBDAT 13 LAST\r\nhello\r\n.\r\nx\r\nNOOP\r\nQUIT\r\n",
    );
    assert_eq!(
        t,
        format!(
            "{EHLO_PLAIN}?MAIL <a@example.org> BODY=8BITMIME\n250 2.1.0 Sender OK\r\n\
             ?RCPT <b@example.com>\n250 2.1.5 Recipient OK\r\n\
             250 2.0.0 14 octets received\r\n\
             250 2.0.0 0 octets received\r\n\
             ?MESSAGE helo=\"c\" from=<a@example.org> BODY=8BITMIME to=<b@example.com> \
             body=\"Subject: x\\r\\n\\r\\nhello\\r\\n.\\r\\nx\\r\\n\"\n\
             250 2.0.0 Queued\r\n250 2.0.0 OK\r\n\
             221 2.0.0 mx.example.net closing connection\r\n(close)\n"
        )
    );
}

#[test]
fn bdat_zero_last_and_literal_dots() {
    let t = bdat_transcript(&config(), b"BDAT 0 LAST\r\nNOOP\r\n");
    assert_eq!(
        t,
        "?MESSAGE helo=\"\" from=<a@example.org> to=<b@example.com> body=\"\"\n\
         250 2.0.0 Queued\r\n250 2.0.0 OK\r\n"
    );
    // No dot handling: "..", ".\r\n" and a lone "." line are content.
    let t = bdat_transcript(&config(), b"BDAT 14 last\r\n..a\r\n.\r\n.\r\nb\r\n");
    assert!(t.starts_with("?MESSAGE helo=\"\" from=<a@example.org> to=<b@example.com> body=\"..a\\r\\n.\\r\\n.\\r\\nb\\r\\n\"\n"), "{t}");
}

/// A chunk holding what looks like the end of data and a second transaction is one
/// message: nothing in a chunk is ever read as a command.
#[test]
fn bdat_chunk_cannot_smuggle_commands() {
    let inner =
        b"x\r\n.\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<v@example.com>\r\nDATA\r\ny\r\n.\r\n";
    let mut rest = format!("BDAT {} LAST\r\n", inner.len()).into_bytes();
    rest.extend_from_slice(inner);
    let t = bdat_transcript(&config(), &rest);
    assert_eq!(t.matches("?MAIL").count(), 0, "{t}");
    assert_eq!(t.matches("?MESSAGE").count(), 1, "{t}");
    assert!(t.contains("MAIL FROM:<evil@example.org>\\r\\n"));
}

#[test]
fn bdat_sequencing() {
    let t = bdat_transcript(
        &config(),
        b"BDAT 2\r\nabDATA\r\nRCPT TO:<c@example.com>\r\nMAIL FROM:<x@example.org>\r\n\
          BDAT 2 LAST\r\ncd",
    );
    assert_eq!(
        t,
        "250 2.0.0 2 octets received\r\n\
         503 5.5.1 DATA not allowed after BDAT; end with BDAT LAST or RSET\r\n\
         503 5.5.1 RCPT not allowed after BDAT\r\n\
         503 5.5.1 Nested MAIL command\r\n\
         ?MESSAGE helo=\"\" from=<a@example.org> to=<b@example.com> body=\"abcd\"\n\
         250 2.0.0 Queued\r\n"
    );
    // RSET drops the chunks received so far.
    let t = bdat_transcript(&config(), b"BDAT 2\r\nabRSET\r\nBDAT 2 LAST\r\ncdNOOP\r\n");
    assert_eq!(
        t,
        "250 2.0.0 2 octets received\r\n250 2.0.0 OK\r\n\
         503 5.5.1 Need MAIL command\r\n250 2.0.0 OK\r\n"
    );
}

/// A refused BDAT still consumes its octets: here they spell commands that must not run.
#[test]
fn refused_bdat_consumes_its_octets() {
    let t = transcript(b"BDAT 12 LAST\r\nRSET\r\nQUIT\r\nNOOP\r\n");
    assert_eq!(t, "503 5.5.1 Need MAIL command\r\n250 2.0.0 OK\r\n");
    let t = transcript(b"MAIL FROM:<a@example.org>\r\nBDAT 6\r\nQUIT\r\nNOOP\r\n");
    assert_eq!(
        t,
        "?MAIL <a@example.org>\n250 2.1.0 Sender OK\r\n503 5.5.1 No valid recipients\r\n250 2.0.0 OK\r\n"
    );
    let cfg = ServerConfig {
        require_helo: true,
        ..config()
    };
    let t = transcript_with(&cfg, b"BDAT 6\r\nQUIT\r\nNOOP\r\n", &accept);
    assert_eq!(t, "503 5.5.1 Send HELO or EHLO first\r\n250 2.0.0 OK\r\n");
}

#[test]
fn bdat_unreadable_size_closes() {
    for (line, reply) in [
        (
            &b"BDAT 99999999999999999999999 LAST\r\n"[..],
            "501 5.5.4 Chunk size too large; closing connection\r\n(close)\n",
        ),
        (
            b"BDAT 18446744073709551616\r\n",
            "501 5.5.4 Chunk size too large; closing connection\r\n(close)\n",
        ),
        (
            b"BDAT\r\n",
            "501 5.5.4 Syntax: BDAT <size> [LAST]; closing connection\r\n(close)\n",
        ),
        (
            b"BDAT -1\r\n",
            "501 5.5.4 Syntax: BDAT <size> [LAST]; closing connection\r\n(close)\n",
        ),
        (
            b"BDAT 5 LAST now\r\n",
            "501 5.5.4 Syntax: BDAT <size> [LAST]; closing connection\r\n(close)\n",
        ),
        (
            b"BDAT 5 FIRST\r\n",
            "501 5.5.4 Syntax: BDAT <size> [LAST]; closing connection\r\n(close)\n",
        ),
    ] {
        let mut rest = line.to_vec();
        rest.extend_from_slice(b"RSET\r\nNOOP\r\n");
        assert_eq!(bdat_transcript(&config(), &rest), reply);
    }
}

#[test]
fn bdat_too_big_is_consumed_then_refused_at_last() {
    let cfg = ServerConfig {
        max_message_size: 10,
        ..config()
    };
    let t = bdat_transcript(&cfg, b"BDAT 8\r\n01234567BDAT 8 LAST\r\n89abcdefNOOP\r\n");
    assert_eq!(
        t,
        "250 2.0.0 8 octets received\r\n\
         552 5.3.4 Message size exceeds fixed maximum message size\r\n\
         250 2.0.0 OK\r\n"
    );
    // A single chunk declared beyond the limit: consumed, refused at LAST.
    let mut rest = b"BDAT 5000 LAST\r\n".to_vec();
    rest.extend_from_slice(&[b'z'; 5000]);
    rest.extend_from_slice(b"NOOP\r\n");
    assert_eq!(
        bdat_transcript(&cfg, &rest),
        "552 5.3.4 Message size exceeds fixed maximum message size\r\n250 2.0.0 OK\r\n"
    );
}

#[test]
fn bdat_huge_declared_chunk_keeps_memory_bounded() {
    let mut s = ServerSession::new(config());
    s.receive(TX);
    s.receive(b"BDAT 18446744073709551615 LAST\r\n");
    loop {
        match s.step() {
            Step::Ask(q) => s.answer(accept(&q)),
            Step::Write(_) => {}
            Step::NeedInput => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(s.in_data());
    let piece = vec![b'x'; 64 * 1024];
    for _ in 0..(32 * 16) {
        // 32 MiB: three times the size limit; nothing is held.
        s.receive(&piece);
        assert!(matches!(s.step(), Step::NeedInput));
        assert_eq!(s.buffered(), 0);
    }
    assert!(s.in_data());
}

#[test]
fn bdat_bare_line_ends_follow_the_data_policy() {
    // Reject: refused at LAST, the stream stays in sync.
    let t = bdat_transcript(&config(), b"BDAT 3\r\na\nbBDAT 1 LAST\r\ncNOOP\r\n");
    assert_eq!(
        t,
        "250 2.0.0 3 octets received\r\n\
         550 5.6.0 Message refused: bare LF or bare CR in the message; lines must end with CRLF (RFC 5321 section 2.3.8)\r\n\
         250 2.0.0 OK\r\n"
    );
    // A CR ending one chunk and a LF starting the next are one CRLF.
    let t = bdat_transcript(&config(), b"BDAT 2\r\na\rBDAT 2 LAST\r\n\nb");
    assert!(t.contains("body=\"a\\r\\nb\""), "{t}");
    // A CR at the very end is bare.
    let t = bdat_transcript(&config(), b"BDAT 2 LAST\r\na\r");
    assert!(t.starts_with("550 5.6.0 "), "{t}");
    // Normalise: stored as CRLF.
    let t = bdat_transcript(&normalising(), b"BDAT 6 LAST\r\na\nb\rc\n");
    assert!(t.contains("body=\"a\\r\\nb\\r\\nc\\r\\n\""), "{t}");
}

#[test]
fn bdat_reports_in_data_and_answers_end_transaction() {
    let policy = |q: &Query| match q {
        Query::Message(_) => Reply::new(451, "4.3.0", "Try again"),
        other => accept(other),
    };
    let t = transcript_with(
        &config(),
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\nBDAT 1 LAST\r\nxBDAT 1 LAST\r\ny",
        &policy,
    );
    assert!(
        t.ends_with("451 4.3.0 Try again\r\n503 5.5.1 Need MAIL command\r\n"),
        "{t}"
    );
}

// ---- DSN parameters (RFC 3461) ----

#[test]
fn golden_dsn_parameters() {
    let t = transcript(
        b"MAIL FROM:<a@example.org> RET=hdrs ENVID=QQ+2B314+3Dx\r\n\
          RCPT TO:<b@example.com> NOTIFY=success,Delay ORCPT=rfc822;b+2Bx+40example.com\r\n\
          RCPT TO:<c@example.com> notify=NEVER orcpt=RFC822;c@example.com\r\n\
          DATA\r\n.\r\n",
    );
    assert_eq!(
        t,
        "?MAIL <a@example.org> RET=HDRS ENVID=QQ+314=x\n250 2.1.0 Sender OK\r\n\
         ?RCPT <b@example.com> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;b+x@example.com\n\
         250 2.1.5 Recipient OK\r\n\
         ?RCPT <c@example.com> NOTIFY=NEVER ORCPT=RFC822;c@example.com\n\
         250 2.1.5 Recipient OK\r\n\
         354 2.0.0 End data with <CR><LF>.<CR><LF>\r\n\
         ?MESSAGE helo=\"\" from=<a@example.org> RET=HDRS ENVID=QQ+314=x \
         to=<b@example.com>,<c@example.com> body=\"\"\n\
         250 2.0.0 Queued\r\n"
    );
}

#[test]
fn envelope_keeps_decoded_rcpt_params() {
    let mut s = ServerSession::new(config());
    s.receive(b"MAIL FROM:<a@example.org> ENVID=x+2By\r\nRCPT TO:<b@example.com> ORCPT=rfc822;b+2B1@example.com\r\nBDAT 0 LAST\r\n");
    loop {
        match s.step() {
            Step::Ask(Query::Message(env)) => {
                assert_eq!(
                    env.mail_params,
                    vec![("ENVID".to_string(), Some("x+y".to_string()))]
                );
                assert_eq!(
                    env.recipients[0].1,
                    vec![(
                        "ORCPT".to_string(),
                        Some("rfc822;b+1@example.com".to_string())
                    )]
                );
                return;
            }
            Step::Ask(q) => s.answer(accept(&q)),
            Step::Write(_) => {}
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn dsn_parameter_errors() {
    let long_envid = format!("MAIL FROM:<a@example.org> ENVID={}\r\n", "e".repeat(101));
    let mut input = b"MAIL FROM:<a@example.org> RET=SOME\r\n\
          MAIL FROM:<a@example.org> RET\r\n\
          MAIL FROM:<a@example.org> RET=FULL ret=HDRS\r\n\
          MAIL FROM:<a@example.org> ENVID=a+ZZ\r\n\
          MAIL FROM:<a@example.org> ENVID=a+0D+0Ab\r\n\
          MAIL FROM:<a@example.org> ENVID=a+\r\n"
        .to_vec();
    input.extend_from_slice(long_envid.as_bytes());
    input.extend_from_slice(
        b"MAIL FROM:<a@example.org> ENVID=x\r\n\
          RCPT TO:<b@example.com> NOTIFY=NEVER,SUCCESS\r\n\
          RCPT TO:<b@example.com> NOTIFY=FAILURE,FAILURE\r\n\
          RCPT TO:<b@example.com> NOTIFY=SOMETIMES\r\n\
          RCPT TO:<b@example.com> NOTIFY\r\n\
          RCPT TO:<b@example.com> ORCPT=b@example.com\r\n\
          RCPT TO:<b@example.com> ORCPT=rfc822;\r\n\
          RCPT TO:<b@example.com> ORCPT=rfc822;b+00@example.com\r\n\
          RCPT TO:<b@example.com> ORCPT=rfc822;a ORCPT=rfc822;b\r\n\
          RCPT TO:<b@example.com> NOTIFY=DELAY\r\n",
    );
    let t = transcript(&input);
    let notify = "501 5.5.4 Syntax: NOTIFY=NEVER or NOTIFY=SUCCESS,FAILURE,DELAY (any of them)\r\n";
    let orcpt = "501 5.5.4 Syntax: ORCPT=<addr-type>;<xtext>\r\n";
    assert_eq!(
        t,
        [
            "501 5.5.4 Syntax: RET=FULL or RET=HDRS\r\n",
            "501 5.5.4 Syntax: RET=FULL or RET=HDRS\r\n",
            "501 5.5.4 Duplicate parameter RET\r\n",
            "501 5.5.4 Syntax: ENVID=<xtext>\r\n",
            "501 5.5.4 Syntax: ENVID=<xtext>\r\n",
            "501 5.5.4 Syntax: ENVID=<xtext>\r\n",
            "501 5.5.4 Syntax: ENVID=<xtext> (at most 100 characters)\r\n",
            "?MAIL <a@example.org> ENVID=x\n250 2.1.0 Sender OK\r\n",
            notify,
            notify,
            notify,
            notify,
            orcpt,
            orcpt,
            orcpt,
            "501 5.5.4 Duplicate parameter ORCPT\r\n",
            "?RCPT <b@example.com> NOTIFY=DELAY\n250 2.1.5 Recipient OK\r\n",
        ]
        .concat()
    );
}

// ---- SIZE (RFC 1870): declared size advisory, real size enforced ----

#[test]
fn size_declaration_never_panics_and_real_size_is_enforced() {
    let t = transcript(b"MAIL FROM:<a@example.org> SIZE=99999999999999999999999\r\n");
    assert_eq!(
        t,
        "552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    );
    let two_mib = vec![b'x'; 2 << 20];
    for (max, accepted) in [(10u64 << 20, true), (1 << 20, false)] {
        let cfg = ServerConfig {
            max_message_size: max,
            ..config()
        };
        // DATA.
        let mut input =
            b"MAIL FROM:<a@example.org> SIZE=10\r\nRCPT TO:<b@example.com>\r\nDATA\r\n".to_vec();
        input.extend_from_slice(&two_mib);
        input.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
        let t = transcript_with(&cfg, &input, &accept);
        assert_eq!(t.contains("?MESSAGE"), accepted);
        assert_eq!(t.contains("552 5.3.4"), !accepted);
        assert!(t.ends_with("250 2.0.0 OK\r\n"));
        // BDAT.
        let mut input = format!(
            "MAIL FROM:<a@example.org> SIZE=10\r\nRCPT TO:<b@example.com>\r\nBDAT {} LAST\r\n",
            two_mib.len()
        )
        .into_bytes();
        input.extend_from_slice(&two_mib);
        input.extend_from_slice(b"NOOP\r\n");
        let t = transcript_with(&cfg, &input, &accept);
        assert_eq!(t.contains("?MESSAGE"), accepted);
        assert_eq!(t.contains("552 5.3.4"), !accepted);
        assert!(t.ends_with("250 2.0.0 OK\r\n"));
    }
}
