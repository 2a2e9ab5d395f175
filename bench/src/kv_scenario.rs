//! `atoll-bench kv`: key-value stores and service calls, each beside its baseline.
//!
//! 1. KV latency, one call at a time: the bare redb store (`KvStore` in this process), the
//!    registry's `/v1/kv` API (what a node's call costs), and a request whose function
//!    reads one key (`todo`'s `GET /todos/1`) beside hello through the same node.
//! 2. KV on NATS JetStream, one call at a time: a bare async-nats KV client beside Atoll's
//!    NATS store without a cache (what the registry uses) and with one (what a node uses;
//!    reads of a key it has seen come from memory). Needs `nats-server` on the PATH; the row
//!    is skipped, saying so, without it.
//! 3. A service call: the `outbound` example calling `hello` through `[services]`
//!    (in-process) beside hello requested directly.
//!
//! Everything runs on loopback: a registry on the embedded store and a node in this
//! process, and a `nats-server -js` child.

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

    // 2. NATS: bare client, Atoll's store uncached and cached.
    let nats = runtime.block_on(nats_rows(args.calls, &value))?;

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
    // 3. A service call beside the direct request.
    let service = wrk::run(&url("/?service=HELLO&path=/"), "caller.localhost", &load)?;
    report(
        &args,
        [bare_set, bare_get, api_set, api_get],
        nats.as_ref(),
        &hello,
        &kv_read,
        &service,
    );
    // Requests wrk abandoned at its end may still be in service calls: let them finish
    // before their runtime goes away.
    std::thread::sleep(Duration::from_millis(500));
    drop(runtime);
    Ok(())
}

/// Names of the NATS rows, in [`nats_rows`]' order.
const NATS_ROWS: [&str; 5] = [
    "nats-bare-put",
    "nats-bare-get",
    "nats-atoll-set",
    "nats-atoll-get",
    "nats-atoll-get-cached",
];

/// The NATS rows, or `None` when nats-server is not installed.
async fn nats_rows(calls: usize, value: &[u8]) -> Result<Option<[Summary; 5]>> {
    use atoll_control::nats_kv::{DEFAULT_CACHE_BYTES, NatsKv};
    use atoll_core::kv::KvBackend;
    use std::sync::Arc;

    if std::process::Command::new("nats-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("kv: nats-server is not installed; the NATS rows are skipped");
        return Ok(None);
    }
    let server = atoll_testkit::NatsServer::start();
    let client = async_nats::connect(&server.url).await?;
    let js = async_nats::jetstream::new(client);
    let bare = js
        .create_key_value(async_nats::jetstream::kv::Config {
            bucket: "bare".into(),
            history: 1,
            ..Default::default()
        })
        .await?;
    let bytes = bytes::Bytes::from(value.to_vec());
    async fn timed_async<F: std::future::Future<Output = Result<()>>>(
        calls: usize,
        mut call: impl FnMut(usize) -> F,
    ) -> Result<Summary> {
        let mut samples = Vec::with_capacity(calls);
        for index in 0..calls {
            let started = Instant::now();
            call(index).await?;
            samples.push(started.elapsed());
        }
        Ok(Summary::of(samples))
    }
    let key = |index: usize| format!("k{}", index % 100);
    let bare_put = timed_async(calls, |index| {
        let (bare, bytes) = (bare.clone(), bytes.clone());
        async move {
            bare.put(key(index), bytes).await?;
            Ok(())
        }
    })
    .await?;
    let bare_get = timed_async(calls, |index| {
        let bare = bare.clone();
        async move {
            bare.get(key(index)).await?;
            Ok(())
        }
    })
    .await?;
    let connect = || Arc::new(atoll_control::LazyNatsStore::new(server.url.clone()));
    let uncached = NatsKv::new(connect(), None);
    let cached = NatsKv::new(connect(), Some(DEFAULT_CACHE_BYTES));
    let atoll_set = timed_async(calls, |index| {
        let (kv, value) = (uncached.clone(), value.to_vec());
        async move {
            kv.set("bench", &key(index), value, None, None).await?;
            Ok(())
        }
    })
    .await?;
    let atoll_get = timed_async(calls, |index| {
        let kv = uncached.clone();
        async move {
            kv.get("bench", &key(index)).await?;
            Ok(())
        }
    })
    .await?;
    // Warm the cache: until its watch runs, reads skip it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cached.cache_hits() < 100 {
        if Instant::now() > deadline {
            bail!("the NATS KV cache never answered");
        }
        for index in 0..100 {
            cached.get("bench", &key(index)).await?;
        }
    }
    let hits = cached.cache_hits();
    let cached_get = timed_async(calls, |index| {
        let kv = cached.clone();
        async move {
            kv.get("bench", &key(index)).await?;
            Ok(())
        }
    })
    .await?;
    if cached.cache_hits() - hits < calls as u64 {
        eprintln!(
            "kv: only {} of {calls} cached reads came from the cache",
            cached.cache_hits() - hits
        );
    }
    Ok(Some([bare_put, bare_get, atoll_set, atoll_get, cached_get]))
}

fn report(
    args: &KvArgs,
    direct: [Summary; 4],
    nats: Option<&[Summary; 5]>,
    hello: &WrkReport,
    kv_read: &WrkReport,
    service: &WrkReport,
) {
    let mut names = vec!["redb-set", "redb-get", "registry-api-set", "registry-api-get"];
    let mut direct = direct.to_vec();
    if let Some(nats) = nats {
        names.extend(NATS_ROWS);
        direct.extend(nats.iter().cloned());
    }
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
    if let Some(nats) = nats {
        println!(
            "ratio atoll/bare NATS p50: set {:.2}, get {:.2}, cached get {:.3}",
            nats[2].p50_us / nats[0].p50_us,
            nats[3].p50_us / nats[1].p50_us,
            nats[4].p50_us / nats[1].p50_us
        );
    }
    println!(
        "ratio function-kv-read/hello req/s: {:.3}; service-call/hello req/s: {:.3}",
        kv_read.requests_per_second / hello.requests_per_second,
        service.requests_per_second / hello.requests_per_second
    );
}
