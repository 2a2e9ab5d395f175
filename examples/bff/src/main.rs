//! The BFF of the primer's to-do app: serves the page and an API shaped for it.
//!
//! ```text
//! GET    /                 the page (HTML + a little JavaScript)
//! GET    /api/todos        the items, from the `todo` function (service binding TODO)
//! POST   /api/todos        body: a title → creates it there
//! DELETE /api/todos/N      deletes it there
//! GET    /api/quote        a quote from $QUOTE_URL (outbound HTTP), or a fallback
//! ```
//!
//! The `todo` function is reached in-process through `[services] TODO = "todo"`; the quote
//! through `[outbound] allowed_hosts`. Neither leaves the node unless it must.

use atoll_sdk::http::{fetch, service};
use atoll_sdk::{Request, Response};

const PAGE: &str = include_str!("page.html");

fn main() {
    let request = Request::from_env();
    handle(&request).send();
}

fn handle(request: &Request) -> Response {
    let path = request.path.as_str();
    match (request.method.as_str(), path) {
        ("GET", "/") => Response::new(200).body("text/html; charset=utf-8", PAGE.as_bytes().to_vec()),
        ("GET", "/api/quote") => quote(),
        (method, path) if path == "/api/todos" || path.starts_with("/api/todos/") => {
            let rest = &path["/api".len()..];
            to_todo(method, rest, &request.body)
        }
        _ => Response::new(404).text("not found\n"),
    }
}

/// Passes the call on to the `todo` function and its answer back.
fn to_todo(method: &str, path: &str, body: &[u8]) -> Response {
    let Some(base) = service("TODO") else {
        return Response::new(500).text("no TODO service binding\n");
    };
    match fetch(
        method,
        &format!("{base}{path}"),
        &[("content-type", "text/plain")],
        body,
    ) {
        Ok(answer) => {
            let content_type = answer.header("content-type").unwrap_or("text/plain").to_string();
            let mut response = Response::new(answer.status);
            if !answer.body.is_empty() || answer.status != 204 {
                response = response.body(&content_type, answer.body);
            }
            response
        }
        Err(error) => Response::new(502).text(&format!("the todo service failed: {error}\n")),
    }
}

/// A quote from the outside API, or a fallback when it is not reachable (or not allowed).
fn quote() -> Response {
    let url = std::env::var("QUOTE_URL").unwrap_or_default();
    match fetch("GET", &url, &[("accept", "application/json")], b"") {
        Ok(answer) if answer.status == 200 => Response::new(200).json(&answer.text()),
        Ok(answer) => Response::new(502).text(&format!("the quote service answered {}\n", answer.status)),
        Err(error) => {
            eprintln!("quote: {error}");
            Response::new(200).json("{\"content\":\"Serverless is someone else's server, until it is yours.\",\"author\":\"Atoll\"}")
        }
    }
}
