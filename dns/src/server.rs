//! The DNS server: hickory-server's UDP and TCP transports around [`crate::answer`].
//!
//! hickory's `Catalog`/`Authority` machinery serves zones held as record sets; our answers
//! depend on who asks and change every poll, so [`DnsHandler`] implements
//! `RequestHandler` directly: it checks the message (one question, opcode QUERY, EDNS
//! version 0), works out the client's address — the EDNS Client Subnet (RFC 7871) address
//! when the query carries one, else the packet's source — loads the current
//! [`ClusterView`] (one atomic load, no lock) and encodes what [`answer`] returns.
//!
//! ECS: the response echoes the option with SCOPE PREFIX-LENGTH equal to the source prefix
//! (the answer was computed for exactly that subnet, which is always correct if not the
//! most cache-friendly); a source prefix of 0 means "do not locate me" and gets the
//! default region.
//!
//! UDP, where a spoofed source turns answers into a reflection attack, is bounded twice:
//! - Size: a response is at most the client's EDNS buffer size, capped at
//!   `--max-udp-payload` (1232 by default; 512 without EDNS). hickory encodes a UDP
//!   response to at most the max payload of the response's OPT record and sets TC=1 when
//!   records do not fit, so the cap is applied there, and the client retries over TCP.
//! - Rate: [`crate::rrl`] limits responses per client prefix; over the limit a response
//!   is dropped or "slipped" (sent empty with TC=1), before any answer is computed. TCP is
//!   never limited: a TCP client cannot spoof its address.
//!
//! Malformed queries that hickory answers itself (FORMERR for a message that does not
//! parse) never reach the handler, so they are not limited, but such a response is a bare
//! header, never bigger than the query.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use arc_swap::ArcSwap;
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::opt::{EdnsCode, EdnsOption};
use hickory_server::proto::serialize::binary::BinDecoder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponseBuilder, Queries};
use tokio::net::{TcpListener, UdpSocket};

use crate::answer::{Question, answer};
use crate::cluster::ClusterView;
use crate::config::{DnsConfig, MIN_UDP_PAYLOAD};
use crate::rrl::{self, Limited, RateLimiter, Verdict};
use atoll_control::ControlPlane;

use crate::source::{poll, unix_now};

/// A TCP connection idle this long is closed.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;
/// Tries at finding a port free for both UDP and TCP when asked for port 0.
const BIND_ATTEMPTS: u32 = 20;
/// The EDNS version spoken.
const EDNS_VERSION: u8 = 0;

/// Answers queries from the current cluster view.
pub struct DnsHandler {
    config: Arc<DnsConfig>,
    view: Arc<ArcSwap<ClusterView>>,
    rotation: AtomicUsize,
    limiter: Option<Mutex<RateLimiter>>,
}

impl DnsHandler {
    /// A handler answering under `config` from whatever `view` holds at query time.
    pub fn new(config: Arc<DnsConfig>, view: Arc<ArcSwap<ClusterView>>) -> DnsHandler {
        let limiter = config
            .rate_limit
            .map(|limit| Mutex::new(RateLimiter::new(limit, rrl::DEFAULT_CAPACITY)));
        DnsHandler {
            config,
            view,
            rotation: AtomicUsize::new(0),
            limiter,
        }
    }

    /// UDP responses refused by the rate limit since start (zero when it is off).
    pub fn rate_limited(&self) -> Limited {
        self.limiter
            .as_ref()
            .map(|limiter| lock(limiter).totals())
            .unwrap_or_default()
    }

    /// The rate limit's verdict on answering `request` now: TCP always passes.
    fn verdict(&self, request: &Request) -> Verdict {
        let Some(limiter) = &self.limiter else {
            return Verdict::Send;
        };
        if request.protocol() != Protocol::Udp {
            return Verdict::Send;
        }
        let now = Instant::now();
        let mut limiter = lock(limiter);
        let verdict = limiter.check(request.src().ip(), now);
        if let Some(limited) = limiter.report(now) {
            tracing::warn!(
                dropped = limited.dropped,
                slipped = limited.slipped,
                "dns rate limit: UDP responses refused since the last report"
            );
        }
        verdict
    }
}

fn lock(limiter: &Mutex<RateLimiter>) -> std::sync::MutexGuard<'_, RateLimiter> {
    // The limiter's state is consistent after any panic (plain counters and instants).
    limiter.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The question section to echo, when the query's own bytes cannot be echoed.
///
/// hickory echoes the question as the bytes the client sent. A name compressed in them is a
/// pointer to an offset of the *query*, which in the response lands on other bytes (a
/// pointer into the header reads the response's flags as a label): the response would not
/// parse. No real client compresses a question (the first name of a message has nothing to
/// point to but the header), so such a query gets an empty question section: re-encoding
/// the names in full would let a few 2-byte pointers come back as many full names, an
/// amplification this server promises not to be.
fn echoed_question(queries: &Queries) -> Option<Queries> {
    if !has_compressed_name(queries.as_bytes(), queries.len()) {
        return None;
    }
    Queries::read(&mut BinDecoder::new(&[]), 0).ok()
}

/// Whether any of the `count` questions in `bytes` has a name with a compression pointer.
fn has_compressed_name(bytes: &[u8], count: usize) -> bool {
    let mut at = 0;
    for _ in 0..count {
        loop {
            let Some(&length) = bytes.get(at) else {
                return false;
            };
            if length & 0xC0 != 0 {
                return true;
            }
            at += 1 + usize::from(length);
            if length == 0 {
                break;
            }
        }
        at += 4; // type and class
    }
    false
}

fn unanswered(request: &Request) -> ResponseInfo {
    ResponseInfo::from(Header {
        metadata: Metadata::response_from_request(&request.metadata),
        counts: HeaderCounts::default(),
    })
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        match self.verdict(request) {
            Verdict::Send => {}
            Verdict::Drop => return unanswered(request),
            Verdict::Slip => {
                // Empty, truncated, no EDNS: never bigger than the query.
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.truncation = true;
                let echoed = echoed_question(&request.queries);
                let queries = echoed.as_ref().unwrap_or(&request.queries);
                let builder = MessageResponseBuilder::new(queries, None);
                return response_handle
                    .send_response(builder.build_no_records(metadata))
                    .await
                    .unwrap_or_else(|error| {
                        tracing::debug!(%error, "failed to send a DNS response");
                        unanswered(request)
                    });
            }
        }
        let echoed = echoed_question(&request.queries);
        let queries = echoed.as_ref().unwrap_or(&request.queries);
        let mut client = Some(request.src().ip());
        let mut response_edns: Option<Edns> = None;
        let mut code = None;
        if let Some(request_edns) = &request.edns {
            let mut edns = Edns::new();
            // hickory encodes a UDP response to at most the max payload of the response's
            // EDNS, truncating (TC=1) what does not fit: this is where the cap applies.
            edns.set_max_payload(
                request_edns
                    .max_payload()
                    .min(self.config.max_udp_payload)
                    .max(MIN_UDP_PAYLOAD),
            );
            edns.set_version(EDNS_VERSION);
            if request_edns.version() > EDNS_VERSION {
                edns.set_rcode_high(ResponseCode::BADVERS.high());
                code = Some(ResponseCode::BADVERS);
            } else if let Some(EdnsOption::Subnet(subnet)) = request_edns.option(EdnsCode::Subnet) {
                client = (subnet.source_prefix() > 0).then(|| subnet.addr());
                let mut echo = *subnet;
                echo.set_scope_prefix(subnet.source_prefix());
                edns.options_mut().insert(EdnsOption::Subnet(echo));
            }
            response_edns = Some(edns);
        }
        if code.is_none() && request.metadata.op_code != OpCode::Query {
            code = Some(ResponseCode::NotImp);
        }
        let info = match (code, request.request_info()) {
            (Some(code), _) => Err(code),
            (None, Err(_)) => Err(ResponseCode::FormErr),
            (None, Ok(info)) => Ok(info),
        };
        let builder = MessageResponseBuilder::new(queries, response_edns.as_ref());
        let sent = match info {
            Err(code) => {
                response_handle
                    .send_response(builder.error_msg(&request.metadata, code))
                    .await
            }
            Ok(info) => {
                let query = info.query.original();
                let question = Question {
                    name: query.name(),
                    qtype: query.query_type(),
                    qclass: query.query_class(),
                    client,
                };
                let rotation = self.rotation.fetch_add(1, Ordering::Relaxed);
                let answer = answer(&self.view.load(), &self.config, &question, rotation);
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.authoritative = answer.authoritative;
                metadata.response_code = answer.code;
                let response = builder.build(
                    metadata,
                    answer.answers.iter(),
                    answer.authorities.iter(),
                    std::iter::empty(),
                    answer.additionals.iter(),
                );
                response_handle.send_response(response).await
            }
        };
        sent.unwrap_or_else(|error| {
            tracing::debug!(%error, "failed to send a DNS response");
            let mut metadata = Metadata::response_from_request(&request.metadata);
            metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        })
    }
}

/// Binds UDP then TCP on the same address. With port 0, UDP picks the port and TCP takes
/// the same one, trying again with another port if TCP finds it taken.
pub async fn bind(listen: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let udp = UdpSocket::bind(listen).await?;
        let addr = udp.local_addr()?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(error)
                if listen.port() == 0
                    && error.kind() == std::io::ErrorKind::AddrInUse
                    && attempt < BIND_ATTEMPTS =>
            {
                continue;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Answers on the bound `udp` and `tcp` under `config` until `shutdown` completes, while a
/// poller keeps the cluster view fresh from `source`. Until its first snapshot arrives,
/// routed names answer SERVFAIL (see [`crate::answer`]).
pub async fn serve(
    config: DnsConfig,
    source: ControlPlane,
    udp: UdpSocket,
    tcp: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let view = Arc::new(ArcSwap::from_pointee(ClusterView::unknown(
        unix_now().as_secs() as u32
    )));
    let mut server = Server::new(DnsHandler::new(Arc::clone(&config), Arc::clone(&view)));
    server.register_socket(udp);
    server.register_listener(tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);

    let (stop_poller, poller_stopped) = tokio::sync::oneshot::channel::<()>();
    let poller = tokio::spawn(poll(source, Arc::clone(&view), async move {
        let _ = poller_stopped.await;
    }));
    let zones: Vec<&str> = config.zones.iter().map(|zone| zone.name.as_str()).collect();
    tracing::info!(zones = ?zones, "dns serving");

    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        result = server.block_until_done() => Err(match result {
            Ok(()) => anyhow::anyhow!("DNS server stopped"),
            Err(error) => anyhow::anyhow!("DNS server stopped: {error}"),
        }),
    };
    let _ = stop_poller.send(());
    let _ = poller.await;
    if outcome.is_ok() {
        server
            .shutdown_gracefully()
            .await
            .context("DNS server shutdown")?;
    }
    outcome
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use hickory_server::net::xfer::Protocol;
    use hickory_server::server::Request;

    use super::echoed_question;

    fn request(bytes: &[u8]) -> Request {
        let source: SocketAddr = "10.1.2.3:53".parse().unwrap();
        Request::from_bytes(bytes.to_vec(), source, Protocol::Udp).unwrap()
    }

    #[test]
    fn compressed_questions_are_not_echoed_and_plain_ones_are() {
        let name = b"\x03www\x07example\x03com\x00";
        let mut plain = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        plain.extend_from_slice(name);
        plain.extend_from_slice(&[0, 1, 0, 1]);
        assert!(
            echoed_question(&request(&plain).queries).is_none(),
            "echoed as sent"
        );

        // One name, then 30 questions that are each a 2-byte pointer to it: echoing them in
        // full would answer 49 bytes of questions with 30 names.
        let mut pointers = vec![0x12, 0x34, 1, 0, 0, 31, 0, 0, 0, 0, 0, 0];
        pointers.extend_from_slice(name);
        pointers.extend_from_slice(&[0, 1, 0, 1]);
        for _ in 0..30 {
            pointers.extend_from_slice(&[0xC0, 12, 0, 28, 0, 1]);
        }
        let request = request(&pointers);
        assert_eq!(request.queries.len(), 31);
        let echoed = echoed_question(&request.queries).expect("not echoed as sent");
        assert!(echoed.is_empty());
    }
}
