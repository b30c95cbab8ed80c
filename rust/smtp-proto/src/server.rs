//! The server side of the SMTP dialog, sans I/O.
//!
//! Follows RFC 5321 (commands, sequencing, replies: sections 3, 4.1, 4.2, 4.3.2, 4.5.3),
//! RFC 1870 (SIZE), RFC 6152 (8BITMIME), RFC 2920 (PIPELINING), RFC 2034 and RFC 3463
//! (enhanced status codes), RFC 3207 (STARTTLS, protocol side), RFC 6531 (SMTPUTF8),
//! RFC 3030 (CHUNKING / BDAT) and RFC 3461 (DSN parameters; see `params`). EHLO
//! advertises an extension only when all of it works here.
//!
//! Driven by the binding crate (`sluice-native`), which owns the socket and the TLS
//! handshake: it feeds what the client sent with [`ServerSession::receive`], calls
//! [`ServerSession::step`] until it gets [`Step::NeedInput`], writes the bytes of each
//! [`Step::Write`], hands each [`Step::Ask`] to policy (Python) and returns the verdict
//! with [`ServerSession::answer`], and on [`Step::StartTls`] runs the handshake and calls
//! [`ServerSession::tls_started`]. The session never decides policy; it only owns the
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
//! to `max_message_size` only (see `data` and `bdat`); a BDAT chunk size is a count of
//! octets to consume, never an allocation.
//!
//! STARTTLS (RFC 3207): after the 220 the session drops every byte it already holds and
//! every byte `receive` gets until the binding calls [`ServerSession::tls_started`]: what a
//! client pipelined after STARTTLS was sent in the clear and must never run inside the TLS
//! session (CVE-2011-0411). STARTTLS inside a mail transaction is refused with 503 rather
//! than resetting the transaction silently: RFC 3207 section 4.2 discards all earlier
//! state anyway, and a client that sends it there has lost track of the dialog.
//!
//! BDAT (RFC 3030): a chunk is consumed by count whatever its fate, so the stream stays in
//! sync; a refused chunk (no transaction, no recipient) is answered after its octets. A
//! BDAT line whose size cannot be read (missing, not digits, beyond 64 bits) leaves no way
//! to know where the chunk ends, and reading its octets as commands would let a body run
//! commands: the session answers 501 5.5.4 and closes.

use std::fmt::Write as _;

use crate::address::{parse_path, AddressMode, Path};
use crate::bdat::BdatBody;
use crate::data::{DataDecoder, DataOutcome};
pub use crate::params::Params;
use crate::params::{check_mail_params, check_rcpt_params, parse_params, ParamError};
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
    /// Offer STARTTLS (RFC 3207); the binding must be able to carry out `Step::StartTls`.
    pub starttls: bool,
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
            starttls: false,
        }
    }
}

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
    /// Write everything already returned (the 220 to STARTTLS is in the last Write), then
    /// run the TLS handshake as server and call `tls_started()`. Until then the session
    /// drops whatever `receive()` gets and `step()` returns `NeedInput`. If the handshake
    /// fails, close the connection.
    StartTls,
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
    /// Counting off the octets of a BDAT chunk.
    Chunk(Chunk),
    /// The 220 to STARTTLS is out: input is dropped until `tls_started`.
    TlsPending,
    /// QUIT or 421: nothing more is read.
    Closed,
}

/// One BDAT chunk being read.
#[derive(Debug)]
struct Chunk {
    /// Declared size (for the reply).
    size: u64,
    /// Octets still to come.
    remaining: u64,
    last: bool,
    /// Why the chunk is refused (its octets are consumed and dropped), or None: stored.
    refusal: Option<&'static str>,
}

/// What an open Ask is about, with what `answer` needs to record on a 2xx.
#[derive(Debug)]
enum Awaiting {
    Mail {
        path: Path,
        params: Params,
        smtputf8: bool,
    },
    Rcpt {
        path: Path,
        params: Params,
    },
    Message,
}

/// The mail transaction (RFC 5321 section 3.3): reverse path, recipients.
#[derive(Debug, Default)]
struct Transaction {
    reverse_path: Option<Path>,
    mail_params: Params,
    recipients: Vec<(Path, Params)>,
    /// MAIL carried SMTPUTF8: UTF-8 allowed in the addresses of this transaction.
    smtputf8: bool,
    /// The body so far, once a BDAT chunk was accepted.
    bdat: Option<BdatBody>,
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
    /// At least one BDAT chunk accepted (RCPT, DATA and MAIL are out of sequence).
    Bdat,
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
    StartTls,
    Bdat,
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
        (b"BDAT", Verb::Bdat),
        (b"STARTTLS", Verb::StartTls),
        (b"AUTH", Verb::NotImplemented),
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
    /// `Step::StartTls` is due once the replies before it are out.
    starttls_due: bool,
    /// The query returned by `step` and not yet answered.
    awaiting: Option<Awaiting>,
    helo: Option<String>,
    esmtp: bool,
    /// The TLS handshake after STARTTLS (or an implicit-TLS listener) is done.
    tls: bool,
    tx: Transaction,
    bad_commands: u32,
    /// Precomputed replies that carry the hostname or the offered extensions.
    ehlo_reply: Vec<u8>,
    helo_reply: Vec<u8>,
    quit_reply: Vec<u8>,
    help_reply: Vec<u8>,
}

/// The EHLO reply: hostname, then one keyword per line (RFC 5321 section 4.1.1.1). Only
/// what works end to end is listed; STARTTLS only while it can still be used.
fn ehlo_reply(config: &ServerConfig, tls: bool) -> Vec<u8> {
    let mut text = format!(
        "{}\nPIPELINING\nSIZE {}\n8BITMIME\nENHANCEDSTATUSCODES\nSMTPUTF8\nDSN\nCHUNKING",
        config.hostname, config.max_message_size
    );
    if config.starttls && !tls {
        text.push_str("\nSTARTTLS");
    }
    Reply::new(250, "", &text).to_bytes()
}

fn help_reply(config: &ServerConfig, tls: bool) -> Vec<u8> {
    let starttls = if config.starttls && !tls {
        " STARTTLS"
    } else {
        ""
    };
    format!(
        "214-2.0.0 Sluice SMTP server\r\n\
         214-2.0.0 Commands: HELO EHLO{starttls} MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY EXPN HELP\r\n\
         214 2.0.0 See RFC 5321\r\n"
    )
    .into_bytes()
}

impl ServerSession {
    pub fn new(config: ServerConfig) -> Self {
        let host = &config.hostname;
        let ehlo_reply = ehlo_reply(&config, false);
        let help_reply = help_reply(&config, false);
        let helo_reply = Reply::new(250, "", host).to_bytes();
        let quit_reply = Reply::new(221, "2.0.0", &format!("{host} closing connection")).to_bytes();
        ServerSession {
            config,
            input: Vec::new(),
            start: 0,
            out: Vec::new(),
            phase: Phase::Command,
            staged: None,
            starttls_due: false,
            awaiting: None,
            helo: None,
            esmtp: false,
            tls: false,
            tx: Transaction::default(),
            bad_commands: 0,
            ehlo_reply,
            helo_reply,
            quit_reply,
            help_reply,
        }
    }

    /// `220 <hostname> ESMTP Sluice`. No enhanced code: RFC 2034 section 3 excludes the
    /// greeting.
    pub fn greeting(&self) -> Reply {
        Reply::new(220, "", &format!("{} ESMTP Sluice", self.config.hostname))
    }

    /// Appends client bytes (any split). After Close, and between STARTTLS and
    /// `tls_started`, they are dropped.
    pub fn receive(&mut self, bytes: &[u8]) {
        if matches!(self.phase, Phase::Closed | Phase::TlsPending) {
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
        if self.starttls_due {
            self.starttls_due = false;
            return Step::StartTls;
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
            Awaiting::Mail {
                path,
                params,
                smtputf8,
            } if accepted => {
                self.tx.reverse_path = Some(path);
                self.tx.mail_params = params;
                self.tx.smtputf8 = smtputf8;
            }
            Awaiting::Rcpt { path, params } if accepted => self.tx.recipients.push((path, params)),
            Awaiting::Message => self.tx = Transaction::default(),
            _ => {}
        }
        if reply.code == 421 {
            self.close();
        }
    }

    /// The TLS handshake is done: resets the session to its state right after the
    /// greeting (RFC 3207 section 4.2: no HELO/EHLO name, no transaction, no buffered
    /// input) and stops offering STARTTLS. The count of bad commands is kept. A binding
    /// that speaks TLS from the first byte (implicit TLS) calls it before any input.
    /// After Close it only records TLS.
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.ehlo_reply = ehlo_reply(&self.config, true);
        self.help_reply = help_reply(&self.config, true);
        if matches!(self.phase, Phase::Closed) {
            return;
        }
        self.phase = Phase::Command;
        self.input.clear();
        self.start = 0;
        self.staged = None;
        self.awaiting = None;
        self.starttls_due = false;
        self.helo = None;
        self.esmtp = false;
        self.tx = Transaction::default();
    }

    /// The session runs under TLS (`tls_started` was called).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Reading a message body, DATA or a BDAT chunk (the binding applies the DATA timeout).
    pub fn in_data(&self) -> bool {
        matches!(self.phase, Phase::Data(_) | Phase::Chunk(_))
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
        while self.staged.is_none() && !self.starttls_due && self.out.len() < COALESCE_LIMIT {
            let avail = buf.get(self.start..).unwrap_or_default();
            if let Phase::Chunk(Chunk { remaining: 0, .. }) = self.phase {
                // BDAT 0: complete without input.
                self.end_of_chunk();
                continue;
            }
            if avail.is_empty() {
                break;
            }
            match &mut self.phase {
                Phase::Closed | Phase::TlsPending => {
                    // Pipelined after STARTTLS, in the clear: never executed.
                    self.start = buf.len();
                }
                Phase::Chunk(chunk) => {
                    let n = usize::try_from(chunk.remaining)
                        .unwrap_or(usize::MAX)
                        .min(avail.len());
                    if chunk.refusal.is_none() {
                        if let Some(body) = self.tx.bdat.as_mut() {
                            body.feed(&avail[..n]);
                        }
                    }
                    // n <= remaining: the subtraction cannot underflow.
                    chunk.remaining -= n as u64;
                    self.start += n;
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
            // A bare CR anywhere, or a bare LF when it does not end a command line.
            self.bad(500, "5.5.2", "Bare CR or LF in command line");
            return;
        }
        let verb = verb_of(word);
        let state = self.tx_state();
        let need_helo = self.config.require_helo && self.helo.is_none();
        match (verb, state) {
            (Verb::Helo, _) => self.hello(arg, false),
            (Verb::Ehlo, _) => self.hello(arg, true),
            (Verb::Mail, _) if need_helo => self.bad(503, "5.5.1", "Send HELO or EHLO first"),
            (Verb::Mail, TxState::Idle) => self.mail(arg),
            (Verb::Mail, _) => self.bad(503, "5.5.1", "Nested MAIL command"),
            (Verb::Rcpt, TxState::Idle) => self.bad(503, "5.5.1", "Need MAIL before RCPT"),
            (Verb::Rcpt, TxState::Bdat) => self.bad(503, "5.5.1", "RCPT not allowed after BDAT"),
            (Verb::Rcpt, _) => self.rcpt(arg),
            (Verb::Data, TxState::Idle) => self.bad(503, "5.5.1", "Need MAIL command"),
            (Verb::Data, TxState::Mail) => self.bad(503, "5.5.1", "No valid recipients"),
            (Verb::Data, TxState::Rcpt) => self.data(arg),
            // RFC 3030 section 3: DATA and BDAT do not mix in one transaction.
            (Verb::Data, TxState::Bdat) => self.bad(
                503,
                "5.5.1",
                "DATA not allowed after BDAT; end with BDAT LAST or RSET",
            ),
            (Verb::Bdat, _) => self.bdat(arg, state, need_helo),
            (Verb::StartTls, _) if !self.config.starttls => {
                self.bad(502, "5.5.1", "Command not implemented")
            }
            (Verb::StartTls, _) if !arg.is_empty() => self.bad(501, "5.5.4", "Syntax: STARTTLS"),
            (Verb::StartTls, _) if self.tls => self.bad(503, "5.5.1", "TLS already active"),
            (Verb::StartTls, _) if need_helo => self.bad(503, "5.5.1", "Send EHLO first"),
            (Verb::StartTls, TxState::Idle) => {
                self.say(220, "2.0.0", "Ready to start TLS");
                self.phase = Phase::TlsPending;
                self.starttls_due = true;
            }
            (Verb::StartTls, _) => self.bad(
                503,
                "5.5.1",
                "STARTTLS not allowed in a mail transaction; send RSET first",
            ),
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
            (Verb::Help, _) => self.out.extend_from_slice(&self.help_reply),
            (Verb::NotImplemented, _) => self.bad(502, "5.5.1", "Command not implemented"),
            (Verb::Unknown, _) => self.bad(500, "5.5.2", "Command unrecognized"),
        }
    }

    fn tx_state(&self) -> TxState {
        match (&self.tx.reverse_path, self.tx.recipients.is_empty()) {
            (None, _) => TxState::Idle,
            (Some(_), true) => TxState::Mail,
            (Some(_), false) if self.tx.bdat.is_some() => TxState::Bdat,
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
    /// The path is parsed with UTF-8 allowed; a non-ASCII octet anywhere in it without
    /// the SMTPUTF8 parameter is refused with 553 5.6.7 (RFC 6531 section 3.5).
    fn mail(&mut self, arg: &[u8]) {
        let Some(rest) = strip_prefix_ci(arg, b"FROM:") else {
            return self.bad(501, "5.5.4", "Syntax: MAIL FROM:<address>");
        };
        let (path, params) = match parse_path(rest, self.config.address_mode, true) {
            Ok(p) => p,
            Err(e) => return self.bad_text(501, "5.1.7", &e.reason),
        };
        let path_octets = &rest[..rest.len() - params.len()];
        if let Path::Mailbox(m) = &path {
            if m.domain.is_none() {
                return self.bad(501, "5.1.7", "domain missing after the local part");
            }
        }
        let params = match parse_params(params)
            .and_then(|p| check_mail_params(p, self.config.max_message_size))
        {
            Ok(p) => p,
            Err(e) => return self.param_error(e),
        };
        let smtputf8 = params.iter().any(|(k, _)| k == "SMTPUTF8");
        if !smtputf8 && !path_octets.is_ascii() {
            return self.non_ascii_address();
        }
        let query = Query::Mail {
            reverse_path: path.clone(),
            params: params.clone(),
        };
        self.staged = Some((
            query,
            Awaiting::Mail {
                path,
                params,
                smtputf8,
            },
        ));
    }

    /// ```text
    /// rcpt = "RCPT TO:" ( "<Postmaster@" Domain ">" / "<Postmaster>" /
    ///        Forward-path ) [SP Rcpt-parameters] CRLF
    /// ```
    /// UTF-8 in the path only when the transaction's MAIL carried SMTPUTF8 (553 5.6.7).
    fn rcpt(&mut self, arg: &[u8]) {
        let Some(rest) = strip_prefix_ci(arg, b"TO:") else {
            return self.bad(501, "5.5.4", "Syntax: RCPT TO:<address>");
        };
        if self.tx.recipients.len() >= self.config.max_recipients {
            return self.say(452, "4.5.3", "Too many recipients");
        }
        let (path, params) = match parse_path(rest, self.config.address_mode, true) {
            Ok(p) => p,
            Err(e) => return self.bad_text(501, "5.1.3", &e.reason),
        };
        let path_octets = &rest[..rest.len() - params.len()];
        if path == Path::Null {
            return self.bad(501, "5.1.3", "the null path <> is not a recipient");
        }
        let params = match parse_params(params).and_then(check_rcpt_params) {
            Ok(p) => p,
            Err(e) => return self.param_error(e),
        };
        if !self.tx.smtputf8 && !path_octets.is_ascii() {
            return self.non_ascii_address();
        }
        let query = Query::Rcpt {
            forward_path: path.clone(),
            params: params.clone(),
        };
        self.staged = Some((query, Awaiting::Rcpt { path, params }));
    }

    fn non_ascii_address(&mut self) {
        self.bad(
            553,
            "5.6.7",
            "Non-ASCII address requires the SMTPUTF8 parameter on MAIL",
        );
    }

    fn param_error(&mut self, e: ParamError) {
        if e.code == 552 {
            // A size refusal is not a protocol error.
            self.say(e.code, e.enhanced, &e.text);
        } else {
            self.bad_text(e.code, e.enhanced, &e.text);
        }
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

    /// ```text
    /// bdat-cmd   = "BDAT" SP chunk-size [ SP end-marker ] CR LF
    /// chunk-size = 1*DIGIT
    /// end-marker = "LAST"
    /// ```
    /// RFC 3030 section 2. A valid size is always consumed, even when the chunk is
    /// refused; an unreadable size closes the session (see the module header).
    fn bdat(&mut self, arg: &[u8], state: TxState, need_helo: bool) {
        let mut words = arg
            .split(|&b| b == b' ' || b == b'\t')
            .filter(|w| !w.is_empty());
        let size = words.next().unwrap_or_default();
        let last = match (words.next(), words.next()) {
            (None, _) => false,
            (Some(w), None) if w.eq_ignore_ascii_case(b"LAST") => true,
            _ => return self.bdat_unsynced("Syntax: BDAT <size> [LAST]"),
        };
        if size.is_empty() || !size.iter().all(u8::is_ascii_digit) {
            return self.bdat_unsynced("Syntax: BDAT <size> [LAST]");
        }
        // All ASCII digits: the only failure left is overflow.
        let Some(size) = std::str::from_utf8(size)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return self.bdat_unsynced("Chunk size too large");
        };
        let refusal = match state {
            _ if need_helo => Some("Send HELO or EHLO first"),
            TxState::Idle => Some("Need MAIL command"),
            TxState::Mail => Some("No valid recipients"),
            TxState::Rcpt | TxState::Bdat => None,
        };
        if refusal.is_none() && self.tx.bdat.is_none() {
            let normalise = self.config.bare_linefeed == BareLinefeedPolicy::Normalise;
            self.tx.bdat = Some(BdatBody::new(self.config.max_message_size, normalise));
        }
        self.phase = Phase::Chunk(Chunk {
            size,
            remaining: size,
            last,
            refusal,
        });
    }

    /// A BDAT whose chunk end cannot be known: the stream cannot be trusted any more.
    fn bdat_unsynced(&mut self, text: &str) {
        let text = format!("{text}; closing connection");
        self.say(501, "5.5.4", &text);
        self.close();
    }

    /// The octets of a BDAT chunk are all in.
    fn end_of_chunk(&mut self) {
        let Phase::Chunk(chunk) = std::mem::replace(&mut self.phase, Phase::Command) else {
            return;
        };
        if let Some(why) = chunk.refusal {
            return self.bad(503, "5.5.1", why);
        }
        if !chunk.last {
            let text = format!("{} octets received", chunk.size);
            return self.say(250, "2.0.0", &text);
        }
        let Some(body) = self.tx.bdat.take() else {
            return;
        };
        self.end_of_message(body.finish());
    }

    /// The terminator was seen.
    fn end_of_data(&mut self) {
        let Phase::Data(decoder) = std::mem::replace(&mut self.phase, Phase::Command) else {
            return;
        };
        self.end_of_message(decoder.finish());
    }

    /// The whole body is in (DATA or BDAT LAST): refuse what the protocol refuses, ask
    /// policy otherwise. Either way the transaction is over.
    fn end_of_message(&mut self, outcome: DataOutcome) {
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
