//! The `atoll` binary: command-line parsing and wiring only. Each subcommand hands off to a
//! crate: `registry` to atoll-registry, `node` to atoll-router, `up` to both in one process,
//! `dns` to atoll-dns (its flags are in [`dns_cli`]),
//! and the client commands (`push`, `ls`, `versions`, `rollback`, `token`) to the registry
//! client.

mod dns_cli;

/// mimalloc rather than glibc's malloc: a request allocates and frees many small objects
/// across threads (headers, buffers, futures), where mimalloc's thread-local free lists
/// cost less (`atoll-bench origin`: the node's CPU per proxied request fell ~8%).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use atoll_control::RegistryClient;
use atoll_core::Manifest;
use atoll_isolate::Engine;
use atoll_registry::{ConnectionLimits, Registry, RegistryOptions, TokenOrigin};
use atoll_router::hop::ClusterKey;
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
        /// Open connections to the registry API; at the cap the longest-idle one is closed.
        #[arg(long, default_value_t = atoll_registry::connections::DEFAULT_MAX_CONNECTIONS)]
        registry_max_connections: usize,
        /// Time a registry client has to send a request head.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        registry_header_timeout: Duration,
        /// A registry connection with no request in flight (a watch counts) is closed after
        /// this long.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        registry_idle_timeout: Duration,
        #[command(flatten)]
        edge: EdgeArgs,
    },
    /// The function registry, on the embedded store (default) or NATS JetStream.
    Registry {
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: SocketAddr,
        /// Embedded store and token file (unused with --store nats://…).
        #[arg(long, default_value = ".atoll/registry")]
        data: PathBuf,
        /// `nats://HOST:PORT`: keep functions in NATS JetStream (KV + object store), so that
        /// several registries serve one state; needs ATOLL_TOKEN. Default: embedded at --data.
        #[arg(long)]
        store: Option<String>,
        /// Largest module a push may carry, in bytes.
        #[arg(long, default_value_t = atoll_registry::api::DEFAULT_MAX_MODULE_BYTES)]
        max_module_bytes: u64,
        /// A file of 64 hex characters (`openssl rand -hex 32`) that seals functions'
        /// secrets; without it `atoll secret set` is refused.
        #[arg(long, env = "ATOLL_SECRETS_KEY_FILE")]
        secrets_key_file: Option<PathBuf>,
        /// Open connections; at the cap the longest-idle one is closed to make room, and a
        /// new one is refused (503) when every connection has a request in flight.
        #[arg(long, default_value_t = atoll_registry::connections::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        /// Time a client has to send a request head (slowloris), e.g. 10s.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        header_timeout: Duration,
        /// A connection with no request in flight (a watch stream counts) is closed after
        /// this long.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        idle_timeout: Duration,
    },
    /// An edge node that serves the registry's functions.
    Node {
        /// The registry to follow.
        #[arg(long, default_value = "http://127.0.0.1:7070", conflicts_with = "store")]
        registry: String,
        /// `nats://HOST:PORT`: follow NATS JetStream directly (no registry needed to serve).
        #[arg(long)]
        store: Option<String>,
        /// Regions to forward to, in order, when this node's region has no node that takes
        /// work (all draining or gone), e.g. `b,c`.
        #[arg(long, value_delimiter = ',')]
        region_fallback: Vec<String>,
        /// Home nodes per function in each region: a function's requests are forwarded to
        /// these so its instances stay warm there.
        #[arg(long, default_value_t = atoll_router::cluster::DEFAULT_HOME_REPLICAS)]
        home_replicas: usize,
        /// After SIGTERM, how long a node with peers keeps accepting (and forwarding) while
        /// it announces that it drains, before it stops.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        drain_delay: Duration,
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
        /// Secret every node of the cluster shares (16 bytes or more): signs the hop header
        /// of forwarded requests, so only peers are believed about the client. Default:
        /// derived from the token.
        #[arg(long, env = "ATOLL_CLUSTER_KEY", hide_env_values = true)]
        cluster_key: Option<String>,
        /// Read the cluster key from this file instead.
        #[arg(long, conflicts_with = "cluster_key")]
        cluster_key_file: Option<PathBuf>,
        #[command(flatten)]
        edge: EdgeArgs,
    },
    /// Authoritative DNS for the cluster: routed domains answer with the healthy nodes of
    /// the client's region, falling back to the next region.
    Dns(dns_cli::DnsArgs),
    /// Push a function: PATH is an atoll.toml or a folder holding one.
    Push {
        path: PathBuf,
        /// Keep serving what is served: the new version joins the traffic split at 0%,
        /// prepared on every node and reached only with `x-atoll-version: N`, until
        /// `atoll traffic` gives it a share.
        #[arg(long)]
        no_traffic: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List functions.
    Ls {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the cluster's nodes with their health.
    Nodes {
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
    /// Gray release: share a function's requests between versions, e.g. `v7=90 v8=10`
    /// (whole percentages adding up to 100; every node chooses alike, the newest version's
    /// users stay on it as its share grows).
    Traffic {
        name: String,
        /// VERSION=PERCENT, e.g. `v7=90 v8=10`.
        #[arg(required = true)]
        shares: Vec<String>,
        /// What keeps a client on one version: `header:NAME`, `cookie:NAME` or `ip`
        /// (default: each request draws). Each `atoll traffic` sets the whole split, this
        /// key too: give it at every step, or the users are drawn anew.
        #[arg(long)]
        sticky: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// End a gray release: all traffic to VERSION (e.g. `v8`).
    Promote {
        name: String,
        version: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Mint, list and revoke scoped tokens (needs an admin token, such as the registry's own).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Functions' secrets: environment variables sealed at rest (needs --secrets-key-file
    /// on the registry and the nodes).
    Secret {
        #[command(subcommand)]
        command: SecretCommand,
    },
    /// Read and change functions' key-value stores (a registry on the embedded store).
    Kv {
        #[command(subcommand)]
        command: KvCommand,
    },
    /// A function's last scheduled runs (`[[cron]]`): tick, node, outcome, newest first.
    Cron {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum SecretCommand {
    /// Set a secret from stdin (never from the command line, which others can read); the
    /// function sees it as the environment variable KEY.
    Set {
        name: String,
        key: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List a function's secrets (names only: values are never shown).
    Ls {
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a secret.
    Rm {
        name: String,
        key: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum KvCommand {
    /// Print a key's value (raw bytes on stdout; its revision on stderr).
    Get {
        store: String,
        key: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Set a key: VALUE, or stdin when VALUE is absent.
    Set {
        store: String,
        key: String,
        value: Option<String>,
        /// Expire after this long, e.g. 10m.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Only if the key is at this revision (0: only if it does not exist).
        #[arg(long)]
        if_revision: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Add N (default 1) to a key's integer value.
    Incr {
        store: String,
        key: String,
        #[arg(default_value_t = 1, allow_negative_numbers = true)]
        by: i64,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List keys, optionally by prefix.
    Ls {
        store: String,
        #[arg(default_value = "")]
        prefix: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a key.
    Rm {
        store: String,
        key: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Mint a token: prints it on stdout, once (the registry keeps only its hash).
    Create {
        /// `admin` (everything), `deploy` (its functions on its domains) or `node`
        /// (heartbeats, watch, modules).
        #[arg(long)]
        scope: atoll_core::auth::Scope,
        /// deploy: the functions it may push and roll back, as name patterns, e.g. 'shop-*'.
        #[arg(long, value_delimiter = ',')]
        functions: Vec<String>,
        /// deploy: the hosts its routes may use, e.g. 'shop.example.com,*.shop.example.com'.
        #[arg(long, value_delimiter = ',')]
        domains: Vec<String>,
        /// node: the only node name it may announce.
        #[arg(long)]
        node: Option<String>,
        /// A note: who holds it, what for.
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List minted tokens (ids and scopes; never the tokens).
    Ls {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revoke a token by id: it stops working at once.
    Revoke {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// The node's ingress: TLS, HTTP/3, ACME and the limits on clients.
#[derive(Args)]
struct EdgeArgs {
    /// CA certificates (PEM) that functions' outbound HTTPS trusts beside the system's,
    /// e.g. an internal CA.
    #[arg(long)]
    outbound_ca: Option<PathBuf>,
    /// Whether a host a manifest lists by exact name or address in [outbound] may be an
    /// internal address (loopback, private): `listed` (default) or `deny` (never, for
    /// nodes whose tenants must not reach this network). Link-local and cloud metadata
    /// addresses are never reached.
    #[arg(long, default_value = "listed", value_parser = ["listed", "deny"])]
    outbound_internal: String,
    /// A file of 64 hex characters (`openssl rand -hex 32`) that opens functions'
    /// secrets (and, for `atoll up`, seals them); the registry's and the nodes' must match.
    #[arg(long, env = "ATOLL_SECRETS_KEY_FILE")]
    secrets_key_file: Option<PathBuf>,
    /// Serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN) here; needs --certs or --acme-directory.
    #[arg(long)]
    tls_listen: Option<SocketAddr>,
    /// Serve HTTP/3 on this UDP address (default: the --tls-listen address).
    #[arg(long)]
    quic_listen: Option<SocketAddr>,
    /// Do not serve HTTP/3.
    #[arg(long)]
    no_http3: bool,
    /// Do not serve cleartext HTTP (only TLS and QUIC).
    #[arg(long)]
    no_cleartext: bool,
    /// Directory of PEM pairs NAME.crt + NAME.key, chosen by SNI and reloaded on change.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// ACME directory URL: obtain certificates for every routed domain.
    #[arg(long)]
    acme_directory: Option<String>,
    /// Contact address for the ACME account.
    #[arg(long)]
    acme_email: Option<String>,
    /// PEM CA certificate to trust for the ACME server's TLS (pebble, step-ca).
    #[arg(long)]
    acme_ca_cert: Option<PathBuf>,
    /// ACME challenge: tls-alpn-01 (on the TLS listener) or http-01 (on the HTTP listener).
    #[arg(long, default_value = "tls-alpn-01", value_parser = ["tls-alpn-01", "http-01"])]
    acme_challenge: String,
    /// Open connections per listener.
    #[arg(long, default_value_t = 10_000)]
    max_connections: usize,
    /// Time a client has to send a request head (slowloris), e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    header_timeout: Duration,
    /// A connection with no request in flight is closed after this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// Time to finish a TLS handshake.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    tls_handshake_timeout: Duration,
    /// Request line plus headers, in bytes (431 beyond).
    #[arg(long, default_value_t = 32 * 1024)]
    max_header_bytes: usize,
    /// Number of request header fields (431 beyond).
    #[arg(long, default_value_t = 100)]
    max_headers: usize,
    /// Request target length in bytes (414 beyond).
    #[arg(long, default_value_t = 8 * 1024)]
    max_uri_bytes: usize,
    /// Request body size in bytes (413 beyond).
    #[arg(long, default_value_t = atoll_router::service::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Longest wait for the next part of a request body (408 and the connection closed).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    body_timeout: Duration,
    /// Concurrent streams per HTTP/2 or HTTP/3 connection.
    #[arg(long, default_value_t = 100)]
    max_concurrent_streams: u32,
    /// How long in-flight requests get to finish after SIGTERM.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// QUIC handshakes in progress beyond which new clients get a Retry (0: always).
    #[arg(long, default_value_t = atoll_router::node::DEFAULT_QUIC_RETRY_THRESHOLD)]
    quic_retry_threshold: usize,
    /// The IP peers and DNS reach this node at (default: the listen address).
    #[arg(long)]
    advertise: Option<std::net::IpAddr>,
    /// Ceiling over every function's `[limits] memory` on this node (e.g. 512MiB).
    #[arg(long, default_value = "4GiB", value_parser = atoll_core::manifest::parse_size)]
    max_function_memory: u64,
    /// Ceiling over every function's `[limits] timeout` on this node.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    max_function_timeout: Duration,
    /// Ceiling over every function's `[limits] response` on this node.
    #[arg(long, default_value = "128MiB", value_parser = atoll_core::manifest::parse_size)]
    max_function_response: u64,
    /// Ceiling over every function's `[scale] max_concurrency` on this node.
    #[arg(long, default_value_t = atoll_core::manifest::MAX_CONCURRENCY)]
    max_function_concurrency: u32,
    /// Threads serving HTTP and HTTPS connections, each connection on one for its whole
    /// life (default: one per core; 0: the node's shared runtime; at most 1024).
    #[arg(long, value_parser = clap::value_parser!(u16).range(0..=1024))]
    connection_threads: Option<u16>,
}

impl EdgeArgs {
    /// Fills the ingress part of `options`.
    fn apply(&self, options: &mut atoll_router::NodeOptions) -> Result<()> {
        options.secrets_key = secrets_key(self.secrets_key_file.as_deref())?;
        options.certs_dir = self.certs.clone();
        options.outbound_ca = self.outbound_ca.clone();
        options.outbound_internal = if self.outbound_internal == "deny" {
            atoll_isolate::outbound::InternalPolicy::Deny
        } else {
            atoll_isolate::outbound::InternalPolicy::Listed
        };
        options.acme = self
            .acme_directory
            .as_ref()
            .map(|directory| atoll_ingress::acme::AcmeOptions {
                directory: directory.clone(),
                email: self.acme_email.clone(),
                ca_cert: self.acme_ca_cert.clone(),
                challenge: if self.acme_challenge == "http-01" {
                    atoll_ingress::acme::ChallengeKind::Http01
                } else {
                    atoll_ingress::acme::ChallengeKind::TlsAlpn01
                },
                state_dir: options.data_dir.join("acme"),
            });
        options.limits = atoll_ingress::server::ServerLimits {
            max_connections: self.max_connections,
            tls_handshake_timeout: self.tls_handshake_timeout,
            header_read_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            max_header_bytes: self.max_header_bytes,
            max_headers: self.max_headers,
            max_uri_bytes: self.max_uri_bytes,
            max_concurrent_streams: self.max_concurrent_streams,
            shutdown_grace: self.shutdown_grace,
            ..Default::default()
        };
        options.max_body_bytes = self.max_body_bytes;
        options.body_timeout = self.body_timeout;
        options.ceilings = atoll_router::sync::FunctionCeilings {
            memory_bytes: self.max_function_memory,
            timeout: self.max_function_timeout,
            response_bytes: self.max_function_response,
            max_concurrency: self.max_function_concurrency,
            ..Default::default()
        };
        options.quic_retry_threshold = self.quic_retry_threshold;
        options.advertise = self.advertise;
        if let Some(threads) = self.connection_threads {
            options.connection_workers = usize::from(threads);
        }
        Ok(())
    }

    /// Binds the node's sockets and prints where each listens.
    async fn bind(&self, listen: SocketAddr, admin: SocketAddr) -> Result<atoll_router::NodeListeners> {
        let http = if self.no_cleartext {
            None
        } else {
            let listener = bind(listen).await?;
            println!("node listening on http://{}", listener.local_addr()?);
            Some(listener)
        };
        let tls = match self.tls_listen {
            Some(address) => {
                let listener = bind(address).await?;
                println!("node listening on https://{}", listener.local_addr()?);
                Some(listener)
            }
            None => None,
        };
        let quic = match (&tls, self.no_http3) {
            (Some(tls), false) => {
                let address = match self.quic_listen {
                    Some(address) => address,
                    None => tls.local_addr()?,
                };
                let socket =
                    std::net::UdpSocket::bind(address).with_context(|| format!("binding UDP {address}"))?;
                println!("node listening on h3://{}", socket.local_addr()?);
                Some(socket)
            }
            _ => None,
        };
        let admin = bind(admin).await?;
        println!("admin listening on http://{}", admin.local_addr()?);
        Ok(atoll_router::NodeListeners {
            http,
            tls,
            quic,
            admin,
        })
    }
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
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rustls=error"));
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
            registry_max_connections,
            registry_header_timeout,
            registry_idle_timeout,
            edge,
        } => {
            let limits = registry_limits(
                "--registry-max-connections",
                registry_max_connections,
                registry_header_timeout,
                registry_idle_timeout,
            )?;
            up(listen, registry_listen, admin, data, limits, edge).await
        }
        Command::Registry {
            listen,
            data,
            store,
            max_module_bytes,
            secrets_key_file,
            max_connections,
            header_timeout,
            idle_timeout,
        } => {
            let secrets_key = secrets_key(secrets_key_file.as_deref())?;
            let limits = registry_limits("--max-connections", max_connections, header_timeout, idle_timeout)?;
            let engine = Engine::new()?;
            let registry = match store {
                None => open_registry(&data, engine, max_module_bytes, secrets_key)?.0,
                Some(url) => open_nats_registry(&url, engine, max_module_bytes, secrets_key).await?,
            };
            let listener = bind(listen).await?;
            println!("registry listening on http://{}", listener.local_addr()?);
            atoll_registry::serve_with(listener, registry, limits, shutdown_signal()).await?;
            Ok(())
        }
        Command::Node {
            registry,
            store,
            region_fallback,
            home_replicas,
            drain_delay,
            listen,
            admin,
            data,
            name,
            region,
            token,
            cluster_key,
            cluster_key_file,
            edge,
        } => {
            let cluster_key = match (cluster_key, cluster_key_file) {
                (Some(key), _) => Some(ClusterKey::new(key.as_bytes()).context("--cluster-key")?),
                (None, Some(path)) => Some(ClusterKey::from_file(&path)?),
                (None, None) => None,
            };
            let engine = Engine::new()?;
            let listeners = edge.bind(listen, admin).await?;
            let mut options = atoll_router::NodeOptions::new(data, registry);
            options.token = token;
            options.name = name.unwrap_or_else(default_node_name);
            options.region = region;
            options.nats_url = store;
            options.region_fallback = region_fallback;
            options.home_replicas = home_replicas.max(1);
            options.drain_delay = drain_delay;
            options.cluster_key = cluster_key;
            edge.apply(&mut options)?;
            atoll_router::run(options, engine, listeners, shutdown_signal()).await?;
            Ok(())
        }
        Command::Dns(args) => dns_cli::run(args, shutdown_signal()).await,
        Command::Push {
            path,
            no_traffic,
            client,
        } => {
            let (manifest_text, module) = read_function(&path)?;
            let pushed = client
                .client()?
                .push_with_traffic(&manifest_text, module, !no_traffic)
                .await?;
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
        Command::Nodes { client } => {
            let nodes = client.client()?.nodes().await?;
            println!(
                "{:<20} {:<12} {:<9} {:>8} {:>9}  {:<16} ADDRESS",
                "NAME", "REGION", "HEALTH", "AGE", "IN-FLIGHT", "SYNC"
            );
            for node in nodes {
                let address = node
                    .announcement
                    .http
                    .or(node.announcement.https)
                    .map_or_else(|| "-".to_string(), |address| address.to_string());
                // In sync, or how far behind: revisions not applied, versions quarantined.
                let sync = match (node.announcement.sync_lag, node.announcement.quarantined) {
                    (0, 0) => "ok".to_string(),
                    (lag, quarantined) => format!("lag={lag},q={quarantined}"),
                };
                println!(
                    "{:<20} {:<12} {:<9} {:>8} {:>9}  {sync:<16} {address}",
                    node.announcement.name,
                    node.announcement.region,
                    node.health.as_str(),
                    format!("{:.1}s", node.age_ms as f64 / 1000.0),
                    node.announcement.in_flight,
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
            if let Some(split) = versions.traffic {
                println!("traffic: {}", describe_split(&split));
            }
            Ok(())
        }
        Command::Traffic {
            name,
            shares,
            sticky,
            client,
        } => {
            let shares = shares
                .iter()
                .map(|share| {
                    let (version, percent) = share
                        .split_once('=')
                        .with_context(|| format!("`{share}` is not VERSION=PERCENT (e.g. v8=10)"))?;
                    let percent = percent
                        .trim_end_matches('%')
                        .parse::<u8>()
                        .with_context(|| format!("`{percent}` in `{share}` is not a percentage 0-100"))?;
                    Ok(atoll_core::traffic::Share {
                        version: parse_version(version)?,
                        percent,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let sticky = sticky
                .map(|key| key.parse::<atoll_core::traffic::StickyKey>())
                .transpose()
                .map_err(|e| anyhow::anyhow!(e))?;
            let request = atoll_core::api_types::TrafficRequest { shares, sticky };
            let answer = client.client()?.traffic(&name, &request).await?;
            print_traffic(&answer);
            Ok(())
        }
        Command::Promote {
            name,
            version,
            client,
        } => {
            let request = atoll_core::api_types::TrafficRequest {
                shares: vec![atoll_core::traffic::Share {
                    version: parse_version(&version)?,
                    percent: 100,
                }],
                sticky: None,
            };
            let answer = client.client()?.traffic(&name, &request).await?;
            print_traffic(&answer);
            Ok(())
        }
        Command::Token { command } => token_command(command).await,
        Command::Kv { command } => kv_command(command).await,
        Command::Secret { command } => secret_command(command).await,
        Command::Cron { name, client } => {
            let runs = client.client()?.cron_runs(&name).await?;
            if runs.is_empty() {
                println!("no runs of {name} yet");
                return Ok(());
            }
            println!(
                "{:<22} {:>5} {:<24} {:<16} {:<9} {:>9}",
                "TICK (UTC)", "ENTRY", "PATH", "NODE", "OUTCOME", "DURATION"
            );
            for run in runs {
                let tick =
                    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(run.tick));
                let outcome = match run.outcome {
                    atoll_core::cron::Outcome::Running => "running".to_string(),
                    atoll_core::cron::Outcome::Skipped => "skipped".to_string(),
                    atoll_core::cron::Outcome::Status(status) => status.to_string(),
                };
                let duration = run.duration_ms.map_or_else(String::new, |ms| format!("{ms}ms"));
                println!(
                    "{:<22} {:>5} {:<24} {:<16} {:<9} {:>9}",
                    tick.to_string(),
                    run.entry,
                    run.path,
                    run.node,
                    outcome,
                    duration
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

/// `v8=10% v7=90% (sticky: header:x-user)`.
fn describe_split(split: &atoll_core::traffic::TrafficSplit) -> String {
    let shares: Vec<String> = split
        .shares
        .iter()
        .map(|share| format!("v{}={}%", share.version, share.percent))
        .collect();
    match &split.sticky {
        Some(key) => format!("{} (sticky: {key})", shares.join(" ")),
        None => shares.join(" "),
    }
}

fn print_traffic(answer: &atoll_core::api_types::TrafficResponse) {
    match &answer.traffic {
        Some(split) => println!("{}: {}", answer.name, describe_split(split)),
        None => println!("{}: all traffic to v{}", answer.name, answer.active),
    }
}

/// `atoll token create|ls|revoke`.
async fn token_command(command: TokenCommand) -> Result<()> {
    match command {
        TokenCommand::Create {
            scope,
            functions,
            domains,
            node,
            description,
            client,
        } => {
            let domains = domains
                .iter()
                .map(|domain| {
                    domain
                        .parse::<atoll_core::HostPattern>()
                        .with_context(|| format!("--domains {domain:?}"))
                })
                .collect::<Result<Vec<_>>>()?;
            let grant = atoll_core::auth::Grant {
                scope,
                functions,
                domains,
                node,
                description,
            };
            grant.validate().map_err(anyhow::Error::msg)?;
            let created = client.client()?.create_token(&grant).await?;
            eprintln!(
                "minted token {} ({}); this is the only time it is shown:",
                created.info.id,
                created.info.grant.summary()
            );
            println!("{}", created.token);
            Ok(())
        }
        TokenCommand::Ls { client } => {
            let tokens = client.client()?.tokens().await?;
            println!("{:<16}  {:<20}  {:<40}  DESCRIPTION", "ID", "CREATED", "GRANT");
            for token in tokens {
                println!(
                    "{:<16}  {:<20}  {:<40}  {}",
                    token.id,
                    token.created_at,
                    token.grant.summary(),
                    token.grant.description
                );
            }
            Ok(())
        }
        TokenCommand::Revoke { id, client } => {
            client.client()?.revoke_token(&id).await?;
            println!("revoked {id}");
            Ok(())
        }
    }
}

/// `atoll up`: registry and node in one process, `hello` deployed.
async fn up(
    listen: SocketAddr,
    registry_listen: SocketAddr,
    admin: SocketAddr,
    data: PathBuf,
    registry_limits: ConnectionLimits,
    edge: EdgeArgs,
) -> Result<()> {
    let engine = Engine::new()?;
    let (registry, token) = open_registry(
        &data.join("registry"),
        engine.clone(),
        atoll_registry::api::DEFAULT_MAX_MODULE_BYTES,
        secrets_key(edge.secrets_key_file.as_deref())?,
    )?;
    // The node in this process calls the registry's KV store directly.
    let local_kv = registry.kv();
    let registry_listener = bind(registry_listen).await?;
    let registry_listener_port = registry_listener.local_addr()?.port();
    let registry_url = format!("http://{}", registry_listener.local_addr()?);
    println!("registry listening on {registry_url}");
    let listeners = edge.bind(listen, admin).await?;
    let node_address = match (&listeners.http, &listeners.tls) {
        (Some(http), _) => http.local_addr()?,
        (None, Some(tls)) => tls.local_addr()?,
        (None, None) => bail!("the node needs an HTTP or a TLS listener"),
    };

    let (stop_sender, stop) = tokio::sync::watch::channel(false);
    let stopped = |mut receiver: tokio::sync::watch::Receiver<bool>| async move {
        let _ = receiver.wait_for(|stop| *stop).await;
    };
    let registry_task = tokio::spawn(atoll_registry::serve_with(
        registry_listener,
        registry,
        registry_limits,
        stopped(stop.clone()),
    ));
    let mut options = atoll_router::NodeOptions::new(data.join("node"), registry_url.clone());
    options.token = Some(token.clone());
    options.name = default_node_name();
    options.kv = local_kv;
    options.other_ports = vec![registry_listener_port];
    edge.apply(&mut options)?;
    let node_task = tokio::spawn(atoll_router::run(
        options,
        engine,
        listeners,
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

/// The registry's limits on connections, from its flags.
fn registry_limits(
    flag: &str,
    max_connections: usize,
    header_read_timeout: Duration,
    idle_timeout: Duration,
) -> Result<ConnectionLimits> {
    if max_connections == 0 {
        bail!("{flag} must be at least 1");
    }
    Ok(ConnectionLimits {
        max_connections,
        header_read_timeout,
        idle_timeout,
        ..ConnectionLimits::default()
    })
}

/// The secrets key in `path`, if one is given.
fn secrets_key(path: Option<&Path>) -> Result<Option<Arc<atoll_core::secrets::SecretKey>>> {
    path.map(|path| {
        atoll_core::secrets::SecretKey::from_file(path)
            .map(Arc::new)
            .map_err(|error| anyhow::anyhow!(error))
    })
    .transpose()
}

fn open_registry(
    data: &Path,
    engine: Engine,
    max_module_bytes: u64,
    secrets_key: Option<Arc<atoll_core::secrets::SecretKey>>,
) -> Result<(Arc<Registry>, String)> {
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
        secrets_key,
        ..RegistryOptions::default()
    };
    let registry = Registry::open(
        data,
        std::sync::Arc::new(atoll_isolate::PushCheck::new(engine)),
        token.clone(),
        options,
    )
    .with_context(|| format!("opening the store in {}", data.display()))?;
    Ok((Arc::new(registry), token))
}

/// A registry on NATS JetStream: stateless, so the token comes from ATOLL_TOKEN, shared by
/// every registry on the cluster.
async fn open_nats_registry(
    url: &str,
    engine: Engine,
    max_module_bytes: u64,
    secrets_key: Option<Arc<atoll_core::secrets::SecretKey>>,
) -> Result<Arc<Registry>> {
    if !url.starts_with("nats://") {
        bail!("--store {url:?}: expected nats://HOST:PORT");
    }
    let token = std::env::var(atoll_registry::token::TOKEN_ENV)
        .ok()
        .map(|token| token.trim().to_string())
        .filter(|token| !token.is_empty())
        .context("--store nats://… needs ATOLL_TOKEN (every registry on the cluster shares it)")?;
    println!("token: from ATOLL_TOKEN");
    let store = atoll_control::NatsStore::connect(url)
        .await
        .with_context(|| format!("opening the NATS store at {url}"))?;
    println!("store: NATS JetStream at {url}");
    let options = RegistryOptions {
        max_module_bytes,
        secrets_key,
        ..RegistryOptions::default()
    };
    let backend = atoll_registry::Backend::Nats(store);
    Ok(Arc::new(Registry::with_backend(
        backend,
        std::sync::Arc::new(atoll_isolate::PushCheck::new(engine)),
        token,
        options,
    )))
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
    if manifest.is_origin_only() {
        return Ok((manifest_text, Vec::new()));
    }
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

/// `atoll secret set|ls|rm`.
async fn secret_command(command: SecretCommand) -> Result<()> {
    use std::io::Read;
    match command {
        SecretCommand::Set { name, key, client } => {
            let mut value = Vec::new();
            std::io::stdin()
                .read_to_end(&mut value)
                .context("reading the secret from stdin")?;
            // `echo value |` adds a newline nobody means as part of the secret.
            if value.last() == Some(&b'\n') {
                value.pop();
                if value.last() == Some(&b'\r') {
                    value.pop();
                }
            }
            client.client()?.secret_set(&name, &key, value).await?;
            println!("{name}: secret {key} set");
        }
        SecretCommand::Ls { name, client } => {
            for key in client.client()?.secret_list(&name).await?.secrets {
                println!("{key}");
            }
        }
        SecretCommand::Rm { name, key, client } => {
            client.client()?.secret_remove(&name, &key).await?;
            println!("{name}: secret {key} removed");
        }
    }
    Ok(())
}

async fn kv_command(command: KvCommand) -> Result<()> {
    use std::io::{Read, Write};
    match command {
        KvCommand::Get { store, key, client } => {
            let entry = client
                .client()?
                .kv_get(&store, &key)
                .await?
                .with_context(|| format!("no key {key:?} in store {store}"))?;
            std::io::stdout().write_all(&entry.value)?;
            eprintln!("revision {}", entry.revision);
            Ok(())
        }
        KvCommand::Set {
            store,
            key,
            value,
            ttl,
            if_revision,
            client,
        } => {
            let value = match value {
                Some(value) => value.into_bytes(),
                None => {
                    let mut bytes = Vec::new();
                    std::io::stdin().read_to_end(&mut bytes)?;
                    bytes
                }
            };
            let ttl = ttl.map(|ttl| ttl.as_secs().max(1));
            let written = client
                .client()?
                .kv_set(&store, &key, value, ttl, if_revision)
                .await?;
            println!("revision {}", written.revision);
            Ok(())
        }
        KvCommand::Incr {
            store,
            key,
            by,
            client,
        } => {
            let written = client.client()?.kv_increment(&store, &key, by).await?;
            println!("{}", written.value.unwrap_or_default());
            Ok(())
        }
        KvCommand::Ls {
            store,
            prefix,
            client,
        } => {
            let client = client.client()?;
            let mut cursor: Option<String> = None;
            loop {
                let page = client
                    .kv_list(&store, &prefix, cursor.as_deref(), atoll_core::kv::MAX_LIST_KEYS)
                    .await?;
                for key in &page.keys {
                    println!("{key}");
                }
                match page.cursor {
                    Some(next) => cursor = Some(next),
                    None => return Ok(()),
                }
            }
        }
        KvCommand::Rm { store, key, client } => {
            if !client.client()?.kv_delete(&store, &key).await? {
                bail!("no key {key:?} in store {store}");
            }
            Ok(())
        }
    }
}
