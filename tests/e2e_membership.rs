//! Cluster membership, end to end: nodes announce themselves to the registry every second,
//! `atoll nodes` lists them with region, address and health, and a node killed without a
//! word is reported gone once its announcement is older than the TTL. A node on a `node`
//! token (not the root one) syncs, serves and announces itself, and that token cannot push.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// The `atoll nodes` table as (name, region, health, address) rows.
fn nodes(registry_url: &str) -> Vec<(String, String, String, String)> {
    let output = atoll(&["nodes", "--registry", registry_url]);
    let table = expect_success("atoll nodes", &output);
    table
        .lines()
        .skip(1)
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (
                fields[0].to_string(),
                fields[1].to_string(),
                fields[2].to_string(),
                fields.last().unwrap().to_string(),
            )
        })
        .collect()
}

fn wait_for_nodes(
    registry_url: &str,
    what: &str,
    check: impl Fn(&[(String, String, String, String)]) -> bool,
) {
    let deadline = Instant::now() + STARTUP;
    loop {
        let rows = nodes(registry_url);
        if check(&rows) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {rows:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn nodes_announce_themselves_and_a_killed_one_is_reported_gone() {
    let data = tempfile::tempdir().unwrap();
    let (_registry, registry_url) = start_registry(&data.path().join("registry"));
    let start = |name: &str, region: &str| {
        let data = data.path().join(name);
        let data = data.to_str().unwrap().to_string();
        let mut process = Process::spawn(
            name,
            &[
                "node",
                "--registry",
                &registry_url,
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--data",
                &data,
                "--name",
                name,
                "--region",
                region,
                "--advertise",
                "127.0.0.1",
            ],
        );
        let http = process.wait_for_line("node listening on http://", STARTUP)
            ["node listening on http://".len()..]
            .trim()
            .to_string();
        (process, http)
    };
    let (_eu, eu_http) = start("eu-1", "eu");
    let (mut us, us_http) = start("us-1", "us");

    wait_for_nodes(&registry_url, "both nodes healthy", |rows| {
        rows.len() == 2 && rows.iter().all(|row| row.2 == "healthy")
    });
    let rows = nodes(&registry_url);
    assert_eq!(rows[0], ("eu-1".into(), "eu".into(), "healthy".into(), eu_http));
    assert_eq!(rows[1], ("us-1".into(), "us".into(), "healthy".into(), us_http));

    us.sigkill();
    let killed = Instant::now();
    wait_for_nodes(&registry_url, "us-1 gone", |rows| {
        rows.iter().any(|row| row.0 == "us-1" && row.2 == "gone")
            && rows.iter().any(|row| row.0 == "eu-1" && row.2 == "healthy")
    });
    // Gone within the 3 s TTL plus a heartbeat, generously bounded for a busy machine.
    assert!(
        killed.elapsed() < Duration::from_secs(20),
        "{:?}",
        killed.elapsed()
    );
}

#[test]
fn a_node_on_a_node_token_serves_and_announces_but_cannot_push() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    assert_eq!(push_ok(&url, &example("hello")), 1);
    let created = atoll(&[
        "token",
        "create",
        "--scope",
        "node",
        "--node",
        "e2e",
        "--registry",
        &url,
    ]);
    let token = expect_success("token create", &created).trim().to_string();

    // `--token` wins over the ATOLL_TOKEN (root) the harness sets; the node is named e2e.
    let node = start_edge_node(&url, &dir.path().join("node"), &["--token", &token]);
    let http = node.http.clone().expect("an http address");
    wait_for_text(&http, "hello.localhost", "/", &hello_body("hello.localhost"));
    wait_for_nodes(&url, "e2e healthy", |rows| {
        rows.iter()
            .any(|(name, _, health, _)| name == "e2e" && health == "healthy")
    });

    let output = atoll_with(
        &["push", example("hello").to_str().unwrap(), "--registry", &url],
        |c| {
            c.env("ATOLL_TOKEN", &token);
        },
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("403") && stderr(&output).contains("needs scope admin or deploy"),
        "{}",
        stderr(&output)
    );
}
