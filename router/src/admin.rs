//! The admin listener: liveness, readiness and metrics, apart from user traffic.
//!
//! - `GET /healthz` — 200 while the process runs.
//! - `GET /readyz`  — 200 once the node has a route table (from the registry or its disk
//!   cache), 503 before and while draining: a load balancer sends traffic only to ready
//!   nodes.
//! - `GET /metrics` — Prometheus text.
//! - `GET /sync` — how far the node is from its source (JSON: applied and source revisions,
//!   lag, versions loading, quarantined versions and why); 503 while degraded (a version the
//!   source holds is not served here), so a load balancer or an alert can see it while
//!   `/readyz` stays 200 for everything else the node serves.
//! - `POST /drain` — take the node out of rotation: it announces that it drains, so DNS
//!   stops naming it and peers stop forwarding to it, and it forwards what still reaches it
//!   to peers. `DELETE /drain` puts it back; `GET /drain` tells which. For rolling
//!   restarts: drain, wait out the DNS TTL, restart.
//! - `GET /peers` — the node's own view of its cluster (JSON): the peers it would forward
//!   to, their load and idle instances, and which it has ejected.
//!
//! Reading is open (keep the listener private: it tells a lot about the node). Changing
//! the node (`POST`/`DELETE /drain`; any method but GET and HEAD is checked) must not be possible for a web page the node's
//! operator happens to have open, which a browser would otherwise let reach loopback. So a
//! state-changing call is accepted when it carries the node's token (`--token`,
//! `ATOLL_TOKEN`) as `Authorization: Bearer …`, or, with no `Authorization` header at all,
//! when it comes from a loopback peer with a loopback `Host` (a DNS-rebinding page sends
//! its own name) and no sign of a browser (`Origin`, or `Sec-Fetch-Site` other than
//! `none`): so `curl -X POST http://127.0.0.1:9090/drain` on the machine keeps working,
//! and a remote operator sends the token.

use std::net::IpAddr;
use std::sync::Arc;

use crate::body::ResponseBody;
use atoll_ingress::server::{BoxError, ConnectionInfo, Handler, text_response};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Body;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::cluster::Cluster;
use crate::served::Routing;

pub struct AdminService {
    routing: Arc<Routing>,
    metrics: PrometheusHandle,
    cluster: Arc<Cluster>,
    /// The node's token: a bearer token that authorises state-changing calls.
    token: Option<String>,
    /// Run before `/metrics` is rendered: sets what is counted outside the registry.
    refresh_metrics: Option<Box<dyn Fn() + Send + Sync>>,
}

impl AdminService {
    pub fn new(
        routing: Arc<Routing>,
        metrics: PrometheusHandle,
        cluster: Arc<Cluster>,
        token: Option<String>,
        refresh_metrics: Option<Box<dyn Fn() + Send + Sync>>,
    ) -> Arc<Self> {
        Arc::new(AdminService {
            routing,
            metrics,
            cluster,
            token: token.filter(|token| !token.is_empty()),
            refresh_metrics,
        })
    }

    /// Why a state-changing request may not go ahead (see the module docs), as the answer
    /// to give; `None` when it may.
    fn refuse_change<B>(
        &self,
        request: &Request<B>,
        connection: &ConnectionInfo,
    ) -> Option<Response<ResponseBody>> {
        let what = format!("{} {}", request.method(), request.uri().path());
        if let Some(authorization) = request.headers().get(http::header::AUTHORIZATION) {
            let presented = authorization
                .to_str()
                .ok()
                .and_then(|value| value.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim());
            return match (presented, &self.token) {
                (Some(presented), Some(token)) if atoll_core::auth::token_matches(token, presented) => None,
                (_, None) => Some(unauthorized(format!(
                    "{what}: this node has no token (--token, ATOLL_TOKEN) to check a bearer token \
                     against; call it from this machine without one"
                ))),
                (None, Some(_)) => Some(unauthorized(format!(
                    "{what}: expected `Authorization: Bearer <the node's token>`"
                ))),
                (Some(_), Some(_)) => Some(unauthorized(format!("{what}: invalid token"))),
            };
        }
        let refused = |reason: &str| {
            Some(text_response(
                StatusCode::FORBIDDEN,
                format!(
                    "{what} changes the node: {reason}; send the node's token as \
                     `Authorization: Bearer …`, or call from this machine (e.g. curl -X {} \
                     http://127.0.0.1:PORT{})",
                    request.method(),
                    request.uri().path()
                ),
            ))
        };
        if !is_loopback(connection.remote.ip()) {
            return refused("without a token it is only taken from loopback");
        }
        match atoll_ingress::server::request_host(request) {
            Some(host) if is_loopback_host(&host) => {}
            Some(host) => {
                return refused(&format!(
                    "without a token the Host must be loopback, not `{host}`"
                ));
            }
            None => return refused("without a token the Host must be loopback"),
        }
        if request.headers().contains_key(http::header::ORIGIN) {
            return refused("it came from a web page (Origin header)");
        }
        // A proxy in between (the node's own origin routes among them) says so.
        for proxied in ["x-forwarded-for", "forwarded", "atoll-hops", "via"] {
            if request.headers().contains_key(proxied) {
                return refused("it came through a proxy (forwarding headers)");
            }
        }
        if let Some(site) = request.headers().get("sec-fetch-site")
            && site.as_bytes() != b"none"
        {
            return refused("it came from a web page (Sec-Fetch-Site header)");
        }
        None
    }

    fn drain_state(&self) -> Response<ResponseBody> {
        match self.cluster.is_draining() {
            true => text_response(StatusCode::OK, "draining"),
            false => text_response(StatusCode::OK, "serving"),
        }
    }
}

impl Handler for AdminService {
    type Body = ResponseBody;

    async fn handle<B>(&self, request: Request<B>, connection: ConnectionInfo) -> Response<ResponseBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        // Every method but GET and HEAD may change something (today POST and DELETE
        // /drain): checked before routing, so a new endpoint is covered by default.
        let reads = matches!(*request.method(), http::Method::GET | http::Method::HEAD);
        if !reads && let Some(refusal) = self.refuse_change(&request, &connection) {
            return refusal;
        }
        match request.uri().path() {
            "/healthz" => text_response(StatusCode::OK, "ok"),
            "/readyz" => match self.routing.current() {
                _ if self.cluster.is_draining() => {
                    text_response(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining")
                }
                Some(table) => {
                    // Ready while it serves; a version that could not be loaded (or is
                    // still loading) is named here and, for a load balancer, in `/sync`.
                    let sync = self.routing.sync_status();
                    let degraded = match (sync.quarantined.len(), sync.loading.len()) {
                        (0, 0) => String::new(),
                        (quarantined, loading) => {
                            format!("; degraded: {quarantined} quarantined, {loading} loading")
                        }
                    };
                    text_response(StatusCode::OK, format!("ready: {} routes{degraded}", table.len()))
                }
                None => text_response(StatusCode::SERVICE_UNAVAILABLE, "not ready: no route table yet"),
            },
            "/sync" => {
                let sync = self.routing.sync_status();
                let status = if sync.is_degraded() {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                };
                let mut body = serde_json::to_value(&*sync).unwrap_or_default();
                body["lag"] = sync.lag().into();
                body["degraded"] = sync.is_degraded().into();
                let mut response = text_response(status, body.to_string());
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                response
            }
            "/drain" => match *request.method() {
                http::Method::POST => {
                    self.cluster.set_draining(true);
                    self.drain_state()
                }
                http::Method::DELETE => {
                    self.cluster.set_draining(false);
                    self.drain_state()
                }
                http::Method::GET | http::Method::HEAD => self.drain_state(),
                _ => {
                    let mut response = text_response(
                        StatusCode::METHOD_NOT_ALLOWED,
                        "use POST, DELETE or GET on /drain",
                    );
                    response.headers_mut().insert(
                        http::header::ALLOW,
                        http::HeaderValue::from_static("GET, POST, DELETE"),
                    );
                    response
                }
            },
            "/peers" => Response::builder()
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(ResponseBody::whole(self.cluster.describe().to_string()))
                .expect("static response parts are valid"),
            "/metrics" => {
                if let Some(refresh) = &self.refresh_metrics {
                    refresh();
                }
                Response::builder()
                    .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                    .body(ResponseBody::whole(self.metrics.render()))
                    .expect("static response parts are valid")
            }
            other => text_response(StatusCode::NOT_FOUND, format!("no admin endpoint `{other}`")),
        }
    }
}

fn unauthorized(message: String) -> Response<ResponseBody> {
    let mut response = text_response(StatusCode::UNAUTHORIZED, message);
    response.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer"),
    );
    response
}

/// 127.0.0.0/8, ::1, and IPv4 loopback mapped into IPv6.
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// `localhost`, `*.localhost` (RFC 6761: they resolve to loopback), or a loopback IP
/// literal, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim().to_ascii_lowercase();
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((inside, after)) if after.is_empty() || after.starts_with(':') => inside.to_string(),
            _ => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_string(),
            Some(_) => return false,
            None => host.clone(),
        },
    };
    let name = name.trim_end_matches('.');
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    name.parse::<IpAddr>().is_ok_and(is_loopback)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ClusterOptions;

    fn service(token: Option<&str>) -> Arc<AdminService> {
        let cluster = Cluster::new(ClusterOptions {
            name: "n1".into(),
            region: "r".into(),
            region_fallback: Vec::new(),
            home_replicas: 1,
            source_ip: None,
            key: None,
        });
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        AdminService::new(Routing::new(), metrics, cluster, token.map(str::to_string), None)
    }

    async fn call(
        service: &Arc<AdminService>,
        method: &str,
        peer: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, String) {
        let mut request = Request::builder()
            .method(method)
            .uri("/drain")
            .header("host", "127.0.0.1:9090");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(http_body_util::Empty::<Bytes>::new()).unwrap();
        let info = ConnectionInfo::plain("127.0.0.1:9090".parse().unwrap(), peer.parse().unwrap());
        let response = service.handle(request, info).await;
        let status = response.status();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// A peer that is not on loopback cannot be had over a loopback-only test network, so
    /// this one calls the handler with the connection a remote peer would have.
    #[tokio::test]
    async fn a_remote_peer_needs_the_token() {
        let admin = service(Some("node-token"));
        let (status, body) = call(&admin, "POST", "192.0.2.7:40000", &[]).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert!(body.contains("only taken from loopback"), "{body}");
        assert!(!admin.cluster.is_draining());
        let (status, body) = call(
            &admin,
            "POST",
            "192.0.2.7:40000",
            &[("authorization", "Bearer node-token")],
        )
        .await;
        assert_eq!((status, body.trim()), (StatusCode::OK, "draining"));
        assert!(admin.cluster.is_draining());
        // From loopback, IPv4 mapped into IPv6 counts as loopback.
        let (status, body) = call(&admin, "DELETE", "[::ffff:127.0.0.1]:40000", &[]).await;
        assert_eq!((status, body.trim()), (StatusCode::OK, "serving"));
    }

    #[tokio::test]
    async fn a_node_without_a_token_takes_changes_only_from_loopback() {
        let admin = service(None);
        let (status, body) = call(
            &admin,
            "POST",
            "127.0.0.1:40000",
            &[("authorization", "Bearer guess")],
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(body.contains("this node has no token"), "{body}");
        assert!(!admin.cluster.is_draining());
        let (status, _) = call(&admin, "POST", "192.0.2.7:40000", &[]).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(!admin.cluster.is_draining());
        // Any method but GET and HEAD is checked, also where nothing is routed yet.
        let (status, _) = call(&admin, "PUT", "192.0.2.7:40000", &[]).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let (status, body) = call(&admin, "GET", "192.0.2.7:40000", &[]).await;
        assert_eq!((status, body.trim()), (StatusCode::OK, "serving"));
    }

    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "LOCALHOST:9090",
            "admin.localhost:1",
            "127.0.0.1",
            "127.0.0.12:9090",
            "[::1]:9090",
            "[::1]",
            "localhost.",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:9090",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "10.0.0.1:9090",
            "[::2]:9090",
            "[::1]x",
            "localhost:x",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
