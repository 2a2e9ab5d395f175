//! `atoll-bench kv`: key-value stores and service calls, each beside its baseline.
//!
//! 1. KV latency, one call at a time: the bare redb store (`KvStore` in this process), the
//!    registry's `/v1/kv` API (what a node's call costs), and a request whose function
//!    reads one key (`todo`'s `GET /todos/1`) beside hello through the same node.
//! 2. A service call: the `outbound` example calling `hello` through `[services]`
//!    (in-process) beside hello requested directly.
//!
//! Everything runs in this process on loopback: a registry on the embedded store and a node.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::http_scenario::{BENCH_TOKEN, NodeSetup, get_status, read_hello, start_node};
use crate::latency::Summary;
use crate::wrk::{self, Load, WrkReport};

#[derive(clap::Args)]
pub struct KvArgs {
    /// Calls per direct measurement (bare store, registry API).
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// Seconds of load per wrk measurement.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Concurrent keep-alive connections for wrk.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

fn example(name: &str) -> Result<Vec<u8>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../examples/target/wasm32-wasip1/release/{name}.wasm"));
    std::fs::read(&path).with_context(|| format!("reading {} (run `cargo build` first)", path.display()))
}

/// Times `calls` sequential runs of `call`.
fn timed(calls: usize, mut call: impl FnMut(usize) -> Result<()>) -> Result<Summary> {
    let mut samples = Vec::with_capacity(calls);
    for index in 0..calls {
        let started = Instant::now();
        call(index)?;
        samples.push(started.elapsed());
    }
    Ok(Summary::of(samples))
}

pub fn run(args: KvArgs) -> Result<()> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()?;
    let load = Load {
        threads: 1,
        connections: args.connections,
        duration: Duration::from_secs(args.duration),
    };

    // 1a. The bare store.
    let bare_dir = tempfile::tempdir()?;
    let bare = atoll_registry::kv::KvStore::open(bare_dir.path())?;
    let value = vec![b'v'; 100];
    let bare_set = timed(args.calls, |index| {
        bare.set(
            "bench",
            &format!("k{}", index % 100),
            &value,
            None,
            atoll_registry::kv::Condition::Always,
        )?;
        Ok(())
    })?;
    let bare_get = timed(args.calls, |index| {
        bare.get("bench", &format!("k{}", index % 100))?;
        Ok(())
    })?;

    // 1b. The registry's API, as a node calls it.
    let node = runtime.block_on(start_node(
        read_hello(None)?,
        NodeSetup {
            certs_dir: None,
            with_image: false,
        },
    ))?;
    let client = atoll_control::RegistryClient::new(&node.registry_url, Some(BENCH_TOKEN.into()))?;
    let api_set = timed(args.calls, |index| {
        runtime.block_on(client.kv_set("bench", &format!("k{}", index % 100), value.clone(), None, None))?;
        Ok(())
    })?;
    let api_get = timed(args.calls, |index| {
        runtime.block_on(client.kv_get("bench", &format!("k{}", index % 100)))?;
        Ok(())
    })?;

    // 1c. A request whose function reads a key, beside hello.
    runtime.block_on(async {
        client
            .push(
                "name = \"todo\"\nwasm = \"todo.wasm\"\nroutes = [\"todo.localhost\"]\n[kv]\nstores = [\"todo\"]\n",
                example("todo")?,
            )
            .await?;
        client
            .push(
                "name = \"caller\"\nwasm = \"outbound.wasm\"\nroutes = [\"caller.localhost\"]\n[services]\nHELLO = \"hello\"\n",
                example("outbound")?,
            )
            .await?;
        client.kv_set("todo", "items/000000000001", b"buy milk".to_vec(), None, None).await?;
        anyhow::Ok(())
    })?;
    let http = node.http;
    let deadline = Instant::now() + Duration::from_secs(30);
    let served = |host: &str, path: &str| {
        runtime
            .block_on(get_status(http, host, path))
            .is_ok_and(|status| status == 200)
    };
    while !(served("todo.localhost", "/todos/1") && served("caller.localhost", "/?service=HELLO&path=/")) {
        if Instant::now() > deadline {
            bail!("todo and caller were not served within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = |path: &str| format!("http://{http}{path}");
    let warmup = Load {
        duration: Duration::from_secs(1),
        ..load.clone()
    };
    wrk::run(&url("/"), "hello.localhost", &warmup)?;
    let hello = wrk::run(&url("/"), "hello.localhost", &load)?;
    let kv_read = wrk::run(&url("/todos/1"), "todo.localhost", &load)?;
    // 2. A service call beside the direct request.
    let service = wrk::run(&url("/?service=HELLO&path=/"), "caller.localhost", &load)?;
    report(
        &args,
        [bare_set, bare_get, api_set, api_get],
        &hello,
        &kv_read,
        &service,
    );
    drop(runtime);
    Ok(())
}

fn report(args: &KvArgs, direct: [Summary; 4], hello: &WrkReport, kv_read: &WrkReport, service: &WrkReport) {
    let names = ["redb-set", "redb-get", "registry-api-set", "registry-api-get"];
    let rows = [
        ("hello", hello),
        ("function-kv-read", kv_read),
        ("service-call-hello", service),
    ];
    if args.json {
        for (name, summary) in names.iter().zip(direct.iter()) {
            println!(
                "{}",
                serde_json::json!({"bench": "kv", "scenario": name, "p50_us": summary.p50_us, "p99_us": summary.p99_us})
            );
        }
        wrk::print_json("kv", args.connections, &rows);
        return;
    }
    println!(
        "kv: {} calls one at a time; wrk -t1 -c{} -d{}s",
        args.calls, args.connections, args.duration
    );
    println!("{:<20} {:>10} {:>10}", "one call", "p50", "p99");
    for (name, summary) in names.iter().zip(direct.iter()) {
        println!("{:<20} {:>8.1}µs {:>8.1}µs", name, summary.p50_us, summary.p99_us);
    }
    wrk::print_table("through the node", &rows);
    println!(
        "ratio registry-api/redb p50: set {:.2}, get {:.2}",
        direct[2].p50_us / direct[0].p50_us,
        direct[3].p50_us / direct[1].p50_us
    );
    println!(
        "ratio function-kv-read/hello req/s: {:.3}; service-call/hello req/s: {:.3}",
        kv_read.requests_per_second / hello.requests_per_second,
        service.requests_per_second / hello.requests_per_second
    );
}
