//! `atoll-bench scaling`: does instance throughput grow with cores?
//!
//! A fresh instance per invocation means memory mappings change for every request, and every
//! `mmap`/`madvise` or copy-on-write fault in a multi-threaded process may shoot down TLBs on
//! all cores — the scaling wall wasmtime and wasmer users hit. This scenario runs the same
//! function (invoke = instantiate from the snapshot + run + reset) on 1 thread, then on N
//! threads (default: all cores), each thread invoking back to back for a fixed time, and
//! prints invocations/s and the ratio. The aim is at least 1.8× on two cores.
//! No HTTP and no load generator are involved, so the whole machine serves the function.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use atoll_isolate::{ArtifactCache, CgiRequest, Engine, FunctionConfig, LoadedFunction};

#[derive(clap::Args)]
pub struct ScalingArgs {
    /// Seconds per run.
    #[arg(long, default_value_t = 3)]
    duration: u64,
    /// Threads in the second run (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// The module (default: the `hello` example built by `cargo build`).
    #[arg(long)]
    wasm: Option<PathBuf>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: ScalingArgs) -> Result<()> {
    let wasm_path = args.wasm.unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/target/wasm32-wasip1/release/hello.wasm")
    });
    let wasm = std::fs::read(&wasm_path).with_context(|| format!("reading {}", wasm_path.display()))?;
    let engine = Engine::new()?;
    let directory = tempfile::tempdir()?;
    let cache = ArtifactCache::open(directory.path(), engine.clone())?;
    let prepared = cache.load_or_prepare(
        &engine,
        &atoll_core::digest::sha256_hex(&wasm),
        &wasm,
        "scaling",
        &[],
        128 << 20,
    )?;
    let function = Arc::new(LoadedFunction::from_prepared(
        engine,
        prepared,
        FunctionConfig::new("scaling"),
    ));
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let duration = Duration::from_secs(args.duration.max(1));

    run_threads(&function, 1, Duration::from_millis(500))?; // warm up
    let single = run_threads(&function, 1, duration)?;
    let multi = run_threads(&function, threads, duration)?;
    let ratio = multi / single;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"bench": "scaling", "threads": 1, "invocations_per_s": single.round()})
        );
        println!(
            "{}",
            serde_json::json!({"bench": "scaling", "threads": threads, "invocations_per_s": multi.round()})
        );
        println!(
            "{}",
            serde_json::json!({"bench": "scaling", "ratio": (ratio * 1000.0).round() / 1000.0})
        );
    } else {
        println!(
            "scaling: fresh instance per invocation (snapshot restore + run + reset), {}s per run",
            duration.as_secs()
        );
        println!("{:>8} {:>16}", "threads", "invocations/s");
        println!("{:>8} {:>16.0}", 1, single);
        println!("{:>8} {:>16.0}", threads, multi);
        println!("ratio {threads} threads / 1 thread: {ratio:.2}");
    }
    Ok(())
}

/// Invocations per second with `threads` threads invoking back to back for `duration`.
fn run_threads(function: &Arc<LoadedFunction>, threads: usize, duration: Duration) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let request = CgiRequest {
        method: "GET".into(),
        raw_path: "/".into(),
        protocol: "HTTP/1.1".into(),
        scheme: "http".into(),
        server_name: "hello.localhost".into(),
        server_port: 80,
        ..CgiRequest::default()
    };
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (function, stop, count, request) = (
                Arc::clone(function),
                Arc::clone(&stop),
                Arc::clone(&count),
                request.clone(),
            );
            std::thread::spawn(move || -> Result<()> {
                while !stop.load(Ordering::Relaxed) {
                    let invocation = function.invoke(&request)?;
                    anyhow::ensure!(
                        invocation.response.status == 200,
                        "answered {}",
                        invocation.response.status
                    );
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.join().expect("bench thread panicked")?;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}
