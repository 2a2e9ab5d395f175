//! The admin listener: liveness, readiness and metrics, apart from user traffic.
//!
//! - `GET /healthz` — 200 while the process runs.
//! - `GET /readyz`  — 200 once the node has a route table (from the registry or its disk
//!   cache), 503 before: a load balancer sends traffic only to ready nodes.
//! - `GET /metrics` — Prometheus text.

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Body;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::served::Routing;
use crate::server::{BoxError, ConnectionInfo, Handler, text_response};

pub struct AdminService {
    routing: Arc<Routing>,
    metrics: PrometheusHandle,
}

impl AdminService {
    pub fn new(routing: Arc<Routing>, metrics: PrometheusHandle) -> Arc<Self> {
        Arc::new(AdminService { routing, metrics })
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
                Some(table) => text_response(StatusCode::OK, format!("ready: {} routes", table.len())),
                None => text_response(StatusCode::SERVICE_UNAVAILABLE, "not ready: no route table yet"),
            },
            "/metrics" => Response::builder()
                .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                .body(Full::new(Bytes::from(self.metrics.render())))
                .expect("static response parts are valid"),
            other => text_response(StatusCode::NOT_FOUND, format!("no admin endpoint `{other}`")),
        }
    }
}
