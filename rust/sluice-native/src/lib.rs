//! `appliance._native`: the PyO3 binding of Sluice.
//!
//! Owns inbound SMTP socket I/O (module `io`) on its own tokio threads, with STARTTLS
//! certificates loaded or made at start-up (module `tls`), and crosses into Python only
//! at policy points, in batches (module `bridge`). Also exposes the envelope
//! address parser and dot-stuffing of `smtp-proto`, so Python uses the same code as the
//! listener. Errors are mapped to Python exceptions here, at the boundary, and nowhere else.
//! The typed interface is `appliance/_native.pyi`.

mod bridge;
mod io;
mod stamp;
mod tls;

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use smtp_proto::{AddressMode, BareLinefeedPolicy, Reply, ServerConfig};
use tokio::sync::watch;

use crate::bridge::{Bridge, PendingQuestion, Question};
use crate::io::{ListenerSettings, Shared};

create_exception!(_native, AddressError, PyValueError);
// An OSError like ssl.SSLError, so start-up code that reports OSError from Server()
// (an address that cannot be bound) reports unusable TLS files the same way.
create_exception!(_native, TlsError, PyOSError);

type Params = Vec<(String, Option<String>)>;

/// One policy question, as Python sees it (see `_native.pyi`).
#[pyclass(frozen, get_all, module = "appliance._native")]
struct Request {
    id: u64,
    kind: &'static str,
    session: u64,
    listener: String,
    peer_ip: String,
    peer_port: u16,
    local_ip: String,
    local_port: u16,
    tls: Option<String>,
    helo: Option<String>,
    esmtp: bool,
    address: String,
    params: Params,
    sender: String,
    mail_params: Params,
    recipients: Vec<String>,
    rcpt_params: Vec<Params>,
    qid: String,
    trace_len: usize,
    body: Py<PyBytes>,
}

#[pymethods]
impl Request {
    fn __repr__(&self) -> String {
        format!(
            "<Request id={} kind={} session={} peer={}:{}>",
            self.id, self.kind, self.session, self.peer_ip, self.peer_port
        )
    }
}

impl Request {
    fn from_pending(py: Python<'_>, pending: PendingQuestion) -> Request {
        let PendingQuestion {
            id,
            facts,
            helo,
            esmtp,
            question,
        } = pending;
        let empty = || PyBytes::new(py, b"").unbind();
        let mut request = Request {
            id,
            kind: "connect",
            session: facts.session,
            listener: facts.listener,
            peer_ip: facts.peer_ip,
            peer_port: facts.peer_port,
            local_ip: facts.local_ip,
            local_port: facts.local_port,
            tls: facts.tls,
            helo,
            esmtp,
            address: String::new(),
            params: Vec::new(),
            sender: String::new(),
            mail_params: Vec::new(),
            recipients: Vec::new(),
            rcpt_params: Vec::new(),
            qid: String::new(),
            trace_len: 0,
            body: empty(),
        };
        match question {
            Question::Connect => {}
            Question::Mail { address, params } => {
                request.kind = "mail";
                request.address = address;
                request.params = params;
            }
            Question::Rcpt {
                sender,
                address,
                params,
            } => {
                request.kind = "rcpt";
                request.sender = sender;
                request.address = address;
                request.params = params;
            }
            Question::Data {
                sender,
                mail_params,
                recipients,
                rcpt_params,
                qid,
                trace,
                body,
            } => {
                request.kind = "data";
                request.sender = sender;
                request.mail_params = mail_params;
                request.recipients = recipients;
                request.rcpt_params = rcpt_params;
                request.qid = qid;
                request.trace_len = trace.len();
                // Header and body written once, straight into the Python object: the
                // message is copied once here and the Rust buffer freed right after.
                let stored = PyBytes::new_with(py, trace.len() + body.len(), |buf| {
                    buf[..trace.len()].copy_from_slice(&trace);
                    buf[trace.len()..].copy_from_slice(&body);
                    Ok(())
                });
                request.body = match stored {
                    Ok(bytes) => bytes.unbind(),
                    Err(_) => {
                        PyBytes::new(py, &[trace.as_slice(), body.as_slice()].concat()).unbind()
                    }
                };
            }
        }
        request
    }
}

/// Settings of one listener (see `_native.pyi` for the defaults and meaning).
#[pyclass(frozen, module = "appliance._native")]
struct ListenerSpec {
    name: String,
    address: String,
    settings: ServerConfig,
    command_timeout: f64,
    data_timeout: f64,
    max_connections: usize,
    max_connections_per_ip: usize,
    tls_certificate: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_dir: Option<PathBuf>,
}

#[pymethods]
impl ListenerSpec {
    #[new]
    #[pyo3(signature = (name, address, hostname, *, max_line_length=4096, max_message_size=10485760,
        max_recipients=1000, require_helo=false, bare_lf_ends_command=true, bare_linefeed="reject",
        address_mode="loose", max_bad_commands=20, command_timeout=300.0, data_timeout=600.0,
        max_connections=1000, max_connections_per_ip=50, starttls=false, tls_certificate=None,
        tls_key=None, tls_dir=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        name: String,
        address: String,
        hostname: String,
        max_line_length: usize,
        max_message_size: u64,
        max_recipients: usize,
        require_helo: bool,
        bare_lf_ends_command: bool,
        bare_linefeed: &str,
        address_mode: &str,
        max_bad_commands: u32,
        command_timeout: f64,
        data_timeout: f64,
        max_connections: usize,
        max_connections_per_ip: usize,
        starttls: bool,
        tls_certificate: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        tls_dir: Option<PathBuf>,
    ) -> PyResult<Self> {
        let bare_linefeed = match bare_linefeed {
            "reject" => BareLinefeedPolicy::Reject,
            "normalise" => BareLinefeedPolicy::Normalise,
            other => {
                return Err(PyValueError::new_err(format!(
                    "bare_linefeed: expected reject or normalise, got {other:?}"
                )))
            }
        };
        let address_mode = match address_mode {
            "loose" => AddressMode::Loose,
            "strict" => AddressMode::Strict,
            other => {
                return Err(PyValueError::new_err(format!(
                    "address_mode: expected loose or strict, got {other:?}"
                )))
            }
        };
        for (key, value) in [
            ("command_timeout", command_timeout),
            ("data_timeout", data_timeout),
        ] {
            if !(value.is_finite() && value > 0.0) {
                return Err(PyValueError::new_err(format!(
                    "{key}: expected a positive number of seconds"
                )));
            }
        }
        if max_line_length < 512 {
            // RFC 5321 section 4.5.3.1.4: a server must accept command lines of 512 octets.
            return Err(PyValueError::new_err(
                "max_line_length: expected at least 512 (RFC 5321 4.5.3.1.4)",
            ));
        }
        if tls_certificate.is_some() != tls_key.is_some() {
            return Err(PyValueError::new_err(
                "tls_certificate and tls_key: give both or neither",
            ));
        }
        if starttls && tls_certificate.is_none() && tls_dir.is_none() {
            return Err(PyValueError::new_err(
                "starttls: needs tls_certificate and tls_key, or tls_dir for a self-signed one",
            ));
        }
        for (key, value) in [
            ("max_connections", max_connections),
            ("max_connections_per_ip", max_connections_per_ip),
        ] {
            if value == 0 {
                return Err(PyValueError::new_err(format!(
                    "{key}: expected a positive integer"
                )));
            }
        }
        let settings = ServerConfig {
            hostname,
            max_line_length,
            max_message_size,
            max_recipients,
            require_helo,
            bare_lf_ends_command,
            bare_linefeed,
            address_mode,
            max_bad_commands,
            starttls,
        };
        Ok(ListenerSpec {
            name,
            address,
            settings,
            command_timeout,
            data_timeout,
            max_connections,
            max_connections_per_ip,
            tls_certificate,
            tls_key,
            tls_dir,
        })
    }

    fn __repr__(&self) -> String {
        format!("<ListenerSpec {} {}>", self.name, self.address)
    }
}

/// The inbound SMTP server: listeners plus the I/O threads that serve them.
#[pyclass(module = "appliance._native")]
struct Server {
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    shared: Arc<Shared>,
    bound: Vec<(String, String, u16)>,
}

#[pymethods]
impl Server {
    #[new]
    #[pyo3(signature = (listeners, io_threads=2))]
    fn new(listeners: Vec<PyRef<'_, ListenerSpec>>, io_threads: usize) -> PyResult<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(io_threads.clamp(1, 64))
            .thread_name("sluice-io")
            .enable_all()
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start I/O threads: {e}")))?;
        let bridge = Bridge::new().map_err(|e| PyOSError::new_err(format!("eventfd: {e}")))?;
        let shared = Arc::new(Shared {
            bridge,
            active: AtomicUsize::new(0),
            next_session: AtomicU64::new(1),
            stop_accepting: watch::channel(false).0,
            shutdown: watch::channel(false).0,
        });
        // Bind everything first, so a bad address fails start-up before any listener runs.
        let mut bound_listeners = Vec::new();
        let mut bound = Vec::new();
        for spec in &listeners {
            let tls = if spec.settings.starttls {
                Some(tls_acceptor(spec)?)
            } else {
                None
            };
            let addr = resolve_listen_address(&spec.address)?;
            let std_listener = bind(addr).map_err(|e| {
                PyOSError::new_err(format!(
                    "listener {}: cannot listen on {}: {e}",
                    spec.name, spec.address
                ))
            })?;
            let local = std_listener
                .local_addr()
                .map_err(|e| PyOSError::new_err(format!("listener {}: {e}", spec.name)))?;
            bound.push((spec.name.clone(), local.ip().to_string(), local.port()));
            let settings = ListenerSettings {
                name: spec.name.clone(),
                protocol: spec.settings.clone(),
                command_timeout: Duration::from_secs_f64(spec.command_timeout),
                data_timeout: Duration::from_secs_f64(spec.data_timeout),
                max_connections: spec.max_connections,
                max_connections_per_ip: spec.max_connections_per_ip,
                tls,
            };
            bound_listeners.push((std_listener, Arc::new(settings)));
        }
        {
            let _guard = runtime.enter();
            for (std_listener, settings) in bound_listeners {
                let listener = tokio::net::TcpListener::from_std(std_listener)
                    .map_err(|e| PyOSError::new_err(format!("listener {}: {e}", settings.name)))?;
                runtime.spawn(io::accept_loop(listener, settings, Arc::clone(&shared)));
            }
        }
        Ok(Server {
            runtime: Mutex::new(Some(runtime)),
            shared,
            bound,
        })
    }

    fn fileno(&self) -> i32 {
        self.shared.bridge.fileno()
    }

    fn bound_addresses(&self) -> Vec<(String, String, u16)> {
        self.bound.clone()
    }

    fn take_requests(&self, py: Python<'_>) -> Vec<Request> {
        // The eventfd read and the list lock (contended by the I/O threads) happen
        // without the GIL; only building the Python objects needs it.
        let shared = Arc::clone(&self.shared);
        let pending = py.detach(move || shared.bridge.take());
        pending
            .into_iter()
            .map(|p| Request::from_pending(py, p))
            .collect()
    }

    fn answer(&self, verdicts: Vec<(u64, u16, String, String)>) -> PyResult<()> {
        let mut replies = Vec::with_capacity(verdicts.len());
        for (id, code, enhanced, text) in verdicts {
            if !(200..600).contains(&code) {
                return Err(PyValueError::new_err(format!(
                    "reply code {code} out of range 200..599"
                )));
            }
            replies.push((id, Reply::new(code, &enhanced, &text)));
        }
        // Handing each reply to its session is a oneshot send and perhaps a futex wake:
        // microseconds. Done with the GIL held on purpose: releasing it here would let
        // the queue's writer thread take it, and getting it back can cost the loop up to
        // a switch interval (the GIL ping-pong that py-spy showed on this line).
        self.shared.bridge.answer(replies);
        Ok(())
    }

    fn stop_accepting(&self) {
        self.shared.stop_accepting.send_replace(true);
    }

    fn active_sessions(&self) -> usize {
        self.shared.active.load(Ordering::Acquire)
    }

    /// Close every session (421 4.3.2) and stop the I/O threads. Waits up to 10 s.
    fn shutdown(&self, py: Python<'_>) {
        self.shared.stop_accepting.send_replace(true);
        self.shared.shutdown.send_replace(true);
        self.shared.bridge.close();
        let shared = Arc::clone(&self.shared);
        let runtime = self
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        py.detach(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while shared.active.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if let Some(rt) = runtime {
                rt.shutdown_timeout(Duration::from_secs(1));
            }
        });
    }
}

/// The listener's TLS acceptor: its configured files, or the self-signed pair in `tls_dir`.
fn tls_acceptor(spec: &ListenerSpec) -> PyResult<tokio_rustls::TlsAcceptor> {
    let err = |e: tls::TlsSetupError| TlsError::new_err(format!("listener {}: {e}", spec.name));
    let (cert, key) = match (&spec.tls_certificate, &spec.tls_key, &spec.tls_dir) {
        (Some(cert), Some(key), _) => (cert.clone(), key.clone()),
        (_, _, Some(dir)) => tls::self_signed(dir, &spec.settings.hostname).map_err(err)?,
        // ListenerSpec::new refuses STARTTLS with neither.
        _ => {
            return Err(TlsError::new_err(format!(
                "listener {}: no certificate",
                spec.name
            )))
        }
    };
    tls::acceptor(&cert, &key).map_err(err)
}

fn resolve_listen_address(address: &str) -> PyResult<SocketAddr> {
    let mut addrs = address
        .to_socket_addrs()
        .map_err(|e| PyValueError::new_err(format!("listen address {address:?}: {e}")))?;
    addrs.next().ok_or_else(|| {
        PyValueError::new_err(format!("listen address {address:?} resolves to nothing"))
    })
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    // std's bind sets SO_REUSEADDR on Unix, so a restart does not wait out TIME_WAIT.
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Parse an envelope path with the listener's parser; returns the mailbox ("" for <>).
#[pyfunction]
#[pyo3(signature = (text, strict=false, utf8=false))]
fn parse_path(text: &str, strict: bool, utf8: bool) -> PyResult<String> {
    let mode = if strict {
        AddressMode::Strict
    } else {
        AddressMode::Loose
    };
    match smtp_proto::parse_path(text.as_bytes(), mode, utf8) {
        Ok((path, rest)) if rest.iter().all(u8::is_ascii_whitespace) => Ok(path.to_string()),
        Ok(_) => Err(AddressError::new_err("unexpected text after the address")),
        Err(e) => Err(AddressError::new_err(e.reason)),
    }
}

/// Dot-stuff a CRLF body for DATA and append the terminating CRLF.CRLF.
#[pyfunction]
fn dot_stuff<'py>(py: Python<'py>, body: &[u8]) -> Bound<'py, PyBytes> {
    let stuffed = py.detach(|| smtp_proto::stuffing::dot_stuff(body));
    PyBytes::new(py, &stuffed)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Request>()?;
    m.add_class::<ListenerSpec>()?;
    m.add_class::<Server>()?;
    m.add("AddressError", m.py().get_type::<AddressError>())?;
    m.add("TlsError", m.py().get_type::<TlsError>())?;
    m.add_function(wrap_pyfunction!(parse_path, m)?)?;
    m.add_function(wrap_pyfunction!(dot_stuff, m)?)?;
    Ok(())
}
