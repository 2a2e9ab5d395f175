//! Scheduled triggers through real processes: three nodes follow a function with a
//! `[[cron]]` entry firing every second, and every tick runs exactly once in the cluster —
//! on NATS JetStream (a KV create claims the tick) and on a registry's embedded store (the
//! registry takes the claims). The function counts its runs per tick in KV, so a tick run
//! twice would show as a 2. No client can make a request look scheduled, and
//! `atoll cron NAME` shows the runs.

mod support;

use std::collections::BTreeMap;

use support::*;

/// Pushes `todo` with a cron entry every second, starts three nodes with `control`, and
/// checks the ticks until at least `ticks` of them ran.
fn runs_each_tick_once(registry_url: &str, control: [&str; 2], dir: &std::path::Path, ticks: usize) {
    let manifest = write_manifest(
        &dir.join("todo"),
        "todo",
        &example_wasm("todo"),
        &["todo.localhost"],
        "[kv]\nstores = [\"todo\"]\n[[cron]]\nschedule = \"* * * * * *\"\npath = \"/tasks/tick\"\n",
    );
    let nodes: Vec<(Process, String)> = ["a", "b", "c"]
        .iter()
        .map(|name| start_named_node(&control, name, &dir.join(name)))
        .collect();
    push_ok(registry_url, &manifest);
    for (_, addr) in &nodes {
        wait_until("todo is served", || {
            http_get(addr, "todo.localhost", "/todos").is_ok_and(|response| response.status == 200)
        });
    }

    // A client cannot pass for the scheduler: the header is not the variable.
    let forged = http_request(
        &nodes[0].1,
        "GET",
        "todo.localhost",
        "/tasks/tick",
        &[("x-atoll-trigger", "cron")],
        b"",
    )
    .unwrap();
    assert_eq!(forged.status, 403, "{}", forged.text());

    let count_ticks = || {
        let listed = atoll(&["kv", "ls", "todo", "ticks/", "--registry", registry_url]);
        expect_success("kv ls", &listed)
            .lines()
            .filter(|line| line.starts_with("ticks/"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    wait_until(&format!("{ticks} cron ticks ran"), || {
        count_ticks().len() >= ticks
    });
    let keys = count_ticks();
    for key in &keys {
        let runs = atoll(&["kv", "get", "todo", key, "--registry", registry_url]);
        assert_eq!(expect_success("kv get", &runs), "1", "{key} ran more than once");
    }
    // Consecutive seconds: no tick between the first and the last was lost.
    let seconds: Vec<u64> = keys
        .iter()
        .map(|key| key["ticks/".len()..].parse().unwrap())
        .collect();
    let (first, last) = (seconds[0], *seconds.last().unwrap());
    assert!(
        last - first + 1 == seconds.len() as u64,
        "ticks missing between {first} and {last}: {seconds:?}"
    );

    // atoll cron shows the runs: one line per tick, by one of the three nodes, status 200.
    wait_until("the runs' outcomes are recorded", || {
        let shown = atoll(&["cron", "todo", "--registry", registry_url]);
        let text = expect_success("cron", &shown);
        text.lines().skip(1).filter(|line| line.contains(" 200 ")).count() >= ticks
    });
    let shown = atoll(&["cron", "todo", "--registry", registry_url]);
    let text = expect_success("cron", &shown);
    println!("{text}");
    let mut by_node: BTreeMap<String, usize> = BTreeMap::new();
    let mut ticks_shown = Vec::new();
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[2], "/tasks/tick", "{line}");
        assert!(["a", "b", "c"].contains(&fields[3]), "{line}");
        *by_node.entry(fields[3].to_string()).or_default() += 1;
        ticks_shown.push(fields[0].to_string());
    }
    let unique: std::collections::BTreeSet<_> = ticks_shown.iter().collect();
    assert_eq!(unique.len(), ticks_shown.len(), "a tick listed twice:\n{text}");
    // The function's home node claims first; the others only when it is late.
    let most = by_node.values().max().copied().unwrap_or(0);
    assert!(
        most * 2 > ticks_shown.len(),
        "no node was preferred: {by_node:?}\n{text}"
    );
}

#[test]
fn on_nats_each_tick_runs_once_across_three_nodes() {
    let nats = NatsServer::start();
    let (_registry, url) = start_nats_registry("registry", &nats);
    let dir = tempfile::tempdir().unwrap();
    runs_each_tick_once(&url, ["--store", nats.url.as_str()], dir.path(), 5);
}

#[test]
fn on_the_embedded_store_each_tick_runs_once_across_three_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    runs_each_tick_once(&url, ["--registry", url.as_str()], dir.path(), 5);
}

#[test]
fn a_schedule_that_is_not_cron_is_refused_at_push() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let manifest = write_manifest(
        &dir.path().join("todo"),
        "todo",
        &example_wasm("todo"),
        &["todo.localhost"],
        "[[cron]]\nschedule = \"every minute\"\npath = \"/tasks/tick\"\n",
    );
    let refused = push(&url, &manifest);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("cron[0]: schedule \"every minute\" is not a cron pattern"),
        "{stderr}"
    );
}
