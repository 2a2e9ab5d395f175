//! `[limits]` with real processes: a guest that loops is stopped at its timeout (504), one
//! that recurses or allocates without end fails alone (502), a module that could never fit
//! its memory limit is refused at push, and requests never see each other's memory.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::*;

/// Pushes `fault` as `name` on `host` with the manifest tail `extra`, and waits until it
/// serves `/`.
fn push_fault(cluster: &Cluster, dir: &Path, name: &str, host: &str, extra: &str) {
    let manifest = write_manifest(&dir.join(name), name, &example_wasm("fault"), &[host], extra);
    push_ok(&cluster.url, &manifest);
    wait_for_text(&cluster.http, host, "/", "ok\n");
}

/// The target for how long past its timeout a looping guest may run.
const TARGET_OVERSHOOT: Duration = Duration::from_millis(100);
/// What this test tolerates on a shared, busy 2-core machine: still far below "never
/// stopped" (the client's 60 s timeout).
const OVERSHOOT_SLACK: Duration = Duration::from_secs(5);

#[test]
fn looping_guest_is_stopped_with_504_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = boot(dir.path());
    push_fault(
        &cluster,
        dir.path(),
        "fault",
        "fault.localhost",
        "[limits]\ntimeout = \"300ms\"\n",
    );
    push_ok(&cluster.url, &example("hello"));
    wait_for_text(
        &cluster.http,
        "hello.localhost",
        "/",
        &hello_body("hello.localhost"),
    );

    let timeout = Duration::from_millis(300);
    let mut overshoots = Vec::new();
    for round in 0..3 {
        let started = Instant::now();
        // Fail fast: a guest that is never stopped must fail the test within seconds, not
        // after the client's own 60 s read timeout.
        let (sender, receiver) = std::sync::mpsc::channel();
        let http = cluster.http.clone();
        std::thread::spawn(move || {
            let _ = sender.send(get(&http, "fault.localhost", "/loop"));
        });
        let response = receiver
            .recv_timeout(timeout + OVERSHOOT_SLACK + Duration::from_secs(3))
            .unwrap_or_else(|_| panic!("round {round}: /loop was not stopped: no answer"));
        let elapsed = started.elapsed();
        assert_eq!(
            response.status,
            504,
            "round {round}: /loop answered {} {:?} after {elapsed:?}",
            response.status,
            response.text()
        );
        assert!(
            response.text().contains("timeout"),
            "round {round}: {}",
            response.text()
        );
        assert!(
            elapsed >= timeout,
            "round {round}: /loop answered 504 after {elapsed:?}, before its {timeout:?} timeout"
        );
        assert!(
            elapsed < timeout + OVERSHOOT_SLACK,
            "round {round}: /loop took {elapsed:?} to stop (timeout {timeout:?})"
        );
        overshoots.push(elapsed - timeout);

        // The node serves right after, the same function and another one.
        let ok = get(&cluster.http, "fault.localhost", "/");
        assert_eq!((ok.status, ok.text().as_str()), (200, "ok\n"), "round {round}");
        let hello = get(&cluster.http, "hello.localhost", "/");
        assert_eq!(
            (hello.status, hello.text()),
            (200, hello_body("hello.localhost")),
            "round {round}"
        );
    }
    let worst = overshoots.iter().max().copied().unwrap_or_default();
    eprintln!(
        "timeout overshoot for a 300 ms timeout: {overshoots:?} (worst {worst:?}; target ≤ {TARGET_OVERSHOOT:?}{})",
        if worst <= TARGET_OVERSHOOT { "" } else { ", MISSED" }
    );

    let health = get(&cluster.admin, "admin", "/healthz");
    assert_eq!(health.status, 200, "{}", health.text());
    cluster.node.wait_for_stderr("fault: looping forever", STARTUP);
    let metrics = metrics(&cluster.admin);
    assert_eq!(
        metric_value(
            &metrics,
            "atoll_invocations_total",
            &[("function", "fault"), ("outcome", "timeout")]
        ),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "atoll_requests_total",
            &[("function", "fault"), ("version", "1"), ("status", "504")]
        ),
        Some(3.0),
        "{metrics}"
    );
}

#[test]
fn deep_recursion_is_502_and_service_continues() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = boot(dir.path());
    push_fault(
        &cluster,
        dir.path(),
        "fault",
        "fault.localhost",
        "[limits]\ntimeout = \"10s\"\n",
    );

    for round in 0..2 {
        let started = Instant::now();
        let response = get(&cluster.http, "fault.localhost", "/recurse");
        assert_eq!(
            response.status,
            502,
            "round {round}: /recurse answered {} {:?} after {:?}",
            response.status,
            response.text(),
            started.elapsed()
        );
        assert!(response.text().contains("it trapped"), "{}", response.text());
        let ok = get(&cluster.http, "fault.localhost", "/");
        assert_eq!((ok.status, ok.text().as_str()), (200, "ok\n"), "round {round}");
    }
    cluster
        .node
        .wait_for_stderr("fault: recursing without end", STARTUP);
    let health = get(&cluster.admin, "admin", "/healthz");
    assert_eq!(health.status, 200, "{}", health.text());
}

#[test]
fn memory_bomb_is_an_error_and_service_continues() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = boot(dir.path());
    push_fault(
        &cluster,
        dir.path(),
        "fault",
        "fault.localhost",
        "[limits]\nmemory = \"32MiB\"\ntimeout = \"20s\"\n",
    );

    let started = Instant::now();
    let response = get(&cluster.http, "fault.localhost", "/grow");
    let elapsed = started.elapsed();
    eprintln!(
        "/grow with a 32 MiB limit answered {} after {elapsed:?}",
        response.status
    );
    assert_eq!(
        response.status,
        502,
        "/grow answered {} {:?} after {elapsed:?}",
        response.status,
        response.text()
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "/grow took {elapsed:?} to fail"
    );
    let ok = get(&cluster.http, "fault.localhost", "/");
    assert_eq!((ok.status, ok.text().as_str()), (200, "ok\n"));
    cluster
        .node
        .wait_for_stderr("fault: allocating without end", STARTUP);

    // The limit held: the guest could not take more than its 32 MiB. Without the limit it
    // grows to wasm32's 4 GiB before its allocator gives up, and the node's peak RSS shows it.
    if let Some(peak) = peak_rss_bytes(cluster.node.pid()) {
        eprintln!("node peak RSS after /grow: {} MiB", peak >> 20);
        assert!(
            peak < 1 << 30,
            "the node's peak RSS reached {} MiB: the guest grew far beyond its 32 MiB memory limit",
            peak >> 20
        );
    }
}

#[test]
fn module_declaring_more_memory_than_its_limit_is_refused_at_push() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = boot(dir.path());
    // hello declares 17 pages (1.0625 MiB) of initial memory.
    let fits = write_manifest(
        &dir.path().join("fits"),
        "tiny",
        &example_wasm("hello"),
        &["tiny.localhost"],
        "[limits]\nmemory = \"2MiB\"\n",
    );
    assert_eq!(push_ok(&cluster.url, &fits), 1);
    let before = versions(&cluster.url, "tiny");

    for limit in ["64KiB", "1MiB"] {
        let manifest = write_manifest(
            &dir.path().join(format!("limit-{limit}")),
            "tiny",
            &example_wasm("hello"),
            &["tiny.localhost"],
            &format!("[limits]\nmemory = {limit:?}\n"),
        );
        let output = push(&cluster.url, &manifest);
        let err = stderr(&output);
        assert!(
            !output.status.success(),
            "a push with memory = {limit:?} succeeded: {}",
            stdout(&output)
        );
        assert!(
            err.contains("memory limit"),
            "memory = {limit:?}: the refusal does not mention the memory limit:\n{err}"
        );
        eprintln!("memory = {limit:?} refused: {}", err.trim());
        assert_eq!(
            versions(&cluster.url, "tiny"),
            before,
            "a refused push changed the versions"
        );
    }
    // The node serves the version that fits.
    wait_for_text(
        &cluster.http,
        "tiny.localhost",
        "/",
        &hello_body("tiny.localhost"),
    );
}

#[test]
fn isolation_across_10000_requests_alternating_functions() {
    const REQUESTS: usize = 10_000;
    const CONNECTIONS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let cluster = boot(dir.path());
    push_fault(&cluster, dir.path(), "fault-a", "a.localhost", "");
    push_fault(&cluster, dir.path(), "fault-b", "b.localhost", "");

    let started = Instant::now();
    let workers: Vec<_> = (0..CONNECTIONS)
        .map(|worker| {
            let http = cluster.http.clone();
            std::thread::spawn(move || {
                let mut client = KeepAlive::new(&http);
                let mut bad = Vec::new();
                let mut served = 0usize;
                for i in (worker..REQUESTS).step_by(CONNECTIONS) {
                    let host = if i % 2 == 0 { "a.localhost" } else { "b.localhost" };
                    match client.get(host, "/leak") {
                        Ok(r) if r.status == 200 && r.body == b"CLEAN\n" => served += 1,
                        Ok(r) => bad.push(format!("#{i} {host}: {} {:?}", r.status, r.text())),
                        Err(e) => bad.push(format!("#{i} {host}: {e}")),
                    }
                }
                (served, bad, client.connects)
            })
        })
        .collect();
    let mut served = 0;
    let mut bad = Vec::new();
    let mut connects = 0;
    for worker in workers {
        let (n, errors, c) = worker.join().expect("client thread");
        served += n;
        bad.extend(errors);
        connects += c;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{REQUESTS} /leak requests alternating two functions over {CONNECTIONS} keep-alive \
         connections ({connects} connects): {elapsed:?} ({:.0} req/s)",
        REQUESTS as f64 / elapsed.as_secs_f64()
    );
    let leaked = bad.iter().filter(|b| b.contains("LEAKED")).count();
    assert!(
        bad.is_empty(),
        "{} of {REQUESTS} requests were not `200 CLEAN` ({leaked} LEAKED); first: {:#?}",
        bad.len(),
        &bad[..bad.len().min(10)]
    );
    assert_eq!(served, REQUESTS);

    let metrics = metrics(&cluster.admin);
    for function in ["fault-a", "fault-b"] {
        let counted = metric_value(
            &metrics,
            "atoll_requests_total",
            &[("function", function), ("version", "1"), ("status", "200")],
        )
        .unwrap_or(0.0);
        assert!(
            counted >= (REQUESTS / 2) as f64,
            "{function}: {counted} requests counted\n{metrics}"
        );
    }
}
