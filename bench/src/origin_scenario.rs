//! `atoll-bench origin`: the node as a reverse proxy, beside nginx `proxy_pass` to the same
//! origin in the same run (the aim: Atoll's req/s at least nginx's).
//!
//! Rows, each `wrk` on `/hello` of one origin (a hyper server on its own runtime here):
//! 1. the origin directly (what neither proxy can beat);
//! 2. nginx (`worker_processes auto`, an upstream with keep-alive connections, HTTP/1.1
//!    to the origin) — skipped, saying so, when `nginx` is not installed
//!    (`apt-get install nginx-light`);
//! 3. a bare hyper proxy ([`crate::bare_proxy`]) on tokio's work-stealing runtime (the
//!    node's, otherwise idle then): the floor of a proxy on this stack, without Atoll's
//!    layers and without its connection workers;
//! 4. an Atoll node with the origin route (`origins = ["http://…"]`), its connections on
//!    its connection workers (a thread per core).
//!
//! Beside req/s, the CPU each proxy spent per request under the same load (user + system,
//! from `/proc`: nginx's processes, the bare proxy's runtime threads, Atoll's connection
//! workers): on a machine whose cores the load generator and the origin share, what a
//! proxy costs per request decides its req/s, and this number moves less from run to run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use atoll_testkit::origin::TestOrigin;

use crate::http_scenario::{BENCH_TOKEN, NodeSetup, get_status, read_hello, start_node};
use crate::soak_scenario::{USER_HZ, parse_task_stat};
use crate::wrk::{self, Load, WrkReport};

#[derive(clap::Args)]
pub struct OriginArgs {
    /// Seconds of load per measurement.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// Print one JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

/// A running nginx; stopped when dropped.
struct Nginx {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: the master then stops its workers (killed, it would leave
        // them running, orphaned).
        let terminated = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .is_ok_and(|status| status.success());
        if !terminated {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// CPU time (user + system) from USER_HZ ticks.
fn ticks_to_cpu(ticks: u64) -> Duration {
    Duration::from_secs_f64(ticks as f64 / USER_HZ)
}

/// CPU time of this process's threads whose name starts with `prefix`.
fn threads_cpu(prefix: &str) -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let ticks = tasks
        .flatten()
        .filter_map(|task| parse_task_stat(&std::fs::read_to_string(task.path().join("stat")).ok()?))
        .filter(|(name, _)| name.starts_with(prefix))
        .map(|(_, ticks)| ticks)
        .sum();
    ticks_to_cpu(ticks)
}

/// CPU time of process `root` and its children (nginx's master and workers); a process
/// that ended meanwhile counts nothing.
fn process_tree_cpu(root: u32) -> Duration {
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    let root = root.to_string();
    let ticks = processes
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().into_string().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // Field 4, the parent's pid, counted from the last `)` as `parse_task_stat` does.
            let ppid = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?;
            (pid == root || ppid == root).then(|| parse_task_stat(&stat).map(|(_, ticks)| ticks))?
        })
        .sum();
    ticks_to_cpu(ticks)
}

/// Runs the load, returning wrk's report and the CPU per request `cpu` says was spent.
fn measured(url: &str, load: &Load, cpu: impl Fn() -> Duration) -> Result<(WrkReport, Duration)> {
    let before = cpu();
    let report = wrk::run(url, "proxy.localhost", load)?;
    let spent = cpu().saturating_sub(before);
    let requests = (report.requests_per_second * load.duration.as_secs_f64()).max(1.0);
    Ok((report, spent.div_f64(requests)))
}

fn nginx_binary() -> Option<PathBuf> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
}

fn start_nginx(binary: &PathBuf, origin: std::net::SocketAddr) -> Result<Nginx> {
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let prefix = dir.path().display().to_string();
    let config = format!(
        "daemon off;\nmaster_process on;\nworker_processes auto;\npid {prefix}/nginx.pid;\n\
         error_log {prefix}/error.log warn;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {prefix}/body;\n  proxy_temp_path {prefix}/proxy;\n\
           fastcgi_temp_path {prefix}/fastcgi;\n  uwsgi_temp_path {prefix}/uwsgi;\n  scgi_temp_path {prefix}/scgi;\n\
           upstream origin {{ server {origin}; keepalive 256; }}\n\
           server {{\n    listen 127.0.0.1:{port};\n    location / {{\n      proxy_pass http://origin;\n\
               proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n\
               proxy_set_header X-Forwarded-For $remote_addr;\n      proxy_set_header X-Forwarded-Proto $scheme;\n    }}\n  }}\n}}\n"
    );
    let config_path = dir.path().join("nginx.conf");
    std::fs::write(&config_path, config)?;
    let child = std::process::Command::new(binary)
        .args(["-p", &prefix, "-c"])
        .arg(&config_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting nginx")?;
    Ok(Nginx {
        child,
        port,
        _dir: dir,
    })
}

fn wait_for_200(address: std::net::SocketAddr, host: &str, runtime: &tokio::runtime::Runtime) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !runtime
        .block_on(get_status(address, host, "/hello"))
        .is_ok_and(|status| status == 200)
    {
        if Instant::now() > deadline {
            bail!("{host} at {address} did not answer 200 within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub fn run(args: OriginArgs) -> Result<()> {
    let load = Load {
        threads: args.threads,
        connections: args.connections,
        duration: Duration::from_secs(args.duration),
    };
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    // The origin on a runtime of its own, as a separate server would be.
    let origin_runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("origin")
        .worker_threads(cores)
        .enable_all()
        .build()?;
    let origin = origin_runtime.block_on(TestOrigin::http());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("node")
        .worker_threads(cores)
        .enable_all()
        .build()?;
    let node = runtime.block_on(start_node(
        read_hello(None)?,
        NodeSetup {
            certs_dir: None,
            with_image: false,
        },
    ))?;
    let manifest = format!(
        "name = \"proxy\"\nroutes = [\"proxy.localhost\"]\norigins = [\"http://{}\"]\n",
        origin.address
    );
    runtime.block_on(async {
        atoll_control::RegistryClient::new(&node.registry_url, Some(BENCH_TOKEN.into()))?
            .push(&manifest, Vec::new())
            .await
    })?;
    wait_for_200(node.http, "proxy.localhost", &runtime)?;
    let nginx = match nginx_binary() {
        Some(binary) => {
            let nginx = start_nginx(&binary, origin.address)?;
            wait_for_200(
                std::net::SocketAddr::from(([127, 0, 0, 1], nginx.port)),
                "proxy.localhost",
                &runtime,
            )?;
            Some(nginx)
        }
        None => {
            eprintln!("origin: nginx is not installed (apt-get install nginx-light); its row is skipped");
            None
        }
    };
    let bare = runtime.block_on(crate::bare_proxy::start(origin.address))?;
    let warmup = Load {
        duration: Duration::from_secs(1),
        ..load.clone()
    };
    let direct_url = format!("http://{}/hello", origin.address);
    let atoll_url = format!("http://{}/hello", node.http);
    wrk::run(&direct_url, "proxy.localhost", &warmup)?;
    let direct = wrk::run(&direct_url, "proxy.localhost", &load)?;
    let nginx_report = match &nginx {
        Some(nginx) => {
            let url = format!("http://127.0.0.1:{}/hello", nginx.port);
            wrk::run(&url, "proxy.localhost", &warmup)?;
            let master = nginx.child.id();
            Some(measured(&url, &load, || process_tree_cpu(master))?)
        }
        None => None,
    };
    let bare_url = format!("http://{bare}/hello");
    wrk::run(&bare_url, "proxy.localhost", &warmup)?;
    let bare = measured(&bare_url, &load, || threads_cpu("node"))?;
    wrk::run(&atoll_url, "proxy.localhost", &warmup)?;
    let atoll = measured(&atoll_url, &load, || threads_cpu("edge"))?;
    report(&args, &direct, nginx_report.as_ref(), &bare, &atoll);
    drop(nginx);
    drop(runtime);
    drop(origin);
    drop(origin_runtime);
    Ok(())
}

fn report(
    args: &OriginArgs,
    direct: &WrkReport,
    nginx: Option<&(WrkReport, Duration)>,
    bare: &(WrkReport, Duration),
    atoll: &(WrkReport, Duration),
) {
    let cpu = |measured: &(WrkReport, Duration)| measured.1.as_secs_f64() * 1e6;
    let (nginx_cpu, bare_cpu, atoll_cpu) = (nginx.map(cpu), cpu(bare), cpu(atoll));
    let (nginx, bare, atoll) = (nginx.map(|(report, _)| report), &bare.0, &atoll.0);
    let mut rows = vec![("origin-direct", direct)];
    if let Some(nginx) = nginx {
        rows.push(("nginx-proxy-pass", nginx));
    }
    rows.push(("hyper-bare-proxy", bare));
    rows.push(("atoll-origin-route", atoll));
    if args.json {
        wrk::print_json("origin", args.connections, &rows);
        println!(
            "{}",
            serde_json::json!({
                "bench": "origin",
                "cpu_us_per_request": {
                    "nginx-proxy-pass": nginx_cpu,
                    "hyper-bare-proxy": bare_cpu,
                    "atoll-origin-route": atoll_cpu,
                },
            })
        );
        return;
    }
    wrk::print_table(
        &format!(
            "origin: wrk -t{} -c{} -d{}s",
            args.threads, args.connections, args.duration
        ),
        &rows,
    );
    if let Some(nginx) = nginx {
        println!(
            "ratio atoll/nginx req/s: {:.3}; p50 {:.2}",
            atoll.requests_per_second / nginx.requests_per_second,
            atoll.p50.as_secs_f64() / nginx.p50.as_secs_f64()
        );
    }
    if let Some(nginx) = nginx {
        println!(
            "ratio hyper-bare/nginx req/s: {:.3}",
            bare.requests_per_second / nginx.requests_per_second
        );
    }
    println!(
        "ratio atoll/hyper-bare req/s: {:.3}",
        atoll.requests_per_second / bare.requests_per_second
    );
    println!(
        "ratio atoll/direct req/s: {:.3}",
        atoll.requests_per_second / direct.requests_per_second
    );
    let nginx_cpu = nginx_cpu.map_or("-".to_string(), |us| format!("{us:.1}"));
    println!(
        "CPU per request (µs, user + system): nginx {nginx_cpu}, hyper-bare {bare_cpu:.1} (the node runtime's threads), atoll {atoll_cpu:.1} (its connection workers)"
    );
}
