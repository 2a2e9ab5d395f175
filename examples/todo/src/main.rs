//! The to-do API of the primer's BFF example: items kept in a key-value store.
//!
//! ```text
//! GET    /todos        [{"id":1,"title":"…"},…]   in order of creation
//! POST   /todos        body: the title → 201 {"id":N}
//! GET    /todos/N      {"id":N,"title":"…"} or 404
//! DELETE /todos/N      204 or 404
//! POST   /hits         adds 1 to a counter → the new count (for load and consistency tests)
//! GET    /tasks/tick   for a `[[cron]]` entry: counts the runs of this tick (ticks/<tick>);
//!                      403 unless the scheduler runs it (X_ATOLL_TRIGGER=cron)
//! ```
//!
//! Keys: `items/<id, 12 digits>` (so they list in creation order), `next-id`, `hits` and
//! `ticks/<unix seconds>`.

use atoll_sdk::kv::Store;
use atoll_sdk::{Request, Response, json_escape};

fn main() {
    let request = Request::from_env();
    let response = match Store::open("todo") {
        Ok(store) => handle(&request, &store),
        Err(error) => Response::new(500).text(&format!("{error}\n")),
    };
    response.send();
}

fn item_key(id: i64) -> String {
    format!("items/{id:012}")
}

fn item_json(id: i64, title: &str) -> String {
    format!("{{\"id\":{id},\"title\":\"{}\"}}", json_escape(title))
}

fn handle(request: &Request, store: &Store) -> Response {
    let segments: Vec<&str> = request.path.trim_matches('/').split('/').collect();
    let result = match (request.method.as_str(), segments.as_slice()) {
        ("GET", ["todos"]) => list(store),
        ("POST", ["todos"]) => create(store, &request.text()),
        ("GET", ["todos", id]) => match id.parse::<i64>() {
            Ok(id) => store.get_text(&item_key(id)).map(|title| match title {
                Some(title) => Response::new(200).json(&item_json(id, &title)),
                None => Response::new(404).text("no such item\n"),
            }),
            Err(_) => Ok(Response::new(400).text("the id is a number\n")),
        },
        ("DELETE", ["todos", id]) => match id.parse::<i64>() {
            Ok(id) => store.delete(&item_key(id)).map(|existed| {
                if existed {
                    Response::new(204)
                } else {
                    Response::new(404).text("no such item\n")
                }
            }),
            Err(_) => Ok(Response::new(400).text("the id is a number\n")),
        },
        ("POST", ["hits"]) => store
            .increment("hits", 1)
            .map(|count| Response::new(200).text(&format!("{count}\n"))),
        ("GET", ["tasks", "tick"]) => tick(store),
        _ => Ok(Response::new(404).text("try /todos\n")),
    };
    result.unwrap_or_else(|error| Response::new(503).text(&format!("{error}\n")))
}

fn list(store: &Store) -> Result<Response, atoll_sdk::kv::KvError> {
    let mut items = Vec::new();
    // A request may make 1000 KV calls: list the first 500 items (one call each).
    for key in store.keys("items/")?.into_iter().take(500) {
        let Some(id) = key.strip_prefix("items/").and_then(|id| id.parse::<i64>().ok()) else {
            continue;
        };
        // Deleted since it was listed: skip it.
        if let Some(title) = store.get_text(&key)? {
            items.push(item_json(id, &title));
        }
    }
    Ok(Response::new(200).json(&format!("[{}]", items.join(","))))
}

fn create(store: &Store, title: &str) -> Result<Response, atoll_sdk::kv::KvError> {
    let title = title.trim();
    if title.is_empty() {
        return Ok(Response::new(400).text("the body is the item's title\n"));
    }
    let id = store.increment("next-id", 1)?;
    // Only if absent: an id is never reused, even if the counter were reset.
    store.compare_and_set(&item_key(id), title.as_bytes(), 0)?;
    Ok(Response::new(201)
        .header("Location", &format!("/todos/{id}"))
        .json(&format!("{{\"id\":{id}}}")))
}

/// A scheduled run: the node sets X_ATOLL_TRIGGER (no client can), and names the tick.
fn tick(store: &Store) -> Result<Response, atoll_sdk::kv::KvError> {
    if std::env::var("X_ATOLL_TRIGGER").as_deref() != Ok("cron") {
        return Ok(Response::new(403).text("only the scheduler runs this\n"));
    }
    let tick = std::env::var("X_ATOLL_CRON_TICK").unwrap_or_default();
    let runs = store.increment(&format!("ticks/{tick}"), 1)?;
    Ok(Response::new(200).text(&format!("{runs}\n")))
}
