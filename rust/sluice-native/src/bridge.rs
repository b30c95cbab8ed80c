//! The bridge between the I/O threads and the uvloop loop.
//!
//! Sessions running on the tokio threads put policy questions into one shared list and
//! wake the Python loop through an eventfd(2) that the loop watches with `add_reader`.
//! Python drains every pending question in one call and answers any number of them in
//! one call, so the GIL is taken once per batch, never once per command line.
//!
//! Each question carries a oneshot channel; the session awaits it. Dropping the bridge's
//! side (on shutdown) wakes the session with an error, which it turns into a 421.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use smtp_proto::Reply;
use tokio::sync::oneshot;

/// Parameters of MAIL or RCPT, keyword upper-cased.
pub type Params = Vec<(String, Option<String>)>;

/// What a question is about. Field sets follow `Request` in `_native.pyi`.
#[derive(Debug)]
pub enum Question {
    Connect,
    Mail {
        address: String,
        params: Params,
    },
    Rcpt {
        sender: String,
        address: String,
        params: Params,
    },
    Data {
        sender: String,
        mail_params: Params,
        recipients: Vec<String>,
        rcpt_params: Vec<Params>,
        /// The queue id named in `trace`.
        qid: String,
        /// Our Received: header, to go in front of the body.
        trace: Vec<u8>,
        body: Vec<u8>,
    },
}

/// Facts about the connection that every question carries.
#[derive(Clone, Debug)]
pub struct ConnectionFacts {
    pub session: u64,
    pub listener: String,
    pub peer_ip: String,
    pub peer_port: u16,
    pub local_ip: String,
    pub local_port: u16,
    /// "TLSv1.3 TLS13_AES_256_GCM_SHA384" once STARTTLS has completed.
    pub tls: Option<String>,
}

#[derive(Debug)]
pub struct PendingQuestion {
    pub id: u64,
    pub facts: ConnectionFacts,
    pub helo: Option<String>,
    pub esmtp: bool,
    pub question: Question,
}

/// The session lost its answer: the server is shutting down.
#[derive(Debug)]
pub struct Abandoned;

pub struct Bridge {
    wake: OwnedFd,
    next_id: AtomicU64,
    pending: Mutex<Vec<PendingQuestion>>,
    waiters: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    closed: std::sync::atomic::AtomicBool,
}

impl Bridge {
    pub fn new() -> std::io::Result<Bridge> {
        // SAFETY: eventfd has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Bridge {
            // SAFETY: fd is a fresh descriptor that nothing else owns.
            wake: unsafe { OwnedFd::from_raw_fd(fd) },
            next_id: AtomicU64::new(1),
            pending: Mutex::new(Vec::new()),
            waiters: Mutex::new(HashMap::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn fileno(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Ask Python a question and wait for its verdict.
    pub async fn ask(
        &self,
        facts: &ConnectionFacts,
        helo: Option<String>,
        esmtp: bool,
        question: Question,
    ) -> Result<Reply, Abandoned> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Abandoned);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.waiters).insert(id, tx);
        let was_empty = {
            let mut pending = lock(&self.pending);
            let was_empty = pending.is_empty();
            pending.push(PendingQuestion {
                id,
                facts: facts.clone(),
                helo,
                esmtp,
                question,
            });
            was_empty
        };
        // One wake-up per batch: while the list is non-empty Python has a wake-up coming.
        if was_empty {
            self.wake_python();
        }
        rx.await.map_err(|_| Abandoned)
    }

    fn wake_python(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. EAGAIN (counter
        // saturated) is harmless: the descriptor is already readable.
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
    }

    /// Take every pending question (called by Python when the eventfd is readable).
    pub fn take(&self) -> Vec<PendingQuestion> {
        let mut counter: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our own non-blocking eventfd; EAGAIN
        // just means nothing was signalled since the last read.
        unsafe {
            libc::read(
                self.wake.as_raw_fd(),
                (&mut counter as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            );
        }
        std::mem::take(&mut *lock(&self.pending))
    }

    /// Deliver verdicts. Unknown ids (the session went away meanwhile) are ignored.
    pub fn answer(&self, verdicts: Vec<(u64, Reply)>) {
        let mut waiters = lock(&self.waiters);
        for (id, reply) in verdicts {
            if let Some(tx) = waiters.remove(&id) {
                // The session may have timed out or closed; its answer is then moot.
                let _ = tx.send(reply);
            }
        }
    }

    /// Refuse every open and future question: each waiting session gets `Abandoned`.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        lock(&self.waiters).clear();
        lock(&self.pending).clear();
    }
}

/// A poisoned lock only means another thread panicked mid-update of a plain list or map;
/// the data is still consistent enough to keep serving, so recover it (the connection
/// counts in `io` too: refusing every later connection would be worse).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
