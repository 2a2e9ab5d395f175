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
//!            │           └─▶ ChunkSize ⇄ ChunkData         │         │
//!            │                └─▶ Trailers ─▶ Head …       │         │
//!            │ valid bytes: passed on in place ────────────┘         │
//!            │ a head or framing line cut by a read: held back       │
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

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Size limits on a request head.
#[derive(Debug, Clone, Copy)]
pub struct H1Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
}

/// Why a request was refused: the status and a short reason for the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: &'static str,
}

/// What the guard found on one connection, shared with the connection's service.
///
/// A connection is refused at most once (it closes after), so this is a write-once cell: the
/// per-request check is one atomic load.
#[derive(Debug, Default)]
pub struct GuardState {
    rejection: OnceLock<(u64, Rejection)>,
}

impl GuardState {
    pub fn new() -> Arc<Self> {
        Arc::new(GuardState::default())
    }

    /// The rejection recorded for the `request_index`-th request (0-based) of the connection.
    pub fn rejection_for(&self, request_index: u64) -> Option<Rejection> {
        self.rejection
            .get()
            .filter(|(index, _)| *index == request_index)
            .map(|(_, rejection)| rejection.clone())
    }

    /// Records that the `request_index`-th request is refused; the first record wins.
    pub fn record(&self, request_index: u64, rejection: Rejection) {
        let _ = self.rejection.set((request_index, rejection));
    }
}

/// The request hyper is handed in place of a refused head: minimal, valid, and closing.
pub const SYNTHETIC_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: rejected.invalid\r\nconnection: close\r\n\r\n";

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE_BYTES: usize = 4096;
/// Beyond `max_uri_bytes`, what a request line may add (method, spaces, version) before it is
/// refused as too long without waiting for its end.
const REQUEST_LINE_ALLOWANCE: usize = 32;

/// Where a violation was found, which decides how hyper is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// In a request head: hyper has seen none of that request.
    Head,
    /// In the framing of a chunked body: hyper has the head and part of the body.
    Body,
}

/// A refused request: which one, why, and where in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// 0-based index of the request on its connection.
    pub request_index: u64,
    pub rejection: Rejection,
    pub stage: Stage,
}

/// Where the validator is in the byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The connection's first bytes, while they still match the HTTP/2 preface.
    Preface {
        matched: usize,
    },
    /// HTTP/2 with prior knowledge: nothing to check.
    Passthrough,
    /// Request line and header fields, up to the empty line.
    Head,
    /// A `Content-Length` body.
    FixedBody {
        remaining: u64,
    },
    /// A chunk-size line, with optional extensions.
    ChunkSize,
    ChunkData {
        remaining: u64,
    },
    /// The CRLF that ends chunk data.
    ChunkDataEnd,
    /// Trailer fields after the last chunk, up to the empty line.
    Trailers {
        fields: usize,
        bytes: usize,
    },
    Rejected,
}

/// What the header fields of the head being read said so far.
#[derive(Debug, Default)]
struct HeadFacts {
    request_line_seen: bool,
    http10: bool,
    fields: usize,
    hosts: u32,
    content_length: Option<u64>,
    transfer_codings: Option<TransferCodings>,
}

/// The `Transfer-Encoding` list of a head, across all its field lines.
#[derive(Debug, Default)]
struct TransferCodings {
    chunked: u32,
    chunked_last: bool,
    others: bool,
}

/// The sans-IO HTTP/1.1 request framing checker. Feed it the connection's bytes in order;
/// [`H1Validator::release_to`] says how many of them may go on to hyper.
#[derive(Debug)]
pub struct H1Validator {
    limits: H1Limits,
    phase: Phase,
    /// Stream offset of the next byte to be fed.
    fed: u64,
    /// Stream offset where the bytes still held back begin: the head being read, or the
    /// framing line being read.
    unit_start: u64,
    /// The line a feed ended in the middle of (copied only when a read cuts a line).
    partial: Vec<u8>,
    /// 0-based index of the request being read.
    request_index: u64,
    head: HeadFacts,
    violation: Option<Violation>,
}

impl H1Validator {
    pub fn new(limits: H1Limits) -> Self {
        H1Validator {
            limits,
            phase: Phase::Preface { matched: 0 },
            fed: 0,
            unit_start: 0,
            partial: Vec::new(),
            request_index: 0,
            head: HeadFacts::default(),
            violation: None,
        }
    }

    /// Checks the next bytes of the connection. After a violation the validator stays refused
    /// and returns the same violation.
    pub fn feed(&mut self, input: &[u8]) -> Result<(), Violation> {
        if let Some(violation) = &self.violation {
            return Err(violation.clone());
        }
        let base = self.fed;
        self.fed += input.len() as u64;
        if let Phase::Preface { matched } = self.phase {
            let want = &H2_PREFACE[matched..];
            let n = want.len().min(input.len());
            if input[..n] == want[..n] {
                self.phase = if matched + n == H2_PREFACE.len() {
                    Phase::Passthrough
                } else {
                    Phase::Preface { matched: matched + n }
                };
                return Ok(());
            }
            // Not HTTP/2: what matched so far (a prefix of the preface) is the start of an
            // HTTP/1 head.
            self.phase = Phase::Head;
            self.scan(0, &H2_PREFACE[..matched])?;
        }
        self.scan(base, input)
    }

    /// Stream offset before which every byte fed may be passed on; the bytes from there to
    /// [`H1Validator::fed`] are held back (an incomplete head or framing line). After a
    /// violation: where the refused head or framing line began.
    pub fn release_to(&self) -> u64 {
        match self.phase {
            Phase::Preface { .. } => 0,
            Phase::Passthrough | Phase::FixedBody { .. } | Phase::ChunkData { .. } => self.fed,
            Phase::Head
            | Phase::ChunkSize
            | Phase::ChunkDataEnd
            | Phase::Trailers { .. }
            | Phase::Rejected => self.unit_start,
        }
    }

    /// Bytes fed so far.
    pub fn fed(&self) -> u64 {
        self.fed
    }

    /// Bytes fed but held back.
    pub fn held(&self) -> u64 {
        self.fed - self.release_to()
    }

    /// 0-based index of the request being read.
    pub fn request_index(&self) -> u64 {
        self.request_index
    }

    /// Whether the connection turned out to be HTTP/2 with prior knowledge.
    pub fn is_passthrough(&self) -> bool {
        self.phase == Phase::Passthrough
    }

    /// Whether the next bytes belong to a request head (none of it may have arrived yet).
    pub fn reading_head(&self) -> bool {
        matches!(self.phase, Phase::Preface { .. } | Phase::Head)
    }

    /// The header timeout passed while a head was incomplete: refuses that request with 408
    /// if any of its bytes arrived. `None` (and no change) when nothing of a head is held.
    pub fn time_out(&mut self) -> Option<Violation> {
        if !self.reading_head() || self.held() == 0 || self.violation.is_some() {
            return None;
        }
        Some(self.refuse(
            Stage::Head,
            StatusCode::REQUEST_TIMEOUT,
            "request head not received in time",
        ))
    }

    /// Checks `bytes`, which start at stream offset `base`.
    fn scan(&mut self, base: u64, bytes: &[u8]) -> Result<(), Violation> {
        let mut pos = 0;
        while pos < bytes.len() {
            match self.phase {
                Phase::FixedBody { remaining } => {
                    let take = remaining.min((bytes.len() - pos) as u64);
                    pos += take as usize;
                    if take == remaining {
                        self.end_message(base + pos as u64);
                    } else {
                        self.phase = Phase::FixedBody {
                            remaining: remaining - take,
                        };
                    }
                }
                Phase::ChunkData { remaining } => {
                    let take = remaining.min((bytes.len() - pos) as u64);
                    pos += take as usize;
                    if take == remaining {
                        self.phase = Phase::ChunkDataEnd;
                        self.unit_start = base + pos as u64;
                    } else {
                        self.phase = Phase::ChunkData {
                            remaining: remaining - take,
                        };
                    }
                }
                Phase::Passthrough | Phase::Rejected | Phase::Preface { .. } => return Ok(()),
                Phase::Head | Phase::ChunkSize | Phase::ChunkDataEnd | Phase::Trailers { .. } => {
                    let rest = &bytes[pos..];
                    match rest.iter().position(|&b| b == b'\n') {
                        Some(lf) => {
                            let line_end = base + (pos + lf + 1) as u64;
                            if self.partial.is_empty() {
                                self.on_line(&rest[..lf], line_end)?;
                            } else {
                                let mut line = std::mem::take(&mut self.partial);
                                line.extend_from_slice(&rest[..lf]);
                                let outcome = self.on_line(&line, line_end);
                                line.clear();
                                self.partial = line;
                                outcome?;
                            }
                            pos += lf + 1;
                        }
                        None => {
                            self.partial.extend_from_slice(rest);
                            pos = bytes.len();
                            self.check_partial_line(base + pos as u64)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Limits that apply before a line is complete, so a line without end cannot grow
    /// without bound. `end`: stream offset after the last byte of the partial line.
    fn check_partial_line(&mut self, end: u64) -> Result<(), Violation> {
        match self.phase {
            Phase::Head => self.check_head_line_limits(self.partial.len(), end)?,
            Phase::ChunkSize if self.partial.len() > MAX_CHUNK_LINE_BYTES => {
                return Err(self.refuse(Stage::Body, StatusCode::BAD_REQUEST, "chunk size line too long"));
            }
            Phase::ChunkDataEnd if self.partial.as_slice() != b"\r" => {
                return Err(self.refuse(
                    Stage::Body,
                    StatusCode::BAD_REQUEST,
                    "missing CRLF after chunk data",
                ));
            }
            Phase::Trailers { bytes, .. } if bytes + self.partial.len() > self.limits.max_header_bytes => {
                return Err(self.refuse(
                    Stage::Body,
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "trailer section over the size limit",
                ));
            }
            _ => {}
        }
        Ok(())
    }

    /// One complete line, `raw` without its LF; `line_end`: stream offset after the LF.
    fn on_line(&mut self, raw: &[u8], line_end: u64) -> Result<(), Violation> {
        match self.phase {
            Phase::Head => self.on_head_line(raw, line_end),
            Phase::ChunkSize => self.on_chunk_size_line(raw, line_end),
            Phase::ChunkDataEnd => {
                if raw != b"\r" {
                    return Err(self.refuse(
                        Stage::Body,
                        StatusCode::BAD_REQUEST,
                        "missing CRLF after chunk data",
                    ));
                }
                self.phase = Phase::ChunkSize;
                self.unit_start = line_end;
                Ok(())
            }
            Phase::Trailers { fields, bytes } => self.on_trailer_line(raw, line_end, fields, bytes),
            _ => Ok(()),
        }
    }

    /// The limits on a head line of `len` bytes (without its LF) ending at stream offset
    /// `end`. Applied to a line in progress and again, first of all checks, to the complete
    /// line: whether a read cut the line or not must not change the verdict (found by
    /// fuzzing: a request line over the limit got 414 when it came in pieces, but 400 for a
    /// stray CR or was even accepted when it came in one read).
    fn check_head_line_limits(&mut self, len: usize, end: u64) -> Result<(), Violation> {
        if !self.head.request_line_seen && len > self.limits.max_uri_bytes + REQUEST_LINE_ALLOWANCE {
            return Err(self.refuse(Stage::Head, StatusCode::URI_TOO_LONG, "request line too long"));
        }
        if end - self.unit_start > self.limits.max_header_bytes as u64 {
            return Err(self.refuse(
                Stage::Head,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request head over the size limit",
            ));
        }
        Ok(())
    }

    fn on_head_line(&mut self, raw: &[u8], line_end: u64) -> Result<(), Violation> {
        self.check_head_line_limits(raw.len(), line_end - 1)?;
        let Some(line) = raw.strip_suffix(b"\r") else {
            return Err(self.refuse(
                Stage::Head,
                StatusCode::BAD_REQUEST,
                "bare LF in the request head",
            ));
        };
        if !self.head.request_line_seen {
            if line.is_empty() {
                // RFC 9112 §2.2: an empty line before the request line is ignored (hyper too).
                return self.check_head_size(line_end);
            }
            self.on_request_line(line)?;
            return self.check_head_size(line_end);
        }
        self.check_head_size(line_end)?;
        if line.is_empty() {
            return self.finish_head(line_end);
        }
        let (name, value) = match check_field_line(line) {
            Ok(field) => field,
            Err(reason) => return Err(self.refuse(Stage::Head, StatusCode::BAD_REQUEST, reason)),
        };
        self.head.fields += 1;
        if self.head.fields > self.limits.max_headers {
            return Err(self.refuse(
                Stage::Head,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too many header fields",
            ));
        }
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") => self.on_host(value),
            14 if name.eq_ignore_ascii_case(b"content-length") => self.on_content_length(value),
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => self.on_transfer_encoding(value),
            _ => Ok(()),
        }
    }

    fn check_head_size(&mut self, line_end: u64) -> Result<(), Violation> {
        if line_end - self.unit_start > self.limits.max_header_bytes as u64 {
            return Err(self.refuse(
                Stage::Head,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request head over the size limit",
            ));
        }
        Ok(())
    }

    /// `method SP request-target SP HTTP-version`, exactly one space each.
    fn on_request_line(&mut self, line: &[u8]) -> Result<(), Violation> {
        let bad = |validator: &mut Self, reason| {
            Err(validator.refuse(Stage::Head, StatusCode::BAD_REQUEST, reason))
        };
        let Some(first_space) = line.iter().position(|&b| b == b' ') else {
            return bad(self, refine(line, "invalid request line"));
        };
        let (method, rest) = (&line[..first_space], &line[first_space + 1..]);
        let Some(second_space) = rest.iter().position(|&b| b == b' ') else {
            return bad(self, refine(line, "invalid request line"));
        };
        let (target, version) = (&rest[..second_space], &rest[second_space + 1..]);
        if target.len() > self.limits.max_uri_bytes {
            return Err(self.refuse(
                Stage::Head,
                StatusCode::URI_TOO_LONG,
                "request target over the length limit",
            ));
        }
        if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
            return bad(self, refine(method, "invalid request method"));
        }
        // httparse (hyper) also wants the target to be UTF-8; without this check such a head
        // got past the guard and failed in hyper instead (found by fuzzing).
        if target.is_empty()
            || !target.iter().all(|&b| is_target_byte(b))
            || std::str::from_utf8(target).is_err()
        {
            return bad(self, refine(target, "invalid request target"));
        }
        self.head.http10 = match version {
            b"HTTP/1.1" => false,
            b"HTTP/1.0" => true,
            _ => return bad(self, refine(version, "unsupported HTTP version")),
        };
        self.head.request_line_seen = true;
        Ok(())
    }

    fn on_host(&mut self, value: &[u8]) -> Result<(), Violation> {
        self.head.hosts += 1;
        if self.head.hosts > 1 {
            return Err(self.refuse(Stage::Head, StatusCode::BAD_REQUEST, "more than one Host header"));
        }
        if !value.iter().all(|&b| is_host_byte(b)) {
            return Err(self.refuse(Stage::Head, StatusCode::BAD_REQUEST, "invalid Host header"));
        }
        Ok(())
    }

    fn on_content_length(&mut self, value: &[u8]) -> Result<(), Violation> {
        if self.head.content_length.is_some() {
            return Err(self.refuse(Stage::Head, StatusCode::BAD_REQUEST, "duplicate Content-Length"));
        }
        if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
            return Err(self.refuse(Stage::Head, StatusCode::BAD_REQUEST, "invalid Content-Length"));
        }
        let length = value.iter().try_fold(0u64, |length, &digit| {
            length.checked_mul(10)?.checked_add(u64::from(digit - b'0'))
        });
        match length {
            Some(length) => {
                self.head.content_length = Some(length);
                Ok(())
            }
            None => Err(self.refuse(Stage::Head, StatusCode::BAD_REQUEST, "Content-Length overflows")),
        }
    }

    /// One `Transfer-Encoding` field line; the list continues across lines.
    fn on_transfer_encoding(&mut self, value: &[u8]) -> Result<(), Violation> {
        let codings = self.head.transfer_codings.get_or_insert_default();
        let mut malformed = value.is_empty().then_some("empty Transfer-Encoding");
        for element in value.split(|&b| b == b',') {
            let element = trim_ows(element);
            let (name, parameters) = match element.iter().position(|&b| b == b';') {
                Some(semicolon) => (trim_ows(&element[..semicolon]), Some(&element[semicolon + 1..])),
                None => (element, None),
            };
            if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
                malformed = Some("malformed Transfer-Encoding");
            } else if name.eq_ignore_ascii_case(b"chunked") {
                if parameters.is_some() {
                    malformed = Some("chunked takes no parameters");
                }
                codings.chunked += 1;
                codings.chunked_last = true;
            } else if contains_ignore_ascii_case(name, b"chunked") {
                malformed = Some("obfuscated transfer coding");
            } else {
                if parameters.is_some_and(|parameters| !valid_transfer_parameters(parameters)) {
                    malformed = Some("malformed transfer coding parameter");
                }
                codings.others = true;
                codings.chunked_last = false;
            }
            if malformed.is_some() {
                break;
            }
        }
        match malformed {
            Some(reason) => Err(self.refuse(Stage::Head, StatusCode::BAD_REQUEST, reason)),
            None => Ok(()),
        }
    }

    /// The empty line: decides how the body is framed.
    fn finish_head(&mut self, head_end: u64) -> Result<(), Violation> {
        let head = std::mem::take(&mut self.head);
        let refuse =
            |validator: &mut Self, status, reason| Err(validator.refuse(Stage::Head, status, reason));
        if !head.http10 && head.hosts == 0 {
            return refuse(self, StatusCode::BAD_REQUEST, "missing Host header");
        }
        if let Some(codings) = head.transfer_codings {
            if head.content_length.is_some() {
                return refuse(
                    self,
                    StatusCode::BAD_REQUEST,
                    "both Content-Length and Transfer-Encoding",
                );
            }
            if head.http10 {
                return refuse(
                    self,
                    StatusCode::BAD_REQUEST,
                    "Transfer-Encoding in an HTTP/1.0 request",
                );
            }
            if codings.chunked > 1 {
                return refuse(self, StatusCode::BAD_REQUEST, "chunked applied more than once");
            }
            if codings.chunked == 1 && !codings.chunked_last {
                return refuse(
                    self,
                    StatusCode::BAD_REQUEST,
                    "chunked is not the final transfer coding",
                );
            }
            if codings.others {
                return refuse(self, StatusCode::NOT_IMPLEMENTED, "unsupported transfer coding");
            }
            self.phase = Phase::ChunkSize;
            self.unit_start = head_end;
            return Ok(());
        }
        match head.content_length {
            Some(length) if length > 0 => {
                self.phase = Phase::FixedBody { remaining: length };
                self.unit_start = head_end;
            }
            _ => self.end_message(head_end),
        }
        Ok(())
    }

    /// `1*HEXDIG *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] )`.
    fn on_chunk_size_line(&mut self, raw: &[u8], line_end: u64) -> Result<(), Violation> {
        let bad = |validator: &mut Self, reason| {
            Err(validator.refuse(Stage::Body, StatusCode::BAD_REQUEST, reason))
        };
        if raw.len() > MAX_CHUNK_LINE_BYTES {
            return bad(self, "chunk size line too long");
        }
        let Some(line) = raw.strip_suffix(b"\r") else {
            return bad(self, "bare LF in chunked framing");
        };
        let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if digits == 0 {
            return bad(self, refine_chunk(line, "invalid chunk size"));
        }
        let size = line[..digits].iter().try_fold(0u64, |size, &digit| {
            let value = (digit as char).to_digit(16).unwrap_or(0);
            size.checked_mul(16)?.checked_add(u64::from(value))
        });
        let Some(size) = size else {
            return bad(self, "chunk size overflows");
        };
        if !valid_chunk_extensions(&line[digits..]) {
            return bad(
                self,
                refine_chunk(&line[digits..], "invalid chunk size or extension"),
            );
        }
        self.unit_start = line_end;
        self.phase = if size == 0 {
            Phase::Trailers { fields: 0, bytes: 0 }
        } else {
            Phase::ChunkData { remaining: size }
        };
        Ok(())
    }

    fn on_trailer_line(
        &mut self,
        raw: &[u8],
        line_end: u64,
        fields: usize,
        bytes: usize,
    ) -> Result<(), Violation> {
        let bad = |validator: &mut Self, status, reason| Err(validator.refuse(Stage::Body, status, reason));
        // The size first, as for a line in progress (see `check_head_line_limits`).
        let bytes = bytes + raw.len() + 1;
        if bytes - 1 > self.limits.max_header_bytes {
            return bad(
                self,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "trailer section over the size limit",
            );
        }
        let Some(line) = raw.strip_suffix(b"\r") else {
            return bad(self, StatusCode::BAD_REQUEST, "bare LF in chunked framing");
        };
        if bytes > self.limits.max_header_bytes {
            return bad(
                self,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "trailer section over the size limit",
            );
        }
        if line.is_empty() {
            self.end_message(line_end);
            return Ok(());
        }
        if let Err(reason) = check_field_line(line) {
            return bad(self, StatusCode::BAD_REQUEST, reason);
        }
        if fields + 1 > self.limits.max_headers {
            return bad(
                self,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too many trailer fields",
            );
        }
        self.phase = Phase::Trailers {
            fields: fields + 1,
            bytes,
        };
        self.unit_start = line_end;
        Ok(())
    }

    /// The message is complete; the next byte starts the next request's head.
    fn end_message(&mut self, end: u64) {
        self.request_index += 1;
        self.phase = Phase::Head;
        self.unit_start = end;
        self.head = HeadFacts::default();
    }

    fn refuse(&mut self, stage: Stage, status: StatusCode, reason: &'static str) -> Violation {
        let violation = Violation {
            request_index: self.request_index,
            rejection: Rejection { status, reason },
            stage,
        };
        self.phase = Phase::Rejected;
        self.partial = Vec::new();
        self.violation = Some(violation.clone());
        violation
    }
}

/// `field-name ":" OWS field-value OWS`: the name and the trimmed value, or why not.
fn check_field_line(line: &[u8]) -> Result<(&[u8], &[u8]), &'static str> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err("obsolete line folding (obs-fold) in a header");
    }
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Err(refine(line, "header line without a colon"));
    };
    let name = &line[..colon];
    if name.is_empty() {
        return Err("empty header name");
    }
    if let Some(&b) = name.iter().find(|&&b| !is_tchar(b)) {
        return Err(match b {
            b' ' | b'\t' => "whitespace in a header name",
            _ => refine(&[b], "invalid header name"),
        });
    }
    let value = trim_ows(&line[colon + 1..]);
    if let Some(&b) = value.iter().find(|&&b| !is_field_value_byte(b)) {
        return Err(refine(&[b], "control character in a header value"));
    }
    Ok((name, value))
}

/// A more precise reason when `bytes` hold a bare CR or a NUL.
fn refine(bytes: &[u8], reason: &'static str) -> &'static str {
    if bytes.contains(&b'\r') {
        "bare CR in the request head"
    } else if bytes.contains(&0) {
        "NUL byte in the request head"
    } else {
        reason
    }
}

fn refine_chunk(bytes: &[u8], reason: &'static str) -> &'static str {
    if bytes.contains(&b'\r') {
        "bare CR in chunked framing"
    } else {
        reason
    }
}

/// `*( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] )`, ext-val a token or quoted-string.
fn valid_chunk_extensions(mut rest: &[u8]) -> bool {
    while !rest.is_empty() {
        let Some(after) = trim_ows_start(rest).strip_prefix(b";") else {
            return false;
        };
        let after = trim_ows_start(after);
        let name = after.iter().take_while(|&&b| is_tchar(b)).count();
        if name == 0 {
            return false;
        }
        rest = &after[name..];
        if let Some(value) = trim_ows_start(rest).strip_prefix(b"=") {
            match skip_token_or_quoted(trim_ows_start(value)) {
                Some(after_value) => rest = after_value,
                None => return false,
            }
        }
    }
    true
}

/// `*( OWS ";" OWS token "=" ( token / quoted-string ) )` after a coding name's first `;`.
fn valid_transfer_parameters(parameters: &[u8]) -> bool {
    let mut rest = parameters;
    loop {
        let after = trim_ows_start(rest);
        let name = after.iter().take_while(|&&b| is_tchar(b)).count();
        if name == 0 {
            return false;
        }
        let Some(value) = after[name..].strip_prefix(b"=") else {
            return false;
        };
        let Some(after_value) = skip_token_or_quoted(value) else {
            return false;
        };
        let after_value = trim_ows_start(after_value);
        if after_value.is_empty() {
            return true;
        }
        match after_value.strip_prefix(b";") {
            Some(next) => rest = next,
            None => return false,
        }
    }
}

/// Skips a non-empty token or a quoted-string; `None` if neither starts `bytes`.
fn skip_token_or_quoted(bytes: &[u8]) -> Option<&[u8]> {
    if let Some(mut rest) = bytes.strip_prefix(b"\"") {
        loop {
            match rest {
                [b'"', after @ ..] => return Some(after),
                [b'\\', escaped, after @ ..] if is_field_value_byte(*escaped) => rest = after,
                [b, after @ ..] if is_qdtext(*b) => rest = after,
                _ => return None,
            }
        }
    }
    let token = bytes.iter().take_while(|&&b| is_tchar(b)).count();
    (token > 0).then(|| &bytes[token..])
}

fn trim_ows_start(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
    &bytes[start..]
}

fn trim_ows(bytes: &[u8]) -> &[u8] {
    let bytes = trim_ows_start(bytes);
    let end = bytes.len()
        - bytes
            .iter()
            .rev()
            .take_while(|&&b| b == b' ' || b == b'\t')
            .count();
    &bytes[..end]
}

fn contains_ignore_ascii_case(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window.eq_ignore_ascii_case(needle))
}

/// tchar (RFC 9110 §5.6.2): what methods, header names and coding names are made of.
const TCHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        table[byte] = (byte as u8).is_ascii_alphanumeric();
        byte += 1;
    }
    let symbols = b"!#$%&'*+-.^_`|~";
    let mut i = 0;
    while i < symbols.len() {
        table[symbols[i] as usize] = true;
        i += 1;
    }
    table
};

fn is_tchar(b: u8) -> bool {
    TCHAR[b as usize]
}

/// A field value byte: VCHAR, SP, HTAB or obs-text; never a control byte, NUL or DEL.
fn is_field_value_byte(b: u8) -> bool {
    (b >= 0x20 && b != 0x7f) || b == b'\t'
}

/// qdtext (RFC 9110 §5.6.4): a field value byte other than `"` and `\`.
fn is_qdtext(b: u8) -> bool {
    is_field_value_byte(b) && b != b'"' && b != b'\\'
}

/// A request-target byte: visible ASCII or obs-text (as httparse, which also wants the whole
/// target to be UTF-8); no space, control or DEL.
fn is_target_byte(b: u8) -> bool {
    b > 0x20 && b != 0x7f
}

/// `uri-host [ ":" port ]`: reg-name, IP literal or IPv4 and a port.
fn is_host_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%".contains(&b)
}

/// How the read side of a [`GuardedIo`] behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadMode {
    /// Checking HTTP/1 framing.
    Validating,
    /// HTTP/2 prior knowledge: reads go straight through.
    Passthrough,
    /// A chunked body was refused: the next read fails, so hyper fails the body.
    FailBody(&'static str),
    /// Refused: the reader has what it needs; reads discard what the client still sends.
    Draining,
    /// Refused and the client finished sending: reads stay pending until hyper closes.
    Silent,
    /// Ended by the guard (header timeout before any byte): reads return end of stream.
    Ended,
}

/// Bytes read per read call when bytes are held back.
const READ_CHUNK: usize = 8 * 1024;
/// Reads a drain makes before yielding.
const DRAIN_ROUNDS: usize = 16;

/// An I/O stream that validates HTTP/1.1 requests on their way to hyper.
pub struct GuardedIo<S> {
    inner: S,
    validator: H1Validator,
    state: Arc<GuardState>,
    /// Bytes read but not yet handed on, in `buffer[start..end]`: `[start..released]` may go,
    /// `[released..end]` is held back. `buffer[end..]` is spare room (kept initialised).
    buffer: Vec<u8>,
    start: usize,
    released: usize,
    end: usize,
    mode: ReadMode,
    header_timeout: Option<Duration>,
    /// When the time for the current head started counting: the connection's start for the
    /// first head, the first byte of any later one; `None` when no head is being awaited
    /// (hyper's own header timer covers the gaps between requests).
    head_clock: Option<Instant>,
    head_timer: Option<Pin<Box<Sleep>>>,
}

impl<S> GuardedIo<S> {
    pub fn new(inner: S, limits: H1Limits, state: Arc<GuardState>) -> Self {
        GuardedIo {
            inner,
            validator: H1Validator::new(limits),
            state,
            buffer: Vec::new(),
            start: 0,
            released: 0,
            end: 0,
            mode: ReadMode::Validating,
            header_timeout: None,
            head_clock: Some(Instant::now()),
            head_timer: None,
        }
    }

    /// Gives a client `timeout` to send a whole request head (the first one counted from the
    /// connection's start).
    pub fn with_header_timeout(mut self, timeout: Duration) -> Self {
        self.header_timeout = Some(timeout);
        self
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Acts on what the validator said about the bytes just fed.
    fn after_feed(&mut self, outcome: Result<(), Violation>) {
        match outcome {
            Ok(()) if self.validator.is_passthrough() => {
                self.mode = ReadMode::Passthrough;
                self.head_clock = None;
            }
            Ok(()) => {
                if !self.validator.reading_head() {
                    self.head_clock = None;
                } else if self.validator.held() > 0 {
                    self.head_clock.get_or_insert_with(Instant::now);
                } else if self.validator.request_index() > 0 {
                    self.head_clock = None;
                }
            }
            Err(violation) => self.refuse(violation),
        }
        if self.head_clock.is_none() {
            // A registered timer would wake the connection for nothing when it expires.
            self.head_timer = None;
        }
    }

    /// Records `violation` and arranges what hyper reads next.
    fn refuse(&mut self, violation: Violation) {
        tracing::debug!(
            index = violation.request_index,
            status = %violation.rejection.status,
            reason = violation.rejection.reason,
            "HTTP/1 request refused"
        );
        self.state
            .record(violation.request_index, violation.rejection.clone());
        self.head_clock = None;
        // The held bytes belong to the refused request: drop them.
        self.end = self.released;
        match violation.stage {
            Stage::Head => {
                self.append(SYNTHETIC_REQUEST);
                self.released = self.end;
                self.mode = ReadMode::Draining;
            }
            Stage::Body => self.mode = ReadMode::FailBody(violation.rejection.reason),
        }
    }

    /// Appends `bytes` after `buffer[..end]`.
    fn append(&mut self, bytes: &[u8]) {
        self.make_room(bytes.len());
        self.buffer[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Ensures `buffer[end..]` has at least `room` bytes, moving unread bytes to the front.
    fn make_room(&mut self, room: usize) {
        if self.start > 0 {
            self.buffer.copy_within(self.start..self.end, 0);
            self.released -= self.start;
            self.end -= self.start;
            self.start = 0;
        }
        if self.buffer.len() < self.end + room {
            self.buffer.resize(self.end + room, 0);
        }
    }

    /// Whether the header timeout has passed for the head being awaited; if so the mode or
    /// the buffer changed and the read should be retried.
    fn head_timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        let (Some(timeout), Some(started)) = (self.header_timeout, self.head_clock) else {
            return false;
        };
        let deadline = started + timeout;
        let timer = self
            .head_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        self.head_clock = None;
        match self.validator.time_out() {
            Some(violation) => self.refuse(violation),
            None => self.mode = ReadMode::Ended,
        }
        true
    }
}

impl<S: AsyncRead + Unpin> GuardedIo<S> {
    /// Reads and discards what the client still sends after a refusal, so the socket is
    /// empty when it closes (a close with unread bytes sends a reset, which can destroy the
    /// response on its way). Never returns bytes.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut scratch = [0u8; 2048];
        for _ in 0..DRAIN_ROUNDS {
            let mut discard = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut discard) {
                Poll::Ready(Ok(())) if discard.filled().is_empty() => {
                    self.mode = ReadMode::Silent;
                    return Poll::Pending;
                }
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => {
                    self.mode = ReadMode::Silent;
                    return Poll::Pending;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for GuardedIo<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.start < this.released {
                let n = (this.released - this.start).min(buf.remaining());
                buf.put_slice(&this.buffer[this.start..this.start + n]);
                this.start += n;
                if this.start == this.end {
                    (this.start, this.released, this.end) = (0, 0, 0);
                }
                return Poll::Ready(Ok(()));
            }
            match this.mode {
                ReadMode::Validating => {}
                ReadMode::Passthrough => return Pin::new(&mut this.inner).poll_read(cx, buf),
                ReadMode::FailBody(reason) => {
                    this.mode = ReadMode::Draining;
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, reason)));
                }
                ReadMode::Draining => return this.poll_drain(cx),
                ReadMode::Silent => return Poll::Pending,
                ReadMode::Ended => return Poll::Ready(Ok(())),
            }
            if this.end == 0 {
                // Nothing held: read into the caller's buffer and check the bytes in place.
                let filled_before = buf.filled().len();
                match Pin::new(&mut this.inner).poll_read(cx, buf) {
                    Poll::Pending => {
                        if this.head_timed_out(cx) {
                            continue;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Ready(Ok(())) => {}
                }
                let fresh = &buf.filled()[filled_before..];
                if fresh.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                let fed_before = this.validator.fed();
                let outcome = this.validator.feed(fresh);
                let release = (this.validator.release_to() - fed_before) as usize;
                if release < fresh.len() {
                    if outcome.is_ok() {
                        this.append(&fresh[release..]);
                    }
                    buf.set_filled(filled_before + release);
                }
                this.after_feed(outcome);
                if release > 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // Bytes are held back: read after them, then check the new bytes.
            this.make_room(READ_CHUNK);
            let old_end = this.end;
            let mut spare = ReadBuf::new(&mut this.buffer[old_end..]);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut spare);
            let read = spare.filled().len();
            match polled {
                Poll::Pending => {
                    if this.head_timed_out(cx) {
                        continue;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(())) => {}
            }
            if read == 0 {
                // End of stream inside a head or framing line: the reader never sees it.
                (this.start, this.released, this.end) = (0, 0, 0);
                return Poll::Ready(Ok(()));
            }
            this.end += read;
            let outcome = this.validator.feed(&this.buffer[old_end..this.end]);
            this.released = this.end - this.validator.held() as usize;
            this.after_feed(outcome);
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for GuardedIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.mode == ReadMode::Draining {
            // Last chance to empty the socket before the close (hyper stops reading after a
            // failed body).
            let _ = self.poll_drain(cx);
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> H1Limits {
        H1Limits {
            max_header_bytes: 1024,
            max_headers: 16,
            max_uri_bytes: 128,
        }
    }

    /// Feeds `stream` in one piece.
    fn feed_whole(stream: &[u8]) -> (Result<(), Violation>, H1Validator) {
        let mut validator = H1Validator::new(limits());
        let outcome = validator.feed(stream);
        (outcome, validator)
    }

    #[track_caller]
    fn assert_accepted(stream: &[u8], requests: u64) {
        let (outcome, validator) = feed_whole(stream);
        assert_eq!(outcome, Ok(()), "{:?}", String::from_utf8_lossy(stream));
        assert_eq!(
            validator.release_to(),
            stream.len() as u64,
            "{:?}",
            String::from_utf8_lossy(stream)
        );
        assert_eq!(
            validator.request_index(),
            requests,
            "{:?}",
            String::from_utf8_lossy(stream)
        );
    }

    #[track_caller]
    fn refusal(stream: &[u8]) -> Violation {
        match feed_whole(stream).0 {
            Err(violation) => violation,
            Ok(()) => panic!("accepted {:?}", String::from_utf8_lossy(stream)),
        }
    }

    /// `POST / HTTP/1.1` with a Host, then `fields` (CRLF-separated, no final CRLF), the empty
    /// line and `body`.
    fn post(fields: &str, body: &str) -> Vec<u8> {
        format!("POST / HTTP/1.1\r\nHost: a\r\n{fields}\r\n\r\n{body}").into_bytes()
    }

    fn chunked(body: &str) -> Vec<u8> {
        post("Transfer-Encoding: chunked", body)
    }

    #[track_caller]
    fn assert_head_refused(stream: &[u8], status: StatusCode) {
        let violation = refusal(stream);
        assert_eq!(
            (
                violation.rejection.status,
                violation.stage,
                violation.request_index
            ),
            (status, Stage::Head, 0),
            "{:?}: {violation:?}",
            String::from_utf8_lossy(stream)
        );
        // Nothing of a refused head is ever released.
        let (_, validator) = feed_whole(stream);
        assert_eq!(validator.release_to(), 0, "{:?}", String::from_utf8_lossy(stream));
    }

    #[test]
    fn content_length_and_transfer_encoding_together_are_400() {
        for fields in [
            "Content-Length: 5\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: chunked\r\nContent-Length: 5",
            "Content-Length: 0\r\nTransfer-Encoding: gzip, chunked",
        ] {
            let stream = post(fields, "0\r\n\r\n");
            assert_head_refused(&stream, StatusCode::BAD_REQUEST);
            assert_eq!(
                refusal(&stream).rejection.reason,
                "both Content-Length and Transfer-Encoding"
            );
        }
    }

    #[test]
    fn bad_content_length_is_400() {
        for value in [
            "5\r\nContent-Length: 5",
            "5\r\nContent-Length: 6",
            "5, 5",
            "5,5",
            "+5",
            "-5",
            "-0",
            "5a",
            "0x5",
            "5 5",
            "",
            " ",
            "5.0",
            "1e3",
            "18446744073709551616",
            "99999999999999999999999",
            "٥",
        ] {
            let stream = post(&format!("Content-Length: {value}"), "hello");
            assert_head_refused(&stream, StatusCode::BAD_REQUEST);
        }
        assert_eq!(
            refusal(&post("Content-Length: 5\r\nContent-Length: 5", "hello"))
                .rejection
                .reason,
            "duplicate Content-Length"
        );
        assert_eq!(
            refusal(&post("Content-Length: 18446744073709551616", ""))
                .rejection
                .reason,
            "Content-Length overflows"
        );
    }

    #[test]
    fn largest_content_length_and_leading_zeros_are_accepted() {
        let (outcome, validator) = feed_whole(&post("Content-Length: 18446744073709551615", "abc"));
        assert_eq!(outcome, Ok(()));
        assert_eq!(validator.request_index(), 0, "still in the body");
        assert_accepted(&post("Content-Length: 005", "hello"), 1);
        assert_accepted(&post("Content-Length:\t5 ", "hello"), 1);
    }

    #[test]
    fn obfuscated_transfer_encoding_is_400() {
        for fields in [
            "Transfer-Encoding: chunked, chunked",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: xchunked",
            "Transfer-Encoding: chunkedx",
            "Transfer-Encoding: x-chunked",
            "Transfer-Encoding: chunked-false",
            "Transfer-Encoding: chunked;foo=bar",
            "Transfer-Encoding: chunked;",
            "Transfer-Encoding: chunked, gzip",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity",
            "Transfer-Encoding: chunked\x0b",
            "Transfer-Encoding: \x0cchunked",
            "Transfer-Encoding: chunked\x00",
            "Transfer-Encoding: chun ked",
            "Transfer-Encoding: chunked,",
            "Transfer-Encoding: , chunked",
            "Transfer-Encoding: chunked, ,",
            "Transfer-Encoding: \"chunked\"",
            "Transfer-Encoding: chun\u{212A}ed",
            "Transfer-Encoding: chunked\u{a0}",
            "Transfer-Encoding: chunked\r\r\nX: y",
            "Transfer-Encoding:",
            "Transfer-Encoding : chunked",
            "Transfer-Encoding\t: chunked",
            " Transfer-Encoding: chunked",
            "X: y\r\n\tTransfer-Encoding: chunked",
            "Transfer-Encoding:\r\n chunked",
            "Transfer-Encoding: gzip\r\n , chunked",
            "Transfer_Encoding: chunked\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: gzip;q",
            "Transfer-Encoding: gzip;q=\"unterminated",
            // Elements are split at every comma, also one in a quoted parameter value.
            "Transfer-Encoding: gzip;q=\"a,b\", chunked",
        ] {
            assert_head_refused(&post(fields, "0\r\n\r\n"), StatusCode::BAD_REQUEST);
        }
        let http10 = b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_head_refused(http10, StatusCode::BAD_REQUEST);
        assert_eq!(
            refusal(http10).rejection.reason,
            "Transfer-Encoding in an HTTP/1.0 request"
        );
        assert_eq!(
            refusal(&post("Transfer-Encoding: chunked, gzip", ""))
                .rejection
                .reason,
            "chunked is not the final transfer coding"
        );
        assert_eq!(
            refusal(&post("Transfer-Encoding: xchunked", "")).rejection.reason,
            "obfuscated transfer coding"
        );
    }

    #[test]
    fn well_formed_unknown_transfer_codings_are_501() {
        for fields in [
            "Transfer-Encoding: gzip, chunked",
            "Transfer-Encoding: identity",
            "Transfer-Encoding: compress",
            "Transfer-Encoding: gzip",
            "Transfer-Encoding: deflate,chunked",
            "Transfer-Encoding: foo, chunked",
            "Transfer-Encoding: gzip;level=9, chunked",
            "Transfer-Encoding: gzip ; level=\"9 ;x\" ; a=b",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked",
        ] {
            assert_head_refused(&post(fields, "0\r\n\r\n"), StatusCode::NOT_IMPLEMENTED);
        }
    }

    #[test]
    fn chunked_spelled_with_case_or_optional_whitespace_is_chunked() {
        for fields in [
            "Transfer-Encoding: chunked",
            "Transfer-Encoding: Chunked",
            "transfer-encoding: CHUNKED",
            "Transfer-Encoding:chunked",
            "Transfer-Encoding: \tchunked \t",
        ] {
            assert_accepted(&post(fields, "5\r\nhello\r\n0\r\n\r\n"), 1);
        }
    }

    #[test]
    fn head_syntax_errors_are_400() {
        let cases: &[(&[u8], &str)] = &[
            (b"GET / HTTP/1.1\nHost: a\r\n\r\n", "bare LF in the request head"),
            (b"GET / HTTP/1.1\r\nHost: a\n\r\n", "bare LF in the request head"),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\n", "bare LF in the request head"),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
                "bare CR in the request head",
            ),
            (
                b"GET / HTTP/1.1\r\r\nHost: a\r\n\r\n",
                "bare CR in the request head",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nX\r: b\r\n\r\n",
                "bare CR in the request head",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
                "obsolete line folding (obs-fold) in a header",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n\tz\r\n\r\n",
                "obsolete line folding (obs-fold) in a header",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\n: empty\r\n\r\n",
                "empty header name",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nFoo Bar: x\r\n\r\n",
                "whitespace in a header name",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nFoo(: x\r\n\r\n",
                "invalid header name",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nNo colon here\r\n\r\n",
                "header line without a colon",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
                "NUL byte in the request head",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n",
                "control character in a header value",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n",
                "control character in a header value",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x1bb\r\n\r\n",
                "control character in a header value",
            ),
            (b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", "invalid request target"),
            (b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", "unsupported HTTP version"),
            (
                b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
                "unsupported HTTP version",
            ),
            (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", "unsupported HTTP version"),
            (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", "unsupported HTTP version"),
            (b"GET / http/1.1\r\nHost: a\r\n\r\n", "unsupported HTTP version"),
            (b"GET / HTTP/1.1x\r\nHost: a\r\n\r\n", "unsupported HTTP version"),
            (b"GET /\r\nHost: a\r\n\r\n", "invalid request line"),
            (b"GET\r\nHost: a\r\n\r\n", "invalid request line"),
            (b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", "invalid request line"),
            (b" GET / HTTP/1.1\r\nHost: a\r\n\r\n", "invalid request method"),
            (b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n", "invalid request method"),
            (
                b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n",
                "NUL byte in the request head",
            ),
            (b"GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n", "invalid request target"),
            (b"GET / HTTP/1.1\r\n\r\n", "missing Host header"),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
                "more than one Host header",
            ),
            (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", "invalid Host header"),
            (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", "invalid Host header"),
            (b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n", "invalid Host header"),
            (b"PRI * HTTP/2.0\r\n\r\nXM\r\n\r\n", "unsupported HTTP version"),
        ];
        for (stream, reason) in cases {
            let violation = refusal(stream);
            assert_eq!(
                (violation.rejection.status, violation.rejection.reason),
                (StatusCode::BAD_REQUEST, *reason),
                "{:?}",
                String::from_utf8_lossy(stream)
            );
            assert_head_refused(stream, StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn size_limits_are_431_and_414() {
        let filler = "x".repeat(limits().max_header_bytes);
        assert_head_refused(
            &post(&format!("X-Big: {filler}"), ""),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        );
        let many: Vec<String> = (0..limits().max_headers).map(|i| format!("X-{i}: v")).collect();
        // Host plus max_headers fields is one too many.
        assert_head_refused(
            &post(&many.join("\r\n"), ""),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        );
        assert_accepted(&post(&many[1..].join("\r\n"), ""), 1);

        let long = format!("/{}", "a".repeat(limits().max_uri_bytes));
        let stream = format!("GET {long} HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_head_refused(stream.as_bytes(), StatusCode::URI_TOO_LONG);
        let fits = format!("GET {} HTTP/1.1\r\nHost: a\r\n\r\n", &long[1..]);
        assert_accepted(fits.as_bytes(), 1);

        // A head with no end is refused as soon as it is over the limit, not at its end.
        let mut validator = H1Validator::new(limits());
        let endless = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {filler}");
        let violation = validator.feed(endless.as_bytes()).unwrap_err();
        assert_eq!(
            violation.rejection.status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let mut validator = H1Validator::new(limits());
        let endless_target = format!("GET /{}", "a".repeat(limits().max_uri_bytes * 2));
        let violation = validator.feed(endless_target.as_bytes()).unwrap_err();
        assert_eq!(violation.rejection.status, StatusCode::URI_TOO_LONG);
    }

    #[test]
    fn bad_chunk_framing_is_400_in_the_body() {
        for body in [
            "x\r\n",
            "\r\n",
            "0x5\r\nhello\r\n0\r\n\r\n",
            "5 \r\nhello\r\n0\r\n\r\n",
            " 5\r\nhello\r\n0\r\n\r\n",
            "\t5\r\nhello\r\n0\r\n\r\n",
            "-5\r\n",
            "+5\r\n",
            "5z\r\nhello\r\n0\r\n\r\n",
            "5;\r\nhello\r\n0\r\n\r\n",
            "5;=x\r\nhello\r\n0\r\n\r\n",
            "5;a=\r\nhello\r\n0\r\n\r\n",
            "5;a=\"open\r\nhello\r\n0\r\n\r\n",
            "5;a b\r\nhello\r\n0\r\n\r\n",
            "5;a \r\nhello\r\n0\r\n\r\n",
            "10000000000000000\r\n",
            "fffffffffffffffff\r\n",
            "5\nhello\r\n0\r\n\r\n",
            "5\r\r\nhello\r\n0\r\n\r\n",
            "5\rX\nhello\r\n0\r\n\r\n",
            "5\r\nhelloXX0\r\n\r\n",
            "5\r\nhello\n0\r\n\r\n",
            "5\r\nhello\r0\r\n\r\n",
            "5\r\nhello\r\n0\n\r\n",
            "5\r\nhello\r\n0\r\nX: a\n\r\n",
            "5\r\nhello\r\n0\r\n\tfolded: x\r\n\r\n",
            "5\r\nhello\r\n0\r\n: empty\r\n\r\n",
            "5\r\nhello\r\n0\r\nX: a\x00\r\n\r\n",
            "5\r\nhello\r\n0\r\n\n",
        ] {
            let stream = chunked(body);
            let violation = refusal(&stream);
            assert_eq!(
                (
                    violation.rejection.status,
                    violation.stage,
                    violation.request_index
                ),
                (StatusCode::BAD_REQUEST, Stage::Body, 0),
                "{body:?}: {violation:?}"
            );
            // The head (and any data before the bad line) was released; the bad line was not.
            let head_len = chunked("").len() as u64;
            let (_, validator) = feed_whole(&stream);
            assert!(validator.release_to() >= head_len, "{body:?}");
            assert!(validator.release_to() < stream.len() as u64, "{body:?}");
        }
        let too_many_trailers: String = (0..=limits().max_headers)
            .map(|i| format!("T{i}: v\r\n"))
            .collect();
        let violation = refusal(&chunked(&format!("0\r\n{too_many_trailers}\r\n")));
        assert_eq!(
            (violation.rejection.status, violation.stage),
            (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, Stage::Body)
        );
        let long_extension = format!("5;x={}\r\nhello\r\n0\r\n\r\n", "e".repeat(MAX_CHUNK_LINE_BYTES));
        assert_eq!(refusal(&chunked(&long_extension)).stage, Stage::Body);
    }

    #[test]
    fn valid_chunked_bodies_are_accepted() {
        for body in [
            "5\r\nhello\r\n0\r\n\r\n",
            "0\r\n\r\n",
            "000a\r\n0123456789\r\n0000\r\n\r\n",
            "A\r\n0123456789\r\n0\r\n\r\n",
            "5;name=value;flag\r\nhello\r\n0\r\n\r\n",
            "5 ;name = value\r\nhello\r\n0;last\r\n\r\n",
            "5;q=\"a \\\"quoted\\\" ;=, value\"\r\nhello\r\n0\r\n\r\n",
            "5\r\nhello\r\n0\r\nTrailer-One: 1\r\nTrailer-Two:\r\n\r\n",
            "4\r\n\r\n\r\n\r\n0\r\n\r\n",
        ] {
            assert_accepted(&chunked(body), 1);
        }
    }

    #[test]
    fn a_violation_belongs_to_its_request_and_earlier_requests_are_released() {
        let good =
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc";
        let mut stream = good.to_vec();
        stream.extend_from_slice(&post("Content-Length: 1\r\nContent-Length: 1", "x"));
        let (outcome, validator) = feed_whole(&stream);
        let violation = outcome.unwrap_err();
        assert_eq!((violation.request_index, violation.stage), (2, Stage::Head));
        assert_eq!(validator.release_to(), good.len() as u64);

        let mut stream = good.to_vec();
        stream.extend_from_slice(&chunked("3\r\nabc\r\nzz\r\n"));
        let (outcome, validator) = feed_whole(&stream);
        let violation = outcome.unwrap_err();
        assert_eq!((violation.request_index, violation.stage), (2, Stage::Body));
        assert_eq!(
            validator.release_to(),
            (stream.len() - "zz\r\n".len()) as u64,
            "everything up to the bad chunk-size line"
        );

        // Refused stays refused.
        let mut validator = H1Validator::new(limits());
        let first = validator.feed(&post("Content-Length: -1", "")).unwrap_err();
        assert_eq!(validator.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Err(first));
    }

    #[test]
    fn bodies_are_opaque() {
        // A Content-Length body that looks like framing is data.
        let inner = "GET /admin HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\x00\n";
        let stream = post(&format!("Content-Length: {}", inner.len()), inner);
        assert_accepted(&stream, 1);
        let data = "0\r\n\r\nGET /x HTTP/1.1\r\n\n";
        let stream = chunked(&format!("{:x}\r\n{data}\r\n0\r\n\r\n", data.len()));
        assert_accepted(&stream, 1);
    }

    #[test]
    fn http10_and_leading_empty_lines_and_odd_targets_are_accepted() {
        assert_accepted(b"GET / HTTP/1.0\r\n\r\n", 1);
        assert_accepted(
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET / HTTP/1.0\r\n\r\n",
            2,
        );
        assert_accepted(b"POST / HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi", 1);
        assert_accepted(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 1);
        assert_accepted(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", 1);
        assert_accepted(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 1);
        assert_accepted(b"GET http://a/x?y=1 HTTP/1.1\r\nHost: a\r\n\r\n", 1);
        assert_accepted(
            b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: [::1]:8080\r\nX: \xe2\x82\xac\r\n\r\n",
            1,
        );
        assert_accepted(b"GET / HTTP/1.1\r\nHost:\r\nEmpty:\r\n\r\n", 1);
        assert_accepted(b"PRI * HTTP/1.1\r\nHost: a\r\n\r\n", 1);
        assert_accepted(
            b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi",
            1,
        );
    }

    #[test]
    fn http2_preface_switches_to_passthrough() {
        let mut stream = H2_PREFACE.to_vec();
        stream.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00 anything\n\r\x00 goes");
        for split in 0..=stream.len() {
            let mut validator = H1Validator::new(limits());
            validator.feed(&stream[..split]).unwrap();
            if split < H2_PREFACE.len() {
                assert_eq!(validator.release_to(), 0, "held while it may be the preface");
                assert!(!validator.is_passthrough());
            }
            validator.feed(&stream[split..]).unwrap();
            assert!(validator.is_passthrough());
            assert_eq!(validator.release_to(), stream.len() as u64);
        }
    }

    /// Valid connections: pipelined messages, with the byte ranges of their heads.
    fn valid_streams() -> Vec<Vec<&'static [u8]>> {
        vec![
            vec![
                b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
                b"",
                b"GET /two?x=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                b"",
            ],
            vec![
                b"\r\nPOST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n",
                b"hello\r\n\r\nxy",
                b"PUT /q HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\nexpect: 100-continue\r\n\r\n",
                b"5;ext=1\r\nhello\r\nA\r\n0123\r\n\r\n89\r\n0\r\nX-Trailer: t\r\n\r\n",
                b"GET / HTTP/1.0\r\n\r\n",
                b"",
            ],
        ]
    }

    /// Feeds `stream` in `pieces` and checks every intermediate state: each feed accepted,
    /// `release_to` monotonic, never inside a head, and everything released at the end.
    #[track_caller]
    fn feed_in_pieces(parts: &[&[u8]], cuts: &[usize]) {
        let stream: Vec<u8> = parts.concat();
        let mut heads = Vec::new();
        let mut offset = 0u64;
        for (i, part) in parts.iter().enumerate() {
            if i % 2 == 0 {
                heads.push((offset, offset + part.len() as u64));
            }
            offset += part.len() as u64;
        }
        let mut validator = H1Validator::new(limits());
        let mut last_release = 0;
        let mut from = 0;
        for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
            validator
                .feed(&stream[from..cut])
                .unwrap_or_else(|v| panic!("cuts {cuts:?}: {v:?}"));
            from = cut;
            let release = validator.release_to();
            assert!(
                release >= last_release && release <= validator.fed(),
                "cuts {cuts:?}"
            );
            assert!(
                heads
                    .iter()
                    .all(|&(start, end)| release <= start || release >= end),
                "cuts {cuts:?}: released up to {release}, inside a head of {heads:?}"
            );
            last_release = release;
        }
        assert_eq!(validator.release_to(), stream.len() as u64, "cuts {cuts:?}");
        assert_eq!(validator.request_index(), parts.len() as u64 / 2, "cuts {cuts:?}");
    }

    #[test]
    fn valid_streams_split_at_every_byte_boundary_are_accepted_unchanged() {
        for parts in valid_streams() {
            let len: usize = parts.iter().map(|p| p.len()).sum();
            for cut in 0..=len {
                feed_in_pieces(&parts, &[cut]);
            }
            for first in (0..=len).step_by(7) {
                for second in first..=len {
                    feed_in_pieces(&parts, &[first, second]);
                }
            }
            let every_byte: Vec<usize> = (1..len).collect();
            feed_in_pieces(&parts, &every_byte);
            // Pseudo-random piece sizes, reproducible.
            let mut seed = 0x2545_f491_u64;
            for _ in 0..200 {
                let mut cuts = Vec::new();
                let mut at = 0;
                loop {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    at += 1 + (seed >> 59) as usize;
                    if at >= len {
                        break;
                    }
                    cuts.push(at);
                }
                feed_in_pieces(&parts, &cuts);
            }
        }
    }

    #[test]
    fn refusals_do_not_depend_on_read_boundaries() {
        let streams: Vec<Vec<u8>> = vec![
            post("Content-Length: 5\r\nTransfer-Encoding: chunked", "0\r\n\r\n"),
            post("Transfer-Encoding : chunked", ""),
            post("Transfer-Encoding: gzip, chunked", ""),
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\nHost: a\r\n\r\n".to_vec(),
            chunked("5\r\nhello\r\n5 \r\nhello\r\n0\r\n\r\n"),
            chunked("5\r\nhelloXX"),
            b"PRI * HTTP/2.0\r\n\r\nSX\r\n\r\n".to_vec(),
            // Found by fuzzing: lines over a limit, refused for their length in pieces, were
            // refused for something else, or accepted, in one read.
            format!("{} / HTTP/1.1\r\nHost: a\r\n\r\n", "A".repeat(200)).into_bytes(),
            format!("GET /{} HTTP/1.1\nHost: a\r\n\r\n", "u".repeat(150)).into_bytes(),
            format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\n\r\n", "x".repeat(1100)).into_bytes(),
            chunked(&format!("0\r\nX: {}\n\r\n", "x".repeat(1100))),
        ];
        for stream in streams {
            let whole = refusal(&stream);
            let (_, validator) = feed_whole(&stream);
            let release = validator.release_to();
            for cut in 0..=stream.len() {
                let mut validator = H1Validator::new(limits());
                let outcome = validator
                    .feed(&stream[..cut])
                    .and_then(|()| validator.feed(&stream[cut..]));
                assert_eq!(
                    outcome,
                    Err(whole.clone()),
                    "cut at {cut} of {:?}",
                    String::from_utf8_lossy(&stream)
                );
                assert_eq!(validator.release_to(), release, "cut at {cut}");
            }
        }
    }

    #[test]
    fn a_target_that_is_not_utf8_is_400_as_hyper_would_refuse_it() {
        assert_head_refused(b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n", StatusCode::BAD_REQUEST);
        assert_head_refused(b"GET /\xc3 HTTP/1.1\r\nHost: a\r\n\r\n", StatusCode::BAD_REQUEST);
        assert_accepted("GET /caf\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n".as_bytes(), 1);
    }

    #[test]
    fn time_out_refuses_only_a_started_head() {
        let mut validator = H1Validator::new(limits());
        assert_eq!(validator.time_out(), None, "nothing received yet");
        validator
            .feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /slow HT")
            .unwrap();
        assert_eq!(validator.release_to(), 27);
        let violation = validator.time_out().unwrap();
        assert_eq!(
            (
                violation.rejection.status,
                violation.request_index,
                violation.stage
            ),
            (StatusCode::REQUEST_TIMEOUT, 1, Stage::Head)
        );
        assert_eq!(validator.release_to(), 27);

        let mut validator = H1Validator::new(limits());
        validator.feed(b"PRI * HTTP/2").unwrap();
        assert_eq!(
            validator.time_out().map(|v| v.rejection.status),
            Some(StatusCode::REQUEST_TIMEOUT)
        );

        let mut validator = H1Validator::new(limits());
        validator.feed(&post("Content-Length: 10", "abc")).unwrap();
        assert_eq!(
            validator.time_out(),
            None,
            "a slow body is not the head timeout's business"
        );
    }

    /// A transport that returns scripted pieces, one per read (split further if the reader's
    /// buffer is smaller), then end of stream.
    struct ScriptedStream {
        pieces: std::collections::VecDeque<Vec<u8>>,
    }

    impl ScriptedStream {
        fn new(stream: &[u8], cuts: &[usize]) -> Self {
            let mut pieces = std::collections::VecDeque::new();
            let mut from = 0;
            for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
                if cut > from {
                    pieces.push_back(stream[from..cut].to_vec());
                }
                from = cut;
            }
            ScriptedStream { pieces }
        }
    }

    impl AsyncRead for ScriptedStream {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(mut piece) = self.pieces.pop_front() {
                let n = piece.len().min(buf.remaining());
                buf.put_slice(&piece[..n]);
                if n < piece.len() {
                    self.pieces.push_front(piece.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for ScriptedStream {
        fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// How a read loop over a [`GuardedIo`] ended.
    #[derive(Debug, PartialEq, Eq)]
    enum ReadEnd {
        Eof,
        /// Reads stay pending (the guard refused and is waiting for hyper to close).
        Pending,
        Error(io::ErrorKind),
    }

    /// Reads `stream`, delivered in pieces cut at `cuts`, through a guard with reads of at
    /// most `read_size` bytes; returns what the reader got and how the reads ended.
    fn read_guarded(stream: &[u8], cuts: &[usize], read_size: usize) -> (Vec<u8>, ReadEnd, Arc<GuardState>) {
        use futures_util::FutureExt;
        use tokio::io::AsyncReadExt;

        let state = GuardState::new();
        let mut guarded = GuardedIo::new(ScriptedStream::new(stream, cuts), limits(), Arc::clone(&state));
        let mut received = Vec::new();
        let mut chunk = vec![0u8; read_size];
        let end = loop {
            match guarded.read(&mut chunk).now_or_never() {
                Some(Ok(0)) => break ReadEnd::Eof,
                Some(Ok(n)) => received.extend_from_slice(&chunk[..n]),
                Some(Err(error)) => break ReadEnd::Error(error.kind()),
                None => break ReadEnd::Pending,
            }
        };
        (received, end, state)
    }

    #[test]
    fn guarded_io_passes_valid_bytes_unchanged_whatever_the_read_sizes() {
        for parts in valid_streams() {
            let stream = parts.concat();
            for read_size in [1, 7, 24, 8192] {
                for cut in 0..=stream.len() {
                    let (received, end, state) = read_guarded(&stream, &[cut], read_size);
                    assert_eq!(end, ReadEnd::Eof, "cut {cut}, reads of {read_size}");
                    assert!(received == stream, "cut {cut}, reads of {read_size}");
                    assert_eq!(state.rejection_for(0), None);
                }
            }
            let every_byte: Vec<usize> = (1..stream.len()).collect();
            let (received, end, _) = read_guarded(&stream, &every_byte, 24);
            assert_eq!((received, end), (stream.clone(), ReadEnd::Eof));
        }
        let mut h2 = H2_PREFACE.to_vec();
        h2.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00GET / HTTP/1.1\n");
        for cut in 0..=h2.len() {
            let (received, end, _) = read_guarded(&h2, &[cut], 24);
            assert_eq!((received, end), (h2.clone(), ReadEnd::Eof), "cut {cut}");
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::fuzz::config(2000))]

        /// Fuzz target for the I/O half (see `crate::fuzz`): whatever the stream, its cuts and
        /// the read sizes, the reader gets exactly the bytes the validator released, then the
        /// synthetic request for a refused head, or a failed read for refused chunk framing.
        #[test]
        fn fuzz_guarded_io_hands_on_exactly_what_the_validator_released(
            stream in crate::fuzz::h1_stream(),
            cuts in proptest::collection::vec(proptest::prelude::any::<usize>(), 0..4),
            read_size in proptest::sample::select(&[1usize, 7, 24, 8192][..]),
        ) {
            let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut % (stream.len() + 1)).collect();
            cuts.sort_unstable();
            let (outcome, validator) = feed_whole(&stream);
            let released = &stream[..validator.release_to() as usize];
            let (received, end, state) = read_guarded(&stream, &cuts, read_size);
            match outcome {
                Ok(()) => {
                    assert!(received == released, "{:?}", String::from_utf8_lossy(&stream));
                    assert_eq!(end, ReadEnd::Eof);
                }
                Err(violation) => {
                    let mut expected = released.to_vec();
                    let expected_end = match violation.stage {
                        Stage::Head => {
                            expected.extend_from_slice(SYNTHETIC_REQUEST);
                            ReadEnd::Pending
                        }
                        Stage::Body => ReadEnd::Error(io::ErrorKind::InvalidData),
                    };
                    assert!(received == expected, "{:?}", String::from_utf8_lossy(&stream));
                    assert_eq!(end, expected_end, "{:?}", String::from_utf8_lossy(&stream));
                    assert_eq!(
                        state.rejection_for(violation.request_index),
                        Some(violation.rejection)
                    );
                }
            }
        }
    }

    #[test]
    fn guarded_io_hands_a_refused_head_over_as_the_synthetic_request() {
        let good =
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi";
        let mut stream = good.to_vec();
        stream.extend_from_slice(&post(
            "Content-Length: 3\r\nTransfer-Encoding: chunked",
            "0\r\n\r\nGET /x",
        ));
        let mut expected = good.to_vec();
        expected.extend_from_slice(SYNTHETIC_REQUEST);
        for read_size in [1, 24, 8192] {
            for cut in 0..=stream.len() {
                let (received, end, state) = read_guarded(&stream, &[cut], read_size);
                assert_eq!(end, ReadEnd::Pending, "cut {cut}, reads of {read_size}");
                assert!(
                    received == expected,
                    "cut {cut}, reads of {read_size}: {:?}",
                    String::from_utf8_lossy(&received)
                );
                assert_eq!(state.rejection_for(1), None);
                assert_eq!(
                    state.rejection_for(2).map(|r| r.status),
                    Some(StatusCode::BAD_REQUEST)
                );
            }
        }
    }

    #[test]
    fn guarded_io_fails_the_read_at_a_bad_chunk_line() {
        let stream = chunked("5\r\nhello\r\n5 \r\nworld\r\n0\r\n\r\n");
        let valid_part = stream.len() - "5 \r\nworld\r\n0\r\n\r\n".len();
        for read_size in [1, 24, 8192] {
            for cut in 0..=stream.len() {
                let (received, end, state) = read_guarded(&stream, &[cut], read_size);
                assert_eq!(
                    end,
                    ReadEnd::Error(io::ErrorKind::InvalidData),
                    "cut {cut}, reads of {read_size}"
                );
                assert!(
                    received == stream[..valid_part],
                    "cut {cut}, reads of {read_size}"
                );
                assert_eq!(
                    state.rejection_for(0).map(|r| r.reason),
                    Some("invalid chunk size or extension")
                );
            }
        }
    }

    /// The guard in its real place: `server::serve_with` (hyper-util's auto builder and the
    /// `respond` checks) on loopback, with a handler that records the bodies it was given.
    mod through_hyper {
        use std::net::SocketAddr;
        use std::sync::Mutex;

        use bytes::Bytes;
        use http::{Request, Response};
        use http_body_util::{BodyExt, Full};
        use hyper::body::Body;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::net::{TcpListener, TcpStream};

        use super::*;
        use crate::server::{self, BoxError, ConnectionInfo, Handler, Ingress, ServerLimits};
        use crate::test_body::TestBody;

        /// Stands in for a function: answers `PATH N bytes` and records each whole body it got.
        #[derive(Default)]
        struct Recorder {
            bodies: Mutex<Vec<Vec<u8>>>,
        }

        impl Recorder {
            fn bodies(&self) -> Vec<Vec<u8>> {
                self.bodies.lock().unwrap().clone()
            }
        }

        impl Handler for Recorder {
            type Body = TestBody;

            async fn handle<B>(
                self: Arc<Self>,
                request: Request<B>,
                _connection: ConnectionInfo,
            ) -> Response<TestBody>
            where
                B: Body<Data = Bytes> + Send + 'static,
                B::Error: Into<BoxError>,
            {
                let path = request.uri().path().to_string();
                match request.into_body().collect().await {
                    Ok(collected) => {
                        let body = collected.to_bytes();
                        self.bodies.lock().unwrap().push(body.to_vec());
                        server::text_response(StatusCode::OK, format!("{path} {} bytes", body.len()))
                    }
                    Err(_) => server::text_response(StatusCode::BAD_REQUEST, "body error"),
                }
            }
        }

        struct TestServer {
            addr: SocketAddr,
            recorder: Arc<Recorder>,
            _stop: tokio::sync::oneshot::Sender<()>,
        }

        async fn start(limits: ServerLimits) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let recorder = Arc::new(Recorder::default());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let ingress = Ingress {
                limits: Arc::new(limits),
                ..Ingress::default()
            };
            tokio::spawn(server::serve_with(
                listener,
                Arc::clone(&recorder),
                ingress,
                async {
                    let _ = stopped.await;
                },
            ));
            TestServer {
                addr,
                recorder,
                _stop: stop,
            }
        }

        fn small_limits() -> ServerLimits {
            ServerLimits {
                max_header_bytes: 2048,
                max_headers: 20,
                max_uri_bytes: 256,
                ..ServerLimits::default()
            }
        }

        const DEADLINE: Duration = Duration::from_secs(20);

        /// Reads until the server closes; panics on a reset or if it stays open.
        async fn read_until_closed(stream: &mut TcpStream) -> String {
            let mut out = Vec::new();
            tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out))
                .await
                .expect("the server closes the connection")
                .expect("a clean close (FIN), not a reset");
            String::from_utf8_lossy(&out).into_owned()
        }

        /// Sends `bytes` in one write and returns everything the server answered.
        async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(bytes).await.unwrap();
            read_until_closed(&mut stream).await
        }

        /// The status codes of the responses in `answer`, in order.
        fn statuses(answer: &str) -> Vec<u16> {
            answer
                .split("HTTP/1.")
                .skip(1)
                .map(|response| response[2..5].parse().unwrap())
                .collect()
        }

        #[tokio::test]
        async fn a_refused_head_gets_its_status_and_the_function_never_runs() {
            let server = start(small_limits()).await;
            let cases: Vec<(Vec<u8>, u16)> = vec![
                (
                    post(
                        "Content-Length: 33\r\nTransfer-Encoding: chunked",
                        "0\r\n\r\nGET /smuggled HTTP/1.1\r\nX: ",
                    ),
                    400,
                ),
                (post("Transfer-Encoding: xchunked", "0\r\n\r\n"), 400),
                (post("Transfer-Encoding : chunked", "0\r\n\r\n"), 400),
                (post("Content-Length: 5\r\nContent-Length: 5", "hello"), 400),
                (b"GET / HTTP/1.1\r\nHost: a\r\nX: y\n\r\n".to_vec(), 400),
                (post("Transfer-Encoding: gzip, chunked", "0\r\n\r\n"), 501),
                (
                    format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "u".repeat(300)).into_bytes(),
                    414,
                ),
                (post(&format!("X-Big: {}", "b".repeat(3000)), ""), 431),
            ];
            for (request, status) in cases {
                let answer = exchange(server.addr, &request).await;
                assert_eq!(
                    statuses(&answer),
                    [status],
                    "{:?} -> {answer}",
                    String::from_utf8_lossy(&request)
                );
                assert!(
                    answer.to_ascii_lowercase().contains("connection: close"),
                    "{answer}"
                );
            }
            assert!(
                server.recorder.bodies().is_empty(),
                "{:?}",
                server.recorder.bodies()
            );
        }

        #[tokio::test]
        async fn pipelined_requests_before_a_refusal_are_answered_in_order() {
            let server = start(small_limits()).await;
            let mut request = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
            request.extend_from_slice(b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc");
            request.extend_from_slice(&chunked("3\r\nxyz\r\n0\r\n\r\n"));
            request.extend_from_slice(&post("Content-Length: 1, 1", "x"));
            request.extend_from_slice(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n");
            let answer = exchange(server.addr, &request).await;
            assert_eq!(statuses(&answer), [200, 200, 200, 400], "{answer}");
            assert!(
                answer.contains("/1 0 bytes") && answer.contains("/2 3 bytes"),
                "{answer}"
            );
            assert!(answer.contains("invalid Content-Length"), "{answer}");
            assert!(!answer.contains("/after"), "{answer}");
            assert_eq!(
                server.recorder.bodies(),
                [b"".to_vec(), b"abc".to_vec(), b"xyz".to_vec()]
            );
        }

        #[tokio::test]
        async fn a_bad_chunk_fails_the_body_so_the_function_never_sees_it_truncated() {
            let server = start(small_limits()).await;
            for body in [
                "5\r\nhello\r\n5 \r\nworld\r\n0\r\n\r\n",
                "5\r\nhello\r\nzz\r\n",
                "5\r\nhelloXX0\r\n\r\n",
                "5\r\nhello\r\n0\r\nBad Name: x\r\n\r\n",
            ] {
                let answer = exchange(server.addr, &chunked(body)).await;
                assert_eq!(statuses(&answer), [400], "{body:?} -> {answer}");
                assert!(
                    !answer.contains("body error"),
                    "the guard's reason, not the handler's: {answer}"
                );
            }
            assert!(
                server.recorder.bodies().is_empty(),
                "{:?}",
                server.recorder.bodies()
            );
        }

        #[tokio::test]
        async fn valid_requests_trickled_byte_by_byte_are_served() {
            let server = start(small_limits()).await;
            let mut request = chunked("5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: t\r\n\r\n");
            request.extend_from_slice(b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
            let mut stream = TcpStream::connect(server.addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            for byte in &request {
                stream.write_all(std::slice::from_ref(byte)).await.unwrap();
            }
            let answer = read_until_closed(&mut stream).await;
            assert_eq!(statuses(&answer), [200, 200], "{answer}");
            assert_eq!(server.recorder.bodies(), [b"hello world".to_vec(), Vec::new()]);
        }

        #[tokio::test]
        async fn expect_100_continue_and_http10_work() {
            let server = start(small_limits()).await;
            let mut stream = TcpStream::connect(server.addr).await.unwrap();
            stream
                .write_all(
                    concat!(
                        "POST /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n",
                        "Content-Length: 4\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
            let mut interim = Vec::new();
            while !interim.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                tokio::time::timeout(DEADLINE, stream.read_exact(&mut byte))
                    .await
                    .unwrap()
                    .unwrap();
                interim.push(byte[0]);
            }
            assert!(
                interim.starts_with(b"HTTP/1.1 100"),
                "{}",
                String::from_utf8_lossy(&interim)
            );
            stream.write_all(b"body").await.unwrap();
            let answer = read_until_closed(&mut stream).await;
            assert_eq!(statuses(&answer), [200], "{answer}");
            assert!(answer.contains("/e 4 bytes"), "{answer}");

            let answer = exchange(server.addr, b"GET /ten HTTP/1.0\r\n\r\n").await;
            assert_eq!(statuses(&answer), [200], "{answer}");
            assert!(answer.contains("/ten 0 bytes"), "{answer}");
        }

        #[tokio::test]
        async fn h2c_prior_knowledge_passes_through() {
            let server = start(small_limits()).await;
            let stream = TcpStream::connect(server.addr).await.unwrap();
            let (mut sender, connection) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(stream),
            )
            .await
            .unwrap();
            tokio::spawn(connection);
            for path in ["/h2-a", "/h2-b"] {
                let request = Request::post(format!("http://a{path}"))
                    .body(Full::new(Bytes::from_static(b"0\r\n\r\nxx")))
                    .unwrap();
                let response = sender.send_request(request).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                let body = response.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body, format!("{path} 7 bytes\n").as_bytes());
            }
        }

        #[tokio::test]
        async fn header_timeout_answers_a_partial_head_with_408_and_ends_a_silent_connection() {
            let timeout = Duration::from_millis(300);
            let server = start(ServerLimits {
                header_read_timeout: timeout,
                ..small_limits()
            })
            .await;
            let started = std::time::Instant::now();
            let mut partial = TcpStream::connect(server.addr).await.unwrap();
            partial
                .write_all(b"GET /slow HTTP/1.1\r\nHost: a\r\n")
                .await
                .unwrap();
            let mut silent = TcpStream::connect(server.addr).await.unwrap();
            let answer = read_until_closed(&mut partial).await;
            assert_eq!(statuses(&answer), [408], "{answer}");
            assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
            assert_eq!(read_until_closed(&mut silent).await, "");
            assert!(started.elapsed() < DEADLINE);
            assert!(server.recorder.bodies().is_empty());
        }
    }
}
