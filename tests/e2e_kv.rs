//! Key-value stores from functions, through real nodes and a registry on the embedded
//! store: the `todo` example (the SDK over `atoll_kv`) keeps its items in a store, two nodes
//! see each other's writes at once, concurrent increments lose nothing, the operator's
//! `atoll kv` sees the same data, and a store the manifest does not grant is refused. The
//! same on NATS JetStream, where each node reads through its own cache.

mod support;

use std::path::Path;

use support::*;

/// `atoll node NAME` following `registry_url`; the process and its HTTP address.
fn node(registry_url: &str, name: &str, data: &Path) -> (Process, String) {
    start_named_node(&["--registry", registry_url], name, data)
}

fn post(addr: &str, path: &str, body: &str) -> Response {
    http_request(addr, "POST", "todo.localhost", path, &[], body.as_bytes()).unwrap()
}

/// 20 writers, half through each node, 5 increments each: the counter ends at 100.
fn twenty_writers_lose_no_increment(a: &str, b: &str, registry_url: &str) {
    let writers: Vec<_> = (0..20)
        .map(|writer| {
            let addr = if writer % 2 == 0 {
                a.to_string()
            } else {
                b.to_string()
            };
            std::thread::spawn(move || {
                for _ in 0..5 {
                    let response = post(&addr, "/hits", "");
                    assert_eq!(response.status, 200, "{}", response.text());
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    let count = atoll(&["kv", "get", "todo", "hits", "--registry", registry_url]);
    assert_eq!(expect_success("kv get", &count), "100");
}

fn served(addr: &str) {
    wait_until("todo is served", || {
        http_get(addr, "todo.localhost", "/todos").is_ok_and(|response| response.status == 200)
    });
}

#[test]
fn two_nodes_share_the_todo_store_and_see_each_others_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let (_a, a) = node(&url, "a", &dir.path().join("a"));
    let (_b, b) = node(&url, "b", &dir.path().join("b"));
    push_ok(&url, &example("todo"));
    served(&a);
    served(&b);

    let created = post(&a, "/todos", "buy milk");
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(created.text(), "{\"id\":1}");
    // Written through a, read through b at once: no cache between them.
    let listed = get(&b, "todo.localhost", "/todos");
    assert_eq!(listed.text(), "[{\"id\":1,\"title\":\"buy milk\"}]");

    // A value larger than the SDK's first buffer: the host says the size, the SDK retries.
    let long_title = "x".repeat(10_000);
    assert_eq!(post(&b, "/todos", &long_title).status, 201);
    let item = get(&a, "todo.localhost", "/todos/2");
    assert_eq!(item.text(), format!("{{\"id\":2,\"title\":\"{long_title}\"}}"));

    let deleted = http_request(&b, "DELETE", "todo.localhost", "/todos/1", &[], b"").unwrap();
    assert_eq!(deleted.status, 204);
    assert_eq!(get(&a, "todo.localhost", "/todos/1").status, 404);

    // The operator sees and changes the same store.
    let next = atoll(&["kv", "get", "todo", "next-id", "--registry", &url]);
    assert_eq!(expect_success("kv get", &next), "2");
    expect_success(
        "kv set",
        &atoll(&[
            "kv",
            "set",
            "todo",
            "items/000000000099",
            "from the operator",
            "--registry",
            &url,
        ]),
    );
    assert_eq!(
        get(&a, "todo.localhost", "/todos/99").text(),
        "{\"id\":99,\"title\":\"from the operator\"}"
    );
}

#[test]
fn twenty_concurrent_writers_through_two_nodes_lose_no_increment() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let (_a, a) = node(&url, "a", &dir.path().join("a"));
    let (_b, b) = node(&url, "b", &dir.path().join("b"));
    push_ok(&url, &example("todo"));
    served(&a);
    served(&b);
    twenty_writers_lose_no_increment(&a, &b, &url);
    assert_eq!(post(&a, "/hits", "").text(), "101\n");
}

/// Polls `path` on `addr` until it answers `status` (and `body`, if given); how long it took.
fn until_answer(addr: &str, path: &str, status: u16, body: Option<&str>) -> std::time::Duration {
    let start = std::time::Instant::now();
    wait_until(&format!("{path} answers {status}"), || {
        get(addr, "todo.localhost", path).status == status
            && body.is_none_or(|body| get(addr, "todo.localhost", path).text() == body)
    });
    start.elapsed()
}

#[test]
fn on_nats_two_nodes_share_a_store_through_their_caches_and_lose_no_increment() {
    let nats = NatsServer::start();
    let (_registry, url) = start_nats_registry("registry", &nats);
    let dir = tempfile::tempdir().unwrap();
    let control = ["--store", nats.url.as_str()];
    let (_a, a) = start_named_node(&control, "a", &dir.path().join("a"));
    let (_b, b) = start_named_node(&control, "b", &dir.path().join("b"));
    push_ok(&url, &example("todo"));
    served(&a);
    served(&b);

    // b reads the item before it exists (a cached miss, once its watch runs), then a
    // creates it: b's cache must let it go when the write's event arrives.
    for _ in 0..20 {
        assert_eq!(get(&b, "todo.localhost", "/todos/1").status, 404);
    }
    let created = post(&a, "/todos", "buy milk");
    assert_eq!(created.status, 201, "{}", created.text());
    assert_eq!(
        get(&a, "todo.localhost", "/todos/1").status,
        200,
        "read-your-writes on a"
    );
    let seen = until_answer(&b, "/todos/1", 200, Some("{\"id\":1,\"title\":\"buy milk\"}"));
    println!("b saw a's write after {seen:?}");

    // The operator writes through the registry (on NATS too); both nodes follow.
    expect_success(
        "kv set",
        &atoll(&[
            "kv",
            "set",
            "todo",
            "items/000000000001",
            "oat milk",
            "--registry",
            &url,
        ]),
    );
    for node in [&a, &b] {
        until_answer(node, "/todos/1", 200, Some("{\"id\":1,\"title\":\"oat milk\"}"));
    }
    let deleted = http_request(&b, "DELETE", "todo.localhost", "/todos/1", &[], b"").unwrap();
    assert_eq!(deleted.status, 204);
    assert_eq!(
        get(&b, "todo.localhost", "/todos/1").status,
        404,
        "read-your-writes on b"
    );
    until_answer(&a, "/todos/1", 404, None);

    twenty_writers_lose_no_increment(&a, &b, &url);
    assert_eq!(post(&b, "/hits", "").text(), "101\n");
    let listed = atoll(&["kv", "ls", "todo", "--registry", &url]);
    assert!(expect_success("kv ls", &listed).contains("hits"));
}

#[test]
fn a_store_the_manifest_does_not_grant_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let (node_process, addr) = node(&url, "a", &dir.path().join("a"));
    let manifest = write_manifest(
        &dir.path().join("todo"),
        "todo",
        &example_wasm("todo"),
        &["todo.localhost"],
        "[kv]\nstores = [\"other\"]\n",
    );
    push_ok(&url, &manifest);
    wait_until("todo is served", || {
        http_get(&addr, "todo.localhost", "/todos").is_ok_and(|response| response.status == 500)
    });
    let response = get(&addr, "todo.localhost", "/todos");
    assert!(response.text().contains("not granted"), "{}", response.text());
    wait_until("the refusal is in the node's log", || {
        node_process.logs().contains("kv store \"todo\" is not granted")
    });
    // Nothing was written anywhere.
    assert!(
        !atoll(&["kv", "get", "todo", "next-id", "--registry", &url])
            .status
            .success()
    );
}

#[test]
fn the_todo_app_a_bff_over_a_service_binding_and_an_outbound_call() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ca = atoll_testkit::origin::TestCa::new();
    let origin = runtime.block_on(atoll_testkit::origin::TestOrigin::https(&ca));
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let node = start_edge_node(
        &url,
        &dir.path().join("node"),
        &["--outbound-ca", ca_file.to_str().unwrap()],
    );
    let addr = node.http.clone().unwrap();
    push_ok(&url, &example("todo"));
    let bff = |allowed: &str| {
        write_manifest(
            &dir.path().join("bff"),
            "bff",
            &example_wasm("bff"),
            &["todos.localhost"],
            &format!(
                "[services]\nTODO = \"todo\"\n[env]\nQUOTE_URL = \"{}\"\n[outbound]\nallowed_hosts = [{allowed}]\n",
                origin.url("/hello")
            ),
        )
    };
    push_ok(
        &url,
        &bff(&format!("\"https://localhost:{}\"", origin.address.port())),
    );
    wait_until("the page is served", || {
        http_get(&addr, "todos.localhost", "/").is_ok_and(|response| response.status == 200)
    });
    served(&addr);

    let page = get(&addr, "todos.localhost", "/");
    assert!(
        page.text().contains("<title>Atoll to-dos</title>"),
        "{}",
        page.text()
    );
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    let created = http_request(
        &addr,
        "POST",
        "todos.localhost",
        "/api/todos",
        &[],
        b"walk the dog",
    )
    .unwrap();
    assert_eq!((created.status, created.text().as_str()), (201, "{\"id\":1}"));
    assert_eq!(
        get(&addr, "todos.localhost", "/api/todos").text(),
        "[{\"id\":1,\"title\":\"walk the dog\"}]"
    );
    // In a real browser: the page's script lists the items through the BFF.
    let page_url = format!("http://todos.localhost:{}/", addr.rsplit(':').next().unwrap());
    let mut rendered = String::new();
    wait_until("chromium shows the item", || {
        rendered = chromium_dom(&page_url);
        rendered.contains("<li>walk the dog<button>done</button></li>")
    });
    assert!(rendered.contains("<title>Atoll to-dos</title>"), "{rendered}");
    let deleted = http_request(&addr, "DELETE", "todos.localhost", "/api/todos/1", &[], b"").unwrap();
    assert_eq!(deleted.status, 204);
    assert_eq!(get(&addr, "todos.localhost", "/api/todos").text(), "[]");
    assert_eq!(
        get(&addr, "todos.localhost", "/api/quote").text(),
        "hello from origin"
    );

    // Without the allowed host the quote is refused, and the page falls back.
    push_ok(&url, &bff(""));
    wait_until("the new version answers with the fallback", || {
        http_get(&addr, "todos.localhost", "/api/quote")
            .is_ok_and(|response| response.text().contains("Atoll"))
    });
    // (Until the new version took over, the old one may have reached the origin again.)
    let reached = origin.requests();
    for _ in 0..5 {
        let fallback = get(&addr, "todos.localhost", "/api/quote");
        assert!(fallback.text().contains("Atoll"), "{}", fallback.text());
    }
    assert_eq!(
        origin.requests(),
        reached,
        "a call not allowed never reaches the origin"
    );
}

#[test]
fn atoll_up_serves_kv_from_its_own_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("up");
    let mut up = Process::spawn(
        "up",
        &[
            "up",
            "--listen",
            "127.0.0.1:0",
            "--registry-listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
        ],
    );
    up.wait_for_line("hello: http://", STARTUP);
    let find = |prefix: &str| {
        up.stdout_lines()
            .into_iter()
            .find_map(|line| line.strip_prefix(prefix).map(|rest| rest.trim().to_string()))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?}"))
    };
    let url = find("registry listening on ");
    let addr = find("node listening on http://");
    // Started with the tests' ATOLL_TOKEN, `up`'s registry takes that token.
    let as_up = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--registry", &url]);
        atoll(&all)
    };
    expect_success("push todo", &as_up(&["push", example("todo").to_str().unwrap()]));
    served(&addr);
    assert_eq!(post(&addr, "/todos", "water the plants").text(), "{\"id\":1}");
    assert_eq!(
        get(&addr, "todo.localhost", "/todos").text(),
        "[{\"id\":1,\"title\":\"water the plants\"}]"
    );
    // The function wrote to the registry's store itself: the operator's CLI reads it.
    assert_eq!(
        expect_success("kv get", &as_up(&["kv", "get", "todo", "next-id"])),
        "1"
    );
    expect_success(
        "kv set",
        &as_up(&["kv", "set", "todo", "items/000000000007", "from the cli"]),
    );
    assert_eq!(
        get(&addr, "todo.localhost", "/todos/7").text(),
        "{\"id\":7,\"title\":\"from the cli\"}"
    );
}

/// The DOM of `url` after its scripts ran, in Debian's headless chromium. Every host but
/// `*.localhost` resolves to nothing, so the browser reaches no one but the node.
fn chromium_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let output = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE *.localhost",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .expect("chromium is installed (apt-get install chromium)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}
