//! Write Atoll functions in Rust, thinly: no runtime, no dependencies.
//!
//! - [`Request`] / [`Response`]: the request as WCGI gives it (CGI/1.1 environment, body
//!   on stdin) and the response written to stdout.
//! - [`http::fetch`]: outbound HTTP through `wasi_experimental_http` (what
//!   `[outbound] allowed_hosts` allows), and [`http::service`] for a `[services]` binding.
//! - [`kv::Store`]: the stores `[kv] stores` grants, through `atoll_kv`.
//!
//! ```no_run
//! use atoll_sdk::{Request, Response, kv::Store};
//!
//! fn main() {
//!     let request = Request::from_env();
//!     let store = Store::open("default").expect("granted in atoll.toml");
//!     let visits = store.increment("visits", 1).unwrap_or(0);
//!     Response::new(200).text(&format!("visit {visits} to {}\n", request.path)).send();
//! }
//! ```
//!
//! Built for `wasm32-wasip1`; on other targets the host calls answer "unavailable", so the
//! crate still builds and its pure parts test on the host.

pub mod http;
pub mod kv;

use std::io::{Read, Write};

/// The request a function was started for.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// The decoded path (`PATH_INFO`).
    pub path: String,
    /// The raw query string, without `?`.
    pub query: String,
    /// Header names lowercased with `-` (from `HTTP_*`), in the order the host gave them.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// Reads the request from the environment and stdin.
    pub fn from_env() -> Request {
        let var = |name: &str| std::env::var(name).unwrap_or_default();
        let mut headers: Vec<(String, String)> = std::env::vars()
            .filter_map(|(key, value)| {
                let name = key.strip_prefix("HTTP_")?;
                Some((name.to_ascii_lowercase().replace('_', "-"), value))
            })
            .collect();
        if let Ok(content_type) = std::env::var("CONTENT_TYPE")
            && !content_type.is_empty()
        {
            headers.push(("content-type".into(), content_type));
        }
        let mut body = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut body);
        Request {
            method: var("REQUEST_METHOD"),
            path: var("PATH_INFO"),
            query: var("QUERY_STRING"),
            headers,
            body,
        }
    }

    /// A header's value (`name` in lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// A query parameter, percent-decoded (`+` is a space).
    pub fn param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then(|| percent_decode(value))
        })
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A response: status, headers, body; [`Response::send`] writes it as CGI to stdout.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// A `text/plain` body.
    pub fn text(self, text: &str) -> Response {
        self.body("text/plain; charset=utf-8", text.as_bytes().to_vec())
    }

    /// An `application/json` body (already serialised).
    pub fn json(self, json: &str) -> Response {
        self.body("application/json", json.as_bytes().to_vec())
    }

    pub fn body(mut self, content_type: &str, body: Vec<u8>) -> Response {
        self.headers.push(("Content-Type".into(), content_type.into()));
        self.body = body;
        self
    }

    /// The CGI bytes: `Status`, the headers, a blank line, the body.
    pub fn to_cgi(&self) -> Vec<u8> {
        let mut out = format!("Status: {}\r\n", self.status).into_bytes();
        for (name, value) in &self.headers {
            // A line break in a value would start a header of the guest's choosing.
            let value: String = value.chars().filter(|c| *c != '\r' && *c != '\n').collect();
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }

    /// Writes the response to stdout.
    pub fn send(&self) {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(&self.to_cgi());
        let _ = stdout.flush();
    }
}

/// Decodes `%XX` and `+` (a query string's encoding).
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'%' if index + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[index + 1..index + 3])
                    .ok()
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                {
                    Some(byte) => {
                        decoded.push(byte);
                        index += 3;
                    }
                    None => {
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

/// Escapes text for a JSON string (without the quotes).
pub fn json_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            c if (c as u32) < 0x20 => escaped.push_str(&format!("\\u{:04x}", c as u32)),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_cgi_and_headers_cannot_be_split() {
        let response = Response::new(201)
            .header("X-Evil", "a\r\nSet-Cookie: x=1")
            .text("made");
        let cgi = String::from_utf8(response.to_cgi()).unwrap();
        assert_eq!(
            cgi,
            "Status: 201\r\nX-Evil: aSet-Cookie: x=1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nmade"
        );
    }

    #[test]
    fn queries_and_json_are_encoded_right() {
        assert_eq!(percent_decode("a%20b+c%2Fd%"), "a b c/d%");
        assert_eq!(percent_decode("%zz"), "%zz");
        let request = Request {
            query: "x=1&title=buy%20milk".into(),
            ..Request::default()
        };
        assert_eq!(request.param("title").as_deref(), Some("buy milk"));
        assert_eq!(request.param("nope"), None);
        assert_eq!(json_escape("say \"hi\"\n\u{1}"), "say \\\"hi\\\"\\n\\u0001");
    }
}
