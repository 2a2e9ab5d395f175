//! `atoll-bench isolate`: how long a fresh instance takes to start and to answer.
//!
//! Three WCGI modules that differ in the size of their initial memory image — `tiny` (the
//! real `hello` example, ~40 KB), `1mib` and `16mib` (generated, see [`wasm_modules`]) —
//! each started under three scenarios in the same run:
//!
//! - `stock`: `LoadedFunction::invoke` on `Engine::stock()`: wasmer's default tunables, so
//!   every instance maps a fresh region and copies every data segment into it.
//! - `snapshot`: Atoll's copy-on-write snapshot restore (see [`snapshot_function`]).
//! - `wasmtime-pooling`: the baseline to beat, wasmtime's pooling allocator with
//!   copy-on-write memory images and imports resolved once (see [`wasmtime_pooling`]).
//!
//! Each invocation is timed twice: `ready` is from the start until the instance exists and
//! `_start` can be called (Atoll: `Invocation::start_time`), `response` until `_start`
//! returned, the store is dropped and stdout is parsed into a response (the whole of
//! `LoadedFunction::invoke`). Every response is checked, so a scenario cannot look fast by
//! skipping the work. One thread; each (module, scenario) warms up, then runs its
//! iterations back to back, so one scenario's cache footprint does not tax another's.
//!
//! [`wasm_modules`]: crate::wasm_modules
//! [`wasmtime_pooling`]: crate::wasmtime_pooling

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use atoll_isolate::{CgiRequest, CgiResponse, Engine, FunctionConfig, LoadedFunction};

use crate::latency::Summary;
use crate::wasm_modules;
use crate::wasmtime_pooling::{self, PooledFunction};

#[derive(clap::Args)]
pub struct IsolateArgs {
    /// Measured iterations per scenario for `tiny` and `1mib`; `16mib` runs a quarter as many.
    #[arg(long, default_value_t = 2000)]
    iterations: usize,
    /// Unmeasured iterations per scenario before measuring.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// The `tiny` module (default: the `hello` example built by `cargo build`).
    #[arg(long)]
    hello_wasm: Option<PathBuf>,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

/// Whether [`snapshot_function`] still builds the stock path (the table says so).
// TODO(lead): set to false when `snapshot_function` switches to snapshot loading.
const SNAPSHOT_PENDING: bool = false;

/// The function as Atoll's snapshot/copy-on-write restore loads it.
/// Prepared as a node prepares a version: pre-initialised, compiled, its memory image in a
/// memfd that every instance maps copy-on-write from a pooled slot.
fn snapshot_function(engine: &Engine, wasm: &[u8]) -> Result<LoadedFunction> {
    let directory = tempfile::tempdir()?;
    let cache = atoll_isolate::ArtifactCache::open(directory.path(), engine.clone())?;
    let digest = atoll_core::digest::sha256_hex(wasm);
    let prepared = cache.load_or_prepare(engine, &digest, wasm, "bench", &[], 128 << 20)?;
    anyhow::ensure!(prepared.image.is_some(), "the module has no copy-on-write image");
    Ok(LoadedFunction::from_prepared(
        engine.clone(),
        prepared,
        FunctionConfig::new("bench"),
    ))
}

/// The function as Atoll loads it today. Keep this on the stock wasmer path even when the
/// engine grows snapshots: it is the baseline the snapshot is measured against.
fn stock_function(stock_engine: &Engine, wasm: &[u8]) -> Result<LoadedFunction> {
    let engine = stock_engine;
    Ok(LoadedFunction::new(
        engine.clone(),
        engine.compile(wasm)?,
        FunctionConfig::new("bench"),
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScenarioKind {
    Stock,
    Snapshot,
    WasmtimePooling,
}

impl ScenarioKind {
    const ALL: [ScenarioKind; 3] = [
        ScenarioKind::Stock,
        ScenarioKind::Snapshot,
        ScenarioKind::WasmtimePooling,
    ];

    fn name(self) -> &'static str {
        match self {
            ScenarioKind::Stock => "stock",
            ScenarioKind::Snapshot => "snapshot",
            ScenarioKind::WasmtimePooling => "wasmtime-pooling",
        }
    }
}

/// One module under test and what its responses must look like.
struct BenchModule {
    name: &'static str,
    wasm: Vec<u8>,
    iterations: usize,
    /// The exact body, for generated modules; the hello example only has to answer 200.
    expected_body: Option<Vec<u8>>,
}

/// A function ready to be invoked by one scenario.
enum Runner {
    Atoll(LoadedFunction),
    Wasmtime(PooledFunction),
}

/// One invocation's timings.
struct Sample {
    ready: Duration,
    response: Duration,
}

impl Runner {
    fn invoke(&self, request: &CgiRequest) -> Result<(Sample, CgiResponse)> {
        match self {
            Runner::Atoll(function) => {
                let started = Instant::now();
                let invocation = function.invoke(request)?;
                let response = started.elapsed();
                Ok((
                    Sample {
                        ready: invocation.start_time,
                        response,
                    },
                    invocation.response,
                ))
            }
            Runner::Wasmtime(function) => {
                let timed = function.invoke(request)?;
                Ok((
                    Sample {
                        ready: timed.ready,
                        response: timed.total,
                    },
                    timed.response,
                ))
            }
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone)]
struct Row {
    module: &'static str,
    scenario: ScenarioKind,
    phase: &'static str,
    iterations: usize,
    summary: Summary,
}

pub fn run(args: IsolateArgs) -> Result<()> {
    if args.iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    let modules = modules(&args)?;
    let engine = Engine::new()?;
    let stock_engine = Engine::stock()?;
    let wasmtime_engine = wasmtime_pooling::pooling_engine()?;
    let request = bench_request();

    let mut rows = Vec::new();
    for module in &modules {
        for scenario in ScenarioKind::ALL {
            let runner = match scenario {
                ScenarioKind::Stock => Runner::Atoll(stock_function(&stock_engine, &module.wasm)?),
                ScenarioKind::Snapshot => Runner::Atoll(snapshot_function(&engine, &module.wasm)?),
                ScenarioKind::WasmtimePooling => {
                    Runner::Wasmtime(PooledFunction::new(&wasmtime_engine, &module.wasm)?)
                }
            };
            let (ready, response) = measure(&runner, module, &request, args.warmup)
                .with_context(|| format!("{} under {}", module.name, scenario.name()))?;
            for (phase, samples) in [("ready", ready), ("response", response)] {
                rows.push(Row {
                    module: module.name,
                    scenario,
                    phase,
                    iterations: module.iterations,
                    summary: Summary::of(samples),
                });
            }
            if !args.json {
                eprintln!("measured {} under {}", module.name, scenario.name());
            }
        }
    }
    let ratios = ratios(&rows);
    if args.json {
        print_json(&rows, &ratios);
    } else {
        print_table(&rows, &ratios, args.warmup);
    }
    Ok(())
}

/// `warmup` unmeasured invocations, then `module.iterations` measured ones.
fn measure(
    runner: &Runner,
    module: &BenchModule,
    request: &CgiRequest,
    warmup: usize,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    for _ in 0..warmup {
        let (_, response) = runner.invoke(request)?;
        check(module, &response)?;
    }
    let mut ready = Vec::with_capacity(module.iterations);
    let mut total = Vec::with_capacity(module.iterations);
    for _ in 0..module.iterations {
        let (sample, response) = runner.invoke(request)?;
        check(module, &response)?;
        ready.push(sample.ready);
        total.push(sample.response);
    }
    Ok((ready, total))
}

fn check(module: &BenchModule, response: &CgiResponse) -> Result<()> {
    if response.status != 200 {
        bail!("answered {} instead of 200", response.status);
    }
    match &module.expected_body {
        Some(expected) if response.body.as_ref() != expected.as_slice() => bail!(
            "answered {:?} instead of {:?}",
            String::from_utf8_lossy(&response.body),
            String::from_utf8_lossy(expected)
        ),
        None if response.body.is_empty() => bail!("answered an empty body"),
        _ => Ok(()),
    }
}

fn modules(args: &IsolateArgs) -> Result<Vec<BenchModule>> {
    let hello_wasm = args.hello_wasm.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/target/wasm32-wasip1/release/hello.wasm")
    });
    let hello = std::fs::read(&hello_wasm).with_context(|| {
        format!(
            "the `tiny` module is the hello example, but {} cannot be read; build the examples \
             first with `cargo build` at the workspace root, or pass --hello-wasm",
            hello_wasm.display()
        )
    })?;
    let generated = |name, image_bytes: usize, iterations| BenchModule {
        name,
        wasm: wasm_modules::data_image_module(image_bytes),
        iterations,
        expected_body: Some(wasm_modules::expected_body(image_bytes)),
    };
    Ok(vec![
        BenchModule {
            name: "tiny",
            wasm: hello,
            iterations: args.iterations,
            expected_body: None,
        },
        generated("1mib", 1024 * 1024, args.iterations),
        generated("16mib", 16 * 1024 * 1024, (args.iterations / 4).max(1)),
    ])
}

/// A typical GET as the edge hands it to a function: ~20 CGI variables.
fn bench_request() -> CgiRequest {
    let mut headers = http::HeaderMap::new();
    for (name, value) in [
        ("host", "hello.localhost:8080"),
        ("user-agent", "atoll-bench/0.1"),
        ("accept", "*/*"),
        ("accept-encoding", "gzip, br"),
    ] {
        headers.insert(name, http::HeaderValue::from_static(value));
    }
    CgiRequest {
        method: "GET".into(),
        raw_path: "/hello".into(),
        query: "name=bench".into(),
        protocol: "HTTP/1.1".into(),
        scheme: "http".into(),
        server_name: "hello.localhost".into(),
        server_port: 8080,
        remote_addr: "127.0.0.1".into(),
        remote_port: 54321,
        matched_route: "hello.localhost".into(),
        route_prefix: String::new(),
        headers,
        body: bytes::Bytes::new(),
        service_depth: 0,
        deadline: None,
        cron_tick: None,
    }
}

/// A named ratio of two response p50s.
struct Ratio {
    name: String,
    module: &'static str,
    value: f64,
}

fn response_p50(rows: &[Row], module: &str, scenario: ScenarioKind) -> Option<f64> {
    rows.iter()
        .find(|row| row.module == module && row.scenario == scenario && row.phase == "response")
        .map(|row| row.summary.p50_us)
}

fn ratios(rows: &[Row]) -> Vec<Ratio> {
    let mut ratios = Vec::new();
    for module in ["tiny", "1mib", "16mib"] {
        if let (Some(snapshot), Some(wasmtime)) = (
            response_p50(rows, module, ScenarioKind::Snapshot),
            response_p50(rows, module, ScenarioKind::WasmtimePooling),
        ) {
            ratios.push(Ratio {
                name: "snapshot/wasmtime-pooling".into(),
                module,
                value: snapshot / wasmtime,
            });
        }
    }
    if let (Some(large), Some(tiny)) = (
        response_p50(rows, "16mib", ScenarioKind::Snapshot),
        response_p50(rows, "tiny", ScenarioKind::Snapshot),
    ) {
        ratios.push(Ratio {
            name: "snapshot 16mib/tiny".into(),
            module: "16mib/tiny",
            value: large / tiny,
        });
    }
    if let (Some(stock), Some(snapshot)) = (
        response_p50(rows, "16mib", ScenarioKind::Stock),
        response_p50(rows, "16mib", ScenarioKind::Snapshot),
    ) {
        ratios.push(Ratio {
            name: "stock/snapshot".into(),
            module: "16mib",
            value: stock / snapshot,
        });
    }
    ratios
}

fn round(value: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (value * scale).round() / scale
}

fn print_json(rows: &[Row], ratios: &[Ratio]) {
    for row in rows {
        println!(
            "{}",
            serde_json::json!({
                "bench": "isolate",
                "scenario": row.scenario.name(),
                "module": row.module,
                "phase": row.phase,
                "iterations": row.iterations,
                "p50_us": round(row.summary.p50_us, 2),
                "p99_us": round(row.summary.p99_us, 2),
            })
        );
    }
    for ratio in ratios {
        println!(
            "{}",
            serde_json::json!({
                "bench": "isolate",
                "ratio": ratio.name,
                "module": ratio.module,
                "phase": "response",
                "stat": "p50",
                "value": round(ratio.value, 3),
            })
        );
    }
}

fn print_table(rows: &[Row], ratios: &[Ratio], warmup: usize) {
    println!("isolate: fresh instance per invocation, one thread, {warmup} warm-up iterations; µs");
    if SNAPSHOT_PENDING {
        println!("note: `snapshot` still loads through the stock path (snapshot loading not wired yet)");
    }
    println!(
        "{:<7} {:<17} {:<9} {:>6} {:>10} {:>10}",
        "module", "scenario", "phase", "iters", "p50", "p99"
    );
    for row in rows {
        println!(
            "{:<7} {:<17} {:<9} {:>6} {:>10.1} {:>10.1}",
            row.module,
            row.scenario.name(),
            row.phase,
            row.iterations,
            row.summary.p50_us,
            row.summary.p99_us
        );
    }
    println!("ratios (response p50):");
    for ratio in ratios {
        println!("  {:<27} {:<11} {:>8.3}", ratio.name, ratio.module, ratio.value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(module: &'static str, scenario: ScenarioKind, phase: &'static str, p50_us: f64) -> Row {
        Row {
            module,
            scenario,
            phase,
            iterations: 1,
            summary: Summary {
                p50_us,
                p99_us: p50_us,
            },
        }
    }

    #[test]
    fn ratios_compare_response_p50s() {
        let rows = vec![
            row("tiny", ScenarioKind::Snapshot, "ready", 1.0),
            row("tiny", ScenarioKind::Snapshot, "response", 20.0),
            row("tiny", ScenarioKind::WasmtimePooling, "response", 10.0),
            row("16mib", ScenarioKind::Stock, "response", 4000.0),
            row("16mib", ScenarioKind::Snapshot, "response", 40.0),
            row("16mib", ScenarioKind::WasmtimePooling, "response", 20.0),
        ];
        let found: Vec<(String, &str, f64)> = ratios(&rows)
            .into_iter()
            .map(|ratio| (ratio.name, ratio.module, ratio.value))
            .collect();
        assert_eq!(
            found,
            vec![
                ("snapshot/wasmtime-pooling".to_string(), "tiny", 2.0),
                ("snapshot/wasmtime-pooling".to_string(), "16mib", 2.0),
                ("snapshot 16mib/tiny".to_string(), "16mib/tiny", 2.0),
                ("stock/snapshot".to_string(), "16mib", 100.0),
            ]
        );
    }

    #[test]
    fn the_bench_request_carries_a_full_cgi_environment() {
        let environment = atoll_isolate::cgi::environment(&bench_request(), &[]);
        assert!(environment.len() >= 15, "{environment:?}");
    }
}
