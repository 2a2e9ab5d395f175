//! The sans-IO half of the guard: [`H1Validator`] is fed a connection's bytes and says how
//! far they may go on to hyper, or which request to refuse, with which status and why. It
//! never sees a socket or a clock, so its tests feed it slices split at every byte boundary
//! (and the fuzz targets check it against httparse).

use http::StatusCode;

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

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Longest chunk-size line (size and extensions) accepted.
pub(super) const MAX_CHUNK_LINE_BYTES: usize = 4096;
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
    /// After the head of an upgrade request (`GET`, `Connection: upgrade`, `Upgrade`, no
    /// body): the bytes that follow are the new protocol's, or nothing hyper parses (hyper
    /// reads no further request before the response is decided, and one that is not 101
    /// closes the connection). Nothing to check.
    Upgraded,
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
    /// The method is exactly `GET` (methods are case-sensitive).
    get: bool,
    /// A `Connection` field listed the `upgrade` option.
    connection_upgrade: bool,
    /// A non-empty `Upgrade` field.
    upgrade: bool,
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
    /// The index of the request whose head switched the connection to another protocol.
    upgraded: Option<u64>,
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
            upgraded: None,
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
            Phase::Passthrough | Phase::Upgraded | Phase::FixedBody { .. } | Phase::ChunkData { .. } => {
                self.fed
            }
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

    /// 0-based index of the request being read; after an upgrade, of the upgrade request.
    pub fn request_index(&self) -> u64 {
        self.request_index
    }

    /// Whether the connection turned out to be HTTP/2 with prior knowledge.
    pub fn is_passthrough(&self) -> bool {
        self.phase == Phase::Passthrough
    }

    /// The index of the request whose head asked to upgrade the connection (HTTP/1.1 `GET`
    /// with `Connection: upgrade`, an `Upgrade` field and no body), if one did: every byte
    /// from the end of that head on is passed through unchecked.
    pub fn upgraded_request(&self) -> Option<u64> {
        self.upgraded
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
                Phase::Passthrough | Phase::Upgraded | Phase::Rejected | Phase::Preface { .. } => {
                    return Ok(());
                }
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
            7 if name.eq_ignore_ascii_case(b"upgrade") => {
                self.head.upgrade |= !value.is_empty();
                Ok(())
            }
            10 if name.eq_ignore_ascii_case(b"connection") => {
                self.head.connection_upgrade |= value
                    .split(|&b| b == b',')
                    .any(|option| trim_ows(option).eq_ignore_ascii_case(b"upgrade"));
                Ok(())
            }
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
        self.head.get = method == b"GET";
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
            // An upgrade request (RFC 9110 §7.8) in the one form hyper hands over the
            // connection for after a 101: HTTP/1.1 (hyper ignores `Upgrade` in HTTP/1.0), no
            // body (no `Transfer-Encoding` reaches here). CONNECT, which hyper also hands over
            // (after a 2xx), never switches the guard.
            _ if !head.http10 && head.get && head.connection_upgrade && head.upgrade => {
                self.phase = Phase::Upgraded;
                self.upgraded = Some(self.request_index);
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
