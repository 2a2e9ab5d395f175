//! `atoll-bench http`: hello through an Atoll node vs a bare hyper hello-world.
//!
//! Both servers run in this process, each on its own multi-threaded runtime, and are loaded
//! one after the other by the same wrk command. The Atoll side is the real thing: a registry
//! on the embedded store, a node following it, the `hello` example pushed and compiled, and
//! every request served by a fresh instance.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::wrk::{self, Load, WrkReport};

#[derive(clap::Args)]
pub struct HttpArgs {
    /// Seconds of load per server.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// Worker threads for each server's runtime (default: all cores).
    #[arg(long)]
    server_threads: Option<usize>,
    /// The hello module (default: the example built by `cargo build`).
    #[arg(long)]
    hello_wasm: Option<PathBuf>,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

const HELLO_MANIFEST: &str = "name = \"hello\"\nwasm = \"hello.wasm\"\nroutes = [\"hello.localhost\"]\n";
/// A function whose memory image is 16 MiB: with copy-on-write restore it should cost about
/// what hello costs.
const IMAGE_MANIFEST: &str =
    "name = \"image16\"\nwasm = \"image16.wasm\"\nroutes = [\"image16.localhost\"]\n";
const IMAGE_BYTES: usize = 16 << 20;

pub fn run(args: HttpArgs) -> Result<()> {
    let load = Load {
        threads: args.threads,
        connections: args.connections,
        duration: Duration::from_secs(args.duration),
    };
    let workers = args
        .server_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;

    let module = read_hello(args.hello_wasm)?;

    let baseline_address = runtime.block_on(start_hyper_hello())?;
    let (atoll_address, _data) = runtime.block_on(start_atoll(module))?;

    // Warm both up briefly so connection setup and first compiles are not measured.
    let warmup = Load {
        duration: Duration::from_secs(1),
        ..load.clone()
    };
    wrk::run(&format!("http://{baseline_address}/"), "hello.localhost", &warmup)?;
    wrk::run(&format!("http://{atoll_address}/"), "hello.localhost", &warmup)?;

    wrk::run(&format!("http://{atoll_address}/"), "image16.localhost", &warmup)?;

    let baseline = wrk::run(&format!("http://{baseline_address}/"), "hello.localhost", &load)?;
    let atoll = wrk::run(&format!("http://{atoll_address}/"), "hello.localhost", &load)?;
    let image = wrk::run(&format!("http://{atoll_address}/"), "image16.localhost", &load)?;
    report(&baseline, &atoll, &image, &load, args.json);
    drop(runtime);
    Ok(())
}

/// The hello module: `path`, or the example built by `cargo build`.
pub fn read_hello(path: Option<PathBuf>) -> Result<Vec<u8>> {
    let hello_wasm = path.unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/target/wasm32-wasip1/release/hello.wasm")
    });
    std::fs::read(&hello_wasm).with_context(|| {
        format!(
            "reading {} (build the examples first: `cargo build` at the workspace root)",
            hello_wasm.display()
        )
    })
}

fn report(baseline: &WrkReport, atoll: &WrkReport, image: &WrkReport, load: &Load, json: bool) {
    let ratio = atoll.requests_per_second / baseline.requests_per_second;
    let image_ratio = image.p50.as_secs_f64() / atoll.p50.as_secs_f64();
    let rows = [
        ("hyper-hello", baseline),
        ("atoll-hello", atoll),
        ("atoll-16mib", image),
    ];
    if json {
        wrk::print_json("http", load.connections, &rows);
        println!(
            "{}",
            serde_json::json!({"bench": "http", "ratio_rps": (ratio * 1000.0).round() / 1000.0})
        );
        return;
    }
    println!(
        "http: wrk -t{} -c{} -d{}s, HTTP/1.1 keep-alive",
        load.threads,
        load.connections,
        load.duration.as_secs()
    );
    wrk::print_table("scenario", &rows);
    println!("ratio atoll/hyper req/s: {ratio:.3}");
    println!("ratio atoll-16mib/atoll-hello p50: {image_ratio:.3}");
}

/// The baseline: the smallest useful hyper server.
async fn start_hyper_hello() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, Infallible>(
                        http::Response::builder()
                            .header("content-type", "text/plain; charset=utf-8")
                            .body(Full::new(Bytes::from_static(b"Hello from hyper!\n")))
                            .expect("valid response"),
                    )
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(address)
}

/// Registry + node in process, `hello` pushed and served. Returns the node's address and the
/// temporary data directory (kept alive by the caller).
async fn start_atoll(module: Vec<u8>) -> Result<(SocketAddr, tempfile::TempDir)> {
    let node = start_node(
        module,
        NodeSetup {
            certs_dir: None,
            with_image: true,
        },
    )
    .await?;
    Ok((node.http, node.data))
}

/// What [`start_node`] sets up besides `hello`.
pub struct NodeSetup {
    /// Serve TLS and HTTP/3 too, with the certificates in this directory.
    pub certs_dir: Option<PathBuf>,
    /// Also push `image16` (a 16 MiB memory image) at `image16.localhost`.
    pub with_image: bool,
}

/// An in-process node and its addresses; `data` must outlive the node.
pub struct AtollNode {
    pub http: SocketAddr,
    /// The registry's URL; its token is [`BENCH_TOKEN`].
    pub registry_url: String,
    pub https: Option<SocketAddr>,
    pub h3: Option<SocketAddr>,
    pub data: tempfile::TempDir,
}

/// A registry on the embedded store in `dir`, served in this runtime on a free port; its URL.
pub async fn start_registry(
    dir: &std::path::Path,
    engine: atoll_isolate::Engine,
    token: &str,
) -> Result<String> {
    let registry = atoll_registry::Registry::open(
        dir,
        std::sync::Arc::new(atoll_isolate::PushCheck::new(engine)),
        token.to_string(),
        atoll_registry::RegistryOptions::default(),
    )?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(atoll_registry::serve(
        listener,
        Arc::new(registry),
        std::future::pending(),
    ));
    Ok(url)
}

/// The token of [`start_node`]'s registry.
pub const BENCH_TOKEN: &str = "bench-token";

/// Registry + node in process with `hello` pushed and served.
pub async fn start_node(module: Vec<u8>, setup: NodeSetup) -> Result<AtollNode> {
    let data = tempfile::tempdir()?;
    let engine = atoll_isolate::Engine::new()?;
    let token = BENCH_TOKEN.to_string();
    let registry_url = start_registry(&data.path().join("registry"), engine.clone(), &token).await?;

    let node_listener = TcpListener::bind("127.0.0.1:0").await?;
    let node_address = node_listener.local_addr()?;
    let admin_listener = TcpListener::bind("127.0.0.1:0").await?;
    let mut options = atoll_router::NodeOptions::new(data.path().join("node"), registry_url.clone());
    options.token = Some(token.clone());
    options.name = "bench".into();
    options.region = "bench".into();
    options.certs_dir = setup.certs_dir.clone();
    let (tls, quic) = match &setup.certs_dir {
        Some(_) => {
            let tls = TcpListener::bind("127.0.0.1:0").await?;
            let quic = std::net::UdpSocket::bind(tls.local_addr()?)?;
            (Some(tls), Some(quic))
        }
        None => (None, None),
    };
    let https = tls.as_ref().map(TcpListener::local_addr).transpose()?;
    let h3 = quic.as_ref().map(std::net::UdpSocket::local_addr).transpose()?;
    let listeners = atoll_router::NodeListeners {
        http: Some(node_listener),
        tls,
        quic,
        admin: admin_listener,
    };
    tokio::spawn(atoll_router::run(
        options,
        engine,
        listeners,
        std::future::pending(),
    ));

    let client = atoll_control::RegistryClient::new(&registry_url, Some(token))?;
    client.push(HELLO_MANIFEST, module).await?;
    wait_until_served(node_address, "hello.localhost").await?;
    if setup.with_image {
        client
            .push(
                IMAGE_MANIFEST,
                crate::wasm_modules::data_image_module(IMAGE_BYTES),
            )
            .await?;
        wait_until_served(node_address, "image16.localhost").await?;
    }
    Ok(AtollNode {
        http: node_address,
        registry_url,
        https,
        h3,
        data,
    })
}

pub async fn wait_until_served(address: SocketAddr, host: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(status) = get_status(address, host, "/").await
            && status == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the node did not serve {host} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The status of one `GET path` on a fresh connection.
pub async fn get_status(address: SocketAddr, host: &str, path: &str) -> Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    let status = text.split_whitespace().nth(1).context("no status line")?;
    Ok(status.parse()?)
}
