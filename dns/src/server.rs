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
//! default region. hickory truncates (TC) UDP answers over the client's buffer size; the
//! client retries over TCP.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::opt::{EdnsCode, EdnsOption};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};

use crate::answer::{Question, answer};
use crate::cli::DnsArgs;
use crate::cluster::ClusterView;
use crate::config::DnsConfig;
use crate::source::{ClusterSource, poll, unix_now};

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
}

impl DnsHandler {
    /// A handler answering under `config` from whatever `view` holds at query time.
    pub fn new(config: Arc<DnsConfig>, view: Arc<ArcSwap<ClusterView>>) -> DnsHandler {
        DnsHandler {
            config,
            view,
            rotation: AtomicUsize::new(0),
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let mut client = Some(request.src().ip());
        let mut response_edns: Option<Edns> = None;
        let mut code = None;
        if let Some(request_edns) = &request.edns {
            let mut edns = Edns::new();
            edns.set_max_payload(request_edns.max_payload().max(512));
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
        let builder = MessageResponseBuilder::new(&request.queries, response_edns.as_ref());
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

/// Runs `atoll dns` until `shutdown` completes: validates the flags, connects to the
/// source, binds, prints `dns listening on udp://ADDR tcp://ADDR` (the real port when
/// asked for port 0), then [`serve`]s.
pub async fn run(args: DnsArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let config = args.config()?;
    let source = args.source().await?;
    let (udp, tcp) = bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", args.listen))?;
    let addr = udp.local_addr()?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "dns listening on udp://{addr} tcp://{addr}")?;
        stdout.flush()?;
    }
    serve(config, source, udp, tcp, shutdown).await
}

/// Answers on the bound `udp` and `tcp` under `config` until `shutdown` completes, while a
/// poller keeps the cluster view fresh from `source`. Until its first snapshot arrives,
/// routed names answer SERVFAIL (see [`crate::answer`]).
pub async fn serve(
    config: DnsConfig,
    source: ClusterSource,
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
