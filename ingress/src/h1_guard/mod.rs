//! Strict HTTP/1.1 framing in front of hyper: refuses what could smuggle a request.
//!
//! Request smuggling lives in the gaps between two parsers' readings of one byte stream: a
//! proxy in front frames a message by `Content-Length`, the server by `Transfer-Encoding`,
//! and the bytes left over become a second request nobody checked. hyper is lenient where the
//! RFC lets it be (it ignores a `Content-Length` next to `Transfer-Encoding`, accepts repeated
//! equal `Content-Length`s, trims any whitespace around `chunked`, reads `5 \r\n` as a chunk
//! size…), so every HTTP/1 connection goes through [`GuardedIo`] first, which accepts only
//! framing that RFC 9112 reads one way, and refuses the rest (then closes, §6.3).
//!
//! ```text
//!  socket ─▶ GuardedIo ─────────────────────────────────▶ hyper ─▶ service (respond)
//!            │ H1Validator (pure, fed bytes):              ▲         │
//!            │   Preface ─▶ h2: pass-through               │         │
//!            │      └─▶ Head ─▶ FixedBody ─▶ Head …        │         │
//!            │           ├─▶ ChunkSize ⇄ ChunkData         │         │
//!            │           │    └─▶ Trailers ─▶ Head …       │         │
//!            │           └─▶ Upgraded: pass-through        │         │
//!            │ valid bytes: passed on in place ────────────┘         │
//!            │ a head or framing line cut by a read: held back       │
//!            ├ upgrade ─▶ GuardState::record_upgrade(index) ─────────┤ upgrade_requested(index)
//!            └ violation ─▶ GuardState::record(index, Rejection) ────┘ rejection_for(index)
//! ```
//!
//! - **Sans-IO core.** [`H1Validator`] is fed bytes and says up to which stream offset they
//!   may be passed on ([`H1Validator::release_to`]); it never sees a socket or a clock, and
//!   its tests feed it slices split at every byte boundary.
//! - **Hot path.** [`GuardedIo`] reads straight into hyper's buffer and validates the bytes
//!   where they are; a whole head and body in one read cost one scan and no copy. Only the
//!   bytes of a head or chunk-size line cut by a read boundary are copied aside until the
//!   rest arrives, so hyper never sees a partial head it could act on.
//! - **Refusing in a way hyper understands.** A bad *head* is never shown to hyper: the
//!   guard records the rejection for that request's index, hands hyper a minimal valid request
//!   instead ([`SYNTHETIC_REQUEST`], `connection: close`), and stops reading. The service
//!   answers it with the rejection ([`GuardState::rejection_for`]) and hyper closes after the
//!   response. A bad *chunked body* is found after hyper has the head (the function may be
//!   reading the body): the guard fails the read with an error, so hyper fails the body, the
//!   service never invokes the function with a truncated body, and the rejection replaces
//!   its answer. Reads after a refusal drain the socket (also at shutdown) so the close is a
//!   FIN, not a reset that could destroy the response in flight.
//! - **HTTP/2 prior knowledge** (`PRI * HTTP/2.0…`, h2c) as the connection's first bytes
//!   switches the guard to a pass-through; HTTP/2 frames itself.
//! - **Upgrades** (WebSocket). The head of an upgrade request — HTTP/1.1, method `GET`, a
//!   `Connection` field listing `upgrade` (any case), a non-empty `Upgrade` field, no body
//!   (no `Transfer-Encoding`, no `Content-Length` other than 0) — switches the guard to a
//!   pass-through from the byte after it: those bytes are the new protocol's. The guard
//!   records the request's index ([`GuardState::upgrade_requested`]) before hyper sees the
//!   head. hyper parses no further request until the response is decided; the service
//!   (`server::respond`) lets a 101 hand the connection to the handler
//!   (`hyper::upgrade::on`), and answers anything else with `Connection: close`, so no
//!   unchecked byte is ever read as HTTP/1. Anything else that carries `Upgrade` (a body,
//!   HTTP/1.0, no `Connection: upgrade`) and CONNECT are checked as usual, and the service
//!   takes hyper's `OnUpgrade` off them, so a 101 or a CONNECT 2xx there only ends the
//!   connection.
//! - **Header timeout.** hyper's own header timer starts only once hyper waits for a head;
//!   on a cleartext connection the h1/h2 detection reads first, and a head the guard holds
//!   back is invisible to hyper. So the guard times the first head from the connection's
//!   start, and any later head from its first byte: a partial head past the timeout gets 408,
//!   a connection that never sent a byte is ended.
//!
//! What is refused, and with which status:
//!
//! - **400**: `Content-Length` with `Transfer-Encoding`; `Content-Length` twice (even equal),
//!   as a list, signed, non-digit or overflowing; a malformed `Transfer-Encoding` (an empty
//!   element, a coding that is not a token, `chunked` with parameters, a token that merely
//!   contains `chunked` such as `xchunked`); `chunked` twice or not last; `Transfer-Encoding`
//!   in HTTP/1.0; a bad chunk size (empty, non-hex, `0x`, overflowing, whitespace or junk
//!   after it) or chunk extension; no CRLF after chunk data; obs-fold; a bare LF or bare CR;
//!   an empty header name or one with whitespace or other non-token bytes
//!   (`Transfer-Encoding : chunked`); control bytes or NUL in a value; a bad request line
//!   (spacing, method, a target with a space or control byte or that is not UTF-8, a version
//!   other than HTTP/1.0 and HTTP/1.1); HTTP/1.1 without `Host`, two `Host` fields, or a
//!   `Host` value with bytes no host has.
//! - **501**: a well-formed `Transfer-Encoding` list, `chunked` at most once and last, that
//!   names another coding: `gzip, chunked`, `identity`, `compress`, `gzip`, `foo`.
//! - **431**: a head over `max_header_bytes` or with more than `max_headers` fields; the same
//!   for trailers.
//! - **414**: a request target over `max_uri_bytes`.
//! - **408**: a head still incomplete at the header timeout.
//!
//! 400 versus 501: anything that could be a *spelling* of `chunked` that another parser might
//! read differently, or that makes the body length ambiguous, is 400 — the message cannot be
//! framed. A list that parses cleanly but asks for a coding we do not implement is 501: the
//! framing is clear, we just do not support it (RFC 9112 §6.1). Coding names compare ASCII
//! case-insensitively as the RFC says (`Chunked` is chunked); non-ASCII look-alikes such as
//! the Kelvin sign in `chun\u{212A}ed` are not tokens, hence 400.
//!
//! In files: `validator.rs` is the pure framing checker ([`H1Validator`]), `io.rs` the wrapper
//! hyper reads through ([`GuardedIo`], [`GuardState`]), `tests.rs` the tests of both.

mod io;
mod validator;

#[cfg(test)]
mod tests;

pub use io::{GuardState, GuardedIo, SYNTHETIC_REQUEST};
pub use validator::{H1Limits, H1Validator, Rejection, Stage, Violation};
