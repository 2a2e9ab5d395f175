//! WCGI: the CGI/1.1 contract between the node and a guest, free of I/O.
//!
//! A request becomes environment variables (RFC 3875 meta-variables, `HTTP_*` for headers,
//! WAGI's `X_*` extras) plus a body on stdin; the guest's stdout is parsed back into a
//! response. Both directions live here as pure functions so they are unit-tested without
//! an engine and fuzzable as parsers.
//!
//! Choices worth knowing:
//! - `PATH_INFO` is the whole decoded request path and `SCRIPT_NAME` is empty, as Wasmer's
//!   WCGI does; the part after the matched route prefix is in `X_RELATIVE_PATH`.
//! - Header names containing `_` are not passed (`X_Foo` would otherwise alias `X-Foo` as
//!   `HTTP_X_FOO`, a spoofing vector nginx also closes).
//! - Output headers may end in CRLF or bare LF (WAGI accepts both). A `Location` without a
//!   `Status` means 302. Hop-by-hop headers and `Content-Length` from the guest are dropped:
//!   the server frames the body itself.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// Everything a guest learns about one request.
#[derive(Debug, Clone, Default)]
pub struct CgiRequest {
    pub method: String,
    /// Raw (still percent-encoded) path, always starting with `/`.
    pub raw_path: String,
    /// Query string without the `?`, possibly empty.
    pub query: String,
    /// `HTTP/1.1`, `HTTP/2.0`, …
    pub protocol: String,
    /// `http` or `https`.
    pub scheme: String,
    pub server_name: String,
    pub server_port: u16,
    pub remote_addr: String,
    pub remote_port: u16,
    /// The route pattern that matched, e.g. `api.example.com/echo`.
    pub matched_route: String,
    /// The matched route's path prefix (empty when the route has none).
    pub route_prefix: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The run's place in a chain of service calls: 0 for a request from outside.
    pub service_depth: u32,
    /// An earlier end than the function's own timeout (a service call's caller's): the
    /// run's outbound calls never wait past it, and calls it makes carry it on.
    pub deadline: Option<std::time::Instant>,
    /// Set when the scheduler runs this request for a `[[cron]]` tick (Unix seconds): the
    /// guest sees `X_ATOLL_TRIGGER=cron` and `X_ATOLL_CRON_TICK`. Nothing a client sends
    /// sets it.
    pub cron_tick: Option<u64>,
}

/// The CGI environment for `request`, with the function's own `[env]` underneath: the
/// manifest cannot fake request metadata, so its variables named like request ones
/// ([`is_request_variable`]: the CGI names and `HTTP_*`) are left out.
pub fn environment(request: &CgiRequest, function_env: &[(String, String)]) -> Vec<(String, String)> {
    let path_info = percent_decode(&request.raw_path);
    let relative = request
        .raw_path
        .strip_prefix(request.route_prefix.as_str())
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        .unwrap_or(&request.raw_path);
    let relative = if relative.is_empty() { "/" } else { relative };
    let default_port = if request.scheme == "https" { 443 } else { 80 };
    let authority = if request.server_port == default_port || request.server_port == 0 {
        request.server_name.clone()
    } else {
        format!("{}:{}", request.server_name, request.server_port)
    };
    let request_uri = if request.query.is_empty() {
        request.raw_path.clone()
    } else {
        format!("{}?{}", request.raw_path, request.query)
    };

    let mut cgi: Vec<(String, String)> = vec![
        ("GATEWAY_INTERFACE".into(), "CGI/1.1".into()),
        (
            "SERVER_SOFTWARE".into(),
            concat!("atoll/", env!("CARGO_PKG_VERSION")).into(),
        ),
        ("SERVER_PROTOCOL".into(), request.protocol.clone()),
        ("SERVER_NAME".into(), request.server_name.clone()),
        ("SERVER_PORT".into(), request.server_port.to_string()),
        ("REQUEST_METHOD".into(), request.method.clone()),
        ("SCRIPT_NAME".into(), String::new()),
        ("PATH_INFO".into(), path_info),
        ("QUERY_STRING".into(), request.query.clone()),
        ("REQUEST_URI".into(), request_uri.clone()),
        ("REMOTE_ADDR".into(), request.remote_addr.clone()),
        ("REMOTE_PORT".into(), request.remote_port.to_string()),
        ("X_MATCHED_ROUTE".into(), request.matched_route.clone()),
        (
            "X_FULL_URL".into(),
            format!("{}://{}{}", request.scheme, authority, request_uri),
        ),
        ("X_RAW_PATH_INFO".into(), request.raw_path.clone()),
        ("X_RELATIVE_PATH".into(), relative.to_string()),
        (
            "X_ATOLL_TRIGGER".into(),
            match (request.cron_tick, request.service_depth) {
                (Some(_), _) => "cron",
                (None, 0) => "http",
                (None, _) => "service",
            }
            .into(),
        ),
    ];
    if let Some(tick) = request.cron_tick {
        cgi.push(("X_ATOLL_CRON_TICK".into(), tick.to_string()));
    }
    if request.scheme == "https" {
        cgi.push(("HTTPS".into(), "on".into()));
    }
    if let Some(content_type) = request.headers.get(http::header::CONTENT_TYPE) {
        cgi.push(("CONTENT_TYPE".into(), lossy(content_type)));
    }
    if !request.body.is_empty() || request.headers.contains_key(http::header::CONTENT_LENGTH) {
        cgi.push(("CONTENT_LENGTH".into(), request.body.len().to_string()));
    }
    for name in request.headers.keys() {
        if name == http::header::CONTENT_TYPE || name == http::header::CONTENT_LENGTH {
            continue;
        }
        if name.as_str().contains('_') {
            continue;
        }
        let joined = request
            .headers
            .get_all(name)
            .iter()
            .map(lossy)
            .collect::<Vec<_>>()
            .join(", ");
        let key = format!("HTTP_{}", name.as_str().to_ascii_uppercase().replace('-', "_"));
        cgi.push((key, joined));
    }

    // A name the request may set is the request's even when this request does not set it:
    // otherwise `[env]` could show `HTTPS` on a plain-HTTP request or an `HTTP_COOKIE` the
    // client never sent (found by fuzzing).
    let mut merged: Vec<(String, String)> = function_env
        .iter()
        .filter(|(key, _)| !is_request_variable(key))
        .cloned()
        .collect();
    merged.extend(cgi);
    merged
}

pub use atoll_core::env_names::is_request_variable;

fn lossy(value: &HeaderValue) -> String {
    String::from_utf8_lossy(value.as_bytes()).into_owned()
}

/// Decodes `%XX` escapes; invalid escapes are kept as written and invalid UTF-8 is replaced,
/// so a guest always gets a readable `PATH_INFO` (the exact bytes are in `X_RAW_PATH_INFO`).
/// `%00` is kept as written too: the environment reaches the guest as NUL-terminated
/// `KEY=VALUE` entries, so a decoded NUL would cut `PATH_INFO` short there (found by fuzzing).
pub fn percent_decode(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%'
            && index + 2 < bytes.len()
            && let (Some(high), Some(low)) = (hex_value(bytes[index + 1]), hex_value(bytes[index + 2]))
            && (high, low) != (0, 0)
        {
            out.push(high << 4 | low);
            index += 3;
            continue;
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// A parsed CGI response.
#[derive(Debug, Clone, PartialEq)]
pub struct CgiResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why the guest's output is not a CGI response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgiError {
    #[error("the function wrote nothing to stdout")]
    Empty,
    #[error("no blank line ends the CGI headers")]
    UnterminatedHeaders,
    #[error("CGI header section is over {limit} bytes")]
    HeadersTooLarge { limit: usize },
    #[error("CGI header line {line} is malformed: {reason}")]
    MalformedHeader { line: usize, reason: String },
    #[error("CGI Status header is invalid: {0:?}")]
    InvalidStatus(String),
}

/// Largest header section accepted from a guest.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// Parses a guest's stdout into a response.
pub fn parse_response(output: Bytes) -> Result<CgiResponse, CgiError> {
    if output.is_empty() {
        return Err(CgiError::Empty);
    }
    let mut headers = HeaderMap::new();
    let mut status: Option<StatusCode> = None;
    let mut position = 0;
    let mut line_number = 0;
    let body_start = loop {
        let Some(newline) = output[position..].iter().position(|&b| b == b'\n') else {
            if output.len() > MAX_HEADER_BYTES {
                return Err(CgiError::HeadersTooLarge {
                    limit: MAX_HEADER_BYTES,
                });
            }
            return Err(CgiError::UnterminatedHeaders);
        };
        let line_end = position + newline;
        if line_end > MAX_HEADER_BYTES {
            return Err(CgiError::HeadersTooLarge {
                limit: MAX_HEADER_BYTES,
            });
        }
        let mut line = &output[position..line_end];
        if let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        line_number += 1;
        position = line_end + 1;
        if line.is_empty() {
            break position;
        }
        let malformed = |reason: &str| CgiError::MalformedHeader {
            line: line_number,
            reason: reason.to_string(),
        };
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(malformed("continuation lines (obs-fold) are not allowed"));
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| malformed("expected `Name: value`"))?;
        let name = HeaderName::from_bytes(&line[..colon]).map_err(|_| malformed("invalid header name"))?;
        let value_bytes = trim_ascii_whitespace(&line[colon + 1..]);
        let value = HeaderValue::from_bytes(value_bytes).map_err(|_| malformed("invalid header value"))?;
        if name.as_str() == "status" {
            let text = String::from_utf8_lossy(value_bytes).into_owned();
            let code = text.split_whitespace().next().unwrap_or("");
            let parsed = code
                .parse::<u16>()
                .ok()
                .filter(|code| (100..=999).contains(code) && code.to_string().len() == 3)
                .and_then(|code| StatusCode::from_u16(code).ok())
                .ok_or(CgiError::InvalidStatus(text))?;
            status = Some(parsed);
            continue;
        }
        if HOP_BY_HOP.contains(&name.as_str()) {
            continue;
        }
        headers.append(name, value);
    };
    let status = match status {
        Some(status) => status,
        None if headers.contains_key(http::header::LOCATION) => StatusCode::FOUND,
        None => StatusCode::OK,
    };
    Ok(CgiResponse {
        status,
        headers,
        body: output.slice(body_start..),
    })
}

fn trim_ascii_whitespace(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<CgiResponse, CgiError> {
        parse_response(Bytes::copy_from_slice(text.as_bytes()))
    }

    #[test]
    fn plain_response_defaults_to_200() {
        let response = parse("Content-Type: text/plain\r\n\r\nhello").unwrap();
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.headers["content-type"], "text/plain");
        assert_eq!(&response.body[..], b"hello");
    }

    #[test]
    fn status_header_sets_status_and_is_not_forwarded() {
        let response = parse("Status: 404 Not Found\nContent-Type: text/html\n\n<p>gone</p>").unwrap();
        assert_eq!(response.status, StatusCode::NOT_FOUND);
        assert!(response.headers.get("status").is_none());
        assert_eq!(&response.body[..], b"<p>gone</p>");
    }

    #[test]
    fn bare_status_code_is_accepted() {
        assert_eq!(parse("Status: 204\n\n").unwrap().status, StatusCode::NO_CONTENT);
    }

    #[test]
    fn location_without_status_redirects() {
        let response = parse("Location: https://example.com/\r\n\r\n").unwrap();
        assert_eq!(response.status, StatusCode::FOUND);
        assert_eq!(response.headers["location"], "https://example.com/");
    }

    #[test]
    fn location_with_explicit_status_keeps_it() {
        let response = parse("Status: 301\nLocation: /new\n\n").unwrap();
        assert_eq!(response.status, StatusCode::MOVED_PERMANENTLY);
    }

    #[test]
    fn repeated_headers_are_kept() {
        let response = parse("Set-Cookie: a=1\nSet-Cookie: b=2\n\n").unwrap();
        let cookies: Vec<_> = response.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
    }

    #[test]
    fn hop_by_hop_and_length_headers_are_dropped() {
        let response =
            parse("Connection: close\nContent-Length: 99\nTransfer-Encoding: chunked\nX-Ok: 1\n\nbody")
                .unwrap();
        assert!(response.headers.get("connection").is_none());
        assert!(response.headers.get("content-length").is_none());
        assert!(response.headers.get("transfer-encoding").is_none());
        assert_eq!(response.headers["x-ok"], "1");
    }

    #[test]
    fn body_may_contain_blank_lines_and_binary() {
        let mut output = b"Content-Type: application/octet-stream\n\n".to_vec();
        output.extend_from_slice(&[0, 1, b'\n', b'\n', 255]);
        let response = parse_response(Bytes::from(output)).unwrap();
        assert_eq!(&response.body[..], &[0, 1, b'\n', b'\n', 255]);
    }

    #[test]
    fn malformed_outputs_are_refused() {
        assert_eq!(parse(""), Err(CgiError::Empty));
        assert_eq!(parse("hello world"), Err(CgiError::UnterminatedHeaders));
        assert_eq!(
            parse("Content-Type: text/plain\n"),
            Err(CgiError::UnterminatedHeaders)
        );
        assert!(matches!(
            parse("no colon here\n\n"),
            Err(CgiError::MalformedHeader { line: 1, .. })
        ));
        assert!(matches!(
            parse("Bad Name: x\n\n"),
            Err(CgiError::MalformedHeader { .. })
        ));
        assert!(matches!(
            parse("A: 1\n folded\n\n"),
            Err(CgiError::MalformedHeader { line: 2, .. })
        ));
        assert!(matches!(
            parse("Status: abc\n\n"),
            Err(CgiError::InvalidStatus(_))
        ));
        assert!(matches!(parse("Status: 42\n\n"), Err(CgiError::InvalidStatus(_))));
        assert!(matches!(
            parse("Status: 1000\n\n"),
            Err(CgiError::InvalidStatus(_))
        ));
        assert!(matches!(
            parse("X: a\u{1}b\n\n"),
            Err(CgiError::MalformedHeader { .. })
        ));
    }

    #[test]
    fn oversized_header_section_is_refused() {
        let big = format!("X-Big: {}\n\nbody", "a".repeat(MAX_HEADER_BYTES + 1));
        assert!(matches!(parse(&big), Err(CgiError::HeadersTooLarge { .. })));
    }

    fn request() -> CgiRequest {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("x-custom", HeaderValue::from_static("one"));
        headers.append("accept", HeaderValue::from_static("a"));
        headers.append("accept", HeaderValue::from_static("b"));
        headers.insert("x_spoof", HeaderValue::from_static("evil"));
        CgiRequest {
            method: "POST".into(),
            raw_path: "/echo/a%20b".into(),
            query: "x=1&y=2".into(),
            protocol: "HTTP/1.1".into(),
            scheme: "http".into(),
            server_name: "api.example.com".into(),
            server_port: 8080,
            remote_addr: "127.0.0.1".into(),
            remote_port: 5555,
            matched_route: "api.example.com/echo".into(),
            route_prefix: "/echo".into(),
            headers,
            body: Bytes::from_static(b"{}"),
            service_depth: 0,
            deadline: None,
            cron_tick: None,
        }
    }

    fn lookup<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
        env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn environment_carries_cgi_and_wagi_variables() {
        let env = environment(&request(), &[]);
        assert_eq!(lookup(&env, "REQUEST_METHOD"), Some("POST"));
        assert_eq!(lookup(&env, "PATH_INFO"), Some("/echo/a b"));
        assert_eq!(lookup(&env, "X_RAW_PATH_INFO"), Some("/echo/a%20b"));
        assert_eq!(lookup(&env, "X_RELATIVE_PATH"), Some("/a%20b"));
        assert_eq!(lookup(&env, "QUERY_STRING"), Some("x=1&y=2"));
        assert_eq!(lookup(&env, "X_MATCHED_ROUTE"), Some("api.example.com/echo"));
        assert_eq!(
            lookup(&env, "X_FULL_URL"),
            Some("http://api.example.com:8080/echo/a%20b?x=1&y=2")
        );
        assert_eq!(lookup(&env, "CONTENT_TYPE"), Some("application/json"));
        assert_eq!(lookup(&env, "CONTENT_LENGTH"), Some("2"));
        assert_eq!(lookup(&env, "HTTP_X_CUSTOM"), Some("one"));
        assert_eq!(lookup(&env, "HTTP_ACCEPT"), Some("a, b"));
        assert_eq!(lookup(&env, "X_ATOLL_TRIGGER"), Some("http"));
        assert_eq!(lookup(&env, "X_ATOLL_CRON_TICK"), None);
        let cron = CgiRequest {
            cron_tick: Some(1_796_083_320),
            ..request()
        };
        let env = environment(&cron, &[("X_ATOLL_TRIGGER".into(), "fake".into())]);
        assert_eq!(lookup(&env, "X_ATOLL_TRIGGER"), Some("cron"));
        assert_eq!(lookup(&env, "X_ATOLL_CRON_TICK"), Some("1796083320"));
        assert_eq!(
            env.iter().filter(|(k, _)| k == "X_ATOLL_TRIGGER").count(),
            1,
            "[env] cannot fake it"
        );
        let service = CgiRequest {
            service_depth: 1,
            ..request()
        };
        assert_eq!(
            lookup(&environment(&service, &[]), "X_ATOLL_TRIGGER"),
            Some("service")
        );
        assert_eq!(lookup(&env, "HTTP_CONTENT_TYPE"), None);
        assert_eq!(lookup(&env, "HTTP_X_SPOOF"), None);
    }

    #[test]
    fn function_env_cannot_shadow_cgi_variables() {
        let function_env = vec![
            ("GREETING".to_string(), "hi".to_string()),
            ("REQUEST_METHOD".to_string(), "FAKE".to_string()),
            // Request variables this (plain-HTTP, cookie-less) request does not set.
            ("HTTPS".to_string(), "on".to_string()),
            ("HTTP_COOKIE".to_string(), "session=forged".to_string()),
        ];
        let env = environment(&request(), &function_env);
        assert_eq!(lookup(&env, "GREETING"), Some("hi"));
        assert_eq!(lookup(&env, "REQUEST_METHOD"), Some("POST"));
        assert_eq!(env.iter().filter(|(k, _)| k == "REQUEST_METHOD").count(), 1);
        assert_eq!(lookup(&env, "HTTPS"), None);
        assert_eq!(lookup(&env, "HTTP_COOKIE"), None);
    }

    #[test]
    fn percent_decoding_keeps_invalid_escapes() {
        assert_eq!(percent_decode("/a%2Fb"), "/a/b");
        assert_eq!(percent_decode("/100%"), "/100%");
        assert_eq!(percent_decode("/%zz"), "/%zz");
        assert_eq!(percent_decode("/%e2%9c%93"), "/✓");
        assert_eq!(
            percent_decode("/a%00b%0a"),
            "/a%00b\n",
            "no NUL in the environment"
        );
    }
}
