//! Service bindings, the node's side: a function's call to `http://NAME.atoll.internal/…`
//! runs function NAME in this process, through the same pool, limits and observer as a
//! request from outside, without touching a socket.
//!
//! Every node serves every function, so the callee is always here: the call never leaves
//! the machine (a home node elsewhere would only add a hop). The callee runs by the
//! caller's deadline, knows its place in the chain (the isolate refuses calls past
//! `MAX_SERVICE_DEPTH`), and its answer — whatever its status — is the caller's response;
//! only the node's own failures (no such function, a body over the caller's budget) are
//! errors. The callee sees `REMOTE_ADDR=0.0.0.0` and none of the node's forwarding headers.

use std::sync::Arc;
use std::time::Instant;

use atoll_isolate::wasi_http::{ServiceCall, ServiceCaller, ServiceFailure, ServiceFuture, ServiceResponse};
use atoll_isolate::{CgiRequest, GuestExecutor};
use http_body_util::{BodyExt, Limited};

use crate::served::{Routing, ServedFunction};
use crate::service::invoke;

/// Runs service calls on this node's functions.
pub struct LocalServices {
    routing: Arc<Routing>,
    executor: Arc<GuestExecutor>,
}

impl LocalServices {
    pub fn new(routing: Arc<Routing>, executor: Arc<GuestExecutor>) -> Arc<Self> {
        Arc::new(LocalServices { routing, executor })
    }
}

impl ServiceCaller for LocalServices {
    fn call(&self, call: ServiceCall) -> ServiceFuture {
        let (routing, executor) = (Arc::clone(&self.routing), Arc::clone(&self.executor));
        Box::pin(async move {
            let Some(served) = routing.function(&call.function) else {
                return Err(ServiceFailure::NotServed(call.function));
            };
            if call.origin {
                return call_origin(&served, call).await;
            }
            let started = Instant::now();
            let (raw_path, query) = match call.path_and_query.split_once('?') {
                Some((path, query)) => (path.to_string(), query.to_string()),
                None => (call.path_and_query.clone(), String::new()),
            };
            // What ingress strips from a client's request, a caller cannot set either.
            let mut headers = call.headers;
            for name in crate::cluster::FORWARDING_HEADERS {
                headers.remove(name);
            }
            let request = CgiRequest {
                method: call.method.as_str().to_string(),
                raw_path,
                query,
                protocol: "HTTP/1.1".into(),
                scheme: "http".into(),
                server_name: format!("{}.{}", call.function, atoll_core::manifest::SERVICE_DOMAIN),
                server_port: 80,
                // Not loopback: a callee that trusts local peers must not trust its callers.
                remote_addr: "0.0.0.0".into(),
                remote_port: 0,
                matched_route: String::new(),
                route_prefix: String::new(),
                headers,
                body: call.body,
                service_depth: call.depth,
                deadline: Some(call.deadline),
                cron_tick: None,
            };
            let deadline = tokio::time::Instant::from_std(call.deadline);
            let response = invoke(&executor, &served, request, Some(deadline)).await;
            let status = response.status();
            served.metrics.request(status.as_u16(), started.elapsed());
            tracing::debug!(caller = %call.caller, function = %call.function, depth = call.depth, status = status.as_u16(), "service call");
            collect(response, call.max_response_bytes).await
        })
    }
}

/// A function's call to its own origins (`http://origin.atoll.internal/…`): through the
/// route's origin pool (balancing, health, retries), answered whole within the caller's
/// budget and deadline.
async fn call_origin(served: &ServedFunction, call: ServiceCall) -> Result<ServiceResponse, ServiceFailure> {
    let Some(origins) = served.origins.clone() else {
        return Err(ServiceFailure::Failed(format!(
            "`{}` lists no origins",
            call.caller
        )));
    };
    let deadline = tokio::time::Instant::from_std(call.deadline);
    let target = call
        .path_and_query
        .parse::<http::uri::PathAndQuery>()
        .map_err(|error| ServiceFailure::Failed(format!("the target is not a URI: {error}")))?;
    let response = origins
        .send(
            call.method,
            target,
            call.headers,
            call.body,
            None,
            call.depth,
            Some(deadline),
        )
        .await
        .map_err(|failure| ServiceFailure::Failed(format!("no origin answered: {failure:?}")))?;
    collect(response, call.max_response_bytes).await
}

/// A response read whole, up to `max_bytes`.
async fn collect(
    response: http::Response<crate::body::ResponseBody>,
    max_bytes: u64,
) -> Result<ServiceResponse, ServiceFailure> {
    let (parts, body) = response.into_parts();
    let limit = usize::try_from(max_bytes).unwrap_or(usize::MAX);
    let body = match Limited::new(body, limit).collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return Err(ServiceFailure::TooLarge(max_bytes));
        }
        Err(error) => return Err(ServiceFailure::Failed(format!("reading the response: {error}"))),
    };
    Ok(ServiceResponse {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}
