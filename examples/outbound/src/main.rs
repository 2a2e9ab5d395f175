//! Calls out over HTTP the way WAGI modules do, through the `wasi-experimental-http`
//! crate (the `wasi_experimental_http` host import), and reports what came back.
//!
//! Query parameters (all optional but `url` or `service`):
//! - `url`: the URL to call (percent-encoded).
//! - `service`: instead of `url`, a service binding: calls `$ATOLL_SERVICE_<service>` plus
//!   `path`, or plus this same query when `path` is absent (a function bound to itself
//!   then calls itself, until the chain's depth limit stops it).
//! - `method`: GET by default; the request's own body is sent along.
//! - `count`: how many calls to make one after another (each response closed), default 1.
//! - `hold`: how many responses to keep open at once before reading them, default 1.
//! - `header`: a `name:value` header to send.
//!
//! The answer is plain text: `status=…`, `content-type=…`, the response headers, then
//! `body=` and the body of the last call. A refused call answers 502 with `error=` and
//! the host's error, so tests can tell which refusal it was.

use std::io::{Read, Write};

fn main() {
    let mut body = Vec::new();
    std::io::stdin().read_to_end(&mut body).expect("read stdin");
    let query = std::env::var("QUERY_STRING").unwrap_or_default();
    let param = |name: &str| {
        query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then(|| percent_decode(value))
        })
    };
    let url = match (param("url"), param("service")) {
        (Some(url), _) => url,
        // A service binding: the URL is in the environment.
        (None, Some(binding)) => {
            let Ok(base) = std::env::var(format!("ATOLL_SERVICE_{binding}")) else {
                respond(400, format!("error=no service binding {binding}\n").as_bytes());
                return;
            };
            match param("path") {
                Some(path) => format!("{base}{path}"),
                // No path: the same query again, so a function bound to itself calls itself.
                None => format!("{base}/?{query}"),
            }
        }
        (None, None) => {
            respond(400, "error=no url or service parameter\n".as_bytes());
            return;
        }
    };
    let method = param("method").unwrap_or_else(|| "GET".into());
    let count: usize = param("count").and_then(|n| n.parse().ok()).unwrap_or(1);
    let hold: usize = param("hold").and_then(|n| n.parse().ok()).unwrap_or(1).max(1);
    let header = param("header");

    let mut out = String::new();
    let mut last_body = Vec::new();
    for call in 0..count {
        let mut held = Vec::new();
        for _ in 0..hold {
            let mut request = http::Request::builder().method(method.as_str()).uri(url.as_str());
            if let Some((name, value)) = header.as_deref().and_then(|h| h.split_once(':')) {
                request = request.header(name, value);
            }
            let request = request
                .body(Some(bytes::Bytes::from(body.clone())))
                .expect("a valid request");
            match wasi_experimental_http::request(request) {
                Ok(response) => held.push(response),
                Err(error) => {
                    out = format!("calls={call}\nerror={error:?}\n");
                    respond(502, out.as_bytes());
                    return;
                }
            }
        }
        for mut response in held {
            out.clear();
            out.push_str(&format!(
                "calls={}\nstatus={}\n",
                call + 1,
                response.status_code.as_u16()
            ));
            let content_type = response.header_get("content-type".to_string());
            out.push_str(&format!("content-type={}\n", content_type.unwrap_or_default()));
            if let Ok(headers) = response.headers_get_all() {
                let mut lines: Vec<String> = headers
                    .iter()
                    .map(|(name, value)| format!("header {name}: {}", value.to_str().unwrap_or("?")))
                    .collect();
                lines.sort();
                for line in lines {
                    out.push_str(&line);
                    out.push('\n');
                }
            }
            last_body = response.body_read_all().unwrap_or_default();
        }
    }
    out.push_str("body=");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&last_body);
    respond(200, &bytes);
}

fn respond(status: u16, body: &[u8]) {
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "Status: {status}\r\nContent-Type: text/plain\r\n\r\n").expect("write");
    stdout.write_all(body).expect("write");
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' if index + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        decoded.push(byte);
                        index += 3;
                    }
                    Err(_) => {
                        decoded.push(b'%');
                        index += 1;
                    }
                }
            }
            b'+' => {
                decoded.push(b' ');
                index += 1;
            }
            byte => {
                decoded.push(byte);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}
