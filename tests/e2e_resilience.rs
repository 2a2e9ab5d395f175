//! Failure handling with real processes: guests that fail, a node that restarts while the
//! registry is down, and a registry killed in the middle of a push.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

/// Traps, non-zero exits and malformed CGI output are 502s; the node keeps serving, and the
/// guest's stderr lands in the node's log.
#[test]
fn failing_guest_is_502_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let (node, http, admin) = start_node(&url, &dir.path().join("node"));
    push_ok(&url, &example("hello"));
    push_ok(&url, &example("fault"));
    wait_for_text(&http, "fault.localhost", "/", "ok\n");
    wait_for_text(&http, "hello.localhost", "/", &hello_body("hello.localhost"));

    for (path, reason) in [
        ("/trap", "it trapped"),
        ("/exit", "it exited with an error"),
        ("/garbage", "its output is not a valid CGI response"),
    ] {
        let response = get(&http, "fault.localhost", path);
        assert_eq!(response.status, 502, "{path}: {}", response.text());
        assert!(response.text().contains(reason), "{path}: {}", response.text());
        // The node still answers, right after each failure.
        let ok = get(&http, "fault.localhost", "/");
        assert_eq!((ok.status, ok.text().as_str()), (200, "ok\n"), "after {path}");
    }
    let teapot = get(&http, "fault.localhost", "/status");
    assert_eq!(teapot.status, 418, "{}", teapot.text());
    assert_eq!(teapot.text(), "short and stout\n");
    assert_eq!(
        get(&http, "hello.localhost", "/").text(),
        hello_body("hello.localhost")
    );

    // The guest's stderr is in the node's log, in the line about the failure.
    let line = node.wait_for_stderr("fault: about to trap", STARTUP);
    assert!(line.contains("fault"), "{line}");
    node.wait_for_stderr("fault: exiting with status 3", STARTUP);

    let metrics = metrics(&admin);
    assert!(
        metrics.contains(r#"atoll_requests_total{function="fault",version="1",status="502"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"atoll_invocations_total{function="fault",outcome="ok"}"#),
        "{metrics}"
    );
}

/// Static stability: a node restarted while the registry is dead serves what it had, from its
/// disk cache, without recompiling.
#[test]
fn node_restarted_without_registry_still_serves() {
    let dir = tempfile::tempdir().unwrap();
    let node_data = dir.path().join("node");
    let (mut registry, url) = start_registry(&dir.path().join("registry"));
    let (mut node, http, admin) = start_node(&url, &node_data);
    push_ok(&url, &example("hello"));
    push_ok(&url, &example("echo"));
    wait_for_text(&http, "hello.localhost", "/", &hello_body("hello.localhost"));
    wait_for_body(
        &http,
        "echo.localhost",
        "/",
        |r| r.status == 200 && r.text().contains("GREETING=hi"),
        STARTUP,
    );
    wait_ready(&admin);

    node.terminate();
    let status = node.wait_exit(STARTUP);
    assert!(
        status.success(),
        "node exited with {status} on SIGTERM\n{}",
        node.logs()
    );
    registry.sigkill();
    drop(node);

    let (node, http, admin) = start_node(&url, &node_data);
    wait_ready(&admin);
    // Served straight away: the table came from disk, not from a (dead) registry.
    let response = get(&http, "hello.localhost", "/");
    assert_eq!(
        (response.status, response.text()),
        (200, hello_body("hello.localhost")),
        "{}",
        node.logs()
    );
    let response = get(&http, "echo.localhost", "/");
    assert!(response.text().contains("GREETING=hi"), "{}", response.text());

    let metrics = metrics(&admin);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with(r#"atoll_module_loads_total{kind="cached"} 2"#)),
        "the restarted node did not load both artifacts from disk:\n{metrics}"
    );
    assert!(
        !metrics.contains(r#"atoll_module_loads_total{kind="compile"}"#),
        "the restarted node recompiled:\n{metrics}"
    );
    // It is trying to reach the registry, and says so.
    node.wait_for_stderr("sync interrupted", STARTUP);
}

/// SIGKILL of the registry while a large push is in flight, then a restart on the same data
/// directory: the store opens, earlier versions are intact, the interrupted version is either
/// wholly there or absent, no temp files remain, and pushing continues with the next number.
#[test]
fn registry_killed_mid_push_keeps_a_consistent_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("registry");
    let (mut registry, mut url) = start_registry(&data);

    let v1 = write_manifest(
        &dir.path().join("v1"),
        "crash",
        &example_wasm("hello"),
        &["crash.localhost"],
        "",
    );
    let echo = write_manifest(
        &dir.path().join("echo"),
        "crash",
        &example_wasm("echo"),
        &["crash.localhost"],
        "[env]\nGREETING = \"after-crash\"\n",
    );
    assert_eq!(push_ok(&url, &v1), 1);
    assert_eq!(push_ok(&url, &echo), 2);
    let mut committed = parse_versions(&versions(&url, "crash"));
    assert_eq!(committed.len(), 2);

    let hello = std::fs::read(example_wasm("hello")).unwrap();
    // Kill at different points: while uploading, while validating, while writing the blob.
    let delays_ms = [5u64, 100, 250, 350, 450, 700];
    let mut outcomes = Vec::new();
    for (round, delay) in delays_ms.into_iter().enumerate() {
        let folder = dir.path().join(format!("big{round}"));
        std::fs::create_dir_all(&folder).unwrap();
        // Distinct bytes each round, so each push writes a new blob.
        let module = padded_module(&hello, 40 << 20, round as u8 + 1);
        std::fs::write(folder.join("big.wasm"), &module).unwrap();
        let manifest = write_manifest(
            &folder,
            "crash",
            &folder.join("big.wasm"),
            &["crash.localhost"],
            "",
        );

        let pusher = Command::new(atoll_bin())
            .args(["push", manifest.to_str().unwrap(), "--registry", &url])
            .env("ATOLL_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Not a readiness wait: this picks the moment of the crash.
        std::thread::sleep(Duration::from_millis(delay));
        registry.sigkill();
        let pushed = pusher.wait_with_output().unwrap();
        let acknowledged = pushed.status.success();
        if round == 0 {
            // Whatever the kill hit, also leave what a crash mid-write leaves behind: a
            // half-written state and blob temp file. The restart must clear them.
            std::fs::write(data.join("state.json.tmp"), b"{\"revision\": 99, \"fun").unwrap();
            std::fs::write(
                data.join("blobs/sha256").join(format!("{}.tmp", "0".repeat(64))),
                b"half",
            )
            .unwrap();
        }

        let (restarted, restarted_url) = start_registry(&data);
        registry = restarted;
        url = restarted_url;

        let leftovers = tmp_files(&data);
        assert!(
            leftovers.is_empty(),
            "temp files left after restart: {leftovers:?}"
        );
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(data.join("state.json")).unwrap()).unwrap();
        assert!(state["revision"].as_u64().unwrap() >= 2, "{state}");

        let rows = parse_versions(&versions(&url, "crash"));
        assert_eq!(
            rows[..committed.len()]
                .iter()
                .map(|r| (r.version, &r.sha256))
                .collect::<Vec<_>>(),
            committed
                .iter()
                .map(|r| (r.version, &r.sha256))
                .collect::<Vec<_>>(),
            "committed versions changed after a crash:\n{rows:?}"
        );
        match rows.len() - committed.len() {
            0 => {
                assert!(
                    !acknowledged,
                    "the push was acknowledged ({}) but its version is gone",
                    stdout(&pushed).trim()
                );
                outcomes.push(format!("{delay} ms: absent"));
            }
            1 => {
                // Present: wholly, with its blob.
                let row = rows.last().unwrap();
                assert!(row.active, "{rows:?}");
                let blob = fetch_blob(&url, &row.sha256);
                assert_eq!(blob.len(), module.len(), "blob of {row:?} has the wrong size");
                assert!(blob == module, "blob of {row:?} differs from what was pushed");
                if acknowledged {
                    assert_eq!(
                        stdout(&pushed).trim(),
                        format!("crash v{} sha256:{}", row.version, row.sha256)
                    );
                }
                outcomes.push(format!("{delay} ms: committed as v{}", row.version));
            }
            n => panic!("{n} new versions after one interrupted push: {rows:?}"),
        }
        committed = rows;
    }
    eprintln!("kill mid-push outcomes: {}", outcomes.join(", "));

    // The store keeps working: the next version number follows the highest.
    let next = committed.last().unwrap().version + 1;
    assert_eq!(push_ok(&url, &echo), next);
    let rows = parse_versions(&versions(&url, "crash"));
    assert_eq!(rows.last().map(|r| (r.version, r.active)), Some((next, true)));

    // A node started against the restarted registry serves the active version (echo).
    let (_node, http, _admin) = start_node(&url, &dir.path().join("node"));
    wait_for_body(
        &http,
        "crash.localhost",
        "/",
        |r| r.status == 200 && r.text().contains("GREETING=after-crash"),
        STARTUP,
    );
    drop(registry);
}

fn fetch_blob(url: &str, sha256: &str) -> Vec<u8> {
    let addr = url_addr(url);
    let authorization = format!("Bearer {TOKEN}");
    let response = http_request(
        addr,
        "GET",
        addr,
        &format!("/v1/blobs/{sha256}"),
        &[("Authorization", &authorization)],
        b"",
    )
    .unwrap();
    assert_eq!(response.status, 200, "blob {sha256}: {}", response.text());
    response.body
}

/// A registry rebuilt from scratch counts revisions from 1 again: a node that had applied
/// more must notice and catch up from the start, not wait for the new registry to pass its
/// old revision.
#[test]
fn a_node_moved_to_a_fresh_registry_catches_up_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let node_data = dir.path().join("node");
    let (mut old_registry, url) = start_registry(&dir.path().join("old-registry"));
    let (mut node, http, _) = start_node(&url, &node_data);
    for _ in 0..3 {
        push_ok(&url, &example("hello"));
    }
    push_ok(&url, &example("echo"));
    wait_for_body(&http, "echo.localhost", "/", |r| r.status == 200, STARTUP);
    node.terminate();
    assert!(node.wait_exit(STARTUP).success());
    old_registry.sigkill();

    let (_new_registry, url) = start_registry(&dir.path().join("new-registry"));
    let scratch = tempfile::tempdir().unwrap();
    let fresh = write_manifest(
        &scratch.path().join("fresh"),
        "fresh",
        &example_wasm("hello"),
        &["fresh.localhost"],
        "",
    );
    push_ok(&url, &fresh);
    // echo v1 again, the same module with another environment.
    let echo = write_manifest(
        &scratch.path().join("echo"),
        "echo",
        &example_wasm("echo"),
        &["echo.localhost"],
        "[env]\nGREETING = \"from the new registry\"\n",
    );
    assert_eq!(push_ok(&url, &echo), 1);
    let (node, http, _) = start_node(&url, &node_data);
    wait_for_text(&http, "fresh.localhost", "/", &hello_body("fresh.localhost"));
    node.wait_for_stderr("catching up from the start", STARTUP);
    wait_for_body(
        &http,
        "echo.localhost",
        "/",
        |r| r.text().contains("GREETING=from the new registry"),
        STARTUP,
    );
    // What it had keeps serving (the new registry never mentioned it).
    assert_eq!(get(&http, "hello.localhost", "/").status, 200);
}
