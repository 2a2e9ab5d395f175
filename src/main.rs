//! The `atoll` binary: command-line parsing and wiring only. Each subcommand hands off to a
//! crate: `registry` to atoll-registry, `node` to atoll-router, `up` to both in one process,
//! and the client commands (`push`, `ls`, `versions`, `rollback`) to the registry client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use atoll_isolate::Engine;
use atoll_registry::{Manifest, Registry, RegistryClient, RegistryOptions, TokenOrigin};
use clap::{Args, Parser, Subcommand};
use tokio::net::TcpListener;

/// The bundled `hello` example, built from `examples/hello` by build.rs.
const HELLO_WASM: &[u8] = include_bytes!(concat!(env!("ATOLL_EXAMPLES_WASM_DIR"), "/hello.wasm"));
const HELLO_MANIFEST: &str = r#"name = "hello"
wasm = "hello.wasm"
routes = ["hello.localhost"]

[env]
GREETING = "Hello"
"#;

#[derive(Parser)]
#[command(name = "atoll", version, about = "Edge functions on machines you own")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Registry and node in one process on the embedded store; deploys `hello`.
    Up {
        /// Where the node serves HTTP traffic.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Where the registry API listens.
        #[arg(long, default_value = "127.0.0.1:7070")]
        registry_listen: SocketAddr,
        /// Where the node's admin endpoints (/healthz, /readyz, /metrics) listen.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
        /// State directory (registry store, node cache).
        #[arg(long, default_value = ".atoll")]
        data: PathBuf,
    },
    /// The function registry on the embedded store.
    Registry {
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        #[arg(long, default_value = ".atoll/registry")]
        data: PathBuf,
        /// Largest module a push may carry, in bytes.
        #[arg(long, default_value_t = atoll_registry::api::DEFAULT_MAX_MODULE_BYTES)]
        max_module_bytes: u64,
    },
    /// An edge node that serves the registry's functions.
    Node {
        /// The registry to follow.
        #[arg(long, default_value = "http://127.0.0.1:7070")]
        registry: String,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
        #[arg(long, default_value = ".atoll/node")]
        data: PathBuf,
        /// The node's name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value = "default")]
        region: String,
        /// Registry token (default: $ATOLL_TOKEN).
        #[arg(long, env = "ATOLL_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Push a function: PATH is an atoll.toml or a folder holding one.
    Push {
        path: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List functions.
    Ls {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List a function's versions.
    Versions {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Serve an earlier version (default: the one before the active one).
    Rollback {
        name: String,
        /// Version to serve, e.g. `v2` or `2`.
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Args)]
struct ClientArgs {
    /// Registry URL.
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    registry: String,
    /// Registry token (default: $ATOLL_TOKEN).
    #[arg(long, env = "ATOLL_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl ClientArgs {
    fn client(&self) -> Result<RegistryClient> {
        Ok(RegistryClient::new(&self.registry, self.token.clone())?)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let is_server = matches!(
        cli.command,
        Command::Up { .. } | Command::Registry { .. } | Command::Node { .. }
    );
    if is_server {
        init_logging();
    }
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line: the chain of causes, outermost first.
            let message = error
                .chain()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ATOLL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Up {
            listen,
            registry_listen,
            admin,
            data,
        } => up(listen, registry_listen, admin, data).await,
        Command::Registry {
            listen,
            data,
            max_module_bytes,
        } => {
            let engine = Engine::new()?;
            let (registry, _token) = open_registry(&data, engine, max_module_bytes)?;
            let listener = bind(listen).await?;
            println!("registry listening on http://{}", listener.local_addr()?);
            atoll_registry::serve(listener, registry, shutdown_signal()).await?;
            Ok(())
        }
        Command::Node {
            registry,
            listen,
            admin,
            data,
            name,
            region,
            token,
        } => {
            let engine = Engine::new()?;
            let listener = bind(listen).await?;
            let admin = bind(admin).await?;
            println!("node listening on http://{}", listener.local_addr()?);
            println!("admin listening on http://{}", admin.local_addr()?);
            let options = atoll_router::NodeOptions {
                data_dir: data,
                registry_url: registry,
                token,
                name: name.unwrap_or_else(default_node_name),
                region,
            };
            atoll_router::run(options, engine, listener, admin, shutdown_signal()).await?;
            Ok(())
        }
        Command::Push { path, client } => {
            let (manifest_text, module) = read_function(&path)?;
            let pushed = client.client()?.push(&manifest_text, module).await?;
            println!("{} v{} sha256:{}", pushed.name, pushed.version, pushed.sha256);
            Ok(())
        }
        Command::Ls { client } => {
            let functions = client.client()?.list().await?;
            println!("{:<24} {:>7} {:>9}  ROUTES", "NAME", "ACTIVE", "VERSIONS");
            for function in functions {
                println!(
                    "{:<24} {:>7} {:>9}  {}",
                    function.name,
                    format!("v{}", function.active),
                    function.versions,
                    function.routes.join(", ")
                );
            }
            Ok(())
        }
        Command::Versions { name, client } => {
            let versions = client.client()?.versions(&name).await?;
            println!("{:<8} {:<7} {:<20} SHA256", "VERSION", "ACTIVE", "CREATED");
            for version in versions.versions {
                println!(
                    "{:<8} {:<7} {:<20} {}",
                    format!("v{}", version.version),
                    if version.version == versions.active {
                        "*"
                    } else {
                        ""
                    },
                    version.created_at,
                    version.sha256
                );
            }
            Ok(())
        }
        Command::Rollback { name, to, client } => {
            let to = to.as_deref().map(parse_version).transpose()?;
            let rolled = client.client()?.rollback(&name, to).await?;
            println!("{} v{} sha256:{}", rolled.name, rolled.active, rolled.sha256);
            Ok(())
        }
    }
}

/// `atoll up`: registry and node in one process, `hello` deployed.
async fn up(listen: SocketAddr, registry_listen: SocketAddr, admin: SocketAddr, data: PathBuf) -> Result<()> {
    let engine = Engine::new()?;
    let (registry, token) = open_registry(
        &data.join("registry"),
        engine.clone(),
        atoll_registry::api::DEFAULT_MAX_MODULE_BYTES,
    )?;
    let registry_listener = bind(registry_listen).await?;
    let registry_url = format!("http://{}", registry_listener.local_addr()?);
    let node_listener = bind(listen).await?;
    let admin_listener = bind(admin).await?;
    let node_address = node_listener.local_addr()?;
    println!("registry listening on {registry_url}");
    println!("node listening on http://{node_address}");
    println!("admin listening on http://{}", admin_listener.local_addr()?);

    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    let stopped = |mut receiver: tokio::sync::watch::Receiver<bool>| async move {
        let _ = receiver.wait_for(|stop| *stop).await;
    };
    let registry_task = tokio::spawn(atoll_registry::serve(
        registry_listener,
        registry,
        stopped(stop.clone()),
    ));
    let options = atoll_router::NodeOptions {
        data_dir: data.join("node"),
        registry_url: registry_url.clone(),
        token: Some(token.clone()),
        name: default_node_name(),
        region: "default".into(),
    };
    let node_task = tokio::spawn(atoll_router::run(
        options,
        engine,
        node_listener,
        admin_listener,
        stopped(stop.clone()),
    ));

    let client = RegistryClient::new(&registry_url, Some(token))?;
    let deployed = client.list().await?;
    if !deployed.iter().any(|function| function.name == "hello") {
        let pushed = client.push(HELLO_MANIFEST, HELLO_WASM.to_vec()).await?;
        println!(
            "deployed {} v{} sha256:{}",
            pushed.name, pushed.version, pushed.sha256
        );
    }
    let port = node_address.port();
    println!(
        "hello: http://hello.localhost:{port}/  (or: curl -H 'Host: hello.localhost' http://{node_address}/)"
    );

    shutdown_signal().await;
    let _ = stop_sender.send(true);
    node_task.await??;
    registry_task.await??;
    Ok(())
}

fn open_registry(data: &Path, engine: Engine, max_module_bytes: u64) -> Result<(Arc<Registry>, String)> {
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let (token, origin) =
        atoll_registry::load_or_create(data).with_context(|| format!("token in {}", data.display()))?;
    match origin {
        TokenOrigin::Env => println!("token: from ATOLL_TOKEN"),
        TokenOrigin::File(path) => println!("token: read from {}", path.display()),
        TokenOrigin::Generated(path) => {
            println!("token: generated and written to {} (mode 0600)", path.display())
        }
    }
    let options = RegistryOptions {
        max_module_bytes,
        ..RegistryOptions::default()
    };
    let registry = Registry::open(data, engine, token.clone(), options)
        .with_context(|| format!("opening the store in {}", data.display()))?;
    Ok((Arc::new(registry), token))
}

/// Reads a function folder or manifest: the manifest text and the module it names.
fn read_function(path: &Path) -> Result<(String, Vec<u8>)> {
    let manifest_path = if path.is_dir() {
        path.join("atoll.toml")
    } else {
        path.to_path_buf()
    };
    let manifest_text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let manifest = Manifest::parse(&manifest_text).with_context(|| manifest_path.display().to_string())?;
    let wasm_path = manifest_path
        .parent()
        .unwrap_or(Path::new("."))
        .join(&manifest.wasm);
    let module =
        std::fs::read(&wasm_path).with_context(|| format!("reading the module {}", wasm_path.display()))?;
    Ok((manifest_text, module))
}

fn parse_version(text: &str) -> Result<u64> {
    let digits = text.strip_prefix('v').unwrap_or(text);
    match digits.parse::<u64>() {
        Ok(version) if version > 0 => Ok(version),
        _ => bail!("`{text}` is not a version (expected v1, v2, …)"),
    }
}

async fn bind(address: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("binding {address}"))
}

fn default_node_name() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|name| name.trim().to_string())
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "node".into())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}
