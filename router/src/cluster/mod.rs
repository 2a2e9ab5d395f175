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

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use atoll_core::membership::{Health, MemberStatus};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Notify;

use crate::body::{PeerBody, ResponseBody};
use crate::hop::{Bound, ClusterKey, HopClaims, Reading};
use placement::{Member, Outliers};

pub mod placement;

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
/// A view older than this (no heartbeat answer since) is not trusted: serve locally.
const VIEW_STALE_AFTER: Duration = Duration::from_secs(10);
/// Connecting to a peer (same LAN or region): a dead one must cost little.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Largest response relayed from a peer: the largest a function may give. Relayed as it
/// arrives, so this bounds bytes passed on, not memory held.
const MAX_FORWARDED_RESPONSE: usize = atoll_core::manifest::MAX_RESPONSE_BYTES as usize;
/// Largest "not served here" refusal read from a peer (a line of text).
const MAX_REFUSAL_BYTES: usize = 64 * 1024;

/// Who this node is in the cluster and how it balances.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub name: String,
    pub region: String,
    /// Regions to forward to, in order, when the local one has no node that takes work.
    pub region_fallback: Vec<String>,
    pub home_replicas: usize,
    /// The address forwards leave from: the node's own listening IP when it listens on one,
    /// so peers recognise it ([`Cluster::is_peer`]) even where the kernel would pick
    /// another source (loopback, several interfaces).
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

/// A peer as last announced.
#[derive(Debug, Clone)]
struct Peer {
    member: Member,
    http: SocketAddr,
    /// Idle instances it announced (shown, not weighed).
    free_capacity: u64,
}

#[derive(Debug, Default)]
struct View {
    /// Healthy and draining peers (not this node, not gone), by name.
    peers: HashMap<String, Peer>,
    /// When the view was learned; `None` before the first heartbeat answer.
    learned: Option<Instant>,
}

/// Why a forward did not produce an answer.
#[derive(Debug)]
pub struct ForwardError {
    /// The request may have reached the peer (so it may have run there).
    pub maybe_sent: bool,
    pub reason: String,
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

    /// Replaces the view with the members a heartbeat answer listed (this node excluded).
    pub fn learn(&self, members: &[MemberStatus]) {
        let peers = members
            .iter()
            .filter(|status| status.announcement.name != self.options.name)
            .filter(|status| status.health != Health::Gone)
            .filter_map(|status| {
                let announcement = &status.announcement;
                let http = announcement.http?;
                Some((
                    announcement.name.clone(),
                    Peer {
                        member: Member {
                            name: announcement.name.clone(),
                            region: announcement.region.clone(),
                            in_flight: announcement.in_flight,
                            draining: status.health == Health::Draining,
                        },
                        http,
                        free_capacity: announcement.free_capacity,
                    },
                ))
            })
            .collect();
        self.view.store(Arc::new(View {
            peers,
            learned: Some(Instant::now()),
        }));
    }

    /// Whether some peer takes work (so draining this node has somewhere to send requests).
    pub fn has_peers_taking_work(&self) -> bool {
        let view = self.view.load();
        fresh(&view, Instant::now()) && view.peers.values().any(|peer| !peer.member.draining)
    }

    /// The node's view, for `GET /peers` on the admin listener: this node's name, region
    /// and whether it drains; how old the view is; and each peer with its region, address,
    /// announced load and idle instances, whether it drains and whether outlier detection
    /// has ejected it.
    pub fn describe(&self) -> serde_json::Value {
        let now = Instant::now();
        let view = self.view.load();
        let outliers = self.outliers.lock().unwrap_or_else(|p| p.into_inner());
        let mut peers: Vec<&Peer> = view.peers.values().collect();
        peers.sort_by(|a, b| a.member.name.cmp(&b.member.name));
        let peers: Vec<serde_json::Value> = peers
            .into_iter()
            .map(|peer| {
                serde_json::json!({
                    "name": peer.member.name,
                    "region": peer.member.region,
                    "http": peer.http.to_string(),
                    "in_flight": peer.member.in_flight,
                    "free_capacity": peer.free_capacity,
                    "draining": peer.member.draining,
                    "ejected": !outliers.is_healthy(&peer.member.name, now),
                })
            })
            .collect();
        serde_json::json!({
            "name": self.options.name,
            "region": self.options.region,
            "draining": self.is_draining(),
            "region_fallback": self.options.region_fallback,
            "view_age_ms": view.learned.map(|learned| now.saturating_duration_since(learned).as_millis() as u64),
            "view_fresh": fresh(&view, now),
            "peers": peers,
        })
    }

    /// Reads a request's hop header: what it claims, and whether it is signed with this
    /// cluster's key for this request and recent.
    pub fn read_hop(&self, value: &str, request: Bound<'_>) -> Reading {
        HopClaims::read(value, self.options.key.as_ref(), request, crate::hop::now())
    }

    /// Where a request for `function` should run: `None` here, or the peer to forward to.
    /// `saturated`: this node's pool for the function has no free slot.
    pub fn place(&self, function: &str, saturated: bool) -> Option<(String, SocketAddr)> {
        let now = Instant::now();
        let view = self.view.load();
        // Alone (or with a stale view): nothing to decide, and nothing to allocate.
        if view.peers.is_empty() || !fresh(&view, now) {
            return None;
        }
        let draining = self.is_draining();
        let forwarded = self.forwarded.lock().unwrap_or_else(|p| p.into_inner());
        let outliers = self.outliers.lock().unwrap_or_else(|p| p.into_inner());
        let mut members: Vec<Member> = view
            .peers
            .values()
            .filter(|peer| outliers.is_healthy(&peer.member.name, now))
            .map(|peer| Member {
                in_flight: peer.member.in_flight + forwarded.get(&peer.member.name).copied().unwrap_or(0),
                ..peer.member.clone()
            })
            .collect();
        drop(outliers);
        drop(forwarded);
        members.push(Member {
            name: self.options.name.clone(),
            region: self.options.region.clone(),
            in_flight: 0,
            draining,
        });
        let decision = decide(function, &self.options, &members, draining, saturated, |n| {
            fastrand::usize(..n)
        })?;
        let peer = view.peers.get(&decision)?;
        Some((decision, peer.http))
    }

    /// Sends the request to `peer` and returns its answer. `host` is the request's host, as
    /// the client gave it; `client` the client's address and `https` how it came in;
    /// `expected` the version this node serves, which the peer must serve too.
    #[allow(clippy::too_many_arguments)]
    pub async fn forward(
        self: &Arc<Self>,
        peer: (&str, SocketAddr),
        method: http::Method,
        uri: &http::Uri,
        mut headers: HeaderMap,
        body: Bytes,
        host: &str,
        client: SocketAddr,
        https: bool,
        expected: &atoll_core::Deployment,
        timeout: Duration,
    ) -> Result<Response<ResponseBody>, ForwardError> {
        let (name, address) = peer;
        let path = uri.path_and_query().map_or("/", |path| path.as_str()).to_string();
        let uri: http::Uri = format!("http://{address}{path}")
            .parse()
            .map_err(|e| ForwardError {
                maybe_sent: false,
                reason: format!("building the peer URI: {e}"),
            })?;
        strip_hop_by_hop(&mut headers);
        headers.insert(
            http::header::HOST,
            HeaderValue::from_str(host).map_err(|e| ForwardError {
                maybe_sent: false,
                reason: format!("host {host:?}: {e}"),
            })?,
        );
        for name in FORWARDING_HEADERS {
            headers.remove(name);
        }
        let claims = HopClaims {
            // For the peer's logs only: kept to what cannot break the header or its fields.
            node: self
                .options
                .name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "._-".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect(),
            function: expected.name.clone(),
            version: expected.version,
            sha256: expected.sha256.clone(),
            client,
            https,
            time: crate::hop::now(),
        };
        let hop = claims.encode(
            self.options.key.as_ref(),
            Bound {
                method: method.as_str(),
                host,
                target: &path,
            },
        );
        headers.insert(
            HeaderName::from_static(HOP_HEADER),
            HeaderValue::from_str(&hop).map_err(|e| ForwardError {
                maybe_sent: false,
                reason: format!("hop header {hop:?}: {e}"),
            })?,
        );
        let mut request = Request::new(Full::new(body));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;

        // In flight at the peer until its answer has been relayed whole.
        let mut in_flight = Some(ForwardInFlight::enter(Arc::clone(self), name));
        let started = Instant::now();
        let outcome = tokio::time::timeout(timeout, async {
            let response = self.client.request(request).await.map_err(|error| ForwardError {
                maybe_sent: !error.is_connect(),
                reason: error_chain(&error),
            })?;
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            if not_served(&Response::from_parts(parts.clone(), ())).is_some() {
                // A short refusal, served here instead: read it so the connection is reused.
                let body = Limited::new(body, MAX_REFUSAL_BYTES)
                    .collect()
                    .await
                    .map_err(|error| ForwardError {
                        maybe_sent: true,
                        reason: format!("reading the peer's refusal: {error}"),
                    })?
                    .to_bytes();
                return Ok(Response::from_parts(parts, ResponseBody::whole(body)));
            }
            // The answer itself is relayed as it arrives, within what is left of the time.
            let left = timeout.saturating_sub(started.elapsed());
            let in_flight = in_flight.take().expect("taken once");
            let body = ResponseBody::Peer(PeerBody::new(body, MAX_FORWARDED_RESPONSE, left, in_flight));
            Ok(Response::from_parts(parts, body))
        })
        .await
        .unwrap_or_else(|_| {
            Err(ForwardError {
                maybe_sent: true,
                reason: format!("no answer within {}s", timeout.as_secs_f32()),
            })
        });
        drop(in_flight);

        // A relayed answer that began well is judged when it ends (`ForwardInFlight`).
        match &outcome {
            Ok(response) if response.status().is_server_error() => self.record_outcome(name, false),
            Ok(response) if response.body().is_streamed() => {}
            Ok(_) => self.record_outcome(name, true),
            Err(_) => self.record_outcome(name, false),
        }
        let label = match &outcome {
            Ok(response) => match not_served(response) {
                Some(NotServed::Version) => "not_served",
                Some(NotServed::Capacity | NotServed::Starting) => "unavailable",
                None => "answered",
            },
            Err(error) if error.maybe_sent => "broken",
            Err(_) => "refused",
        };
        ::metrics::counter!(crate::metrics::FORWARDS_TOTAL, "outcome" => label).increment(1);
        outcome
    }

    /// Counts a forward's outcome for outlier ejection.
    fn record_outcome(&self, peer: &str, ok: bool) {
        let mut outliers = self.outliers.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            outliers.success(peer);
        } else {
            outliers.failure(peer, Instant::now());
        }
    }

    fn adjust_forwarded(&self, peer: &str, delta: i64) {
        let mut forwarded = self.forwarded.lock().unwrap_or_else(|p| p.into_inner());
        let count = forwarded.entry(peer.to_string()).or_insert(0);
        *count = count.saturating_add_signed(delta);
        if *count == 0 {
            forwarded.remove(peer);
        }
    }
}

/// A request forwarded to a peer, counted in this node's load figure for that peer until
/// dropped: when the forward failed or was refused, or when the peer's relayed answer ended.
pub struct ForwardInFlight {
    cluster: Arc<Cluster>,
    peer: String,
}

impl ForwardInFlight {
    fn enter(cluster: Arc<Cluster>, peer: &str) -> Self {
        cluster.adjust_forwarded(peer, 1);
        ForwardInFlight {
            cluster,
            peer: peer.to_string(),
        }
    }

    /// The relayed answer ended: whole (`ok`), or broken off or past its time, which counts
    /// against the peer as a failed forward does. Settled once; an answer the client
    /// stopped reading says nothing of the peer and is not settled.
    pub fn settle(self, ok: bool) {
        self.cluster.record_outcome(&self.peer, ok);
    }
}

impl Drop for ForwardInFlight {
    fn drop(&mut self) {
        self.cluster.adjust_forwarded(&self.peer, -1);
    }
}

/// Why a peer's answer says it ran nothing, if it does.
pub fn not_served<B>(response: &Response<B>) -> Option<NotServed> {
    let value = response.headers().get(NOT_SERVED_HEADER)?;
    [NotServed::Version, NotServed::Capacity, NotServed::Starting]
        .into_iter()
        .find(|reason| value.as_bytes() == reason.as_str().as_bytes())
}

fn fresh(view: &View, now: Instant) -> bool {
    view.learned
        .is_some_and(|learned| now.saturating_duration_since(learned) < VIEW_STALE_AFTER)
}

/// The placement decision, pure: the name of the peer to forward to, or `None` to serve
/// here. `members` includes this node (named `options.name`, `draining` as given) and only
/// peers that may be picked; `random(n)` draws in `0..n`.
pub fn decide(
    function: &str,
    options: &ClusterOptions,
    members: &[Member],
    draining: bool,
    saturated: bool,
    mut random: impl FnMut(usize) -> usize,
) -> Option<String> {
    let me = options.name.as_str();
    // A region not listed is never a fallback: no `others`.
    let fallback = options.region_fallback.iter().map(String::as_str);
    for region in atoll_core::membership::region_order(&options.region, fallback, []) {
        let homes = placement::home_nodes(function, region, members, options.home_replicas);
        let home_here = homes.iter().any(|member| member.name == me);
        if home_here && !saturated {
            return None;
        }
        let peers: Vec<&Member> = homes.into_iter().filter(|member| member.name != me).collect();
        if peers.is_empty() {
            if region == options.region && !draining {
                // Nobody else to ask in the region: this node serves (it is taking work).
                return None;
            }
            continue;
        }
        return placement::power_of_two(&peers, &mut random).map(|member| member.name.clone());
    }
    None
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        http::header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        http::header::PROXY_AUTHENTICATE,
        http::header::PROXY_AUTHORIZATION,
        http::header::TE,
        http::header::TRAILER,
        http::header::TRANSFER_ENCODING,
        http::header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(name: &str, region: &str, fallback: &[&str]) -> ClusterOptions {
        ClusterOptions {
            name: name.into(),
            region: region.into(),
            region_fallback: fallback.iter().map(|r| r.to_string()).collect(),
            home_replicas: 2,
            source_ip: None,
            key: None,
        }
    }

    fn member(name: &str, region: &str, draining: bool) -> Member {
        Member {
            name: name.into(),
            region: region.into(),
            in_flight: 0,
            draining,
        }
    }

    /// Six nodes, two per region a, b, c.
    fn six(draining_in_a: bool) -> Vec<Member> {
        ["a", "b", "c"]
            .iter()
            .flat_map(|region| {
                (1..=2).map(move |i| member(&format!("{region}{i}"), region, draining_in_a && *region == "a"))
            })
            .collect()
    }

    #[test]
    fn a_home_node_serves_locally_and_others_forward_to_a_home() {
        // Three nodes in a with two homes: exactly one of them is not a home for "f".
        let members = vec![
            member("a1", "a", false),
            member("a2", "a", false),
            member("a3", "a", false),
        ];
        let homes: Vec<String> = placement::home_nodes("f", "a", &members, 2)
            .iter()
            .map(|m| m.name.clone())
            .collect();
        for name in ["a1", "a2", "a3"] {
            let decision = decide("f", &options(name, "a", &[]), &members, false, false, |_| 0);
            if homes.contains(&name.to_string()) {
                assert_eq!(decision, None, "{name} is home");
            } else {
                let to = decision.expect("a non-home forwards");
                assert!(homes.contains(&to), "{name} forwarded to {to}, not a home");
            }
        }
    }

    #[test]
    fn a_saturated_home_forwards_to_the_other_home() {
        let members = vec![member("a1", "a", false), member("a2", "a", false)];
        assert_eq!(
            decide("f", &options("a1", "a", &[]), &members, false, false, |_| 0),
            None
        );
        assert_eq!(
            decide("f", &options("a1", "a", &[]), &members, false, true, |_| 0).as_deref(),
            Some("a2")
        );
        // Alone and saturated: nobody to ask, so it queues here.
        let alone = vec![member("a1", "a", false)];
        assert_eq!(
            decide("f", &options("a1", "a", &[]), &alone, false, true, |_| 0),
            None
        );
    }

    #[test]
    fn a_non_home_forwards_to_the_less_loaded_of_two_homes() {
        // Three nodes, two homes for "f": the third node picks between them by load,
        // whichever of the two is busier and whichever order the homes rank in.
        let mut members = vec![
            member("a1", "a", false),
            member("a2", "a", false),
            member("a3", "a", false),
        ];
        let homes: Vec<String> = placement::home_nodes("f", "a", &members, 2)
            .iter()
            .map(|m| m.name.clone())
            .collect();
        let front = members
            .iter()
            .find(|m| !homes.contains(&m.name))
            .unwrap()
            .name
            .clone();
        for (busy, idle) in [(&homes[0], &homes[1]), (&homes[1], &homes[0])] {
            for member in &mut members {
                member.in_flight = if &member.name == busy { 7 } else { 1 };
            }
            // Every draw: both homes are compared, so the choice is by load alone.
            for draw in 0..2 {
                let to = decide("f", &options(&front, "a", &[]), &members, false, false, |n| {
                    draw.min(n - 1)
                });
                assert_eq!(to.as_ref(), Some(idle), "{busy} is busier (draw {draw})");
            }
        }
    }

    #[test]
    fn a_draining_node_forwards_to_its_region_then_to_the_fallbacks() {
        let mut members = six(false);
        members.iter_mut().find(|m| m.name == "a1").unwrap().draining = true;
        let to = decide(
            "f",
            &options("a1", "a", &["b", "c"]),
            &members,
            true,
            false,
            |_| 0,
        );
        assert_eq!(to.as_deref(), Some("a2"), "the region's other node");

        let members = six(true);
        let to = decide(
            "f",
            &options("a1", "a", &["c", "b"]),
            &members,
            true,
            false,
            |_| 0,
        )
        .unwrap();
        assert!(to.starts_with('c'), "first fallback region, got {to}");
        let to = decide("f", &options("a1", "a", &["b"]), &members, true, false, |_| 0).unwrap();
        assert!(to.starts_with('b'), "got {to}");
        // Draining with no fallback configured and no peer in the region: serve here.
        assert_eq!(
            decide("f", &options("a1", "a", &[]), &members, true, false, |_| 0),
            None
        );
    }

    #[test]
    fn a_forwarded_request_never_comes_back() {
        // Whatever a node decides, the peer it names would serve the request itself (it is
        // a home and not saturated), so one hop is the most a request takes.
        let members = six(false);
        for function in ["f", "g", "h", "shop", "api"] {
            for from in &members {
                let opts = options(&from.name, &from.region, &["b", "c"]);
                if let Some(to) = decide(function, &opts, &members, false, false, |_| 0) {
                    let peer = members.iter().find(|m| m.name == to).unwrap();
                    let peer_opts = options(&peer.name, &peer.region, &["b", "c"]);
                    assert_eq!(decide(function, &peer_opts, &members, false, false, |_| 0), None);
                }
            }
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

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("close, x-private"),
        );
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert(
            http::header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn the_view_excludes_this_node_and_gone_members_and_goes_stale() {
        use atoll_core::membership::NodeAnnouncement;
        let cluster = Cluster::new(options("a1", "a", &[]));
        assert!(!cluster.has_peers_taking_work(), "no view yet");
        let status = |name: &str, health| MemberStatus {
            announcement: NodeAnnouncement {
                name: name.into(),
                region: "a".into(),
                http: Some("127.0.0.12:80".parse().unwrap()),
                https: None,
                in_flight: 0,
                free_capacity: 0,
                draining: health == Health::Draining,
                sync_lag: 0,
                quarantined: 0,
            },
            age_ms: 0,
            health,
        };
        cluster.learn(&[
            status("a1", Health::Healthy),
            status("a2", Health::Draining),
            status("a3", Health::Gone),
        ]);
        assert!(!cluster.has_peers_taking_work(), "a2 drains, a3 is gone");
        cluster.learn(&[status("a2", Health::Healthy)]);
        assert!(cluster.has_peers_taking_work());
    }

    #[test]
    fn the_peer_listing_shows_what_each_peer_announced() {
        use atoll_core::membership::NodeAnnouncement;
        let cluster = Cluster::new(options("a1", "a", &[]));
        cluster.learn(&[MemberStatus {
            announcement: NodeAnnouncement {
                name: "a2".into(),
                region: "a".into(),
                http: Some("127.0.0.12:80".parse().unwrap()),
                https: None,
                in_flight: 3,
                free_capacity: 7,
                draining: false,
                sync_lag: 0,
                quarantined: 0,
            },
            age_ms: 0,
            health: Health::Healthy,
        }]);
        let peer = &cluster.describe()["peers"][0];
        assert_eq!(peer["name"], "a2");
        assert_eq!(peer["in_flight"], 3);
        assert_eq!(peer["free_capacity"], 7);
    }

    /// A peer on 127.0.0.1 whose every answer is a 200 whose body the test writes: each
    /// request hands its writer over `writers`.
    async fn streaming_peer() -> (
        SocketAddr,
        std::sync::mpsc::Receiver<atoll_isolate::stream::BodyWriter>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (writers, handed) = std::sync::mpsc::channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let writers = writers.clone();
                let service = hyper::service::service_fn(move |_request| {
                    let (writer, reader) = atoll_isolate::stream::body_pipe(1 << 20);
                    let _ = writers.send(writer);
                    std::future::ready(Ok::<_, std::convert::Infallible>(Response::new(
                        ResponseBody::Function(reader),
                    )))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
        (address, handed)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_relayed_answer_is_in_flight_until_it_ends_and_a_broken_one_counts_against_the_peer() {
        let (peer, writers) = streaming_peer().await;
        let cluster = Cluster::new(options("a1", "a", &[]));
        let deployment = atoll_core::Deployment {
            name: "f".into(),
            version: 1,
            sha256: "0".repeat(64),
            manifest: atoll_core::Manifest::parse(
                "name = \"f\"\nwasm = \"f.wasm\"\nroutes = [\"f.localhost\"]\n",
            )
            .unwrap(),
        };
        let uri: http::Uri = "/".parse().unwrap();
        let forward = || {
            cluster.forward(
                ("a2", peer),
                http::Method::GET,
                &uri,
                HeaderMap::new(),
                Bytes::new(),
                "f.localhost",
                "127.0.0.1:1".parse().unwrap(),
                false,
                &deployment,
                Duration::from_secs(30),
            )
        };
        let in_flight = || {
            let forwarded = cluster.forwarded.lock().unwrap();
            forwarded.get("a2").copied().unwrap_or(0)
        };

        let response = forward().await.expect("the peer answers");
        let mut writer = writers.recv().unwrap();
        assert_eq!(in_flight(), 1, "a relayed answer still being read is in flight");
        writer.send(Bytes::from_static(b"hello"), || false).unwrap();
        writer.finish();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "hello");
        assert_eq!(in_flight(), 0, "a relayed answer that ended is not");

        // Answers that break off after their head count against the peer until it is out.
        for _ in 0..OUTLIER_THRESHOLD {
            assert!(cluster.outliers.lock().unwrap().is_healthy("a2", Instant::now()));
            let response = forward().await.expect("the peer answers");
            let mut writer = writers.recv().unwrap();
            writer.send(Bytes::from_static(b"part"), || false).unwrap();
            writer.abort("the peer's guest trapped");
            assert!(response.into_body().collect().await.is_err());
        }
        assert!(!cluster.outliers.lock().unwrap().is_healthy("a2", Instant::now()));
        assert_eq!(in_flight(), 0);
    }
}
