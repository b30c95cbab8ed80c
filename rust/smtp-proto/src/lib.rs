//! Sans-I/O SMTP for Sluice.
//!
//! Bytes go in, steps come out: this crate never touches a socket, a thread or Python.
//! The binding crate (`sluice-native`) feeds it what the client sent and carries out the
//! steps it returns (write these bytes, ask policy this question, close).
//!
//! Modules, in the order a message meets them:
//! - [`server`]: the server dialog (RFC 5321 section 4), a table of commands per state.
//! - [`address`]: envelope paths (RFC 5321 section 4.1.2), lenient like the IronPort appliance.
//! - [`params`]: ESMTP parameters of MAIL / RCPT: SIZE, BODY, SMTPUTF8, and the DSN
//!   parameters RET, ENVID, NOTIFY, ORCPT with xtext decoding (RFC 3461).
//! - [`data`]: the DATA body decoder: CRLF.CRLF only ends a message, dot-unstuffing,
//!   bare CR / bare LF detection, size limit (RFC 5321 sections 4.1.1.4, 4.5.2).
//! - [`bdat`]: the BDAT body accumulator: chunks taken literally, the same bare line end
//!   policy and size limit as DATA (RFC 3030).
//! - [`reply`]: reply formatting with enhanced status codes (RFC 3463, RFC 2034).
//! - [`trace`]: the Received: header put on each accepted message (RFC 5321 section 4.4).
//! - [`stuffing`]: dot-stuffing for output to the next hop (RFC 5321 section 4.5.2).

pub mod address;
pub mod bdat;
pub mod data;
#[doc(hidden)]
pub mod fuzzing;
pub mod params;
pub mod reply;
pub mod server;
pub mod stuffing;
pub mod trace;

pub use address::{parse_path, AddressError, AddressMode, Mailbox, Path};
pub use params::Params;
pub use reply::Reply;
pub use server::{BareLinefeedPolicy, Envelope, Query, ServerConfig, ServerSession, Step};
