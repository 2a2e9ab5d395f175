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
//!   to, their load, and which it has ejected.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Body;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::cluster::Cluster;
use crate::served::Routing;
use crate::server::{BoxError, ConnectionInfo, Handler, text_response};

pub struct AdminService {
    routing: Arc<Routing>,
    metrics: PrometheusHandle,
    cluster: Arc<Cluster>,
}

impl AdminService {
    pub fn new(routing: Arc<Routing>, metrics: PrometheusHandle, cluster: Arc<Cluster>) -> Arc<Self> {
        Arc::new(AdminService {
            routing,
            metrics,
            cluster,
        })
    }

    fn drain_state(&self) -> Response<Full<Bytes>> {
        match self.cluster.is_draining() {
            true => text_response(StatusCode::OK, "draining"),
            false => text_response(StatusCode::OK, "serving"),
        }
    }
}

impl Handler for AdminService {
    async fn handle<B>(
        self: Arc<Self>,
        request: Request<B>,
        _connection: ConnectionInfo,
    ) -> Response<Full<Bytes>>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
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
                .body(Full::new(Bytes::from(self.cluster.describe().to_string())))
                .expect("static response parts are valid"),
            "/metrics" => Response::builder()
                .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                .body(Full::new(Bytes::from(self.metrics.render())))
                .expect("static response parts are valid"),
            other => text_response(StatusCode::NOT_FOUND, format!("no admin endpoint `{other}`")),
        }
    }
}
