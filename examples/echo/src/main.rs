//! Reflects the request it was given: method, path, query, headers and body, as JSON-ish
//! text that is easy to read with curl and easy to check in tests.
//!
//! It shows the whole WCGI contract: request metadata arrives as CGI/1.1 environment
//! variables (`REQUEST_METHOD`, `PATH_INFO`, `QUERY_STRING`, `HTTP_*` …), the body on
//! stdin, and the response — headers, a blank line, the body — goes to stdout.

use std::io::{Read, Write};

fn main() {
    let mut body = Vec::new();
    std::io::stdin().read_to_end(&mut body).expect("read stdin");
    let var = |name: &str| std::env::var(name).unwrap_or_default();

    let mut headers: Vec<(String, String)> = std::env::vars()
        .filter(|(key, _)| key.starts_with("HTTP_"))
        .collect();
    headers.sort();

    let mut out = String::new();
    out.push_str("Status: 200 OK\r\n");
    out.push_str("Content-Type: text/plain; charset=utf-8\r\n");
    out.push_str("X-Echo: 1\r\n\r\n");
    for key in [
        "REQUEST_METHOD",
        "PATH_INFO",
        "QUERY_STRING",
        "SERVER_NAME",
        "SERVER_PORT",
        "SERVER_PROTOCOL",
        "REMOTE_ADDR",
        "CONTENT_TYPE",
        "CONTENT_LENGTH",
        "SCRIPT_NAME",
        "X_MATCHED_ROUTE",
        "X_FULL_URL",
        "X_RAW_PATH_INFO",
        "X_RELATIVE_PATH",
        "GREETING",
    ] {
        out.push_str(&format!("{key}={}\n", var(key)));
    }
    for (key, value) in headers {
        out.push_str(&format!("{key}={value}\n"));
    }
    out.push_str(&format!("BODY_LENGTH={}\n", body.len()));
    out.push_str("BODY=");
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(out.as_bytes()).expect("write");
    stdout.write_all(&body).expect("write");
    stdout.flush().expect("flush");
    eprintln!("echo: {} {}", var("REQUEST_METHOD"), var("PATH_INFO"));
}
