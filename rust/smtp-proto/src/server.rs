//! The server side of the SMTP dialog, sans I/O.
//!
//! Follows RFC 5321 (commands, sequencing, replies: sections 3, 4.1, 4.2, 4.3.2, 4.5.3),
//! RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 2920 (PIPELINING), RFC 2034 and RFC 3463
//! (enhanced status codes). Driven by the binding crate (`sluice-native`), which owns the
//! socket: it feeds what the client sent with [`ServerSession::receive`], calls
//! [`ServerSession::step`] until it gets [`Step::NeedInput`], writes the bytes of each
//! [`Step::Write`], hands each [`Step::Ask`] to policy (Python) and returns the verdict
//! with [`ServerSession::answer`]. The session never decides policy; it only owns the
//! protocol: syntax, sequencing, limits, and the replies that follow from them.
//!
//! Pipelining (RFC 2920): replies come out strictly in command order. Commands that need
//! policy stop the processing of input until the answer arrives, so a reply to a later
//! command can never overtake the verdict on an earlier one, and the recipient count is
//! exact. Replies the session produces itself while it works through input that is
//! already buffered are coalesced into one `Write`. Because the machine works on a
//! buffer and keeps all partial state (partial lines, the DATA decoder), the same input
//! split at any byte yields the same transcript.
//!
//! Memory: a command line is buffered up to `max_line_length`; a longer one is answered
//! with 500 and discarded up to its line end without being stored. A body is stored up
//! to `max_message_size` only (see `data`).

use std::fmt::Write as _;

use crate::address::{parse_path, AddressMode, Path};
use crate::data::DataDecoder;
use crate::reply::Reply;

/// What to do with a bare LF or bare CR inside a message body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BareLinefeedPolicy {
    /// Refuse the message after the end of data with 550 5.6.0.
    Reject,
    /// Store each bare LF / bare CR as CRLF.
    Normalise,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Used in the greeting, the EHLO / HELO replies and the 221.
    pub hostname: String,
    /// Longest command line accepted, CRLF included.
    pub max_line_length: usize,
    /// Largest body accepted, in unstuffed octets; advertised with SIZE.
    pub max_message_size: u64,
    /// Accepted recipients per message; more get 452 4.5.3 (RFC 5321 section 4.5.3.1.10).
    pub max_recipients: usize,
    /// Require HELO / EHLO before MAIL (503 5.5.1 otherwise).
    pub require_helo: bool,
    /// A LF without CR ends a command line (inside DATA it never ends anything).
    pub bare_lf_ends_command: bool,
    /// Bare LF / bare CR inside a message body.
    pub bare_linefeed: BareLinefeedPolicy,
    pub address_mode: AddressMode,
    /// Syntax and sequencing errors tolerated; at this count: 421 4.7.0 and Close.
    /// 0 disables the limit.
    pub max_bad_commands: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hostname: "localhost".to_string(),
            max_line_length: 4096,
            max_message_size: 10 * 1024 * 1024,
            max_recipients: 1000,
            require_helo: false,
            bare_lf_ends_command: true,
            bare_linefeed: BareLinefeedPolicy::Reject,
            address_mode: AddressMode::Loose,
            max_bad_commands: 20,
        }
    }
}

/// ESMTP parameters: keyword (upper-cased) and optional value.
pub type Params = Vec<(String, Option<String>)>;

/// The envelope and body handed to policy when a message is complete.
#[derive(Clone, Debug)]
pub struct Envelope {
    pub helo: Option<String>,
    pub reverse_path: Path,
    pub mail_params: Params,
    pub recipients: Vec<(Path, Params)>,
    /// Unstuffed; lines end in CRLF (bare LF / CR normalised when the policy is Normalise).
    pub body: Vec<u8>,
}

/// A question for policy. The session waits (`step` returns `NeedInput`) until `answer`.
#[derive(Clone, Debug)]
pub enum Query {
    Mail { reverse_path: Path, params: Params },
    Rcpt { forward_path: Path, params: Params },
    Message(Envelope),
}

#[derive(Debug)]
pub enum Step {
    /// Reply bytes to send, in order.
    Write(Vec<u8>),
    /// Call `answer()` before `step()` returns anything else.
    Ask(Query),
    /// Write everything already returned, then close.
    Close,
    /// Feed more bytes with `receive()` (or, while an Ask is open, answer it).
    NeedInput,
}

/// Coalesced reply bytes are handed out once they reach this size, so a long pipelined
/// batch does not build one huge write.
const COALESCE_LIMIT: usize = 64 * 1024;

/// Where the byte stream is.
#[derive(Debug)]
enum Phase {
    /// Reading command lines.
    Command,
    /// Dropping the rest of an over-long command line up to its line end.
    Discard { after_cr: bool },
    /// Reading a message body.
    Data(DataDecoder),
    /// QUIT or 421: nothing more is read.
    Closed,
}

/// What an open Ask is about, with what `answer` needs to record on a 2xx.
#[derive(Debug)]
enum Awaiting {
    Mail { path: Path, params: Params },
    Rcpt { path: Path, params: Params },
    Message,
}

/// The mail transaction (RFC 5321 section 3.3): reverse path, recipients.
#[derive(Debug, Default)]
struct Transaction {
    reverse_path: Option<Path>,
    mail_params: Params,
    recipients: Vec<(Path, Params)>,
}

/// Transaction state, the second key of the command table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TxState {
    /// No MAIL accepted.
    Idle,
    /// MAIL accepted, no recipient yet.
    Mail,
    /// At least one recipient accepted.
    Rcpt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verb {
    Helo,
    Ehlo,
    Mail,
    Rcpt,
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Expn,
    Help,
    /// Known SMTP commands this server does not offer (yet): 502.
    NotImplemented,
    Unknown,
}

fn verb_of(word: &[u8]) -> Verb {
    const TABLE: &[(&[u8], Verb)] = &[
        (b"MAIL", Verb::Mail),
        (b"RCPT", Verb::Rcpt),
        (b"DATA", Verb::Data),
        (b"EHLO", Verb::Ehlo),
        (b"HELO", Verb::Helo),
        (b"RSET", Verb::Rset),
        (b"NOOP", Verb::Noop),
        (b"QUIT", Verb::Quit),
        (b"VRFY", Verb::Vrfy),
        (b"EXPN", Verb::Expn),
        (b"HELP", Verb::Help),
        (b"STARTTLS", Verb::NotImplemented),
        (b"AUTH", Verb::NotImplemented),
        (b"BDAT", Verb::NotImplemented),
        (b"ETRN", Verb::NotImplemented),
        (b"TURN", Verb::NotImplemented),
        (b"ATRN", Verb::NotImplemented),
        (b"SEND", Verb::NotImplemented),
        (b"SOML", Verb::NotImplemented),
        (b"SAML", Verb::NotImplemented),
    ];
    TABLE
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(word))
        .map_or(Verb::Unknown, |&(_, v)| v)
}

pub struct ServerSession {
    config: ServerConfig,
    /// Client bytes not yet consumed start at `input[start]`.
    input: Vec<u8>,
    start: usize,
    /// Reply bytes not yet handed out.
    out: Vec<u8>,
    phase: Phase,
    /// A query decided but not yet returned (replies before it go out first).
    staged: Option<(Query, Awaiting)>,
    /// The query returned by `step` and not yet answered.
    awaiting: Option<Awaiting>,
    helo: Option<String>,
    esmtp: bool,
    tx: Transaction,
    bad_commands: u32,
    /// Precomputed replies that carry the hostname.
    ehlo_reply: Vec<u8>,
    helo_reply: Vec<u8>,
    quit_reply: Vec<u8>,
}

impl ServerSession {
    pub fn new(config: ServerConfig) -> Self {
        let host = &config.hostname;
        let ehlo_reply = Reply::new(
            250,
            "",
            &format!(
                "{host}\nPIPELINING\nSIZE {}\n8BITMIME\nENHANCEDSTATUSCODES",
                config.max_message_size
            ),
        )
        .to_bytes();
        let helo_reply = Reply::new(250, "", host).to_bytes();
        let quit_reply = Reply::new(221, "2.0.0", &format!("{host} closing connection")).to_bytes();
        ServerSession {
            config,
            input: Vec::new(),
            start: 0,
            out: Vec::new(),
            phase: Phase::Command,
            staged: None,
            awaiting: None,
            helo: None,
            esmtp: false,
            tx: Transaction::default(),
            bad_commands: 0,
            ehlo_reply,
            helo_reply,
            quit_reply,
        }
    }

    /// 220 <hostname> ESMTP Sluice. No enhanced code: RFC 2034 section 3 excludes the
    /// greeting.
    pub fn greeting(&self) -> Reply {
        Reply::new(220, "", &format!("{} ESMTP Sluice", self.config.hostname))
    }

    /// Appends client bytes (any split). After Close they are dropped.
    pub fn receive(&mut self, bytes: &[u8]) {
        if matches!(self.phase, Phase::Closed) {
            return;
        }
        self.input.extend_from_slice(bytes);
    }

    /// The next thing to do. While an Ask is unanswered this is `NeedInput` and no input
    /// is consumed.
    pub fn step(&mut self) -> Step {
        if self.awaiting.is_some() {
            return Step::NeedInput;
        }
        if self.staged.is_none() {
            self.process();
        }
        if !self.out.is_empty() {
            return Step::Write(std::mem::take(&mut self.out));
        }
        if let Some((query, awaiting)) = self.staged.take() {
            self.awaiting = Some(awaiting);
            return Step::Ask(query);
        }
        if matches!(self.phase, Phase::Closed) {
            return Step::Close;
        }
        Step::NeedInput
    }

    /// The verdict for the last Ask, written as given. A 2xx to MAIL records the reverse
    /// path, a 2xx to RCPT the recipient; the transaction ends with any answer to the
    /// message. A 421 closes the session (RFC 5321 section 3.8). An answer with no open
    /// Ask is ignored.
    pub fn answer(&mut self, reply: Reply) {
        let Some(awaiting) = self.awaiting.take() else {
            return;
        };
        let accepted = (200..300).contains(&reply.code);
        self.out.extend_from_slice(&reply.to_bytes());
        match awaiting {
            Awaiting::Mail { path, params } if accepted => {
                self.tx.reverse_path = Some(path);
                self.tx.mail_params = params;
            }
            Awaiting::Rcpt { path, params } if accepted => self.tx.recipients.push((path, params)),
            Awaiting::Message => self.tx = Transaction::default(),
            _ => {}
        }
        if reply.code == 421 {
            self.close();
        }
    }

    /// Reading a message body (the binding applies the DATA timeout).
    pub fn in_data(&self) -> bool {
        matches!(self.phase, Phase::Data(_))
    }

    /// Input bytes held. Bounded by `max_line_length` plus one read, except while an Ask
    /// is open: then nothing is consumed, so the binding should not read on.
    pub fn buffered(&self) -> usize {
        self.input.len() - self.start
    }

    /// The HELO / EHLO name given so far.
    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// The client greeted with EHLO.
    pub fn esmtp(&self) -> bool {
        self.esmtp
    }

    /// The accepted reverse path of the open transaction.
    pub fn reverse_path(&self) -> Option<&Path> {
        self.tx.reverse_path.as_ref()
    }

    /// Works through buffered input until it runs out, a query is staged, the session
    /// closes, or enough reply bytes are waiting.
    fn process(&mut self) {
        // Take the buffer out so lines can be borrowed from it while `self` changes.
        let buf = std::mem::take(&mut self.input);
        while self.staged.is_none() && self.out.len() < COALESCE_LIMIT {
            let avail = buf.get(self.start..).unwrap_or_default();
            if avail.is_empty() {
                break;
            }
            match &mut self.phase {
                Phase::Closed => {
                    self.start = buf.len();
                }
                Phase::Data(decoder) => match decoder.feed(avail) {
                    None => self.start = buf.len(),
                    Some(n) => {
                        self.start += n;
                        self.end_of_data();
                    }
                },
                Phase::Discard { after_cr } => {
                    match find_line_end(avail, self.config.bare_lf_ends_command, *after_cr) {
                        Some(end) => {
                            self.start += end;
                            self.phase = Phase::Command;
                        }
                        None => {
                            *after_cr = avail.last() == Some(&b'\r');
                            self.start = buf.len();
                        }
                    }
                }
                Phase::Command => {
                    let max = self.config.max_line_length;
                    match find_line_end(avail, self.config.bare_lf_ends_command, false) {
                        Some(end) if end > max => {
                            self.start += end;
                            self.line_too_long();
                        }
                        Some(end) => {
                            self.start += end;
                            self.command(strip_line_end(&avail[..end]));
                        }
                        None if avail.len() >= max => {
                            // Even the line end would not fit: answer now, drop the rest.
                            self.phase = Phase::Discard {
                                after_cr: avail.last() == Some(&b'\r'),
                            };
                            self.start = buf.len();
                            self.line_too_long();
                        }
                        None => break,
                    }
                }
            }
        }
        self.input = buf;
        // Compact only when the consumed prefix is at least half the buffer, so a long
        // pipelined batch answered one Ask at a time is not moved once per command.
        if self.start == self.input.len() {
            self.input.clear();
            self.start = 0;
        } else if self.start > 0 && self.start >= self.input.len() / 2 {
            self.input.drain(..self.start);
            self.start = 0;
        }
    }

    fn line_too_long(&mut self) {
        self.bad(500, "5.5.2", "Line too long");
    }

    /// One command line, line end removed. The table: (verb, transaction state).
    fn command(&mut self, line: &[u8]) {
        let line = trim_end_wsp(line);
        let (word, arg) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], trim_start_wsp(&line[i + 1..])),
            None => (line, &line[line.len()..]),
        };
        if line.contains(&b'\n') || line.contains(&b'\r') {
            // Only possible when bare LF does not end a command line.
            self.bad(500, "5.5.2", "Bare CR or LF in command line");
            return;
        }
        let verb = verb_of(word);
        let state = self.tx_state();
        match (verb, state) {
            (Verb::Helo, _) => self.hello(arg, false),
            (Verb::Ehlo, _) => self.hello(arg, true),
            (Verb::Mail, _) if self.config.require_helo && self.helo.is_none() => {
                self.bad(503, "5.5.1", "Send HELO or EHLO first")
            }
            (Verb::Mail, TxState::Idle) => self.mail(arg),
            (Verb::Mail, _) => self.bad(503, "5.5.1", "Nested MAIL command"),
            (Verb::Rcpt, TxState::Idle) => self.bad(503, "5.5.1", "Need MAIL before RCPT"),
            (Verb::Rcpt, _) => self.rcpt(arg),
            (Verb::Data, TxState::Idle) => self.bad(503, "5.5.1", "Need MAIL command"),
            (Verb::Data, TxState::Mail) => self.bad(503, "5.5.1", "No valid recipients"),
            (Verb::Data, TxState::Rcpt) => self.data(arg),
            (Verb::Rset, _) if !arg.is_empty() => self.bad(501, "5.5.4", "Syntax: RSET"),
            (Verb::Rset, _) => {
                self.tx = Transaction::default();
                self.say(250, "2.0.0", "OK");
            }
            (Verb::Noop, _) => self.say(250, "2.0.0", "OK"),
            (Verb::Quit, _) => {
                self.out.extend_from_slice(&self.quit_reply);
                self.close();
            }
            (Verb::Vrfy, _) | (Verb::Expn, _) if arg.is_empty() => {
                self.bad(501, "5.5.4", "Argument required")
            }
            (Verb::Vrfy, _) => self.say(
                252,
                "2.5.0",
                "Cannot VRFY user, but will accept message and attempt delivery",
            ),
            (Verb::Expn, _) => self.say(
                252,
                "2.5.0",
                "Cannot EXPN list, but will accept message and attempt delivery",
            ),
            (Verb::Help, _) => self.out.extend_from_slice(
                b"214-2.0.0 Sluice SMTP server\r\n\
                  214-2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP QUIT VRFY EXPN HELP\r\n\
                  214 2.0.0 See RFC 5321\r\n",
            ),
            (Verb::NotImplemented, _) => self.bad(502, "5.5.1", "Command not implemented"),
            (Verb::Unknown, _) => self.bad(500, "5.5.2", "Command unrecognized"),
        }
    }

    fn tx_state(&self) -> TxState {
        match (&self.tx.reverse_path, self.tx.recipients.is_empty()) {
            (None, _) => TxState::Idle,
            (Some(_), true) => TxState::Mail,
            (Some(_), false) => TxState::Rcpt,
        }
    }

    /// ```text
    /// ehlo = "EHLO" SP ( Domain / address-literal ) CRLF
    /// helo = "HELO" SP Domain CRLF
    /// ```
    /// The name is not checked against the grammar (clients send all sorts; policy may
    /// look at it), only for being printable ASCII. Replies carry no enhanced code (RFC
    /// 2034 section 3), and EHLO's lines must stay bare keywords for the client to parse.
    fn hello(&mut self, arg: &[u8], esmtp: bool) {
        if arg.is_empty() || !arg.iter().all(|&b| (0x20..0x7f).contains(&b)) {
            let text = if esmtp {
                "501 Syntax: EHLO hostname\r\n"
            } else {
                "501 Syntax: HELO hostname\r\n"
            };
            self.out.extend_from_slice(text.as_bytes());
            self.count_bad();
            return;
        }
        // A new greeting resets the transaction (RFC 5321 section 4.1.4).
        self.tx = Transaction::default();
        self.helo = Some(String::from_utf8_lossy(arg).into_owned());
        self.esmtp = esmtp;
        let reply = if esmtp {
            &self.ehlo_reply
        } else {
            &self.helo_reply
        };
        self.out.extend_from_slice(reply);
    }

    /// ```text
    /// mail = "MAIL FROM:" Reverse-path [SP Mail-parameters] CRLF
    /// ```
    fn mail(&mut self, arg: &[u8]) {
        let Some(rest) = strip_prefix_ci(arg, b"FROM:") else {
            return self.bad(501, "5.5.4", "Syntax: MAIL FROM:<address>");
        };
        let (path, params) = match parse_path(rest, self.config.address_mode, false) {
            Ok(p) => p,
            Err(e) => return self.bad_text(501, "5.1.7", &e.reason),
        };
        if let Path::Mailbox(m) = &path {
            if m.domain.is_none() {
                return self.bad(501, "5.1.7", "domain missing after the local part");
            }
        }
        let params = match parse_params(params) {
            Ok(p) => p,
            Err(reason) => return self.bad_text(501, "5.5.4", &reason),
        };
        for (key, value) in &params {
            match (key.as_str(), value.as_deref()) {
                ("SIZE", Some(v)) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                    // A number too large for u64 is certainly too large for us.
                    let too_big = v
                        .parse::<u64>()
                        .map_or(true, |n| n > self.config.max_message_size);
                    if too_big {
                        return self.say(
                            552,
                            "5.3.4",
                            "Message size exceeds fixed maximum message size",
                        );
                    }
                }
                ("SIZE", _) => return self.bad(501, "5.5.4", "Syntax: SIZE=<number>"),
                ("BODY", Some(v))
                    if v.eq_ignore_ascii_case("7BIT") || v.eq_ignore_ascii_case("8BITMIME") => {}
                ("BODY", _) => return self.bad(501, "5.5.4", "Syntax: BODY=7BIT or BODY=8BITMIME"),
                _ => {
                    let text = format!("Unsupported MAIL parameter {key}");
                    return self.bad_text(555, "5.5.4", &text);
                }
            }
        }
        let query = Query::Mail {
            reverse_path: path.clone(),
            params: params.clone(),
        };
        self.staged = Some((query, Awaiting::Mail { path, params }));
    }

    /// ```text
    /// rcpt = "RCPT TO:" ( "<Postmaster@" Domain ">" / "<Postmaster>" /
    ///        Forward-path ) [SP Rcpt-parameters] CRLF
    /// ```
    fn rcpt(&mut self, arg: &[u8]) {
        let Some(rest) = strip_prefix_ci(arg, b"TO:") else {
            return self.bad(501, "5.5.4", "Syntax: RCPT TO:<address>");
        };
        if self.tx.recipients.len() >= self.config.max_recipients {
            return self.say(452, "4.5.3", "Too many recipients");
        }
        let (path, params) = match parse_path(rest, self.config.address_mode, false) {
            Ok(p) => p,
            Err(e) => return self.bad_text(501, "5.1.3", &e.reason),
        };
        if path == Path::Null {
            return self.bad(501, "5.1.3", "the null path <> is not a recipient");
        }
        let params = match parse_params(params) {
            Ok(p) => p,
            Err(reason) => return self.bad_text(501, "5.5.4", &reason),
        };
        if let Some((key, _)) = params.first() {
            let text = format!("Unsupported RCPT parameter {key}");
            return self.bad_text(555, "5.5.4", &text);
        }
        let query = Query::Rcpt {
            forward_path: path.clone(),
            params: params.clone(),
        };
        self.staged = Some((query, Awaiting::Rcpt { path, params }));
    }

    /// ```text
    /// data = "DATA" CRLF
    /// ```
    fn data(&mut self, arg: &[u8]) {
        if !arg.is_empty() {
            return self.bad(501, "5.5.4", "Syntax: DATA");
        }
        self.say(354, "2.0.0", "End data with <CR><LF>.<CR><LF>");
        let normalise = self.config.bare_linefeed == BareLinefeedPolicy::Normalise;
        self.phase = Phase::Data(DataDecoder::new(self.config.max_message_size, normalise));
    }

    /// The terminator was seen: refuse what the protocol refuses, ask policy otherwise.
    fn end_of_data(&mut self) {
        let Phase::Data(decoder) = std::mem::replace(&mut self.phase, Phase::Command) else {
            return;
        };
        let outcome = decoder.finish();
        let tx = std::mem::take(&mut self.tx);
        if outcome.too_big {
            self.say(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            );
            return;
        }
        if (outcome.bare_lf || outcome.bare_cr)
            && self.config.bare_linefeed == BareLinefeedPolicy::Reject
        {
            self.say(
                550,
                "5.6.0",
                "Message refused: bare LF or bare CR in the message; lines must end with CRLF (RFC 5321 section 2.3.8)",
            );
            return;
        }
        let envelope = Envelope {
            helo: self.helo.clone(),
            reverse_path: tx.reverse_path.unwrap_or(Path::Null),
            mail_params: tx.mail_params,
            recipients: tx.recipients,
            body: outcome.body,
        };
        self.staged = Some((Query::Message(envelope), Awaiting::Message));
    }

    /// Nothing more is read; what is buffered is dropped by the next `process`.
    fn close(&mut self) {
        self.phase = Phase::Closed;
    }

    /// A reply with fixed text (no line ends in it).
    fn say(&mut self, code: u16, enhanced: &str, text: &str) {
        let mut line = String::with_capacity(text.len() + 12);
        let _ = write!(line, "{code} {enhanced} {text}\r\n");
        self.out.extend_from_slice(line.as_bytes());
    }

    /// A syntax or sequencing error: counts towards `max_bad_commands`.
    fn bad(&mut self, code: u16, enhanced: &str, text: &str) {
        self.say(code, enhanced, text);
        self.count_bad();
    }

    /// Like `bad`, for text built from peer input: goes through `Reply` for sanitising.
    fn bad_text(&mut self, code: u16, enhanced: &str, text: &str) {
        self.out
            .extend_from_slice(&Reply::new(code, enhanced, text).to_bytes());
        self.count_bad();
    }

    fn count_bad(&mut self) {
        self.bad_commands = self.bad_commands.saturating_add(1);
        let max = self.config.max_bad_commands;
        if max > 0 && self.bad_commands >= max {
            self.say(421, "4.7.0", "Too many errors, closing connection");
            self.close();
        }
    }
}

/// Index just past the line end in `s`, if there is one. `after_cr`: the byte before `s`
/// was a CR (only matters when a line must end in CRLF).
fn find_line_end(s: &[u8], bare_lf_ends: bool, after_cr: bool) -> Option<usize> {
    let mut from = 0;
    loop {
        let lf = from + s.get(from..)?.iter().position(|&b| b == b'\n')?;
        let crlf = if lf == 0 {
            after_cr
        } else {
            s.get(lf - 1) == Some(&b'\r')
        };
        if bare_lf_ends || crlf {
            return Some(lf + 1);
        }
        from = lf + 1;
    }
}

fn strip_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim_start_wsp(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    &s[n..]
}

fn trim_end_wsp(s: &[u8]) -> &[u8] {
    let n = s
        .iter()
        .rev()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    &s[..s.len() - n]
}

fn strip_prefix_ci<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// ```text
/// Mail-parameters = esmtp-param *(SP esmtp-param)
/// esmtp-param     = esmtp-keyword ["=" esmtp-value]
/// esmtp-keyword   = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
/// esmtp-value     = 1*(%d33-60 / %d62-126)
/// ```
/// Keywords are upper-cased (they are case-insensitive); a keyword given twice is an
/// error. Runs of white space between parameters are tolerated.
fn parse_params(rest: &[u8]) -> Result<Params, String> {
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
            return Err("Syntax error in parameters".to_string());
        }
        let value_ok = value.is_none_or(|v| {
            !v.is_empty() && v.iter().all(|&b| (33..=126).contains(&b) && b != b'=')
        });
        if !value_ok {
            return Err("Syntax error in parameter value".to_string());
        }
        // Both checked to be printable ASCII above.
        let key = String::from_utf8_lossy(key).to_ascii_uppercase();
        if params.iter().any(|(k, _)| *k == key) {
            return Err(format!("Duplicate parameter {key}"));
        }
        let value = value.map(|v| String::from_utf8_lossy(v).into_owned());
        params.push((key, value));
    }
    Ok(params)
}
