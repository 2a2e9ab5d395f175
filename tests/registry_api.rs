//! The registry API end to end over loopback: a real server on `127.0.0.1:0`, driven by
//! the real `RegistryClient`, with the real engine validating modules.

use std::sync::Arc;
use std::time::Duration;

use atoll_control::{ClientError, RegistryClient};
use atoll_core::WatchEvent;
use atoll_core::api_types::FunctionSummary;
use atoll_core::auth::{Grant, Scope};
use atoll_core::membership::NodeAnnouncement;
use atoll_registry::{Registry, RegistryOptions, serve};
use futures_util::{Stream, StreamExt};
use tokio::sync::oneshot;

const TOKEN: &str = "test-token-0123456789";

fn leb128(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// `(module (memory (export "memory") 1) (func (export "_start")))` plus a custom section
/// named `tag`, so different tags give different bytes (and digests).
fn module(tag: &str) -> Vec<u8> {
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    m.extend_from_slice(&[0x01, 0x04, 0x01, 0x60, 0x00, 0x00]); // type: () -> ()
    m.extend_from_slice(&[0x03, 0x02, 0x01, 0x00]); // func 0: type 0
    m.extend_from_slice(&[0x05, 0x03, 0x01, 0x00, 0x01]); // memory 0: min 1 page
    m.extend_from_slice(&[0x07, 0x13, 0x02]); // export section, 19 bytes, 2 entries
    m.extend_from_slice(b"\x06_start\x00\x00"); // "_start" func 0
    m.extend_from_slice(b"\x06memory\x02\x00"); // "memory" memory 0
    m.extend_from_slice(&[0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b]); // code: empty body
    let mut payload = Vec::new();
    leb128(tag.len(), &mut payload);
    payload.extend_from_slice(tag.as_bytes());
    m.push(0x00); // custom section
    leb128(payload.len(), &mut m);
    m.extend_from_slice(&payload);
    m
}

fn manifest(name: &str, routes: &[&str]) -> String {
    let routes: Vec<String> = routes.iter().map(|r| format!("{r:?}")).collect();
    format!(
        "name = {name:?}\nwasm = \"{name}.wasm\"\nroutes = [{}]\n[env]\nGREETING = \"hi\"\n",
        routes.join(", ")
    )
}

struct Server {
    url: String,
    data: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(options: RegistryOptions) -> Server {
        let data = tempfile::tempdir().unwrap();
        let engine = atoll_isolate::Engine::new().unwrap();
        let registry = Registry::open(
            data.path(),
            std::sync::Arc::new(atoll_isolate::PushCheck::new(engine)),
            TOKEN.into(),
            options,
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, Arc::new(registry), async move {
            let _ = stopped.await;
        }));
        // Poll until it answers; never sleep for readiness.
        let http = reqwest::Client::new();
        let health = format!("{url}/healthz");
        for attempt in 0.. {
            match http.get(&health).send().await {
                Ok(r) if r.status() == 200 => {
                    assert_eq!(r.text().await.unwrap(), "ok");
                    break;
                }
                _ if attempt < 500 => tokio::task::yield_now().await,
                other => panic!("registry never became healthy: {other:?}"),
            }
        }
        Server {
            url,
            data,
            stop: Some(stop),
            task,
        }
    }

    fn client(&self) -> RegistryClient {
        RegistryClient::new(&self.url, Some(TOKEN.into())).unwrap()
    }

    fn client_with(&self, token: &str) -> RegistryClient {
        RegistryClient::new(&self.url, Some(token.into())).unwrap()
    }

    fn blob_files(&self) -> usize {
        std::fs::read_dir(self.data.path().join("blobs/sha256"))
            .unwrap()
            .count()
    }

    async fn shutdown(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("graceful shutdown finishes")
            .unwrap()
            .unwrap();
    }
}

fn status_of(e: &ClientError) -> u16 {
    e.status()
        .unwrap_or_else(|| panic!("expected an HTTP error, got {e}"))
        .as_u16()
}

async fn next_event<S>(stream: &mut S) -> WatchEvent
where
    S: Stream<Item = Result<WatchEvent, ClientError>> + Unpin,
{
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("an event within 10 s")
        .expect("stream still open")
        .expect("a valid event")
}

#[tokio::test]
async fn push_list_versions_rollback_blob() {
    let server = Server::start(RegistryOptions::default()).await;
    let client = server.client();

    let v1 = client
        .push(
            &manifest("echo", &["echo.example.com", "API.example.com/echo/"]),
            module("v1"),
        )
        .await
        .unwrap();
    assert_eq!((v1.name.as_str(), v1.version), ("echo", 1));
    assert_eq!(v1.sha256.len(), 64);
    let v2 = client
        .push(&manifest("echo", &["echo.example.com"]), module("v2"))
        .await
        .unwrap();
    assert_eq!(v2.version, 2);
    assert_ne!(v1.sha256, v2.sha256);
    client
        .push(&manifest("alpha", &["alpha.example.com"]), module("a"))
        .await
        .unwrap();

    let list = client.list().await.unwrap();
    let names: Vec<&str> = list.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["alpha", "echo"]);
    assert_eq!(list[1].active, 2);
    assert_eq!(list[1].versions, 2);
    assert_eq!(list[1].routes, ["echo.example.com"]);
    assert_eq!(list[1].sha256, v2.sha256);

    let versions = client.versions("echo").await.unwrap();
    assert_eq!(versions.active, 2);
    assert_eq!(versions.versions.len(), 2);
    assert_eq!(
        versions.versions[0].manifest.routes,
        ["echo.example.com", "api.example.com/echo"]
    );
    assert_eq!(versions.versions[0].manifest.env["GREETING"], "hi");
    let e = client.versions("nope").await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "registry answered 404 Not Found: no function `nope`"
    );

    let r = client.rollback("echo", None).await.unwrap();
    assert_eq!((r.active, r.sha256.as_str()), (1, v1.sha256.as_str()));
    let r = client.rollback("echo", Some(2)).await.unwrap();
    assert_eq!((r.active, r.sha256.as_str()), (2, v2.sha256.as_str()));
    assert_eq!(
        status_of(&client.rollback("echo", Some(9)).await.unwrap_err()),
        404
    );
    assert_eq!(status_of(&client.rollback("nope", None).await.unwrap_err()), 404);
    // An empty body means "the version before".
    let raw = reqwest::Client::new()
        .post(format!("{}/v1/functions/echo/rollback", server.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 200);
    assert_eq!(client.versions("echo").await.unwrap().active, 1);

    assert_eq!(client.blob(&v1.sha256).await.unwrap(), module("v1"));
    let e = client.blob("not-a-digest").await.unwrap_err();
    assert_eq!(status_of(&e), 400);
    assert_eq!(status_of(&client.blob(&"0".repeat(64)).await.unwrap_err()), 404);

    // Route taken by another function: 409 naming it, nothing stored.
    let blobs = server.blob_files();
    let e = client
        .push(&manifest("other", &["ECHO.example.com"]), module("o"))
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), 409);
    assert!(e.to_string().contains("function `echo`"), "{e}");
    assert_eq!(client.list().await.unwrap().len(), 2);
    assert_eq!(server.blob_files(), blobs);

    // Bad manifest: 400 naming the key.
    let e = client
        .push(
            &format!("colour = \"red\"\n{}", manifest("x", &["x.com"])),
            module("x"),
        )
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), 400);
    assert!(e.to_string().contains("manifest: unknown field `colour`"), "{e}");
    // Empty module: 400.
    let e = client.push(&manifest("x", &["x.com"]), vec![]).await.unwrap_err();
    assert_eq!(status_of(&e), 400);

    server.shutdown().await;
}

#[tokio::test]
async fn auth_is_required() {
    let server = Server::start(RegistryOptions::default()).await;
    let anonymous = RegistryClient::new(&server.url, None).unwrap();
    let e = anonymous.list().await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "registry answered 401 Unauthorized: missing bearer token"
    );
    let wrong = RegistryClient::new(&server.url, Some("nope".into())).unwrap();
    let e = wrong.list().await.unwrap_err();
    assert_eq!(e.to_string(), "registry answered 401 Unauthorized: invalid token");
    let e = wrong
        .push(&manifest("a", &["a.com"]), module("a"))
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), 401);
    assert!(wrong.watch(0).await.is_err());
    assert_eq!(server.blob_files(), 0);
    server.shutdown().await;
}

#[tokio::test]
async fn invalid_module_is_refused_and_nothing_stored() {
    let server = Server::start(RegistryOptions::default()).await;
    let client = server.client();
    let e = client
        .push(&manifest("a", &["a.com"]), b"not wasm at all".to_vec())
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), 422);
    assert!(e.to_string().contains(": invalid module: "), "{e}");
    // Valid Wasm, but not a WASI command (no `_start`).
    let e = client
        .push(&manifest("a", &["a.com"]), b"\0asm\x01\0\0\0".to_vec())
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), 422);
    assert!(e.to_string().contains("_start"), "{e}");
    // A WASI command whose init function traps: no node could prepare it.
    let trapping_init = wat::parse_str(
        r#"(module (memory (export "memory") 1)
             (func (export "atoll_init") unreachable)
             (func (export "_start")))"#,
    )
    .unwrap();
    let e = client
        .push(&manifest("a", &["a.com"]), trapping_init)
        .await
        .unwrap_err();
    assert_eq!(status_of(&e), 422);
    assert!(e.to_string().contains("init function"), "{e}");
    // A memory that starts larger than the manifest's limit could never run.
    let big_memory =
        wat::parse_str(r#"(module (memory (export "memory") 40) (func (export "_start")))"#).unwrap();
    let limited = format!(
        "{}[limits]\nmemory = \"2MiB\"\n",
        manifest("a", &["a.com"]).replace("[env]\nGREETING = \"hi\"\n", "")
    );
    let e = client.push(&limited, big_memory).await.unwrap_err();
    assert_eq!(status_of(&e), 422);
    assert!(e.to_string().contains("over the 2 MiB memory limit"), "{e}");
    assert!(client.list().await.unwrap().is_empty());
    assert_eq!(server.blob_files(), 0);
    assert!(!server.data.path().join("state.json").exists());
    server.shutdown().await;
}

#[tokio::test]
async fn oversized_modules_get_a_clean_413() {
    let options = RegistryOptions {
        max_module_bytes: 1024,
        ..RegistryOptions::default()
    };
    let server = Server::start(options).await;
    let client = server.client();

    // Over the module limit, within the body limit: the exact size is reported.
    let big = module(&"x".repeat(2000));
    let e = client
        .push(&manifest("a", &["a.com"]), big.clone())
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "registry answered 413 Payload Too Large: module is {} bytes, over the 1 KiB limit",
            big.len()
        )
    );
    // Over the body limit itself (1 KiB + 1 MiB): still an answer, not a reset.
    let huge = module(&"x".repeat(4 << 20));
    let e = client.push(&manifest("a", &["a.com"]), huge).await.unwrap_err();
    assert_eq!(status_of(&e), 413, "{e}");
    assert!(e.to_string().contains("request body is over"), "{e}");

    // Still serving, nothing stored; a module within the limit goes through.
    assert!(client.list().await.unwrap().is_empty());
    assert_eq!(server.blob_files(), 0);
    client
        .push(&manifest("a", &["a.com"]), module("small"))
        .await
        .unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn watch_catches_up_then_streams() {
    let options = RegistryOptions {
        heartbeat: Duration::from_millis(200),
        ..RegistryOptions::default()
    };
    let server = Server::start(options).await;
    let client = server.client();
    let a = client
        .push(&manifest("a", &["a.com"]), module("a1"))
        .await
        .unwrap();

    let mut watch = client.watch(0).await.unwrap();
    match next_event(&mut watch).await {
        WatchEvent::Put { revision, deployment } => {
            assert_eq!(revision, 1);
            assert_eq!((deployment.name.as_str(), deployment.version), ("a", 1));
            assert_eq!(deployment.sha256, a.sha256);
            assert_eq!(deployment.manifest.routes, ["a.com"]);
        }
        other => panic!("expected a put, got {other:?}"),
    }
    assert_eq!(next_event(&mut watch).await, WatchEvent::Synced { revision: 1 });

    // A new push arrives on the open stream (heartbeats may come first). Heartbeats reset
    // next_event's own timeout, so the loops below also have an overall deadline: a
    // broken watch fails the test instead of looping on heartbeats forever.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let b = client
        .push(&manifest("b", &["b.com"]), module("b1"))
        .await
        .unwrap();
    let put = loop {
        assert!(std::time::Instant::now() < deadline, "no put within 30 s");
        match next_event(&mut watch).await {
            WatchEvent::Heartbeat { .. } => continue,
            other => break other,
        }
    };
    match put {
        WatchEvent::Put { revision, deployment } => {
            assert_eq!(revision, 2);
            assert_eq!(deployment.name, "b");
            assert_eq!(deployment.sha256, b.sha256);
        }
        other => panic!("expected a put, got {other:?}"),
    }
    // A rollback is a put too.
    client
        .push(&manifest("a", &["a.com"]), module("a2"))
        .await
        .unwrap();
    client.rollback("a", None).await.unwrap();
    let mut seen = Vec::new();
    while seen.last().map(WatchEvent::revision) != Some(4) {
        assert!(
            std::time::Instant::now() < deadline,
            "no rollback put within 30 s: {seen:?}"
        );
        match next_event(&mut watch).await {
            WatchEvent::Heartbeat { .. } => {}
            WatchEvent::Put { revision, deployment } => seen.push(WatchEvent::Put { revision, deployment }),
            other => panic!("unexpected {other:?}"),
        }
    }
    match seen.last() {
        Some(WatchEvent::Put { deployment, .. }) => assert_eq!(deployment.version, 1),
        other => panic!("unexpected {other:?}"),
    }
    // Idle: heartbeats carry the covered revision.
    assert_eq!(
        next_event(&mut watch).await,
        WatchEvent::Heartbeat { revision: 4 }
    );

    // Resuming from revision 2 sends only what changed after it.
    let mut resumed = client.watch(2).await.unwrap();
    match next_event(&mut resumed).await {
        WatchEvent::Put { revision, deployment } => assert_eq!(
            (revision, deployment.name.as_str(), deployment.version),
            (4, "a", 1)
        ),
        other => panic!("expected a put, got {other:?}"),
    }
    assert_eq!(next_event(&mut resumed).await, WatchEvent::Synced { revision: 4 });

    // Shutdown ends the streams, so the graceful shutdown completes.
    server.shutdown().await;
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(event) = watch.next().await {
            if event.is_err() {
                break;
            }
        }
    })
    .await;
    assert!(end.is_ok(), "watch stream ended");
}

fn grant(scope: Scope, functions: &[&str], domains: &[&str]) -> Grant {
    Grant {
        scope,
        functions: functions.iter().map(|f| f.to_string()).collect(),
        domains: domains.iter().map(|d| d.parse().unwrap()).collect(),
        node: None,
        description: String::new(),
    }
}

/// What a client may see of the registry's state: the list, and every function's versions.
async fn state_of(client: &RegistryClient) -> (Vec<FunctionSummary>, Vec<(u64, usize)>) {
    let list = client.list().await.unwrap();
    let mut versions = Vec::new();
    for function in &list {
        let v = client.versions(&function.name).await.unwrap();
        versions.push((v.active, v.versions.len()));
    }
    (list, versions)
}

fn announcement(name: &str) -> NodeAnnouncement {
    NodeAnnouncement {
        name: name.into(),
        region: "default".into(),
        http: Some("127.0.0.1:8080".parse().unwrap()),
        https: None,
        in_flight: 0,
        free_capacity: 1,
        draining: false,
        sync_lag: 0,
        quarantined: 0,
    }
}

/// The assertion that a call was refused with `status` and a message holding `needles`.
fn refused(e: ClientError, status: u16, needles: &[&str]) {
    assert_eq!(status_of(&e), status, "{e}");
    for needle in needles {
        assert!(e.to_string().contains(needle), "{needle:?} not in: {e}");
    }
}

#[tokio::test]
async fn deploy_token_is_limited_to_its_functions_and_domains() {
    let server = Server::start(RegistryOptions::default()).await;
    let admin = server.client();
    admin
        .push(&manifest("blog", &["blog.localhost"]), module("blog"))
        .await
        .unwrap();
    admin
        .push(&manifest("shop-old", &["old.example.org"]), module("old1"))
        .await
        .unwrap();
    let created = admin
        .create_token(&grant(
            Scope::Deploy,
            &["shop-*"],
            &["shop.localhost", "*.shop.localhost"],
        ))
        .await
        .unwrap();
    assert!(created.token.starts_with("atoll_"), "{}", created.token);
    let deploy = server.client_with(&created.token);

    // Its functions, on its domains: fine, a new version too.
    let pushed = deploy
        .push(
            &manifest("shop-web", &["shop.localhost", "www.shop.localhost/app"]),
            module("w1"),
        )
        .await
        .unwrap();
    assert_eq!((pushed.name.as_str(), pushed.version), ("shop-web", 1));
    deploy
        .push(&manifest("shop-web", &["shop.localhost"]), module("w2"))
        .await
        .unwrap();
    deploy
        .push(&manifest("shop-old", &["old.shop.localhost"]), module("old2"))
        .await
        .unwrap();

    let before = state_of(&admin).await;
    let blobs = server.blob_files();
    // Another name, even on its domains.
    refused(
        deploy
            .push(&manifest("blog", &["blog.shop.localhost"]), module("b2"))
            .await
            .unwrap_err(),
        403,
        &["function `blog` is not one of its functions"],
    );
    // Its name, another domain.
    refused(
        deploy
            .push(
                &manifest("shop-evil", &["shop.localhost/x", "evil.localhost"]),
                module("evil"),
            )
            .await
            .unwrap_err(),
        403,
        &["route \"evil.localhost\" is outside its domains (shop.localhost, *.shop.localhost)"],
    );
    // A wildcard wider than its domains.
    refused(
        deploy
            .push(&manifest("shop-all", &["*.localhost"]), module("all"))
            .await
            .unwrap_err(),
        403,
        &["outside its domains"],
    );
    // Someone else's function: no rollback, no versions.
    refused(
        deploy.rollback("blog", None).await.unwrap_err(),
        403,
        &["may not roll back", "`blog`"],
    );
    refused(deploy.versions("blog").await.unwrap_err(), 403, &["`blog`"]);
    // Its function, but back to a version whose routes are not on its domains.
    refused(
        deploy.rollback("shop-old", None).await.unwrap_err(),
        403,
        &["may not roll back to v1", "old.example.org"],
    );
    // Not a node, not an admin.
    refused(deploy.watch(0).await.err().unwrap(), 403, &["GET /v1/watch"]);
    refused(
        deploy.blob(&pushed.sha256).await.unwrap_err(),
        403,
        &["needs scope admin or node"],
    );
    refused(
        deploy.announce(&announcement("n1")).await.unwrap_err(),
        403,
        &["PUT /v1/nodes/{name}"],
    );
    refused(
        deploy
            .create_token(&grant(Scope::Admin, &[], &[]))
            .await
            .unwrap_err(),
        403,
        &["needs scope admin"],
    );
    assert_eq!(state_of(&admin).await, before);
    assert_eq!(server.blob_files(), blobs);

    // It sees its own functions only; rolls them back within its domains.
    let names: Vec<String> = deploy.list().await.unwrap().into_iter().map(|f| f.name).collect();
    assert_eq!(names, ["shop-old", "shop-web"]);
    assert_eq!(deploy.rollback("shop-web", None).await.unwrap().active, 1);

    // Revoked: the token stops working.
    admin.revoke_token(&created.info.id).await.unwrap();
    refused(deploy.list().await.unwrap_err(), 401, &["invalid token"]);
    refused(admin.revoke_token(&created.info.id).await.unwrap_err(), 404, &[]);
    server.shutdown().await;
}

#[tokio::test]
async fn node_token_cannot_push_and_announces_only_its_node() {
    let server = Server::start(RegistryOptions::default()).await;
    let admin = server.client();
    let pushed = admin
        .push(&manifest("echo", &["echo.localhost"]), module("e1"))
        .await
        .unwrap();
    let mut bound = grant(Scope::Node, &[], &[]);
    bound.node = Some("n1".into());
    let node = server.client_with(&admin.create_token(&bound).await.unwrap().token);

    // What a node (and `atoll dns`) needs.
    let mut events = node.watch(0).await.unwrap();
    assert!(matches!(next_event(&mut events).await, WatchEvent::Put { .. }));
    assert_eq!(node.blob(&pushed.sha256).await.unwrap(), module("e1"));
    assert_eq!(node.list().await.unwrap().len(), 1);
    let members = node.announce(&announcement("n1")).await.unwrap();
    assert_eq!(members.len(), 1);

    // Not another node's name, and nothing that changes functions.
    let before = state_of(&admin).await;
    refused(
        node.announce(&announcement("n2")).await.unwrap_err(),
        403,
        &["may only announce node `n1`, not `n2`"],
    );
    // Cron: it claims ticks as itself only, once each; nothing for another node's name.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let run = |node: &str| atoll_core::cron::CronRun {
        function: "echo".into(),
        entry: 0,
        path: "/".into(),
        tick: now,
        node: node.into(),
        outcome: atoll_core::cron::Outcome::Running,
        duration_ms: None,
    };
    refused(
        node.cron_claim(&run("n2")).await.unwrap_err(),
        403,
        &["may only announce node `n1`, not `n2`"],
    );
    assert!(node.cron_claim(&run("n1")).await.unwrap());
    assert!(
        !node.cron_claim(&run("n1")).await.unwrap(),
        "a tick is claimed once"
    );
    let future = atoll_core::cron::CronRun {
        tick: now + 3600,
        ..run("n1")
    };
    refused(
        node.cron_claim(&future).await.unwrap_err(),
        400,
        &["from the registry's clock"],
    );
    refused(
        node.push(&manifest("echo", &["echo.localhost"]), module("e2"))
            .await
            .unwrap_err(),
        403,
        &["POST /v1/functions", "needs scope admin or deploy"],
    );
    refused(
        node.push(&manifest("evil", &["evil.localhost"]), module("ev"))
            .await
            .unwrap_err(),
        403,
        &[],
    );
    refused(node.rollback("echo", None).await.unwrap_err(), 403, &[]);
    refused(node.versions("echo").await.unwrap_err(), 403, &[]);
    refused(node.tokens().await.unwrap_err(), 403, &[]);
    assert_eq!(state_of(&admin).await, before);
    let names: Vec<String> = node
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.announcement.name)
        .collect();
    assert_eq!(names, ["n1"]);

    // An unbound node token may announce any node; the root token still may too.
    let any = server.client_with(
        &admin
            .create_token(&grant(Scope::Node, &[], &[]))
            .await
            .unwrap()
            .token,
    );
    any.announce(&announcement("n2")).await.unwrap();
    admin.announce(&announcement("n3")).await.unwrap();
    assert_eq!(admin.nodes().await.unwrap().len(), 3);
    server.shutdown().await;
}

#[tokio::test]
async fn admin_tokens_mint_list_and_revoke() {
    let server = Server::start(RegistryOptions::default()).await;
    let root = server.client();
    let mut minted = grant(Scope::Admin, &[], &[]);
    minted.description = "ci".into();
    let created = root.create_token(&minted).await.unwrap();
    let admin = server.client_with(&created.token);
    // A minted admin does what the root token does: push, mint, list, revoke.
    admin
        .push(&manifest("a", &["a.localhost"]), module("a"))
        .await
        .unwrap();
    let node = admin.create_token(&grant(Scope::Node, &[], &[])).await.unwrap();
    let listed = root.tokens().await.unwrap();
    let mut ids: Vec<&str> = listed.iter().map(|t| t.id.as_str()).collect();
    ids.sort_unstable();
    let mut expected = [created.info.id.as_str(), node.info.id.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected);
    assert!(listed.iter().any(|t| t.grant.description == "ci"));
    // The registry keeps hashes only: neither the tokens nor their hashes are listed or stored.
    let json = serde_json::to_string(&listed).unwrap();
    assert!(
        !json.contains(&created.token) && !json.contains("sha256"),
        "{json}"
    );
    let state = std::fs::read_to_string(server.data.path().join("state.json")).unwrap();
    assert!(!state.contains(&created.token) && !state.contains(&node.token));
    admin.revoke_token(&node.info.id).await.unwrap();
    assert_eq!(root.tokens().await.unwrap().len(), 1);

    // Malformed grants are refused with the reason.
    refused(
        root.create_token(&grant(Scope::Deploy, &[], &["a.localhost"]))
            .await
            .unwrap_err(),
        400,
        &["a deploy token needs `functions`"],
    );
    refused(
        root.create_token(&grant(Scope::Node, &["x"], &[]))
            .await
            .unwrap_err(),
        400,
        &["`functions` is only for the deploy scope"],
    );
    // A token shaped like a minted one but unknown, or with a wrong secret: 401.
    let forged = format!("{}x", &created.token[..created.token.len() - 1]);
    refused(server.client_with(&forged).list().await.unwrap_err(), 401, &[]);
    server.shutdown().await;
}

#[tokio::test]
async fn routes_under_another_functions_hosts_are_refused() {
    let server = Server::start(RegistryOptions::default()).await;
    let client = server.client();
    client
        .push(
            &manifest("owner", &["shop.localhost", "*.shop.localhost"]),
            module("o1"),
        )
        .await
        .unwrap();
    client
        .push(&manifest("api", &["api.localhost/v1"]), module("api"))
        .await
        .unwrap();
    let before = state_of(&client).await;
    let blobs = server.blob_files();

    let claims = [
        // A path under its host.
        (
            "shop.localhost/checkout",
            "route \"shop.localhost/checkout\" is refused: shop.localhost/checkout belongs to \
             function `owner` (its route \"shop.localhost\")",
        ),
        // A name under its wildcard.
        (
            "login.shop.localhost",
            "route \"login.shop.localhost\" is refused: login.shop.localhost belongs to function \
             `owner` (its route \"*.shop.localhost\")",
        ),
        // Wider than what it holds.
        (
            "*.localhost",
            "route \"*.localhost\" is refused: api.localhost/v1 belongs to function `api` (its \
             route \"api.localhost/v1\")",
        ),
        // A path under its path prefix.
        (
            "api.localhost/v1/users",
            "route \"api.localhost/v1/users\" is refused: api.localhost/v1/users belongs to \
             function `api` (its route \"api.localhost/v1\")",
        ),
    ];
    for (route, message) in claims {
        let e = client
            .push(&manifest("thief", &["thief.localhost", route]), module(route))
            .await
            .unwrap_err();
        assert_eq!(status_of(&e), 409, "{e}");
        assert_eq!(
            e.to_string(),
            format!("registry answered 409 Conflict: {message}")
        );
    }
    // Nothing changed: no `thief`, no new version, no new module.
    assert_eq!(state_of(&client).await, before);
    assert_eq!(status_of(&client.versions("thief").await.unwrap_err()), 404);
    assert_eq!(server.blob_files(), blobs);

    // Beside them is fine; the owner keeps its routes in new versions.
    client
        .push(
            &manifest("neighbour", &["localhost", "api.localhost/v2"]),
            module("n"),
        )
        .await
        .unwrap();
    let v2 = client
        .push(
            &manifest("owner", &["shop.localhost", "*.shop.localhost"]),
            module("o2"),
        )
        .await
        .unwrap();
    assert_eq!(v2.version, 2);

    // The owner gives up its wildcard, another function takes a name under it; rolling the
    // owner back to v2 would take it back: refused, the active version stays.
    client
        .push(&manifest("owner", &["shop.localhost"]), module("o3"))
        .await
        .unwrap();
    client
        .push(&manifest("login", &["login.shop.localhost"]), module("l"))
        .await
        .unwrap();
    let e = client.rollback("owner", None).await.unwrap_err();
    refused(
        e,
        409,
        &["route \"*.shop.localhost\" is refused", "function `login`"],
    );
    assert_eq!(client.versions("owner").await.unwrap().active, 3);
    server.shutdown().await;
}

/// Found while fuzzing the snapshot rewriter: every module compiled on one engine stays
/// mapped until the engine is dropped, so each push (two to four compiles) grew the registry
/// by a few memory mappings for ever; some ten thousand pushes reached `vm.max_map_count`
/// and then every mapping in the process failed.
#[tokio::test]
async fn fuzz_found_pushes_do_not_grow_the_registrys_memory_mappings() {
    let maps = || {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .count()
    };
    let data = tempfile::tempdir().unwrap();
    let engine = atoll_isolate::Engine::new().unwrap();
    let registry = atoll_registry::Registry::open(
        data.path(),
        std::sync::Arc::new(atoll_isolate::PushCheck::new(engine)),
        "token".into(),
        Default::default(),
    )
    .unwrap();
    let manifest = "name = \"f\"\nwasm = \"f.wasm\"\nroutes = [\"f.localhost\"]\n";
    let module = |n: usize| {
        wat::parse_str(format!(
            r#"(module (memory (export "memory") 1) (global $g (mut i32) (i32.const 0))
                 (data (i32.const 0) "{n}") (func (export "_start"))
                 (func (export "wizer.initialize") (global.set $g (i32.const 1))))"#
        ))
        .unwrap()
    };
    registry.push(manifest, module(0)).await.unwrap();
    let before = maps();
    for n in 1..=100 {
        registry.push(manifest, module(n)).await.unwrap();
    }
    let growth = maps().saturating_sub(before);
    // On one engine: ~4 compiles a push, 2-3 mappings each.
    assert!(growth < 150, "{growth} more memory mappings after 100 pushes");
}
