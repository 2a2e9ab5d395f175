//! The guard's tests: the validator fed whole streams and streams cut at every byte, the
//! I/O wrapper under scripted reads, and both in their real place behind hyper.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::validator::{H2_PREFACE, MAX_CHUNK_LINE_BYTES};
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

/// A WebSocket upgrade request head (RFC 6455 §4.1), as a browser sends it.
const UPGRADE_HEAD: &[u8] = b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n\
Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// What follows an upgrade: WebSocket frames (masked text, binary, close) and bytes that no
/// HTTP/1 head may hold (bare LF and CR, NUL, a chunk-size line, every byte value).
fn after_upgrade() -> Vec<u8> {
    let mut bytes = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58".to_vec();
    bytes.extend_from_slice(b"GET /smuggled HTTP/1.1\nHost: a\n\n\r\x00 5 \r\nhello\r\n0x5\r\n");
    bytes.extend(0..=255u8);
    bytes.extend_from_slice(b"\x88\x80\x00\x00\x00\x00");
    bytes
}

#[test]
fn an_upgrade_request_passes_every_later_byte_through() {
    let after = after_upgrade();
    let get = b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n";
    let upgrade_heads: Vec<Vec<u8>> = vec![
        UPGRADE_HEAD.to_vec(),
        b"GET / HTTP/1.1\r\nHost: a\r\nconnection: UPGRADE\r\nupgrade: websocket\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nHost: a\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nConnection: ,\tupgrade ,\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n".to_vec(),
    ];
    for head in &upgrade_heads {
        // Alone, and after a pipelined request: the index is the upgrade request's.
        for (before, index) in [(&b""[..], 0), (&get[..], 1)] {
            let stream = [before, head, &after].concat();
            let head_end = before.len() + head.len();
            let shown = String::from_utf8_lossy(head);
            for split in 0..=stream.len() {
                let mut validator = H1Validator::new(limits());
                validator.feed(&stream[..split]).unwrap();
                if split < head_end {
                    assert_eq!(validator.upgraded_request(), None, "split {split}: {shown:?}");
                    assert!(validator.release_to() <= before.len() as u64, "split {split}");
                } else {
                    assert_eq!(validator.release_to(), split as u64, "split {split}: {shown:?}");
                }
                validator.feed(&stream[split..]).unwrap();
                assert_eq!(
                    validator.upgraded_request(),
                    Some(index),
                    "split {split}: {shown:?}"
                );
                assert_eq!(validator.request_index(), index);
                assert_eq!(validator.release_to(), stream.len() as u64, "split {split}");
                assert!(!validator.reading_head() && !validator.is_passthrough());
                assert_eq!(validator.time_out(), None, "no head timeout after an upgrade");
            }
            // One byte at a time.
            let mut validator = H1Validator::new(limits());
            for byte in &stream {
                validator.feed(std::slice::from_ref(byte)).unwrap();
            }
            assert_eq!(
                (validator.upgraded_request(), validator.release_to()),
                (Some(index), stream.len() as u64)
            );
        }
    }
}

#[test]
fn requests_that_are_not_upgrade_requests_do_not_switch() {
    let not_upgrades: &[&[u8]] = &[
        // A body, framed either way.
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        // CONNECT, even with the upgrade fields.
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
        // HTTP/1.0 (hyper ignores Upgrade there).
        b"GET /ws HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        // No `upgrade` among the Connection options, or no Connection at all.
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nUpgrade: websocket\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgraded, x-upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: up grade\r\nUpgrade: websocket\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nX-Connection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        // No Upgrade, or an empty one.
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade:\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nX-Upgrade: websocket\r\n\r\n",
        // Another method (methods are case-sensitive).
        b"POST /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"get /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    ];
    let after = after_upgrade();
    for request in not_upgrades {
        let shown = String::from_utf8_lossy(request);
        assert_accepted(request, 1);
        assert_eq!(feed_whole(request).1.upgraded_request(), None, "{shown:?}");
        // What follows is checked as the next request's head, so WebSocket frames are refused.
        let stream = [request, &after[..]].concat();
        for split in 0..=stream.len() {
            let mut validator = H1Validator::new(limits());
            let violation = validator
                .feed(&stream[..split])
                .and_then(|()| validator.feed(&stream[split..]))
                .unwrap_err();
            assert_eq!(
                (violation.request_index, violation.stage),
                (1, Stage::Head),
                "split {split}: {shown:?}"
            );
            assert_eq!(validator.upgraded_request(), None, "split {split}: {shown:?}");
            assert_eq!(validator.release_to(), request.len() as u64, "split {split}");
        }
    }
}

#[test]
fn a_bad_head_is_refused_even_when_it_or_a_later_one_asks_to_upgrade() {
    let after = after_upgrade();
    // Bad heads that ask to upgrade: refused, nothing released, no switch.
    let bad_upgrades: Vec<Vec<u8>> = vec![
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\n\r\n".to_vec(),
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n Upgrade: websocket\r\n\r\n".to_vec(),
        b"GET /ws HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n".to_vec(),
        b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n".to_vec(),
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: web\x00socket\r\n\r\n".to_vec(),
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade : websocket\r\n\r\n".to_vec(),
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 0, 0\r\n\r\n".to_vec(),
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
    ];
    for head in &bad_upgrades {
        let stream = [&head[..], &after[..]].concat();
        let whole = refusal(&stream);
        assert_eq!(
            (whole.request_index, whole.stage),
            (0, Stage::Head),
            "{:?}",
            String::from_utf8_lossy(head)
        );
        for split in 0..=stream.len() {
            let mut validator = H1Validator::new(limits());
            let outcome = validator
                .feed(&stream[..split])
                .and_then(|()| validator.feed(&stream[split..]));
            assert_eq!(outcome, Err(whole.clone()), "split {split}");
            assert_eq!(validator.upgraded_request(), None);
            assert_eq!(validator.release_to(), 0, "split {split}");
        }
    }
    // A bad request before an upgrade request: refused; the upgrade never happens.
    let bad_before: Vec<Vec<u8>> = vec![
        post("Content-Length: 5\r\nContent-Length: 5", "hello"),
        b"GET / HTTP/1.1\nHost: a\r\n\r\n".to_vec(),
        chunked("5\r\nhello\r\n5 \r\nworld\r\n0\r\n\r\n"),
    ];
    for bad in &bad_before {
        let stream = [&bad[..], UPGRADE_HEAD, &after[..]].concat();
        let whole = refusal(&stream);
        assert_eq!(whole.request_index, 0, "{:?}", String::from_utf8_lossy(bad));
        for split in 0..=stream.len() {
            let mut validator = H1Validator::new(limits());
            let outcome = validator
                .feed(&stream[..split])
                .and_then(|()| validator.feed(&stream[split..]));
            assert_eq!(outcome, Err(whole.clone()), "split {split}");
            assert_eq!(validator.upgraded_request(), None);
            assert!(validator.release_to() < bad.len() as u64, "split {split}");
        }
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

#[test]
fn guarded_io_passes_everything_after_an_upgrade_head_through() {
    let get = b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n";
    let stream = [&get[..], UPGRADE_HEAD, &after_upgrade()].concat();
    for read_size in [1, 7, 24, 8192] {
        for cut in 0..=stream.len() {
            let (received, end, state) = read_guarded(&stream, &[cut], read_size);
            assert_eq!(end, ReadEnd::Eof, "cut {cut}, reads of {read_size}");
            assert!(received == stream, "cut {cut}, reads of {read_size}");
            assert!(!state.upgrade_requested(0) && state.upgrade_requested(1));
            assert_eq!(state.rejection_for(1), None);
        }
    }
    let every_byte: Vec<usize> = (1..stream.len()).collect();
    let (received, end, state) = read_guarded(&stream, &every_byte, 24);
    assert_eq!((received, end), (stream.clone(), ReadEnd::Eof));
    assert!(state.upgrade_requested(1));

    // Not an upgrade request (a body): what follows is checked, and refused.
    let with_body =
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 2\r\n\r\nhi";
    let stream = [&with_body[..], &after_upgrade()].concat();
    let (received, end, state) = read_guarded(&stream, &[], 8192);
    assert_eq!(end, ReadEnd::Pending);
    assert!(received == [&with_body[..], SYNTHETIC_REQUEST].concat());
    assert!(!state.upgrade_requested(0) && !state.upgrade_requested(1));
    assert_eq!(
        state.rejection_for(1).map(|r| r.status),
        Some(StatusCode::BAD_REQUEST)
    );
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
    use crate::server::{self, BoxError, ConnectionInfo, Handler, HandlerBody, Ingress, ServerLimits};
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

        async fn handle<B>(&self, request: Request<B>, _connection: ConnectionInfo) -> Response<TestBody>
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

    /// Serves `handler` on a loopback port until the returned sender is dropped.
    async fn spawn_server<H: Handler>(
        handler: Arc<H>,
        limits: ServerLimits,
    ) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let ingress = Ingress {
            limits: Arc::new(limits),
            ..Ingress::default()
        };
        tokio::spawn(server::serve_with(listener, handler, ingress, async {
            let _ = stopped.await;
        }));
        (addr, stop)
    }

    async fn start(limits: ServerLimits) -> TestServer {
        let recorder = Arc::new(Recorder::default());
        let (addr, stop) = spawn_server(Arc::clone(&recorder), limits).await;
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

    #[tokio::test]
    async fn a_later_head_is_timed_from_its_first_byte_and_keep_alive_waits_for_the_idle_timeout() {
        let timeout = Duration::from_millis(300);
        let server = start(ServerLimits {
            header_read_timeout: timeout,
            ..small_limits()
        })
        .await;
        let mut client = TcpStream::connect(server.addr).await.unwrap();
        client
            .write_all(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        // Kept alive with no request for twice the header timeout: the wait between
        // requests is the idle timeout's (60 s here), not a head's.
        tokio::time::sleep(timeout * 2).await;
        client
            .write_all(b"GET /two HTTP/1.1\r\nHost: a\r\n")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let answer = read_until_closed(&mut client).await;
        assert_eq!(statuses(&answer), [200, 408], "{answer}");
        assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
    }

    /// Stands in for a WebSocket function: takes the connection whenever hyper's
    /// `OnUpgrade` came with the request (101, then echoes every byte back until the client
    /// stops sending), except on `/refuse`; answers 200 otherwise. Records each path and
    /// whether `OnUpgrade` came with it.
    #[derive(Default)]
    struct Upgrades {
        seen: Mutex<Vec<(String, bool)>>,
    }

    impl Upgrades {
        fn seen(&self) -> Vec<(String, bool)> {
            self.seen.lock().unwrap().clone()
        }
    }

    impl Handler for Upgrades {
        type Body = TestBody;

        async fn handle<B>(&self, mut request: Request<B>, _connection: ConnectionInfo) -> Response<TestBody>
        where
            B: Body<Data = Bytes> + Send + 'static,
            B::Error: Into<BoxError>,
        {
            let path = request.uri().path().to_string();
            let can_upgrade = request.extensions().get::<hyper::upgrade::OnUpgrade>().is_some();
            self.seen.lock().unwrap().push((path.clone(), can_upgrade));
            if !can_upgrade || path == "/refuse" {
                return server::text_response(StatusCode::OK, format!("{path}: no upgrade"));
            }
            let on_upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let mut io = hyper_util::rt::TokioIo::new(upgraded);
                let mut buffer = [0u8; 1024];
                while let Ok(n @ 1..) = io.read(&mut buffer).await {
                    if io.write_all(&buffer[..n]).await.is_err() {
                        return;
                    }
                }
                let _ = io.shutdown().await;
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(http::header::CONNECTION, "upgrade")
                .header(http::header::UPGRADE, "websocket")
                .body(TestBody::empty())
                .unwrap()
        }
    }

    /// Reads one response head, up to its empty line.
    async fn read_head(stream: &mut TcpStream) -> String {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            tokio::time::timeout(DEADLINE, stream.read_exact(&mut byte))
                .await
                .expect("a response head in time")
                .expect("a response head");
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).into_owned()
    }

    /// Writes `bytes` and expects them back from the echo on the upgraded connection.
    async fn assert_echoed(stream: &mut TcpStream, bytes: &[u8]) {
        stream.write_all(bytes).await.unwrap();
        let mut echoed = vec![0u8; bytes.len()];
        tokio::time::timeout(DEADLINE, stream.read_exact(&mut echoed))
            .await
            .expect("the echo in time")
            .expect("the echo");
        assert!(echoed == bytes, "{:?}", String::from_utf8_lossy(&echoed));
    }

    #[tokio::test]
    async fn an_upgrade_answered_with_101_carries_bytes_both_ways() {
        let upgrades = Arc::new(Upgrades::default());
        let (addr, _stop) = spawn_server(Arc::clone(&upgrades), small_limits()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // A first frame in the same write as the head: what hyper read ahead of the 101
        // reaches the handler too.
        let first = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58";
        stream
            .write_all(&[UPGRADE_HEAD, &first[..]].concat())
            .await
            .unwrap();
        let head = read_head(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        let lowercase = head.to_ascii_lowercase();
        assert!(lowercase.contains("upgrade: websocket"), "{head}");
        assert!(!lowercase.contains("connection: close"), "{head}");
        let mut echoed = vec![0u8; first.len()];
        tokio::time::timeout(DEADLINE, stream.read_exact(&mut echoed))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echoed, first);
        // Bytes the guard would refuse as HTTP/1, and a request that must not be served.
        assert_echoed(&mut stream, &after_upgrade()).await;
        assert_echoed(&mut stream, b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n").await;
        assert_echoed(&mut stream, &vec![b'x'; 100_000]).await;
        stream.shutdown().await.unwrap();
        assert_eq!(read_until_closed(&mut stream).await, "");
        assert_eq!(upgrades.seen(), [("/chat".to_string(), true)]);
    }

    #[tokio::test]
    async fn an_upgrade_request_answered_otherwise_closes_the_connection() {
        let upgrades = Arc::new(Upgrades::default());
        let (addr, _stop) = spawn_server(Arc::clone(&upgrades), small_limits()).await;
        let refused = b"GET /refuse HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
        // The guard passes what follows through unchecked, so it must never be served.
        let smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
        let answer = exchange(addr, &[&refused[..], &smuggled[..]].concat()).await;
        assert_eq!(statuses(&answer), [200], "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
        assert!(answer.contains("/refuse: no upgrade"), "{answer}");
        // Alone, too: the server closes after the answer.
        let answer = exchange(addr, refused).await;
        assert_eq!(statuses(&answer), [200], "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
        assert_eq!(
            upgrades.seen(),
            [("/refuse".to_string(), true), ("/refuse".to_string(), true)]
        );
    }

    #[tokio::test]
    async fn a_request_the_guard_does_not_switch_on_cannot_be_upgraded() {
        let upgrades = Arc::new(Upgrades::default());
        let (addr, _stop) = spawn_server(Arc::clone(&upgrades), small_limits()).await;
        // `Upgrade` with a body: checked as HTTP/1 (hyper would still offer an upgrade), so
        // no `OnUpgrade`, and the connection goes on with checked requests.
        let mut request = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 5\r\n\r\nhello".to_vec();
        request.extend_from_slice(b"GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let answer = exchange(addr, &request).await;
        assert_eq!(statuses(&answer), [200, 200], "{answer}");
        // `Upgrade` without `Connection: upgrade`, and CONNECT: no `OnUpgrade` either.
        let answer = exchange(
            addr,
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(statuses(&answer), [200], "{answer}");
        let _ = exchange(addr, b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n").await;
        assert_eq!(
            upgrades.seen(),
            [
                ("/ws".to_string(), false),
                ("/after".to_string(), false),
                ("/ws".to_string(), false),
                ("".to_string(), false),
            ]
        );
    }

    #[tokio::test]
    async fn an_upgraded_connection_still_counts_against_the_connection_cap() {
        let upgrades = Arc::new(Upgrades::default());
        let limits = ServerLimits {
            max_connections: 1,
            ..small_limits()
        };
        let (addr, _stop) = spawn_server(Arc::clone(&upgrades), limits).await;
        let mut upgraded = TcpStream::connect(addr).await.unwrap();
        upgraded.write_all(UPGRADE_HEAD).await.unwrap();
        assert!(read_head(&mut upgraded).await.starts_with("HTTP/1.1 101 "));
        assert_echoed(&mut upgraded, b"ping").await;
        // The listener takes no other connection while the upgraded one is open.
        let mut second = TcpStream::connect(addr).await.unwrap();
        second
            .write_all(b"GET /second HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut byte = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(300), second.read(&mut byte))
                .await
                .is_err(),
            "served beyond the cap"
        );
        assert_echoed(&mut upgraded, b"still open").await;
        drop(upgraded);
        let answer = read_until_closed(&mut second).await;
        assert_eq!(statuses(&answer), [200], "{answer}");
    }
}
