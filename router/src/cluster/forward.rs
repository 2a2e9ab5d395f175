//! Forwarding a request to a peer: the request with its signed hop header, sent on the
//! pooled HTTP/1.1 client, the answer relayed as it arrives, and what each outcome counts
//! for the peer (its load figure here, outlier ejection).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full, Limited};

use super::{Cluster, FORWARDING_HEADERS, HOP_HEADER, NotServed, not_served};
use crate::body::{PeerBody, ResponseBody};
use crate::hop::{Bound, HopClaims};

/// Connecting to a peer (same LAN or region): a dead one must cost little.
pub(super) const PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Largest response relayed from a peer: the largest a function may give. Relayed as it
/// arrives, so this bounds bytes passed on, not memory held.
const MAX_FORWARDED_RESPONSE: usize = atoll_core::manifest::MAX_RESPONSE_BYTES as usize;
/// Largest "not served here" refusal read from a peer (a line of text).
const MAX_REFUSAL_BYTES: usize = 64 * 1024;

/// Why a forward did not produce an answer.
#[derive(Debug)]
pub struct ForwardError {
    /// The request may have reached the peer (so it may have run there).
    pub maybe_sent: bool,
    pub reason: String,
}

impl Cluster {
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
    use crate::cluster::OUTLIER_THRESHOLD;
    use crate::cluster::tests::options;

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
            traffic: None,
            secrets: Default::default(),
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
