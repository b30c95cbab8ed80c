//! TLS for STARTTLS (RFC 3207): certificates, the acceptor, and what a session reports.
//!
//! Runs at start-up, on the Python thread that builds the `Server` (loading PEM files,
//! making the self-signed certificate), and on the I/O threads through the acceptor it
//! builds. Uses rustls with the `ring` provider, chosen explicitly per acceptor rather
//! than through a process-wide default, so nothing else loaded into the interpreter can
//! change which crypto the listener uses.
//!
//! Certificates come from the listener's `tls_certificate` / `tls_key` (PEM). A listener
//! with STARTTLS on and none configured uses a self-signed certificate for the hostname,
//! made with rcgen on the first start in the data directory (`tls/self-signed.pem` and
//! `tls/self-signed.key`, the key mode 0600) and reused on later starts. Clients that
//! check certificates will not trust it; SMTP between MTAs mostly uses opportunistic TLS
//! (RFC 3207 section 4.1, RFC 7435), where an encrypted session with an unverified
//! certificate is still better than plain text.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::ServerConnection;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

pub const SELF_SIGNED_CERT: &str = "self-signed.pem";
pub const SELF_SIGNED_KEY: &str = "self-signed.key";

/// A start-up problem with TLS material; the message names the setting and the file.
#[derive(Debug)]
pub struct TlsSetupError(pub String);

impl fmt::Display for TlsSetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Build the acceptor from a PEM certificate chain and a PEM private key.
pub fn acceptor(cert_path: &Path, key_path: &Path) -> Result<TlsAcceptor, TlsSetupError> {
    let certs = load_certificates(cert_path)?;
    let key = load_key(key_path)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError(format!("TLS set-up: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            TlsSetupError(format!(
                "tls_certificate {} / tls_key {}: cannot be used together: {e}",
                cert_path.display(),
                key_path.display()
            ))
        })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let bad = |what: &dyn fmt::Display| {
        TlsSetupError(format!("tls_certificate {}: {what}", path.display()))
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&pem_error(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&pem_error(e)))?;
    if certs.is_empty() {
        return Err(bad(&"no PEM CERTIFICATE block in the file"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        let reason = match e {
            rustls_pki_types::pem::Error::NoItemsFound => {
                "no PEM PRIVATE KEY block in the file".to_string()
            }
            other => pem_error(other),
        };
        TlsSetupError(format!("tls_key {}: {reason}", path.display()))
    })
}

fn pem_error(e: rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => format!("cannot read: {io}"),
        other => format!("not a valid PEM file: {other}"),
    }
}

/// The self-signed certificate and key in `dir`, made on first use for `hostname`.
///
/// Both files are written under temporary names and renamed into place, key first, so
/// a crash half-way leaves either nothing or a complete pair (a lone key is replaced).
pub fn self_signed(dir: &Path, hostname: &str) -> Result<(PathBuf, PathBuf), TlsSetupError> {
    let cert_path = dir.join(SELF_SIGNED_CERT);
    let key_path = dir.join(SELF_SIGNED_KEY);
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let fail = |what: &str, path: &Path, e: &dyn fmt::Display| {
        TlsSetupError(format!(
            "self-signed certificate: cannot {what} {}: {e}",
            path.display()
        ))
    };
    fs::create_dir_all(dir).map_err(|e| fail("create", dir, &e))?;
    let made = make_self_signed(hostname)
        .map_err(|e| fail("make a certificate for", Path::new(hostname), &e))?;
    let key_tmp = dir.join(format!("{SELF_SIGNED_KEY}.tmp"));
    let cert_tmp = dir.join(format!("{SELF_SIGNED_CERT}.tmp"));
    write_new(&key_tmp, made.signing_key.serialize_pem().as_bytes(), 0o600)
        .map_err(|e| fail("write", &key_tmp, &e))?;
    write_new(&cert_tmp, made.cert.pem().as_bytes(), 0o644)
        .map_err(|e| fail("write", &cert_tmp, &e))?;
    fs::rename(&key_tmp, &key_path).map_err(|e| fail("rename", &key_tmp, &e))?;
    fs::rename(&cert_tmp, &cert_path).map_err(|e| fail("rename", &cert_tmp, &e))?;
    Ok((cert_path, key_path))
}

/// A certificate for `hostname` (subject CN and DNS name), signed by its own new key.
fn make_self_signed(hostname: &str) -> Result<rcgen::CertifiedKey<rcgen::KeyPair>, rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![hostname.to_string()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hostname);
    let cert = params.self_signed(&key)?;
    Ok(rcgen::CertifiedKey {
        cert,
        signing_key: key,
    })
}

/// Write a file with `mode` from the start (never readable by others, even briefly).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    // A leftover from an interrupted start may carry other permissions: start afresh.
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// "TLSv1.3 TLS13_AES_256_GCM_SHA384": what the Received: header and policy see.
pub fn describe(conn: &ServerConnection) -> String {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => "TLS".to_string(),
    };
    match conn.negotiated_cipher_suite() {
        Some(suite) => match suite.suite().as_str() {
            Some(name) => format!("{version} {name}"),
            None => format!("{version} {:?}", suite.suite()),
        },
        None => version,
    }
}
