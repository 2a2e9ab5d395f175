//! Every `/v1/*` endpoint of the registry API refuses a request without a token and one
//! with a wrong token: 401, and nothing changed afterwards (functions, versions, the active
//! pointers, blobs, members, the revision). `/healthz` stays open.
//!
//! The table is checked against the routes `registry/src/api.rs` declares, so a new
//! endpoint cannot be added without being listed (and so tested) here.

use std::sync::Arc;
use std::time::Duration;

use atoll_control::RegistryClient;
use atoll_core::WatchEvent;
use atoll_registry::{Registry, RegistryOptions, serve};
use futures_util::StreamExt;
use tokio::sync::oneshot;

const TOKEN: &str = "test-token-0123456789";

/// `(method, path as routed, path as called)`: every route under the auth layer.
const ENDPOINTS: &[(&str, &str, &str)] = &[
    ("POST", "/v1/functions", "/v1/functions"),
    ("GET", "/v1/functions", "/v1/functions"),
    (
        "GET",
        "/v1/functions/{name}/versions",
        "/v1/functions/echo/versions",
    ),
    (
        "POST",
        "/v1/functions/{name}/rollback",
        "/v1/functions/echo/rollback",
    ),
    (
        "POST",
        "/v1/functions/{name}/traffic",
        "/v1/functions/echo/traffic",
    ),
    (
        "GET",
        "/v1/functions/{name}/secrets",
        "/v1/functions/echo/secrets",
    ),
    (
        "PUT",
        "/v1/functions/{name}/secrets/{key}",
        "/v1/functions/echo/secrets/API_KEY",
    ),
    (
        "DELETE",
        "/v1/functions/{name}/secrets/{key}",
        "/v1/functions/echo/secrets/API_KEY",
    ),
    ("GET", "/v1/blobs/{sha256}", "/v1/blobs/SHA"),
    ("GET", "/v1/watch", "/v1/watch?since=0"),
    ("GET", "/v1/nodes", "/v1/nodes"),
    ("PUT", "/v1/nodes/{name}", "/v1/nodes/intruder"),
    ("POST", "/v1/tokens", "/v1/tokens"),
    ("GET", "/v1/tokens", "/v1/tokens"),
    ("DELETE", "/v1/tokens/{id}", "/v1/tokens/TOKEN_ID"),
    ("GET", "/v1/cron/{name}", "/v1/cron/echo"),
    ("POST", "/v1/cron/{name}", "/v1/cron/echo"),
    ("PUT", "/v1/cron/{name}", "/v1/cron/echo"),
    ("GET", "/v1/kv/{store}", "/v1/kv/todo"),
    ("GET", "/v1/kv/{store}/{key}", "/v1/kv/todo/k"),
    ("PUT", "/v1/kv/{store}/{key}", "/v1/kv/todo/k"),
    ("POST", "/v1/kv/{store}/{key}", "/v1/kv/todo/k?increment=1"),
    ("DELETE", "/v1/kv/{store}/{key}", "/v1/kv/todo/k"),
];

/// The `(method, path)` pairs `api.rs` routes: each `.route("PATH", get(h).post(h)…)`,
/// on one line or several.
fn declared_routes() -> Vec<(String, String)> {
    let source = include_str!("../registry/src/api.rs");
    let mut routes = Vec::new();
    for call in source.split(".route(").skip(1) {
        // rustfmt may break the call after its opening parenthesis.
        let Some(call) = call.trim_start().strip_prefix('"') else {
            continue;
        };
        let (path, rest) = call.split_once('"').expect("a quoted path");
        // The route call ends at its closing parenthesis (the handlers may span lines).
        let mut depth = 1;
        let end = rest
            .char_indices()
            .find(|(_, character)| {
                match character {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                depth == 0
            })
            .map(|(index, _)| index)
            .expect("the end of the route call");
        let handlers = &rest[..end];
        for method in ["get", "post", "put", "delete", "patch"] {
            let calls = handlers.matches(&format!("{method}(")).count()
                - handlers.matches(&format!("_{method}(")).count();
            if calls > 0 {
                routes.push((method.to_uppercase(), path.to_string()));
            }
        }
    }
    routes.sort();
    routes
}

#[test]
fn the_table_lists_every_v1_route() {
    let declared: Vec<(String, String)> = declared_routes()
        .into_iter()
        .filter(|(_, path)| path != "/healthz")
        .collect();
    let mut listed: Vec<(String, String)> = ENDPOINTS
        .iter()
        .map(|(method, path, _)| (method.to_string(), path.to_string()))
        .collect();
    listed.sort();
    assert!(
        declared.len() >= 8,
        "parsed too few routes from api.rs: {declared:?}"
    );
    assert_eq!(
        listed, declared,
        "registry/tests/auth_endpoints.rs must list every route of api.rs"
    );
}

/// `(module (memory (export "memory") 1) (func (export "_start")))` with a custom section
/// so `tag`s differ.
fn module(tag: &str) -> Vec<u8> {
    let mut wasm = wat::parse_str(r#"(module (memory (export "memory") 1) (func (export "_start")))"#)
        .expect("valid WAT");
    let mut payload = vec![tag.len() as u8];
    payload.extend_from_slice(tag.as_bytes());
    wasm.push(0x00);
    wasm.push(payload.len() as u8);
    wasm.extend_from_slice(&payload);
    wasm
}

fn manifest(name: &str, host: &str) -> String {
    format!("name = {name:?}\nwasm = \"{name}.wasm\"\nroutes = [{host:?}]\n")
}

/// Everything a refused request could have changed.
#[derive(Debug, PartialEq)]
struct Snapshot {
    functions: Vec<(String, u64, u64, String)>,
    versions: Vec<u64>,
    members: Vec<String>,
    revision: u64,
    blobs: usize,
    tokens: Vec<String>,
    cron_runs: usize,
}

async fn snapshot(client: &RegistryClient, data: &std::path::Path) -> Snapshot {
    let functions = client
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|f| (f.name, f.active, f.versions, f.sha256))
        .collect();
    let versions = client
        .versions("echo")
        .await
        .unwrap()
        .versions
        .iter()
        .map(|v| v.version)
        .collect();
    let members = client
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.announcement.name)
        .collect();
    let mut watch = Box::pin(client.watch(0).await.unwrap());
    let revision = loop {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("the catch-up ends within 10 s")
            .expect("the stream is open")
            .unwrap();
        if let WatchEvent::Synced { revision } = event {
            break revision;
        }
    };
    let blobs = std::fs::read_dir(data.join("blobs/sha256")).unwrap().count();
    let tokens = client.tokens().await.unwrap().into_iter().map(|t| t.id).collect();
    let cron_runs = client.cron_runs("echo").await.unwrap().len();
    Snapshot {
        functions,
        versions,
        members,
        revision,
        blobs,
        tokens,
        cron_runs,
    }
}

#[tokio::test]
async fn every_v1_endpoint_needs_the_token_and_changes_nothing_without_it() {
    let data = tempfile::tempdir().unwrap();
    let engine = atoll_isolate::Engine::new().unwrap();
    let registry = Registry::open(
        data.path(),
        std::sync::Arc::new(atoll_isolate::PushCheck::new(engine)),
        TOKEN.into(),
        RegistryOptions::default(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve(listener, Arc::new(registry), async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    // /healthz is open (and tells when the server is up: poll, never sleep).
    let mut attempts = 0;
    loop {
        match http.get(format!("{url}/healthz")).send().await {
            Ok(response) => {
                assert_eq!(response.status(), 200);
                assert_eq!(response.text().await.unwrap(), "ok");
                break;
            }
            Err(error) if attempts < 500 => {
                attempts += 1;
                let _ = error;
                tokio::task::yield_now().await;
            }
            Err(error) => panic!("registry never answered: {error}"),
        }
    }

    // State that every refused request would change if it went through: two versions (a
    // rollback would move the active one), a blob, no member.
    let client = RegistryClient::new(&url, Some(TOKEN.into())).unwrap();
    client
        .push(&manifest("echo", "echo.example"), module("v1"))
        .await
        .unwrap();
    let v2 = client
        .push(&manifest("echo", "echo.example"), module("v2"))
        .await
        .unwrap();
    // A scoped token a refused DELETE would revoke, and a POST would add to.
    client
        .create_token(&serde_json::from_value(serde_json::json!({ "scope": "node" })).unwrap())
        .await
        .unwrap();
    let before = snapshot(&client, data.path()).await;
    assert_eq!(before.tokens.len(), 1);
    assert_eq!(before.functions[0].1, 2);

    // A heartbeat the registry would take (see membership::NodeAnnouncement).
    let announcement = serde_json::json!({
        "name": "intruder",
        "region": "evil",
        "http": "127.0.0.66:80",
        "in_flight": 0,
    });
    for (method, _, target) in ENDPOINTS {
        let target = target
            .replace("SHA", &v2.sha256)
            .replace("TOKEN_ID", &before.tokens[0]);
        for (credential, expected_error) in [
            (None, "missing bearer token"),
            (Some("wrong-token"), "invalid token"),
        ] {
            let mut request = http.request(method.parse().unwrap(), format!("{url}{target}"));
            request = match *method {
                "POST" if target == "/v1/functions" => request.multipart(
                    reqwest::multipart::Form::new()
                        .text("manifest", manifest("intruder", "intruder.example"))
                        .part("module", reqwest::multipart::Part::bytes(module("x"))),
                ),
                "POST" if target == "/v1/tokens" => request.json(&serde_json::json!({ "scope": "admin" })),
                "POST" | "PUT" if target.starts_with("/v1/cron/") => {
                    request.json(&atoll_core::cron::CronRun {
                        function: "echo".into(),
                        entry: 0,
                        path: "/".into(),
                        tick: 1,
                        node: "intruder".into(),
                        outcome: atoll_core::cron::Outcome::Running,
                        duration_ms: None,
                    })
                }
                // A split that would move the active version to v1 if it went through.
                "POST" if target.ends_with("/traffic") => request.json(&serde_json::json!({
                    "shares": [{ "version": 1, "percent": 60 }, { "version": 2, "percent": 40 }]
                })),
                "POST" => request.json(&serde_json::json!({ "to": 1 })),
                "PUT" => request.json(&announcement),
                _ => request,
            };
            if let Some(token) = credential {
                request = request.bearer_auth(token);
            }
            let response = tokio::time::timeout(Duration::from_secs(30), request.send())
                .await
                .unwrap_or_else(|_| panic!("{method} {target} answers"))
                .unwrap_or_else(|e| panic!("{method} {target}: {e}"));
            let status = response.status();
            let challenge = response.headers().get("www-authenticate").cloned();
            let body = response.text().await.unwrap();
            assert_eq!(
                status, 401,
                "{method} {target} with {credential:?} answered {status}: {body}"
            );
            assert_eq!(challenge.as_ref().map(|v| v.as_bytes()), Some(&b"Bearer"[..]));
            let error: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(error["error"], expected_error, "{method} {target}");
        }
    }

    assert_eq!(
        snapshot(&client, data.path()).await,
        before,
        "a refused request changed state"
    );
}
