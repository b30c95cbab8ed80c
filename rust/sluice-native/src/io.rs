//! Inbound socket I/O: listeners, one task per SMTP session, timeouts.
//!
//! Runs on a small fixed pool of tokio threads with no GIL. Each session task feeds the
//! bytes it reads into `smtp_proto::ServerSession` and carries out the steps it returns:
//! write reply bytes, put a policy question to Python over the bridge, or close. The
//! state machine decides everything about the dialog; this module only moves bytes and
//! keeps time (RFC 5321 section 4.5.3.2 timeouts, configured per listener).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use smtp_proto::{Envelope, Query, Reply, ServerConfig, ServerSession, Step};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::bridge::{Bridge, ConnectionFacts, Question};

/// Everything a listener needs, fixed at start-up.
pub struct ListenerSettings {
    pub name: String,
    pub protocol: ServerConfig,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub max_connections: usize,
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

/// Accept connections until told to stop accepting.
pub async fn accept_loop(
    listener: TcpListener,
    settings: Arc<ListenerSettings>,
    shared: Arc<Shared>,
) {
    let mut stop = shared.stop_accepting.subscribe();
    let listener_active = Arc::new(AtomicUsize::new(0));
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
        let listener_active = Arc::clone(&listener_active);
        tokio::spawn(async move {
            shared.active.fetch_add(1, Ordering::AcqRel);
            let over_limit =
                listener_active.fetch_add(1, Ordering::AcqRel) >= settings.max_connections;
            if over_limit {
                refuse(stream, &settings.protocol.hostname).await;
            } else {
                Session::new(stream, peer, settings, Arc::clone(&shared))
                    .run()
                    .await;
            }
            listener_active.fetch_sub(1, Ordering::AcqRel);
            shared.active.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

async fn refuse(mut stream: TcpStream, hostname: &str) {
    let reply = Reply::new(
        421,
        "4.7.0",
        &format!("{hostname} too many connections, try again later"),
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&reply.to_bytes())).await;
    let _ = stream.shutdown().await;
}

/// Render an address so IPv4 clients on a dual-stack socket show as plain IPv4.
fn plain_ip(addr: IpAddr) -> String {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => v6.to_string(),
        },
        IpAddr::V4(v4) => v4.to_string(),
    }
}

struct Session {
    stream: TcpStream,
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
        };
        let machine = ServerSession::new(settings.protocol.clone());
        Session {
            stream,
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
                    if self.flush().await.is_err() {
                        return End::Gone;
                    }
                    return End::Gone;
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
                Question::Data {
                    sender: reverse_path.to_string(),
                    mail_params,
                    recipients,
                    rcpt_params,
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
        let write = self.stream.write_all(&self.out);
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
