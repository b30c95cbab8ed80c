//! Inbound socket I/O: listeners, connection limits, one task per SMTP session, STARTTLS,
//! timeouts.
//!
//! Runs on a small fixed pool of tokio threads with no GIL. Each session task feeds the
//! bytes it reads into `smtp_proto::ServerSession` and carries out the steps it returns:
//! write reply bytes, put a policy question to Python over the bridge, switch to TLS
//! (RFC 3207), or close. The state machine decides everything about the dialog; this
//! module only moves bytes, keeps time and counts connections.
//!
//! Timeouts (RFC 5321 section 4.5.3.2), per listener:
//! - `command_timeout` bounds each wait for client bytes between commands and each write
//!   of our replies; `data_timeout` bounds each wait for bytes of a message body. Both are
//!   idle timeouts per read, as the RFC defines them, not a bound on a whole command line
//!   or message: a client sending one byte just inside the timeout keeps its session
//!   alive. That costs only its own task, its own socket and buffers bounded by
//!   `max_line_length` / `max_message_size` (no thread, no lock is held while waiting),
//!   and `max_connections_per_ip` bounds how many such sessions one address can hold.
//! - A client that never reads our replies fills its socket buffer; the write then waits,
//!   bounded by `command_timeout`, and the session closes. Writes are async, so no I/O
//!   thread is ever blocked by one peer.
//! - The TLS handshake as a whole is bounded by `command_timeout`.
//!
//! Limits, per listener: `max_connections` sessions in all and `max_connections_per_ip`
//! from one address; a connection beyond either gets 421 4.7.0 and is closed before it
//! is greeted or Python is asked about it. The per-address count is a map behind a mutex
//! (O(1) per connect; an address leaves the map when its count drops to zero).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use smtp_proto::trace::{received_header, TraceInfo};
use smtp_proto::{Envelope, Query, Reply, ServerConfig, ServerSession, Step};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::bridge::{lock, Bridge, ConnectionFacts, Question};
use crate::stamp;

/// Everything a listener needs, fixed at start-up.
pub struct ListenerSettings {
    pub name: String,
    pub protocol: ServerConfig,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Present when STARTTLS is offered (`protocol.starttls`).
    pub tls: Option<TlsAcceptor>,
}

/// Shared by all sessions of the server.
pub struct Shared {
    pub bridge: Bridge,
    pub active: AtomicUsize,
    pub next_session: std::sync::atomic::AtomicU64,
    /// Flips to true when the server stops accepting connections.
    pub stop_accepting: watch::Sender<bool>,
    /// Flips to true when every session must end (421 to idle clients).
    pub shutdown: watch::Sender<bool>,
}

const READ_CHUNK: usize = 64 * 1024;

/// Sessions of one listener, in all and per client address.
struct Occupancy {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Why a connection was refused before its greeting.
enum Refusal {
    Listener,
    Address,
}

/// A claimed place in the listener's limits; dropping it gives the place back.
struct Slot {
    occupancy: Arc<Occupancy>,
    ip: IpAddr,
}

impl Occupancy {
    fn claim(self: &Arc<Self>, ip: IpAddr, settings: &ListenerSettings) -> Result<Slot, Refusal> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= settings.max_connections {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Listener);
        }
        {
            let mut per_ip = lock(&self.per_ip);
            let count = per_ip.entry(ip).or_insert(0);
            if *count >= settings.max_connections_per_ip {
                if *count == 0 {
                    per_ip.remove(&ip);
                }
                drop(per_ip);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::Address);
            }
            *count += 1;
        }
        Ok(Slot {
            occupancy: Arc::clone(self),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        {
            let mut per_ip = lock(&self.occupancy.per_ip);
            if let Some(count) = per_ip.get_mut(&self.ip) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    per_ip.remove(&self.ip);
                }
            }
        }
        self.occupancy.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accept connections until told to stop accepting.
pub async fn accept_loop(
    listener: TcpListener,
    settings: Arc<ListenerSettings>,
    shared: Arc<Shared>,
) {
    let mut stop = shared.stop_accepting.subscribe();
    let occupancy = Arc::new(Occupancy {
        total: AtomicUsize::new(0),
        per_ip: Mutex::new(HashMap::new()),
    });
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            // EMFILE and friends: back off briefly instead of spinning.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let settings = Arc::clone(&settings);
        let shared = Arc::clone(&shared);
        // Claimed here, on the accept task, so the limits are exact in accept order.
        let slot = occupancy.claim(canonical_ip(peer.ip()), &settings);
        shared.active.fetch_add(1, Ordering::AcqRel);
        tokio::spawn(async move {
            match slot {
                Ok(slot) => {
                    Session::new(stream, peer, Arc::clone(&settings), Arc::clone(&shared))
                        .run()
                        .await;
                    drop(slot);
                }
                Err(refusal) => refuse(stream, &settings.protocol.hostname, refusal).await,
            }
            shared.active.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

async fn refuse(mut stream: TcpStream, hostname: &str, refusal: Refusal) {
    let text = match refusal {
        Refusal::Listener => format!("{hostname} too many connections, try again later"),
        Refusal::Address => {
            format!("{hostname} too many connections from your address, try again later")
        }
    };
    let reply = Reply::new(421, "4.7.0", &text);
    // Bounded: a refused client that never reads must not hold even this task for long.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(&reply.to_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// The address limits count: an IPv4 client on a dual-stack socket counts as its IPv4.
fn canonical_ip(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Render an address so IPv4 clients on a dual-stack socket show as plain IPv4.
fn plain_ip(addr: IpAddr) -> String {
    canonical_ip(addr).to_string()
}

/// The session's byte stream: plain TCP until STARTTLS, TLS over the same TCP after.
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while the TCP stream is lent to the TLS handshake; a failed handshake
    /// leaves it here, and every use fails.
    Detached,
}

fn detached() -> std::io::Error {
    std::io::ErrorKind::NotConnected.into()
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::Detached => Poll::Ready(Ok(())),
        }
    }
}

struct Session {
    stream: Conn,
    settings: Arc<ListenerSettings>,
    shared: Arc<Shared>,
    facts: ConnectionFacts,
    machine: ServerSession,
    out: Vec<u8>,
    /// The reverse path of the open transaction, for RCPT questions.
    sender: String,
}

/// Why a session ended early.
enum End {
    /// The peer closed or the socket failed: nothing more can be written.
    Gone,
    /// We want to say goodbye with this reply, then close.
    Goodbye(Reply),
}

impl Session {
    fn new(
        stream: TcpStream,
        peer: SocketAddr,
        settings: Arc<ListenerSettings>,
        shared: Arc<Shared>,
    ) -> Self {
        let local = stream.local_addr().unwrap_or(peer);
        let facts = ConnectionFacts {
            session: shared.next_session.fetch_add(1, Ordering::Relaxed),
            listener: settings.name.clone(),
            peer_ip: plain_ip(peer.ip()),
            peer_port: peer.port(),
            local_ip: plain_ip(local.ip()),
            local_port: local.port(),
            tls: None,
        };
        let machine = ServerSession::new(settings.protocol.clone());
        Session {
            stream: Conn::Plain(stream),
            settings,
            shared,
            facts,
            machine,
            out: Vec::with_capacity(512),
            sender: String::new(),
        }
    }

    async fn run(mut self) {
        let end = self.dialog().await;
        if let End::Goodbye(reply) = end {
            self.out.extend_from_slice(&reply.to_bytes());
            let _ = self.flush().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.stream.shutdown()).await;
    }

    async fn dialog(&mut self) -> End {
        let mut shutdown = self.shared.shutdown.subscribe();
        let verdict = match self.ask(Question::Connect, &mut shutdown).await {
            Ok(v) => v,
            Err(end) => return end,
        };
        if verdict.code / 100 != 2 {
            return End::Goodbye(verdict);
        }
        self.out
            .extend_from_slice(&self.machine.greeting().to_bytes());
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            match self.machine.step() {
                Step::Write(bytes) => self.out.extend_from_slice(&bytes),
                Step::Ask(query) => {
                    let question = self.question_for(query);
                    let reply = match self.ask(question, &mut shutdown).await {
                        Ok(r) => r,
                        Err(end) => return end,
                    };
                    self.machine.answer(reply);
                }
                Step::Close => {
                    let _ = self.flush().await;
                    return End::Gone;
                }
                Step::StartTls => {
                    // The 220 goes out in plain text, before the handshake.
                    if self.flush().await.is_err() {
                        return End::Gone;
                    }
                    if let Err(end) = self.start_tls(&mut shutdown).await {
                        return end;
                    }
                }
                Step::NeedInput => {
                    if self.flush().await.is_err() {
                        return End::Gone;
                    }
                    let limit = if self.machine.in_data() {
                        self.settings.data_timeout
                    } else {
                        self.settings.command_timeout
                    };
                    let read = tokio::select! {
                        biased;
                        _ = shutdown.wait_for(|s| *s) => {
                            return End::Goodbye(Reply::new(421, "4.3.2", &format!(
                                "{} service shutting down, try again later",
                                self.settings.protocol.hostname)));
                        }
                        r = tokio::time::timeout(limit, self.stream.read(&mut buf)) => r,
                    };
                    match read {
                        Err(_elapsed) => {
                            // Anything the client sends after this is never read, so late
                            // bytes can never run as commands.
                            return End::Goodbye(Reply::new(
                                421,
                                "4.4.2",
                                &format!(
                                    "{} timeout exceeded, closing connection",
                                    self.settings.protocol.hostname
                                ),
                            ));
                        }
                        Ok(Ok(0)) | Ok(Err(_)) => return End::Gone,
                        Ok(Ok(n)) => self.machine.receive(&buf[..n]),
                    }
                }
            }
        }
    }

    /// Switch the session to TLS after the machine said `220 Ready to start TLS`.
    ///
    /// Command injection (CVE-2011-0411 and kin): plain-text bytes that followed the
    /// STARTTLS line must never run as commands inside the TLS session. The machine drops
    /// what it has buffered when it returns `StartTls`; this loop holds nothing of its
    /// own, because every read is handed to the machine whole before it steps. Plain
    /// bytes still in the kernel's socket buffer are read by the handshake as TLS
    /// records, which fails it and closes the connection. Only bytes decrypted from the
    /// TLS stream reach the machine afterwards.
    ///
    /// A failed or timed-out handshake closes the connection without a reply (the TLS
    /// state is unknown, so nothing can be said); Python is not asked anything more.
    async fn start_tls(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<(), End> {
        let acceptor = match (&self.settings.tls, &self.stream) {
            (Some(acceptor), Conn::Plain(_)) => acceptor.clone(),
            // The machine only offers STARTTLS when configured and not yet in TLS.
            _ => return Err(End::Gone),
        };
        let Conn::Plain(tcp) = std::mem::replace(&mut self.stream, Conn::Detached) else {
            return Err(End::Gone);
        };
        let handshake = tokio::time::timeout(self.settings.command_timeout, acceptor.accept(tcp));
        let tls = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return Err(End::Gone),
            r = handshake => match r {
                Ok(Ok(tls)) => tls,
                Ok(Err(_)) | Err(_) => return Err(End::Gone),
            },
        };
        self.facts.tls = Some(crate::tls::describe(tls.get_ref().1));
        self.stream = Conn::Tls(Box::new(tls));
        // RFC 3207 section 4.2: forget everything learnt before the handshake.
        self.machine.tls_started();
        self.sender.clear();
        Ok(())
    }

    /// Turn the machine's query into a bridge question, remembering the sender.
    fn question_for(&mut self, query: Query) -> Question {
        match query {
            Query::Mail {
                reverse_path,
                params,
            } => {
                let address = reverse_path.to_string();
                self.sender.clone_from(&address);
                Question::Mail { address, params }
            }
            Query::Rcpt {
                forward_path,
                params,
            } => Question::Rcpt {
                sender: self.sender.clone(),
                address: forward_path.to_string(),
                params,
            },
            Query::Message(envelope) => {
                let Envelope {
                    reverse_path,
                    mail_params,
                    recipients,
                    body,
                    ..
                } = envelope;
                let (recipients, rcpt_params): (Vec<String>, Vec<_>) = recipients
                    .into_iter()
                    .map(|(path, params)| (path.to_string(), params))
                    .unzip();
                let qid = stamp::new_queue_id();
                let date = stamp::rfc5322_now();
                let trace = received_header(&TraceInfo {
                    helo: self.machine.helo(),
                    peer_ip: &self.facts.peer_ip,
                    hostname: &self.settings.protocol.hostname,
                    esmtp: self.machine.esmtp(),
                    tls: self.facts.tls.as_deref(),
                    qid: &qid,
                    recipients: &recipients,
                    date: &date,
                });
                Question::Data {
                    sender: reverse_path.to_string(),
                    mail_params,
                    recipients,
                    rcpt_params,
                    qid,
                    trace,
                    body,
                }
            }
        }
    }

    async fn ask(
        &mut self,
        question: Question,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Reply, End> {
        let helo = self.machine.helo().map(str::to_owned);
        let esmtp = self.machine.esmtp();
        let asked = self.shared.bridge.ask(&self.facts, helo, esmtp, question);
        tokio::select! {
            r = asked => r.map_err(|_| shutting_down(&self.settings)),
            // A session waiting for policy when shutdown is forced gets a 421 as well.
            _ = shutdown.wait_for(|s| *s) => Err(shutting_down(&self.settings)),
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        // Over TLS, write_all may leave records inside rustls: flush pushes them out.
        let out = &self.out;
        let stream = &mut self.stream;
        let write = async move {
            stream.write_all(out).await?;
            stream.flush().await
        };
        match tokio::time::timeout(self.settings.command_timeout, write).await {
            Ok(result) => result?,
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
        }
        self.out.clear();
        // A long message leaves a large reply buffer only rarely; don't keep it.
        if self.out.capacity() > 64 * 1024 {
            self.out.shrink_to(512);
        }
        Ok(())
    }
}

fn shutting_down(settings: &ListenerSettings) -> End {
    End::Goodbye(Reply::new(
        421,
        "4.3.2",
        &format!(
            "{} service shutting down, try again later",
            settings.protocol.hostname
        ),
    ))
}
