//! `atoll-bench outbound`: functions that call out over HTTP (`wasi_experimental_http`).
//!
//! 1. Hello's latency alone, then again while guests — two per core — wait on outbound
//!    calls of `--wait-ms` each, all the time: a guest waiting on the network must not hold
//!    up other functions (the aim: p50 within 1.2× of hello alone).
//! 2. An origin's `/hello` loaded directly, beside the same through a function that calls
//!    it (guest → the node's pooled client → origin): what the hop through a function costs.
//!
//! The origin is a hyper server in this process on loopback; the function is the outbound
//! example (the WAGI guest crate), built by `cargo build`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use atoll_testkit::origin::TestOrigin;

use crate::http_scenario::{BENCH_TOKEN, NodeSetup, read_hello, start_node};
use crate::wrk::{self, Load, WrkReport};

#[derive(clap::Args)]
pub struct OutboundArgs {
    /// Seconds of load per measurement.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// How long each waiting guest's outbound call takes.
    #[arg(long, default_value_t = 2000)]
    wait_ms: u64,
    /// The outbound module (default: the example built by `cargo build`).
    #[arg(long)]
    outbound_wasm: Option<PathBuf>,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: OutboundArgs) -> Result<()> {
    let load = Load {
        threads: args.threads,
        connections: args.connections,
        duration: Duration::from_secs(args.duration),
    };
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()?;
    let origin = runtime.block_on(TestOrigin::http());
    let node = runtime.block_on(start_node(
        read_hello(None)?,
        NodeSetup {
            certs_dir: None,
            with_image: false,
        },
    ))?;
    let outbound_wasm = args.outbound_wasm.unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/target/wasm32-wasip1/release/outbound.wasm")
    });
    let module = std::fs::read(&outbound_wasm)
        .with_context(|| format!("reading {} (run `cargo build` first)", outbound_wasm.display()))?;
    let manifest = format!(
        "name = \"outbound\"\nwasm = \"outbound.wasm\"\nroutes = [\"outbound.localhost\"]\n\
         [limits]\ntimeout = \"60s\"\n[outbound]\nallowed_hosts = [\"http://{}\"]\n",
        origin.address
    );
    runtime.block_on(async {
        atoll_control::RegistryClient::new(&node.registry_url, Some(BENCH_TOKEN.into()))?
            .push(&manifest, module)
            .await
    })?;
    let call = |path: &str| {
        format!(
            "/?url=http%3A%2F%2F{}{}",
            origin.address,
            path.replace('/', "%2F").replace('?', "%3F").replace('=', "%3D")
        )
    };
    let hello_call = call("/hello");
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(node.http, "outbound.localhost", &hello_call)
        .map(|(status, _)| status)
        .unwrap_or(0)
        != 200
    {
        if Instant::now() > deadline {
            bail!("the outbound function was not served within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    let hello_url = format!("http://{}/", node.http);
    let warmup = Load {
        duration: Duration::from_secs(1),
        ..load.clone()
    };
    wrk::run(&hello_url, "hello.localhost", &warmup)?;
    let alone = wrk::run(&hello_url, "hello.localhost", &load)?;

    // Guests waiting on the network, all the time, two per core.
    let waiters = 2 * cores;
    let stop = Arc::new(AtomicBool::new(false));
    let waits_done = Arc::new(AtomicU64::new(0));
    let before = origin.requests();
    let delay_call = call(&format!("/delay?ms={}", args.wait_ms));
    let threads: Vec<_> = (0..waiters)
        .map(|_| {
            let (stop, waits_done, path, address) = (
                Arc::clone(&stop),
                Arc::clone(&waits_done),
                delay_call.clone(),
                node.http,
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((200, _)) = get(address, "outbound.localhost", &path) {
                        waits_done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while origin.requests() < before + waiters {
        if Instant::now() > deadline {
            bail!("the waiting guests did not all call out within 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let beside = wrk::run(&hello_url, "hello.localhost", &load)?;
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        let _ = thread.join();
    }

    let direct = wrk::run(&format!("http://{}/hello", origin.address), "origin", &load)?;
    let through = wrk::run(
        &format!("http://{}{hello_call}", node.http),
        "outbound.localhost",
        &load,
    )?;
    report(
        &alone,
        &beside,
        waiters,
        waits_done.load(Ordering::Relaxed),
        &direct,
        &through,
        &load,
        args.wait_ms,
        args.json,
    );
    drop(runtime);
    Ok(())
}

/// One GET over a fresh connection: the status and body.
fn get(address: SocketAddr, host: &str, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or(0);
    Ok((status, response))
}

#[allow(clippy::too_many_arguments)]
fn report(
    alone: &WrkReport,
    beside: &WrkReport,
    waiters: usize,
    waits_done: u64,
    direct: &WrkReport,
    through: &WrkReport,
    load: &Load,
    wait_ms: u64,
    json: bool,
) {
    let p50_ratio = beside.p50.as_secs_f64() / alone.p50.as_secs_f64();
    let p99_ratio = beside.p99.as_secs_f64() / alone.p99.as_secs_f64();
    let call_ratio = through.requests_per_second / direct.requests_per_second;
    let rows = [
        ("hello-alone", alone),
        ("hello-beside-waiters", beside),
        ("origin-direct", direct),
        ("origin-via-function", through),
    ];
    if json {
        wrk::print_json("outbound", load.connections, &rows);
        println!(
            "{}",
            serde_json::json!({
                "bench": "outbound",
                "waiters": waiters,
                "wait_ms": wait_ms,
                "waits_done": waits_done,
                "ratio_p50_beside_alone": (p50_ratio * 1000.0).round() / 1000.0,
                "ratio_p99_beside_alone": (p99_ratio * 1000.0).round() / 1000.0,
                "ratio_rps_via_function_direct": (call_ratio * 1000.0).round() / 1000.0,
            })
        );
        return;
    }
    println!(
        "outbound: wrk -t{} -c{} -d{}s; {waiters} guests each waiting {wait_ms} ms on an outbound call beside hello ({waits_done} waits done)",
        load.threads,
        load.connections,
        load.duration.as_secs()
    );
    wrk::print_table("scenario", &rows);
    println!("ratio hello beside waiters / alone: p50 {p50_ratio:.3}, p99 {p99_ratio:.3} (aim: p50 <= 1.2)");
    println!("ratio origin via a function / direct req/s: {call_ratio:.3}");
}
