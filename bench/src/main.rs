//! atoll-bench: measures Atoll side by side with a baseline in the same run.
//!
//! Every scenario runs the baseline and Atoll one after the other on the same machine with
//! the same load generator and prints both figures and their ratio, so results from
//! different machines (or a noisy neighbour) are still comparable as ratios.
//!
//! `atoll-bench http`: a hello function served through a node (fresh instance per
//! request, HTTP/1.1 keep-alive) against a bare hyper hello-world server. Load comes from
//! `wrk` (a separate process, closed loop), the reference tool for this comparison.
//!
//! `atoll-bench isolate`: start-to-ready and start-to-response latency of a fresh instance
//! for modules with 40 KB, 1 MiB and 16 MiB memory images, under Atoll's stock path, its
//! copy-on-write snapshots and wasmtime's pooling allocator.
//!
//! `atoll-bench tls`: TLS handshakes/s against bare rustls, HTTPS against cleartext
//! keep-alive, HTTP/3 against HTTP/2.
//!
//! `atoll-bench outbound`: hello beside guests waiting on outbound calls against hello
//! alone, and an origin through a function against the origin directly.
//!
//! `atoll-bench kv`: KV latency on the bare store, through the registry's API and through a
//! function, and a service call beside the direct request.
//!
//! `atoll-bench soak`: no baseline but the promises themselves — mixed load with churn and
//! hostile guests beside it; failures, the node's RSS and fd curve, and idle CPU after it.

/// The node's allocator (see the `atoll` binary), so the bench measures what runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bare_proxy;
mod cluster_scenario;
mod h3_load;
mod http_scenario;
mod isolate_scenario;
mod kv_scenario;
mod latency;
mod origin_scenario;
mod outbound_scenario;
mod scaling_scenario;
mod soak_guests;
mod soak_scenario;
mod tls_scenario;
mod wasm_modules;
mod wasmtime_pooling;
mod wrk;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "atoll-bench",
    about = "Atoll side by side with a baseline, in one run"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Requests/s and latency of a hello function through the node vs a bare hyper server.
    Http(http_scenario::HttpArgs),
    /// Start-up latency of a fresh instance: stock wasmer, Atoll snapshots, wasmtime pooling.
    Isolate(isolate_scenario::IsolateArgs),
    /// Invocations/s of a fresh-instance-per-call function on one thread vs all cores.
    Scaling(scaling_scenario::ScalingArgs),
    /// TLS handshakes/s, HTTPS vs cleartext keep-alive, HTTP/3 vs HTTP/2.
    Tls(tls_scenario::TlsArgs),
    /// Latency a forward to a peer adds, and time from a home's crash to the first success.
    Cluster(cluster_scenario::ClusterArgs),
    /// Hello beside guests waiting on outbound calls vs alone; an origin via a function vs
    /// directly.
    Outbound(outbound_scenario::OutboundArgs),
    /// KV latency: bare redb, the registry's API, a function; a service call vs direct.
    Kv(kv_scenario::KvArgs),
    /// An origin route (the node as a reverse proxy) beside nginx proxy_pass to the same
    /// origin, and the origin directly.
    Origin(origin_scenario::OriginArgs),
    /// Minutes of mixed load with pushes, rollbacks and hostile guests beside it: zero
    /// failures, flat RSS and fds, no thread left spinning.
    Soak(soak_scenario::SoakArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::Http(args) => http_scenario::run(args),
        Scenario::Isolate(args) => isolate_scenario::run(args),
        Scenario::Scaling(args) => scaling_scenario::run(args),
        Scenario::Tls(args) => tls_scenario::run(args),
        Scenario::Cluster(args) => cluster_scenario::run(args),
        Scenario::Outbound(args) => outbound_scenario::run(args),
        Scenario::Kv(args) => kv_scenario::run(args),
        Scenario::Origin(args) => origin_scenario::run(args),
        Scenario::Soak(args) => soak_scenario::run(args),
    }
}
