//! Fuzz targets for the parsers that read a client's bytes before hyper or h3 do: the
//! HTTP/1.1 framing validator ([`H1Validator`]) and the HTTP/3 frame limit ([`FrameLimit`]).
//!
//! libFuzzer needs nightly, so these are property tests (proptest) that run with the other
//! tests, a bounded number of cases each; `PROPTEST_CASES=100000 cargo nextest run -p
//! atoll-ingress fuzz` runs them longer. Inputs come from a grammar of the pieces request
//! smuggling is made of (conflicting lengths, codings spelled oddly, stray CR and LF, folded
//! lines, chunk sizes and extensions), then mutated byte by byte, and from the seeds in
//! `fuzz-corpus/`. Each input is checked against an independent reading of the same bytes:
//! httparse (hyper's parser) for every head the validator lets through and a plain chunked
//! decoder for the bodies, so the validator and hyper can never disagree on where a request
//! ends, nor on which request is an upgrade request (after its head everything passes
//! through). A failing case is written to `proptest-regressions/` and replayed first from then on.

use http::StatusCode;
use proptest::prelude::*;
use proptest::sample::select;

use crate::h1_guard::{H1Limits, H1Validator, Stage, Violation};
use crate::quic::{FrameLimit, FrameTooLarge};

pub(crate) use atoll_testkit::fuzz::config;

/// The seed inputs of one target: every file in `fuzz-corpus/<target>/`.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    atoll_testkit::fuzz::corpus(env!("CARGO_MANIFEST_DIR"), target)
}

/// Byte-level mutations: (position, what) pairs applied in order, positions taken modulo
/// the length at that point.
#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    /// Repeats `len` bytes from the position (a duplicated header line, say).
    Repeat(usize, usize),
}

/// Bytes that matter to HTTP/1 framing, inserted more often than chance would.
const INTERESTING_BYTES: &[u8] = b"\r\n\r\n \t\0:;,=\"0aF\x7f\x0b";

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, mask)| Mutation::Flip(at, mask.max(1))),
        (any::<usize>(), select(INTERESTING_BYTES)).prop_map(|(at, byte)| Mutation::Insert(at, byte)),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert(at, byte)),
        any::<usize>().prop_map(Mutation::Delete),
        (any::<usize>(), 1..24usize).prop_map(|(at, len)| Mutation::Repeat(at, len)),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for mutation in mutations {
        let len = bytes.len();
        match *mutation {
            Mutation::Flip(at, mask) if len > 0 => bytes[at % len] ^= mask,
            Mutation::Insert(at, byte) => bytes.insert(at % (len + 1), byte),
            Mutation::Delete(at) if len > 0 => {
                bytes.remove(at % len);
            }
            Mutation::Repeat(at, n) if len > 0 => {
                let start = at % len;
                let piece = bytes[start..(start + n).min(len)].to_vec();
                bytes.splice(start..start, piece);
            }
            _ => {}
        }
    }
    bytes
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1 validator
// ---------------------------------------------------------------------------------------

/// A choice from `pool` whose first `good` entries are well-formed: one of those `weight`
/// times out of `weight + 1`, anything in the pool otherwise. Mostly valid requests get past
/// the first line and exercise the framing; the rest probe the refusals.
fn biased(pool: &'static [&'static str], good: usize, weight: u32) -> impl Strategy<Value = &'static str> {
    prop_oneof![weight => select(&pool[..good]), 1 => select(pool)]
}

const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "HEAD", "OPTIONS", "G ET", "", "GET\0", "G\tT", "PRI", "get",
];
const TARGETS: &[&str] = &[
    "/",
    "/a/b?c=d",
    "*",
    "http://a/x",
    "/\u{fc}",
    "/\x7f",
    "/a b",
    "/%00",
    "/a\rb",
];
const VERSIONS: &[&str] = &[
    "HTTP/1.1",
    "HTTP/1.0",
    "HTTP/1.2",
    "http/1.1",
    "HTTP/2.0",
    "HTTP/1.1 ",
    "HTTP/11",
];
/// Field names: ordinary ones (5), the ones framing depends on (8), malformed ones.
const NAMES: &[&str] = &[
    "X-Forwarded-For",
    "Connection",
    "Expect",
    "Trailer",
    "Accept",
    "Host",
    "host",
    "Upgrade",
    "Content-Length",
    "content-length",
    "CONTENT-LENGTH",
    "Transfer-Encoding",
    "transfer-encoding",
    "Transfer-Encoding ",
    " Transfer-Encoding",
    "Transfer_Encoding",
    "",
    "X\0",
    "Content-Length\t",
    "X-\u{212A}",
];

/// A field name: an ordinary one most of the time, so that requests get through.
fn field_name() -> impl Strategy<Value = &'static str> {
    prop_oneof![8 => select(&NAMES[..5]), 3 => select(&NAMES[5..13]), 1 => select(NAMES)]
}

/// Field values, well-formed first (21).
const VALUES: &[&str] = &[
    "a",
    "a:80",
    "[::1]:8080",
    "0",
    "5",
    "10",
    "005",
    "chunked",
    "Chunked",
    " chunked ",
    "gzip, chunked",
    "chunked, gzip",
    "identity",
    "gzip;q=1, chunked",
    "gzip;q=\"a\\\"b\", chunked",
    "close",
    "keep-alive, Upgrade",
    "websocket",
    "100-continue",
    "\u{fc}",
    "",
    "+5",
    "-1",
    "5, 5",
    "1 5",
    "18446744073709551616",
    "chunked, chunked",
    "xchunked",
    "chunked;a=b",
    "chun\u{212A}ed",
    ",chunked",
    "chunked,",
    "\tchunked",
    "\x0bchunked",
    "a\rb",
    "a\x01b",
];
const SEPARATORS: &[&str] = &[": ", ":", ":\t", " : ", "::"];
const EOLS: &[&str] = &["\r\n", "\n", "\r", "\r\r\n", "\n\r"];

/// A line end: CRLF all but one time in 25.
fn eol() -> impl Strategy<Value = &'static str> {
    biased(EOLS, 1, 24)
}

#[derive(Debug, Clone)]
struct Field {
    name: String,
    separator: &'static str,
    value: String,
    /// An obs-fold continuation (` x`) after the value.
    folded: bool,
    eol: &'static str,
}

fn field() -> impl Strategy<Value = Field> {
    let value = prop_oneof![
        4 => biased(VALUES, 21, 6).prop_map(String::from),
        1 => any::<u16>().prop_map(|n| n.to_string()),
        1 => "[ -~\t]{0,12}",
    ];
    (
        field_name().prop_map(String::from),
        biased(SEPARATORS, 3, 12),
        value,
        prop::bool::weighted(0.02),
        eol(),
    )
        .prop_map(|(name, separator, value, folded, eol)| Field {
            name,
            separator,
            value,
            folded,
            eol,
        })
}

/// A chunk size as written: how its hex is spelled and what follows it.
#[derive(Debug, Clone)]
struct Chunk {
    data: Vec<u8>,
    /// Size written in the line (usually the data's length).
    declared: Option<u64>,
    spelling: &'static str,
    extension: &'static str,
    eol: &'static str,
    data_eol: &'static str,
}

/// How a chunk size is written (`x` stands for its hex digits), well-formed first (2).
const SPELLINGS: &[&str] = &["x", "00x", "X", "0x", " x", "x ", "+x", "x\t"];
/// Chunk extensions, well-formed first (5).
const EXTENSIONS: &[&str] = &[
    "",
    ";a=b",
    ";a",
    "; a = \"q\\\"x\"",
    ";a=b;c",
    ";",
    ";=b",
    ";a=\"",
    "junk",
];

fn chunk() -> impl Strategy<Value = Chunk> {
    (
        prop::collection::vec(any::<u8>(), 1..20),
        prop::option::weighted(0.1, prop_oneof![Just(u64::MAX), 0..40u64]),
        biased(SPELLINGS, 2, 6),
        biased(EXTENSIONS, 5, 6),
        eol(),
        eol(),
    )
        .prop_map(|(data, declared, spelling, extension, eol, data_eol)| Chunk {
            data,
            declared,
            spelling,
            extension,
            eol,
            data_eol,
        })
}

#[derive(Debug, Clone)]
enum Body {
    None,
    /// A body framed by an added `Content-Length` of `declared` (its length when `None`).
    Fixed {
        data: Vec<u8>,
        declared: Option<u64>,
    },
    /// A body framed by an added `Transfer-Encoding: chunked`: chunks, the last-chunk line,
    /// trailer fields.
    Chunked {
        chunks: Vec<Chunk>,
        last: &'static str,
        trailers: Vec<Field>,
    },
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        2 => Just(Body::None),
        2 => (
            prop::collection::vec(any::<u8>(), 0..40),
            prop::option::weighted(0.1, 0..60u64)
        )
            .prop_map(|(data, declared)| Body::Fixed { data, declared }),
        3 => (
            prop::collection::vec(chunk(), 0..4),
            biased(&["0\r\n", "000\r\n", "0;x=y\r\n", "0\n", "0 \r\n"], 3, 12),
            prop::collection::vec(field(), 0..3)
        )
            .prop_map(|(chunks, last, trailers)| Body::Chunked {
                chunks,
                last,
                trailers
            }),
    ]
}

#[derive(Debug, Clone)]
struct Request {
    leading_empty_line: bool,
    method: &'static str,
    target: &'static str,
    version: &'static str,
    space: &'static str,
    eol: &'static str,
    fields: Vec<Field>,
    body: Body,
    end_of_head: &'static str,
}

fn request() -> impl Strategy<Value = Request> {
    (
        prop::bool::weighted(0.05),
        (
            biased(METHODS, 5, 12),
            biased(TARGETS, 5, 12),
            biased(VERSIONS, 2, 12),
        ),
        biased(&[" ", "  ", "\t"], 1, 24),
        eol(),
        prop::collection::vec(field(), 0..5),
        body(),
        eol(),
    )
        .prop_map(
            |(leading_empty_line, (method, target, version), space, eol, fields, body, end_of_head)| {
                Request {
                    leading_empty_line,
                    method,
                    target,
                    version,
                    space,
                    eol,
                    fields,
                    body,
                    end_of_head,
                }
            },
        )
}

fn write_field(out: &mut Vec<u8>, field: &Field) {
    out.extend_from_slice(field.name.as_bytes());
    out.extend_from_slice(field.separator.as_bytes());
    out.extend_from_slice(field.value.as_bytes());
    if field.folded {
        out.extend_from_slice(b"\r\n x");
    }
    out.extend_from_slice(field.eol.as_bytes());
}

impl Request {
    fn encode(&self, out: &mut Vec<u8>) {
        if self.leading_empty_line {
            out.extend_from_slice(b"\r\n");
        }
        let line = [self.method, self.target, self.version].join(self.space);
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(self.eol.as_bytes());
        // A Host most of the time, so that requests get past the head often.
        if !self
            .fields
            .iter()
            .any(|field| field.name.eq_ignore_ascii_case("host"))
        {
            out.extend_from_slice(b"Host: h\r\n");
        }
        for field in &self.fields {
            write_field(out, field);
        }
        match &self.body {
            Body::None => {}
            Body::Fixed { data, declared } => {
                let length = declared.unwrap_or(data.len() as u64);
                out.extend_from_slice(format!("Content-Length: {length}\r\n").as_bytes());
            }
            Body::Chunked { .. } => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        }
        out.extend_from_slice(self.end_of_head.as_bytes());
        match &self.body {
            Body::None => {}
            Body::Fixed { data, .. } => out.extend_from_slice(data),
            Body::Chunked {
                chunks,
                last,
                trailers,
            } => {
                for chunk in chunks {
                    let size = chunk.declared.unwrap_or(chunk.data.len() as u64);
                    let size = chunk.spelling.replace('x', &format!("{size:x}"));
                    out.extend_from_slice(size.as_bytes());
                    out.extend_from_slice(chunk.extension.as_bytes());
                    out.extend_from_slice(chunk.eol.as_bytes());
                    out.extend_from_slice(&chunk.data);
                    out.extend_from_slice(chunk.data_eol.as_bytes());
                }
                out.extend_from_slice(last.as_bytes());
                for trailer in trailers {
                    write_field(out, trailer);
                }
                out.extend_from_slice(b"\r\n");
            }
        }
    }
}

/// A connection's bytes: requests from the grammar or a seed, then byte mutations. Also
/// drives the `GuardedIo` target in `h1_guard`'s tests.
pub(crate) fn h1_stream() -> impl Strategy<Value = Vec<u8>> {
    let seeds = corpus("h1");
    let from_grammar = prop::collection::vec(request(), 1..4).prop_map(|requests| {
        let mut out = Vec::new();
        for request in &requests {
            request.encode(&mut out);
        }
        out
    });
    let from_seed = select(seeds);
    (
        prop_oneof![3 => from_grammar, 1 => from_seed],
        prop_oneof![Just(Vec::new()), prop::collection::vec(mutation(), 1..4)],
    )
        .prop_map(|(bytes, mutations)| mutate(bytes, &mutations))
}

/// Small limits, so the size refusals are reached too.
fn h1_limits() -> impl Strategy<Value = H1Limits> {
    (
        prop_oneof![1 => Just(96usize), 4 => Just(512), 4 => Just(8192)],
        prop_oneof![1 => Just(2usize), 4 => Just(8), 4 => Just(100)],
        prop_oneof![1 => Just(8usize), 4 => Just(64), 4 => Just(4096)],
    )
        .prop_map(|(max_header_bytes, max_headers, max_uri_bytes)| H1Limits {
            max_header_bytes,
            max_headers,
            max_uri_bytes,
        })
}

/// What feeding a connection's bytes came to: the first violation, and the validator's
/// position after it (or after the last byte).
#[derive(Debug, PartialEq, Eq)]
struct Verdict {
    violation: Option<Violation>,
    release_to: u64,
    request_index: u64,
}

/// Feeds `stream` cut at `cuts` (sorted offsets).
fn feed_in_pieces(limits: H1Limits, stream: &[u8], cuts: &[usize]) -> Verdict {
    let mut validator = H1Validator::new(limits);
    let mut start = 0;
    let mut violation = None;
    for end in cuts.iter().copied().chain([stream.len()]) {
        if end < start {
            continue;
        }
        if let Err(refused) = validator.feed(&stream[start..end]) {
            violation = Some(refused);
            break;
        }
        start = end;
    }
    Verdict {
        violation,
        release_to: validator.release_to(),
        request_index: validator.request_index(),
    }
}

/// Where the validator, fed one byte at a time, saw each request's head and message end.
#[derive(Debug, Default)]
struct Trace {
    /// `(head start, head end, message end if reached)` of each head it let through, but
    /// an upgrade request's.
    messages: Vec<(u64, u64, Option<u64>)>,
    passthrough: bool,
    /// `(head start, head end)` of the upgrade request after which everything passes.
    upgrade: Option<(u64, u64)>,
    verdict: Option<Verdict>,
}

fn trace_bytewise(limits: H1Limits, stream: &[u8]) -> Trace {
    let mut validator = H1Validator::new(limits);
    let mut trace = Trace::default();
    let mut message_start = 0u64;
    let mut released = 0u64;
    let mut violation = None;
    let bound = limits.max_header_bytes.max(4096) as u64 + 2;
    for (offset, byte) in stream.iter().enumerate() {
        let end = offset as u64 + 1;
        let (was_head, index) = (validator.reading_head(), validator.request_index());
        if let Err(refused) = validator.feed(std::slice::from_ref(byte)) {
            violation = Some(refused);
            break;
        }
        if validator.is_passthrough() {
            trace.passthrough = true;
            return trace;
        }
        if validator.upgraded_request().is_some() {
            // From the upgrade request's head on, every byte is released as it comes.
            trace.upgrade.get_or_insert((message_start, end));
            assert_eq!(validator.upgraded_request(), Some(index));
            assert_eq!(validator.release_to(), end);
            continue;
        }
        // Released bytes never come back, and what is held back stays bounded.
        assert!(
            validator.release_to() >= released,
            "release_to went back from {released} to {} at byte {offset}",
            validator.release_to()
        );
        released = validator.release_to();
        assert!(released <= end);
        assert!(
            validator.held() <= bound,
            "{} bytes held back at byte {offset}",
            validator.held()
        );
        if validator.request_index() > index {
            assert_eq!(validator.request_index(), index + 1);
            if was_head {
                trace.messages.push((message_start, end, Some(end)));
            } else {
                trace.messages.last_mut().unwrap().2 = Some(end);
            }
            message_start = end;
        } else if was_head && !validator.reading_head() {
            trace.messages.push((message_start, end, None));
        }
    }
    trace.verdict = Some(Verdict {
        violation,
        release_to: validator.release_to(),
        request_index: validator.request_index(),
    });
    trace
}

/// Where a chunked body starting at `body` ends, read as hyper reads one: a hex size (whatever
/// follows it up to the CRLF ignored), the data, CRLF; after the last chunk, trailer lines up
/// to an empty one. `None` when the bytes end first or the framing is broken.
fn chunked_end(stream: &[u8], body: usize) -> Option<usize> {
    let line = |at: usize| -> Option<(&[u8], usize)> {
        let lf = stream.get(at..)?.iter().position(|&b| b == b'\n')?;
        let line = stream[at..at + lf].strip_suffix(b"\r")?;
        Some((line, at + lf + 1))
    };
    let mut at = body;
    loop {
        let (size_line, next) = line(at)?;
        let digits = size_line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        if digits == 0 || digits > 16 {
            return None;
        }
        let size = u64::from_str_radix(std::str::from_utf8(&size_line[..digits]).ok()?, 16).ok()?;
        at = next;
        if size == 0 {
            loop {
                let (trailer, next) = line(at)?;
                at = next;
                if trailer.is_empty() {
                    return Some(at);
                }
            }
        }
        let data_end = at.checked_add(usize::try_from(size).ok()?)?;
        let next = data_end.checked_add(2)?;
        if stream.get(data_end..next)? != b"\r\n" {
            return None;
        }
        at = next;
    }
}

/// The independent reading of one head the validator let through: what it must hold, where
/// its body ends (`None`: not within `stream`, or not framed), and whether it is an upgrade
/// request (HTTP/1.1 `GET`, `upgrade` among the `Connection` options, a non-empty `Upgrade`,
/// no body), after which the validator must pass everything through.
fn check_accepted_head(limits: H1Limits, stream: &[u8], start: usize, end: usize) -> (Option<u64>, bool) {
    let head = &stream[start..end];
    let shown = String::from_utf8_lossy(head);
    for (index, &byte) in head.iter().enumerate() {
        match byte {
            b'\n' => assert!(
                index > 0 && head[index - 1] == b'\r',
                "bare LF accepted: {shown:?}"
            ),
            b'\r' => assert_eq!(head.get(index + 1), Some(&b'\n'), "bare CR accepted: {shown:?}"),
            _ => {}
        }
    }
    assert!(head.ends_with(b"\r\n\r\n"), "{shown:?}");
    let lines: Vec<&[u8]> = head.split(|&b| b == b'\n').collect();
    let request_line = lines.iter().position(|line| *line != b"\r").unwrap();
    for line in &lines[request_line + 1..] {
        assert!(
            !line.starts_with(b" ") && !line.starts_with(b"\t"),
            "obs-fold accepted: {shown:?}"
        );
    }
    assert!(
        head.len() <= limits.max_header_bytes,
        "a {}-byte head accepted: {shown:?}",
        head.len()
    );

    // hyper's parser reads the same head, to the same end.
    let mut headers = vec![httparse::EMPTY_HEADER; limits.max_headers + 1];
    let mut request = httparse::Request::new(&mut headers);
    let parsed = request.parse(head);
    assert_eq!(
        parsed.as_ref().ok(),
        Some(&httparse::Status::Complete(head.len())),
        "httparse reads {parsed:?}: {shown:?}"
    );
    assert!(request.headers.len() <= limits.max_headers, "{shown:?}");
    assert!(request.path.unwrap().len() <= limits.max_uri_bytes, "{shown:?}");
    let http10 = request.version == Some(0);
    let named = |name: &str| {
        request
            .headers
            .iter()
            .filter(|header| header.name.eq_ignore_ascii_case(name))
            .map(|header| header.value)
            .collect::<Vec<_>>()
    };
    for header in request.headers.iter() {
        assert!(
            header
                .value
                .iter()
                .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f)),
            "control byte in a value accepted: {shown:?}"
        );
    }
    let upgrade = !http10
        && request.method == Some("GET")
        && named("connection").iter().any(|value| {
            value
                .split(|&b| b == b',')
                .any(|option| option.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
        })
        && named("upgrade").iter().any(|value| !value.is_empty());
    let hosts = named("host");
    assert!(hosts.len() <= 1 && (http10 || hosts.len() == 1), "{shown:?}");
    let lengths = named("content-length");
    let codings = named("transfer-encoding");
    assert!(lengths.len() <= 1, "Content-Length twice accepted: {shown:?}");
    assert!(
        lengths.is_empty() || codings.is_empty(),
        "Content-Length with Transfer-Encoding accepted: {shown:?}"
    );
    if !codings.is_empty() {
        assert!(!http10, "Transfer-Encoding in HTTP/1.0 accepted: {shown:?}");
        let list = codings.join(&b","[..]);
        let elements: Vec<&str> = std::str::from_utf8(&list)
            .unwrap()
            .split(',')
            .map(|element| element.trim_matches([' ', '\t']))
            .collect();
        assert!(
            elements.len() == 1 && elements[0].eq_ignore_ascii_case("chunked"),
            "Transfer-Encoding {elements:?} accepted: {shown:?}"
        );
        return (chunked_end(stream, end).map(|end| end as u64), false);
    }
    match lengths.first() {
        Some(value) => {
            assert!(
                !value.is_empty() && value.iter().all(u8::is_ascii_digit),
                "{shown:?}"
            );
            let length: u64 = std::str::from_utf8(value).unwrap().parse().unwrap();
            let end = (end as u64)
                .checked_add(length)
                .filter(|&body_end| body_end <= stream.len() as u64);
            (end, upgrade && length == 0)
        }
        None => (Some(end as u64), upgrade),
    }
}

/// Every property of the validator on one connection's bytes.
fn check_h1(limits: H1Limits, stream: &[u8], cuts: &[usize]) {
    let shown = String::from_utf8_lossy(stream);
    let whole = feed_in_pieces(limits, stream, &[]);
    let trace = trace_bytewise(limits, stream);
    if trace.passthrough {
        assert!(stream.starts_with(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert_eq!(whole.violation, None);
        return;
    }
    let bytewise = trace.verdict.as_ref().unwrap();

    // How the bytes happen to be cut by reads never changes the verdict.
    assert_eq!(&whole, bytewise, "whole vs byte by byte: {shown:?}");
    let mut cuts = cuts
        .iter()
        .map(|cut| cut % (stream.len() + 1))
        .collect::<Vec<_>>();
    cuts.sort_unstable();
    assert_eq!(
        whole,
        feed_in_pieces(limits, stream, &cuts),
        "whole vs cut at {cuts:?}: {shown:?}"
    );

    if let Some(violation) = &whole.violation {
        let status = violation.rejection.status;
        assert!(
            [
                StatusCode::BAD_REQUEST,
                StatusCode::URI_TOO_LONG,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                StatusCode::NOT_IMPLEMENTED
            ]
            .contains(&status),
            "{violation:?}"
        );
        let reason = violation.rejection.reason;
        assert!(!reason.is_empty() && reason.bytes().all(|b| b == b' ' || b.is_ascii_graphic()));
        assert_eq!(violation.request_index, whole.request_index);
    }

    // Each head let through is one hyper reads alike, and its body ends where hyper's does.
    let completed = trace.messages.iter().filter(|m| m.2.is_some()).count() as u64;
    assert_eq!(completed, whole.request_index, "{shown:?}");
    for (index, &(start, head_end, message_end)) in trace.messages.iter().enumerate() {
        let (expected_end, upgrade) = check_accepted_head(limits, stream, start as usize, head_end as usize);
        assert!(
            !upgrade,
            "request {index} is an upgrade request, not switched: {shown:?}"
        );
        let body_refused = matches!(&whole.violation,
            Some(v) if v.stage == Stage::Body && v.request_index == index as u64);
        match message_end {
            Some(end) => assert_eq!(
                expected_end,
                Some(end),
                "request {index} ends at {end} for the validator: {shown:?}"
            ),
            None if body_refused => {}
            None => assert_eq!(
                expected_end, None,
                "request {index} is complete for hyper, not for the validator: {shown:?}"
            ),
        }
    }

    // An upgrade request's head, read alike, switches: everything after it is released.
    if let Some((start, head_end)) = trace.upgrade {
        let (expected_end, upgrade) = check_accepted_head(limits, stream, start as usize, head_end as usize);
        assert!(
            upgrade && expected_end == Some(head_end),
            "switched on a head that is no upgrade request: {shown:?}"
        );
        assert_eq!(whole.violation, None, "{shown:?}");
        assert_eq!(whole.release_to, stream.len() as u64, "{shown:?}");
        return;
    }

    // Nothing of a refused or incomplete head is released to hyper.
    let last_end = trace.messages.last().and_then(|m| m.2).unwrap_or(0);
    let in_head = match &whole.violation {
        Some(violation) => violation.stage == Stage::Head,
        None => trace.messages.last().is_none_or(|m| m.2.is_some()),
    };
    if in_head {
        assert_eq!(whole.release_to, last_end, "{shown:?}");
    }
}

proptest! {
    #![proptest_config(config(10_000))]

    #[test]
    fn fuzz_h1_validator(
        limits in h1_limits(),
        stream in h1_stream(),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        check_h1(limits, &stream, &cuts);
    }

    #[test]
    fn fuzz_h1_validator_on_noise(
        stream in prop::collection::vec(any::<u8>(), 0..200),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let limits = H1Limits { max_header_bytes: 128, max_headers: 4, max_uri_bytes: 32 };
        check_h1(limits, &stream, &cuts);
    }
}

/// The seeds themselves, fed in every split, under the limits production uses.
#[test]
fn fuzz_h1_validator_seeds() {
    let limits = H1Limits {
        max_header_bytes: 8192,
        max_headers: 100,
        max_uri_bytes: 4096,
    };
    for seed in corpus("h1") {
        for cut in 0..=seed.len() {
            check_h1(limits, &seed, &[cut]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP/3 frame limit
// ---------------------------------------------------------------------------------------

/// A QUIC varint of `value` in `width` bytes (1, 2, 4 or 8), or the shortest that holds it.
fn varint(value: u64, width: usize) -> Vec<u8> {
    let fits = |width: usize| value < 1u64 << (8 * width - 2);
    let width = [1, 2, 4, 8]
        .into_iter()
        .find(|&w| w >= width && fits(w))
        .unwrap_or(8);
    let tag = u64::from(width.trailing_zeros() as u8) << (8 * width - 2);
    (value | tag).to_be_bytes()[8 - width..].to_vec()
}

/// Reads a varint at `at` (`None` when the bytes end first).
fn read_varint(bytes: &[u8], at: usize) -> Option<(u64, usize)> {
    let first = *bytes.get(at)?;
    let width = 1usize << (first >> 6);
    let encoded = bytes.get(at..at + width)?;
    let mut value = u64::from(first & 0x3f);
    for &byte in &encoded[1..] {
        value = value << 8 | u64::from(byte);
    }
    Some((value, at + width))
}

/// The limit, read on the whole stream at once: the first frame other than DATA that
/// declares more than `max`.
fn reference_frame_limit(bytes: &[u8], unidirectional: bool, max: u64) -> Result<(), FrameTooLarge> {
    let mut at = 0;
    if unidirectional {
        match read_varint(bytes, 0) {
            Some((0, next)) => at = next,
            _ => return Ok(()),
        }
    }
    while let Some((frame_type, next)) = read_varint(bytes, at) {
        let Some((length, next)) = read_varint(bytes, next) else {
            return Ok(());
        };
        if frame_type != 0 && length > max {
            return Err(FrameTooLarge {
                frame_type,
                length,
                max,
            });
        }
        at = next.saturating_add(usize::try_from(length).unwrap_or(usize::MAX));
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct Frame {
    frame_type: u64,
    length: u64,
    widths: (usize, usize),
    /// Payload bytes actually sent (at most `length`).
    payload: usize,
}

fn frames(max: u64) -> impl Strategy<Value = Vec<u8>> {
    let frame_type = prop_oneof![
        Just(0u64),
        Just(1),
        Just(4),
        Just(7),
        Just(0x21),
        Just(0x1f * 7 + 0x21),
        0..(1u64 << 62)
    ];
    let length = prop_oneof![
        Just(0u64),
        Just(max - 1),
        Just(max),
        Just(max + 1),
        0..64u64,
        0..(1u64 << 62)
    ];
    let width = select(&[1usize, 2, 4, 8][..]);
    let frame = (frame_type, length, (width.clone(), width), 0..80usize).prop_map(
        |(frame_type, length, widths, payload)| Frame {
            frame_type,
            length,
            widths,
            payload,
        },
    );
    (
        prop::option::of(select(&[0u64, 2, 3, 0x21][..])),
        prop::collection::vec(frame, 0..5),
    )
        .prop_map(|(stream_type, frames)| {
            let mut out = stream_type.map(|t| varint(t, 1)).unwrap_or_default();
            for frame in frames {
                out.extend(varint(frame.frame_type, frame.widths.0));
                out.extend(varint(frame.length, frame.widths.1));
                let payload = frame.length.min(frame.payload as u64) as usize;
                out.extend(std::iter::repeat_n(0xab, payload));
            }
            out
        })
}

fn check_frame_limit(bytes: &[u8], unidirectional: bool, max: u64, cuts: &[usize]) {
    let expected = reference_frame_limit(bytes, unidirectional, max);
    let mut cuts = cuts.iter().map(|cut| cut % (bytes.len() + 1)).collect::<Vec<_>>();
    cuts.sort_unstable();
    let mut limit = if unidirectional {
        FrameLimit::unidirectional_stream(max)
    } else {
        FrameLimit::request_stream(max)
    };
    let mut start = 0;
    let mut outcome = Ok(());
    for end in cuts.into_iter().chain([bytes.len()]) {
        outcome = limit.observe(&bytes[start..end]);
        if outcome.is_err() {
            break;
        }
        start = end;
    }
    assert_eq!(outcome, expected, "{bytes:02x?}");
    if let Err(refused) = expected {
        assert_eq!(limit.observe(b"more"), Err(refused), "a refusal sticks");
    }
}

proptest! {
    #![proptest_config(config(10_000))]

    #[test]
    fn fuzz_h3_frame_limit(
        (max, bytes) in select(&[1u64, 100, 65536, 1 << 40][..]).prop_flat_map(|max| (
            Just(max),
            prop_oneof![3 => frames(max), 1 => prop::collection::vec(any::<u8>(), 0..64)],
        )),
        unidirectional in any::<bool>(),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        check_frame_limit(&bytes, unidirectional, max, &cuts);
    }
}

#[test]
fn fuzz_h3_frame_limit_seeds() {
    for seed in corpus("h3-frames") {
        for unidirectional in [false, true] {
            for cut in 0..=seed.len() {
                check_frame_limit(&seed, unidirectional, 65536, &[cut]);
            }
        }
    }
}
