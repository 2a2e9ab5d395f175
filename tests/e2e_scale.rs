//! `[scale]` with real processes: a full queue answers 503 with `Retry-After`, ready
//! instances scale to zero after `idle_timeout` (or down to `min_instances`), and a slow
//! function does not stall the others.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use support::*;

/// Pushes `wasm` (an example's name) as function `name` on `NAME.localhost` with the
/// manifest tail `extra`; returns the host.
fn push_function(cluster: &Cluster, dir: &Path, name: &str, wasm: &str, extra: &str) -> String {
    let host = format!("{name}.localhost");
    let manifest = write_manifest(&dir.join(name), name, &example_wasm(wasm), &[&host], extra);
    push_ok(&cluster.url, &manifest);
    host
}

/// `threads` × `per_thread` GETs of `path` on `host`, each thread on one keep-alive
/// connection, all starting together; panics unless every one is a 200. Returns when the
/// last request was sent: the pool's idle clock cannot start before that.
fn burst(http: &str, host: &str, path: &str, threads: usize, per_thread: usize) -> Instant {
    let barrier = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (http, host, path) = (http.to_string(), host.to_string(), path.to_string());
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let mut client = KeepAlive::new(&http);
                barrier.wait();
                let mut last_sent = Instant::now();
                for i in 0..per_thread {
                    last_sent = Instant::now();
                    let response = client
                        .get(&host, &path)
                        .unwrap_or_else(|e| panic!("request {i} to {host}{path}: {e}"));
                    assert_eq!(response.status, 200, "{host}{path}: {}", response.text());
                }
                last_sent
            })
        })
        .collect();
    workers
        .into_iter()
        .map(|worker| worker.join().expect("burst thread"))
        .max()
        .expect("at least one burst thread")
}

/// Polls the `idle` instance gauge of `function` on a thread until stopped; records the
/// highest value seen.
struct IdleWatcher {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IdleWatcher {
    fn start(admin: &str, function: &str) -> IdleWatcher {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(0));
        let thread = {
            let (admin, function) = (admin.to_string(), function.to_string());
            let (stop, max) = (Arc::clone(&stop), Arc::clone(&max));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let idle = instances(&admin, &function, "idle");
                    max.fetch_max(idle as u64, Ordering::SeqCst);
                    std::thread::sleep(POLL);
                }
            })
        };
        IdleWatcher {
            stop,
            max,
            thread: Some(thread),
        }
    }

    /// Stops polling; returns the highest value seen.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("watcher thread");
        }
        self.max.load(Ordering::SeqCst)
    }
}

#[test]
fn queue_full_answers_503_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = boot(dir.path());
    let host = push_function(
        &cluster,
        dir.path(),
        "spin",
        "fault",
        "[limits]\ntimeout = \"20s\"\n[scale]\nmax_concurrency = 1\nmax_queue = 1\n",
    );
    wait_for_text(&cluster.http, &host, "/", "ok\n");

    const CLIENTS: usize = 4;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (http, host) = (cluster.http.clone(), host.clone());
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                let started = Instant::now();
                let response = get(&http, &host, "/spin?ms=4000");
                (response, started.elapsed())
            })
        })
        .collect();
    let answers: Vec<(Response, Duration)> = clients
        .into_iter()
        .map(|c| c.join().expect("client thread"))
        .collect();
    let summary: Vec<String> = answers
        .iter()
        .map(|(r, t)| {
            format!(
                "{} after {t:?} (Retry-After {:?})",
                r.status,
                r.header("retry-after")
            )
        })
        .collect();
    eprintln!("4 concurrent /spin?ms=4000 with max_concurrency 1, max_queue 1: {summary:?}");

    let refused: Vec<&Response> = answers
        .iter()
        .map(|(r, _)| r)
        .filter(|r| r.status == 503)
        .collect();
    let served = answers.iter().filter(|(r, _)| r.status == 200).count();
    assert!(
        answers.iter().all(|(r, _)| r.status == 200 || r.status == 503),
        "{summary:?}"
    );
    assert!(!refused.is_empty(), "no request was refused: {summary:?}");
    assert!(served >= 1, "no request was served: {summary:?}");
    for response in &refused {
        let retry_after = response
            .header("retry-after")
            .unwrap_or_else(|| panic!("503 without Retry-After: {:?}", response.headers));
        let seconds: u64 = retry_after
            .parse()
            .unwrap_or_else(|_| panic!("Retry-After {retry_after:?} is not a number of seconds"));
        assert!(seconds >= 1, "Retry-After {seconds}");
    }
    for (response, _) in answers.iter().filter(|(r, _)| r.status == 200) {
        assert_eq!(response.text(), "spun 4000 ms\n");
    }

    let ok = get(&cluster.http, &host, "/");
    assert_eq!((ok.status, ok.text().as_str()), (200, "ok\n"));
    let metrics = metrics(&cluster.admin);
    let overloaded = metric_value(&metrics, "atoll_overloaded_total", &[("function", "spin")]);
    assert_eq!(
        overloaded,
        Some(refused.len() as f64),
        "atoll_overloaded_total{{function=\"spin\"}}:\n{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "atoll_requests_total",
            &[("function", "spin"), ("version", "1"), ("status", "503")]
        ),
        Some(refused.len() as f64),
        "{metrics}"
    );
}

#[test]
fn scales_to_zero_after_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = boot(dir.path());
    let host = push_function(
        &cluster,
        dir.path(),
        "bursty",
        "hello",
        "[scale]\nidle_timeout = \"1s\"\n",
    );
    wait_for_text(&cluster.http, &host, "/", &hello_body(&host));

    let watcher = IdleWatcher::start(&cluster.admin, "bursty");
    let last_sent = burst(&cluster.http, &host, "/", 8, 20);
    let burst_end = Instant::now();
    // Right after the burst, instances are kept ready for the load just seen…
    let deadline = burst_end + Duration::from_secs(20);
    let mut after_burst_max = 0.0f64;
    let zero_at = loop {
        let idle = instances(&cluster.admin, "bursty", "idle");
        after_burst_max = after_burst_max.max(idle);
        if idle == 0.0 && after_burst_max > 0.0 {
            // From the last request: the idle timeout counts from when it took its instance,
            // possibly well before every client thread was joined.
            break last_sent.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "idle instances did not {} within 20 s of the burst (now {idle})\n{}",
            if after_burst_max > 0.0 {
                "go back to zero"
            } else {
                "show up"
            },
            metrics(&cluster.admin)
        );
        std::thread::sleep(POLL);
    };
    let during_max = watcher.stop();
    eprintln!(
        "scale to zero: up to {during_max} idle instances during the burst, {after_burst_max} \
         after it, 0 again {zero_at:?} after it (idle_timeout 1 s)"
    );
    // …and dropped after the idle timeout, not before.
    assert!(
        zero_at >= Duration::from_millis(900),
        "idle instances went to zero {zero_at:?} after the burst, before the 1 s idle timeout"
    );
    assert_eq!(instances(&cluster.admin, "bursty", "busy"), 0.0);

    // Scaled to zero, it still serves (an instance made on demand).
    let ok = get(&cluster.http, &host, "/");
    assert_eq!((ok.status, ok.text()), (200, hello_body(&host)));
}

#[test]
fn min_instances_are_kept_ready() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = boot(dir.path());
    let host = push_function(
        &cluster,
        dir.path(),
        "warm",
        "hello",
        "[scale]\nmin_instances = 3\nidle_timeout = \"1s\"\n",
    );
    wait_for_text(&cluster.http, &host, "/", &hello_body(&host));
    wait_for_metric(
        &cluster.admin,
        "atoll_instances",
        &[("function", "warm"), ("state", "idle")],
        |v| v == Some(3.0),
        STARTUP,
    );

    let watcher = IdleWatcher::start(&cluster.admin, "warm");
    burst(&cluster.http, &host, "/", 8, 20);
    let burst_end = Instant::now();
    // Back to exactly 3 once the idle timeout (1 s) and a maintenance round (1 s) have passed.
    let settled = Duration::from_millis(2500);
    let deadline = burst_end + Duration::from_secs(20);
    let mut after_burst_max = 0.0f64;
    loop {
        let idle = instances(&cluster.admin, "warm", "idle");
        after_burst_max = after_burst_max.max(idle);
        if burst_end.elapsed() >= settled && idle == 3.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "idle instances did not return to 3 within 20 s of the burst (now {idle})\n{}",
            metrics(&cluster.admin)
        );
        std::thread::sleep(POLL);
    }
    let during_max = watcher.stop();
    eprintln!(
        "min_instances 3: up to {during_max} idle instances during the burst, {after_burst_max} \
         after it, back to 3"
    );
    // And it stays at 3 (never scales to zero) over the next maintenance rounds.
    let watch_until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < watch_until {
        let idle = instances(&cluster.admin, "warm", "idle");
        assert_eq!(
            idle,
            3.0,
            "idle instances left min_instances = 3\n{}",
            metrics(&cluster.admin)
        );
        std::thread::sleep(POLL);
    }
    // The reserved instances serve: no request has to make one on demand now.
    let metrics_before = metrics(&cluster.admin);
    let on_demand = |text: &str| {
        metric_value(
            text,
            "atoll_instance_starts_total",
            &[("function", "warm"), ("when", "on_demand")],
        )
        .unwrap_or(0.0)
    };
    let ok = get(&cluster.http, &host, "/");
    assert_eq!((ok.status, ok.text()), (200, hello_body(&host)));
    assert_eq!(
        on_demand(&metrics(&cluster.admin)),
        on_demand(&metrics_before),
        "a request to a function with ready instances made one on demand"
    );
}

#[test]
fn slow_function_does_not_stall_others() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = boot(dir.path());
    let slow = push_function(
        &cluster,
        dir.path(),
        "slow",
        "fault",
        "[limits]\ntimeout = \"30s\"\n",
    );
    let quick = push_function(&cluster, dir.path(), "quick", "hello", "");
    wait_for_text(&cluster.http, &slow, "/", "ok\n");
    wait_for_text(&cluster.http, &quick, "/", &hello_body(&quick));

    // Keep every core busy with spinning guests for as long as the measurement runs.
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let stop = Arc::new(AtomicBool::new(false));
    let spinners: Vec<_> = (0..cores)
        .map(|_| {
            let (http, slow, stop) = (cluster.http.clone(), slow.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                // When each spin request was in flight.
                let mut spins = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let started = Instant::now();
                    // Long spins: a hello stuck behind one would wait up to 5 s, above the
                    // bound below, which leaves room for a loaded machine.
                    let response = get(&http, &slow, "/spin?ms=5000");
                    assert_eq!(response.status, 200, "/spin: {}", response.text());
                    spins.push((started, Instant::now()));
                }
                spins
            })
        })
        .collect();
    wait_for_metric(
        &cluster.admin,
        "atoll_instances",
        &[("function", "slow"), ("state", "busy")],
        |v| v.is_some_and(|busy| busy >= cores as f64),
        STARTUP,
    );

    let mut latencies = Vec::new();
    let window_start = Instant::now();
    for i in 0..50 {
        let started = Instant::now();
        let response = get(&cluster.http, &quick, "/");
        let latency = started.elapsed();
        assert_eq!(
            (response.status, response.text()),
            (200, hello_body(&quick)),
            "request {i}"
        );
        latencies.push(latency);
    }
    let window = (window_start, Instant::now());
    stop.store(true, Ordering::SeqCst);
    // How much of the measurement window each spinner had a spin request in flight.
    let coverage: Vec<f64> = spinners
        .into_iter()
        .map(|s| {
            let spins = s.join().expect("spinner thread");
            let covered: Duration = spins
                .iter()
                .map(|&(from, to)| {
                    let (from, to) = (from.max(window.0), to.min(window.1));
                    to.saturating_duration_since(from)
                })
                .sum();
            covered.as_secs_f64() / (window.1 - window.0).as_secs_f64()
        })
        .collect();

    latencies.sort();
    let p50 = latencies[latencies.len() / 2];
    let max = *latencies.last().unwrap();
    eprintln!(
        "hello while {cores} guests spin (each spinning {coverage:.2?} of the time): p50 {p50:?}, \
         p90 {:?}, max {max:?}",
        latencies[latencies.len() * 9 / 10]
    );
    assert!(
        coverage.iter().all(|&c| c >= 0.5),
        "the guests were not spinning during the measurement: coverage {coverage:?}"
    );
    assert!(
        max < Duration::from_secs(3),
        "a hello request took {max:?} while {cores} guests spun (p50 {p50:?})\n{}",
        cluster.node.logs()
    );
}
