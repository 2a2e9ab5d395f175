//! The node's view of its cluster, and where each request runs.
//!
//! ```text
//! heartbeat answer ─▶ Cluster::learn (peers, their load, draining or not)
//! request ─▶ Cluster::place(function) ─▶ None: serve here
//!                                     └▶ Some(peer): forward (pooled HTTP/1.1, signed hop header)
//!                                                    ├─ fails before the peer answered ─▶ serve here
//!                                                    └─ peer: "not served here" ────────▶ serve here
//! ```
//!
//! Each function has a few *home* nodes per region ([`placement::home_nodes`]), so its
//! instances stay warm on those and nowhere else. A node that gets a request for a function
//! homed elsewhere — or whose own pool is full, or that is draining — forwards it to the
//! less loaded of two home nodes (power of two choices), trying the configured fallback
//! regions when its own region has none that takes work. A forwarded request carries
//! [`HOP_HEADER`] and is never forwarded again, so requests never loop. Forwarding is
//! an optimisation, never a dependency: when the view is stale (no heartbeat answer for a
//! while), when no peer qualifies, or when the forward fails, the node serves the request
//! itself — it has every function (static stability).
//!
//! The hop header names the version the forwarding node serves ([`crate::hop`]). A peer
//! that does not serve exactly that version — it lags behind the registry, or is ahead of
//! this node — runs nothing and answers [`NOT_SERVED_HEADER`], and the request is served
//! here: a client gets the version of the node it reached, never a 404 or an old version
//! because a peer lags. Exact, not "at least": rollbacks move the active version back, so a
//! higher number is not a newer deployment, and neither node can tell which one is behind.
//! The client's address and scheme in the hop header are believed only when its HMAC with
//! the cluster key verifies.
//!
//! Health is the heartbeat's (gone after the TTL, draining by its own word) plus passive
//! outlier detection: a peer that refuses connections or answers 5xx several times in a row
//! is skipped for a while ([`placement::Outliers`]).
//!
//! The module's files:
//! - here: the headers, [`ClusterOptions`], [`NotServed`], and the [`Cluster`] the others
//!   add to (its accessors, draining);
//! - `view.rs`: the peers as last announced, [`Cluster::learn`], and [`Cluster::describe`]
//!   (`GET /peers`);
//! - [`placement`]: home nodes, power of two choices, outlier ejection, [`decide`] (pure)
//!   and [`Cluster::place`], which feeds it the view;
//! - `forward.rs`: [`Cluster::forward`], the pooled client's request to a peer, and
//!   [`ForwardInFlight`], a forward counted in the peer's load until its answer ends.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Notify;

use crate::hop::{Bound, ClusterKey, HopClaims, Reading};
use forward::PEER_CONNECT_TIMEOUT;
use placement::Outliers;
use view::View;

mod forward;
pub mod placement;
mod view;

pub use forward::{ForwardError, ForwardInFlight};
pub use placement::decide;

/// Marks a request forwarded by a peer, which is never forwarded again; its value is the
/// signed [`crate::hop::HopClaims`] (who forwarded it, the expected version, the client).
pub const HOP_HEADER: &str = "x-atoll-hop";
/// Where nodes before the signed hop header put the client's address and scheme: never
/// believed now, and removed like the hop header.
pub const CLIENT_HEADER: &str = "x-atoll-client";
pub const SCHEME_HEADER: &str = "x-atoll-scheme";
/// What a forward adds; removed before a function sees the request, so a function sees the
/// same request whether it was forwarded or not (and a client cannot pose as a peer).
pub const FORWARDING_HEADERS: [&str; 3] = [HOP_HEADER, CLIENT_HEADER, SCHEME_HEADER];
/// On a node's answer to a forwarded request it did not run (its value says why:
/// [`NotServed`]); the forwarding node then serves the request itself. Removed from
/// function responses, so a function cannot make a request run twice.
pub const NOT_SERVED_HEADER: &str = "x-atoll-not-served";
/// Names the node that ran the function, on every function response.
pub const SERVED_BY_HEADER: &str = "x-atoll-node";
/// Home nodes per function and region.
pub const DEFAULT_HOME_REPLICAS: usize = 2;
/// Consecutive failures that eject a peer, and for how long.
const OUTLIER_THRESHOLD: u32 = 3;
const OUTLIER_EJECTION: Duration = Duration::from_secs(10);

/// Who this node is in the cluster and how it balances.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub name: String,
    pub region: String,
    /// Regions to forward to, in order, when the local one has no node that takes work.
    pub region_fallback: Vec<String>,
    pub home_replicas: usize,
    /// The address forwards leave from: the node's own listening IP when it listens on one,
    /// so a peer sees a forward come from the address it knows this node by, even where the
    /// kernel would pick another source (loopback, several interfaces).
    pub source_ip: Option<IpAddr>,
    /// Signs this node's forwards and checks its peers'; `None`: forwards are unsigned and
    /// no forwarded client address is believed.
    pub key: Option<ClusterKey>,
}

/// Why a node did not run a forwarded request (the [`NOT_SERVED_HEADER`] value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotServed {
    /// It serves another version of the function, or no function, for that host and path.
    Version,
    /// The function's queue is full.
    Capacity,
    /// It has no route table yet.
    Starting,
}

impl NotServed {
    pub fn as_str(self) -> &'static str {
        match self {
            NotServed::Version => "version",
            NotServed::Capacity => "capacity",
            NotServed::Starting => "starting",
        }
    }

    /// The status a node answers with: 421 (RFC 9110 §15.5.20: this server does not answer
    /// for that) for another version, 503 when it is busy or starting.
    pub fn status(self) -> StatusCode {
        match self {
            NotServed::Version => StatusCode::MISDIRECTED_REQUEST,
            NotServed::Capacity | NotServed::Starting => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// The node's cluster state; shared by the service, the heartbeat and the admin listener.
pub struct Cluster {
    options: ClusterOptions,
    view: ArcSwap<View>,
    draining: AtomicBool,
    /// Wakes the heartbeat when draining starts or stops, so peers hear at once.
    changed: Notify,
    outliers: Mutex<Outliers>,
    /// Requests this node has in flight at each peer: added to the peer's announced load,
    /// which is up to a heartbeat old.
    forwarded: Mutex<HashMap<String, u64>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("options", &self.options)
            .field("draining", &self.is_draining())
            .finish_non_exhaustive()
    }
}

impl Cluster {
    pub fn new(options: ClusterOptions) -> Arc<Cluster> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(PEER_CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        connector.set_local_address(options.source_ip);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector);
        Arc::new(Cluster {
            options,
            view: ArcSwap::from_pointee(View::default()),
            draining: AtomicBool::new(false),
            changed: Notify::new(),
            outliers: Mutex::new(Outliers::new(OUTLIER_THRESHOLD, OUTLIER_EJECTION)),
            forwarded: Mutex::new(HashMap::new()),
            client,
        })
    }

    pub fn name(&self) -> &str {
        &self.options.name
    }

    pub fn region(&self) -> &str {
        &self.options.region
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Takes the node out of rotation (or back in): announced with the next heartbeat,
    /// which is sent at once.
    pub fn set_draining(&self, draining: bool) {
        if self.draining.swap(draining, Ordering::AcqRel) != draining {
            tracing::info!(draining, "node rotation changed");
            self.changed.notify_one();
        }
    }

    /// Resolves when draining is switched; the heartbeat uses it to announce at once.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Reads a request's hop header: what it claims, and whether it is signed with this
    /// cluster's key for this request and recent.
    pub fn read_hop(&self, value: &str, request: Bound<'_>) -> Reading {
        HopClaims::read(value, self.options.key.as_ref(), request, crate::hop::now())
    }
}

/// Why a peer's answer says it ran nothing, if it does.
pub fn not_served<B>(response: &Response<B>) -> Option<NotServed> {
    let value = response.headers().get(NOT_SERVED_HEADER)?;
    [NotServed::Version, NotServed::Capacity, NotServed::Starting]
        .into_iter()
        .find(|reason| value.as_bytes() == reason.as_str().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    pub(super) fn options(name: &str, region: &str, fallback: &[&str]) -> ClusterOptions {
        ClusterOptions {
            name: name.into(),
            region: region.into(),
            region_fallback: fallback.iter().map(|r| r.to_string()).collect(),
            home_replicas: 2,
            source_ip: None,
            key: None,
        }
    }

    #[test]
    fn only_a_known_not_served_marker_means_the_peer_ran_nothing() {
        let marked = |value: &'static str| {
            let mut response = Response::new(());
            response
                .headers_mut()
                .insert(NOT_SERVED_HEADER, HeaderValue::from_static(value));
            not_served(&response)
        };
        assert_eq!(marked("version"), Some(NotServed::Version));
        assert_eq!(marked("capacity"), Some(NotServed::Capacity));
        assert_eq!(marked("starting"), Some(NotServed::Starting));
        assert_eq!(marked("other"), None);
        assert_eq!(not_served(&Response::new(())), None);
        assert_eq!(NotServed::Version.status(), StatusCode::MISDIRECTED_REQUEST);
    }
}
