//! `atoll-bench cluster`: what forwarding between nodes costs, and how fast a dead home is
//! routed around.
//!
//! One registry (embedded store) and two nodes in one region, each node on its own tokio
//! runtime so it can be "killed": dropping a runtime aborts every task and closes its
//! sockets at once, which a peer sees as a crash (connections refused or reset), not a
//! graceful stop. With one home per function, one node is hello's home and serves it
//! locally (the baseline); the other forwards every request to it.
//!
//! 1. Latency: the same wrk load against the home (local) and the other node (forwarded);
//!    the difference is what a hop costs.
//! 2. Failover: a client sends requests one after another through the forwarding node; the
//!    home is killed; reported is the time from the kill to the first success, the requests
//!    that failed, and — as the baseline — the heartbeat TTL, which is how long a health check
//!    by heartbeats alone would keep sending requests to the dead node.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::net::TcpListener;

use crate::wrk::{self, Load, WrkReport};

#[derive(clap::Args)]
pub struct ClusterArgs {
    /// Seconds of load per measurement.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Concurrent keep-alive connections for the loaded measurement.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// The hello module (default: the example built by `cargo build`).
    #[arg(long)]
    hello_wasm: Option<std::path::PathBuf>,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

const HELLO_MANIFEST: &str = "name = \"hello\"\nwasm = \"hello.wasm\"\nroutes = [\"hello.localhost\"]\n";
const HOST: &str = "hello.localhost";

struct BenchNode {
    name: String,
    http: SocketAddr,
    runtime: tokio::runtime::Runtime,
}

pub fn run(args: ClusterArgs) -> Result<()> {
    let module = crate::http_scenario::read_hello(args.hello_wasm.clone())?;
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let data = tempfile::tempdir()?;
    let engine = atoll_isolate::Engine::new()?;
    let token = "bench-token".to_string();
    let registry_url = control.block_on(crate::http_scenario::start_registry(
        &data.path().join("registry"),
        engine.clone(),
        &token,
    ))?;
    let mut nodes = Vec::new();
    for (name, region, ip) in [
        ("a1", "a", "127.0.0.11"),
        ("a2", "a", "127.0.0.12"),
        ("b1", "b", "127.0.0.21"),
    ] {
        let data = data.path().join(name);
        nodes.push(start_node(
            name,
            region,
            ip,
            &registry_url,
            &token,
            &data,
            engine.clone(),
        )?);
    }
    let region_b = nodes.pop().context("b1")?;
    let dns_server = control.block_on(start_dns(&registry_url, &token))?;
    let client = atoll_control::RegistryClient::new(&registry_url, Some(token))?;
    control.block_on(async {
        // Both nodes in the member list, then hello pushed and served by both.
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.nodes().await.map_or(0, |nodes| nodes.len()) < 3 {
            if Instant::now() > deadline {
                bail!("the nodes did not announce themselves within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        client.push(HELLO_MANIFEST, module).await?;
        anyhow::Ok(())
    })?;
    // Both nodes agree on the home once each has the function and the other's heartbeat.
    let home = control.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let first = served_by(nodes[0].http).await.ok();
            let second = served_by(nodes[1].http).await.ok();
            if let (Some(first), Some(second)) = (&first, &second)
                && first == second
            {
                return Ok(first.clone());
            }
            if Instant::now() > deadline {
                bail!("the nodes did not agree on hello's home within 30 s ({first:?}, {second:?})");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })?;
    let home_index = nodes
        .iter()
        .position(|node| node.name == home)
        .context("home is a node")?;
    let (home_http, front_http) = (nodes[home_index].http, nodes[1 - home_index].http);

    let loads = [
        (
            "unloaded (wrk -c1)",
            Load {
                threads: 1,
                connections: 1,
                duration: Duration::from_secs(args.duration),
            },
        ),
        (
            "loaded",
            Load {
                threads: 1,
                connections: args.connections,
                duration: Duration::from_secs(args.duration),
            },
        ),
    ];
    let warmup = Load {
        duration: Duration::from_secs(1),
        ..loads[1].1.clone()
    };
    wrk::run(&format!("http://{home_http}/"), HOST, &warmup)?;
    wrk::run(&format!("http://{front_http}/"), HOST, &warmup)?;
    let mut rows = Vec::new();
    for (label, load) in &loads {
        let local = wrk::run(&format!("http://{home_http}/"), HOST, load)?;
        let forwarded = wrk::run(&format!("http://{front_http}/"), HOST, load)?;
        rows.push((*label, load.connections, local, forwarded));
    }

    // Failover: sequential requests through the front node; kill the home mid-stream.
    let home_node = nodes.remove(home_index);
    let failover = control.block_on(async move {
        for _ in 0..50 {
            served_by(front_http).await?;
        }
        let killed = Instant::now();
        home_node.runtime.shutdown_background();
        let mut failed = 0u32;
        loop {
            match served_by(front_http).await {
                Ok(_) => return anyhow::Ok((killed.elapsed(), failed)),
                Err(_) => failed += 1,
            }
            if killed.elapsed() > Duration::from_secs(30) {
                bail!("no success through the front node within 30 s of the kill");
            }
        }
    })?;

    // Region failover: kill the rest of region a; wait for the DNS to name b, and b to serve.
    let region_a_client = "127.0.0.9";
    let region_b_ip = region_b.http.ip().to_string();
    let ask = |client: &str| dig(dns_server, client, HOST);
    let deadline = Instant::now() + Duration::from_secs(30);
    while ask(region_a_client)? != [nodes[0].http.ip().to_string()] {
        if Instant::now() > deadline {
            bail!("the DNS did not name region a's survivor within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let survivor = nodes.remove(0);
    let killed = Instant::now();
    survivor.runtime.shutdown_background();
    loop {
        if ask(region_a_client)? == [region_b_ip.clone()] {
            break;
        }
        if killed.elapsed() > Duration::from_secs(30) {
            bail!("the DNS did not move region a's client to region b within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let answered = killed.elapsed();
    control.block_on(served_by(region_b.http))?;
    let region_failover = (answered, killed.elapsed());
    report(&rows, failover, region_failover, args.json);
    drop(region_b);
    Ok(())
}

/// `atoll dns` in process on `registry_url`, zone `localhost`, 127.0.0.8/29 in region a
/// and 127.0.0.16/28 in b; its UDP address.
async fn start_dns(registry_url: &str, token: &str) -> Result<SocketAddr> {
    use atoll_dns::config::{DEFAULT_MAX_UDP_PAYLOAD, DnsConfig, RegionMap, name_servers};
    let zone = "localhost".parse().map_err(anyhow::Error::msg)?;
    let region_map = ["127.0.0.8/29=a", "127.0.0.16/28=b"]
        .iter()
        .map(|rule| rule.parse().map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let listen: SocketAddr = "127.0.0.1:0".parse()?;
    let config = DnsConfig {
        zones: name_servers(&[zone], &[], Some(listen.ip())),
        region_map: RegionMap::new(region_map),
        default_region: "default".into(),
        fallback: [("a".to_string(), vec!["b".to_string()])].into(),
        ttl: 5,
        max_udp_payload: DEFAULT_MAX_UDP_PAYLOAD,
        // Every client here is in 127.0.0.0/24, one rate-limited prefix: dig polling for
        // the failover would be slowed by dropped answers and the measurement skewed.
        rate_limit: None,
    };
    let source = atoll_control::ControlPlane::Registry(atoll_control::RegistryClient::new(
        registry_url,
        Some(token.to_string()),
    )?);
    let (udp, tcp) = atoll_dns::bind(listen).await?;
    let address = udp.local_addr()?;
    tokio::spawn(atoll_dns::serve(config, source, udp, tcp, std::future::pending()));
    Ok(address)
}

/// The A records `dig` gets for `name` from `server`, asking from `source`.
fn dig(server: SocketAddr, source: &str, name: &str) -> Result<Vec<String>> {
    let output = std::process::Command::new("dig")
        .args([
            &format!("@{}", server.ip()),
            "-p",
            &server.port().to_string(),
            "-b",
            source,
        ])
        .args([name, "A", "+short", "+tries=1", "+time=2"])
        .output()
        .context("running dig (install it with `apt-get install dnsutils`)")?;
    let mut addresses: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|line| line.parse::<std::net::Ipv4Addr>().is_ok())
        .map(str::to_string)
        .collect();
    addresses.sort();
    Ok(addresses)
}

fn start_node(
    name: &str,
    region: &str,
    ip: &str,
    registry_url: &str,
    token: &str,
    data: &std::path::Path,
    engine: atoll_isolate::Engine,
) -> Result<BenchNode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let http = runtime.block_on(async {
        let http = TcpListener::bind((ip, 0)).await?;
        let address = http.local_addr()?;
        let admin = TcpListener::bind((ip, 0)).await?;
        let mut options = atoll_router::NodeOptions::new(data.to_path_buf(), registry_url.to_string());
        options.token = Some(token.to_string());
        options.name = name.to_string();
        options.region = region.into();
        options.home_replicas = 1;
        let listeners = atoll_router::NodeListeners {
            http: Some(http),
            tls: None,
            quic: None,
            admin,
        };
        tokio::spawn(atoll_router::run(
            options,
            engine,
            listeners,
            std::future::pending(),
        ));
        anyhow::Ok(address)
    })?;
    Ok(BenchNode {
        name: name.to_string(),
        http,
        runtime,
    })
}

/// `GET /` for hello: the node that ran it, or an error for anything but 200.
async fn served_by(address: SocketAddr) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(address))
        .await
        .context("connect timed out")??;
    stream
        .write_all(format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
        .await
        .context("response timed out")??;
    let text = String::from_utf8_lossy(&response);
    let status = text.split_whitespace().nth(1).context("no status line")?;
    if status != "200" {
        bail!("status {status}");
    }
    text.lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case(atoll_router::cluster::SERVED_BY_HEADER)
                .then(|| value.trim().to_string())
        })
        .context("no x-atoll-node header")
}

/// How often `atoll dns` refreshes its view (its source's poll interval).
const DNS_POLL: Duration = Duration::from_millis(500);

fn report(
    rows: &[(&str, u32, WrkReport, WrkReport)],
    failover: (Duration, u32),
    region: (Duration, Duration),
    json: bool,
) {
    let ttl = atoll_core::membership::MEMBER_TTL;
    let region_bound = ttl + DNS_POLL;
    if json {
        for (label, connections, local, forwarded) in rows {
            for (scenario, report) in [("local", local), ("forwarded", forwarded)] {
                println!(
                    "{}",
                    serde_json::json!({
                        "bench": "cluster",
                        "load": label,
                        "connections": connections,
                        "scenario": scenario,
                        "requests_per_second": report.requests_per_second.round(),
                        "p50_us": report.p50.as_micros(),
                        "p99_us": report.p99.as_micros(),
                        "errors": report.errors,
                    })
                );
            }
        }
        println!(
            "{}",
            serde_json::json!({
                "bench": "cluster",
                "scenario": "home killed",
                "first_success_ms": failover.0.as_secs_f64() * 1000.0,
                "failed_requests": failover.1,
                "baseline_heartbeat_ttl_ms": ttl.as_millis(),
            })
        );
        println!(
            "{}",
            serde_json::json!({
                "bench": "cluster",
                "scenario": "region killed",
                "dns_moved_ms": region.0.as_secs_f64() * 1000.0,
                "first_success_ms": region.1.as_secs_f64() * 1000.0,
                "baseline_member_ttl_plus_dns_poll_ms": region_bound.as_millis(),
            })
        );
        return;
    }
    println!("cluster: two nodes in region a (one home per function), one in b; wrk -t1 per row");
    println!(
        "{:<20} {:<10} {:>12} {:>10} {:>10} {:>7}",
        "load", "scenario", "req/s", "p50", "p99", "errors"
    );
    for (label, _, local, forwarded) in rows {
        for (scenario, report) in [("local", local), ("forwarded", forwarded)] {
            println!(
                "{:<20} {:<10} {:>12.0} {:>9}µs {:>9}µs {:>7}",
                label,
                scenario,
                report.requests_per_second,
                report.p50.as_micros(),
                report.p99.as_micros(),
                report.errors
            );
        }
        println!(
            "{:<20} added by the hop: p50 {:+}µs, p99 {:+}µs; req/s ratio forwarded/local {:.3}",
            "",
            forwarded.p50.as_micros() as i64 - local.p50.as_micros() as i64,
            forwarded.p99.as_micros() as i64 - local.p99.as_micros() as i64,
            forwarded.requests_per_second / local.requests_per_second
        );
    }
    println!(
        "home killed: first success through the other node after {:.2} ms, {} failed requests \
         (baseline: heartbeat TTL {} ms; ratio {:.4})",
        failover.0.as_secs_f64() * 1000.0,
        failover.1,
        ttl.as_millis(),
        failover.0.as_secs_f64() / ttl.as_secs_f64()
    );
    println!(
        "region a killed: DNS names region b after {:.0} ms, first success there after {:.0} ms \
         (bound by design: member TTL + DNS poll = {} ms; ratio {:.3}); client caches add up to the 5 s TTL",
        region.0.as_secs_f64() * 1000.0,
        region.1.as_secs_f64() * 1000.0,
        region_bound.as_millis(),
        region.1.as_secs_f64() / region_bound.as_secs_f64()
    );
}
