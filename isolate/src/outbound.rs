//! Where an outbound call may connect, and the node's one client that makes it.
//!
//! A call passes the allow-list, then DNS, then the SSRF guard, in that order, before any
//! byte leaves the node:
//!
//! ```text
//! scheme://host:port ─▶ AllowedHosts::allowing ─ no ─▶ Refusal::NotAllowed
//!                         │ yes
//!                         ▼
//!   an address literal: internal and not listed by name ─▶ Refusal::Internal
//!   a name: resolved by the client's GuardedResolver, which drops internal addresses
//!           unless the host is listed by name ─ none left ─▶ Refusal::Internal
//!                         ▼
//!   the client connects to exactly the addresses the guard let through
//! ```
//!
//! The guard sits *in* the client's resolver, so the addresses checked are the addresses
//! connected to: there is no second lookup a rebinding DNS server could answer differently.
//! The node has one [`OutboundClient`] with two pools — one whose resolver refuses internal
//! addresses, one that allows them for hosts some manifest lists by name — so a connection
//! one function may open to an internal host is never handed to a function that may not.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use atoll_core::outbound::{AllowedHosts, Scheme, is_internal, is_never_reachable};

/// Why an outbound call was refused before it connected. Display is one line for the
/// function's log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No `[outbound] allowed_hosts` entry allows it.
    #[error("{url} is not in [outbound] allowed_hosts")]
    NotAllowed {
        /// `scheme://host:port`.
        url: String,
    },
    /// The name did not resolve.
    #[error("{host} does not resolve: {reason}")]
    Unresolved {
        /// The host name.
        host: String,
        /// The resolver's error.
        reason: String,
    },
    /// Every address is internal and the host was not listed by name (or the node lets no
    /// function reach internal addresses, or they are never reachable: link-local and cloud
    /// metadata). The addresses are for the operator's log, not the function's: they map
    /// the node's internal network.
    #[error(
        "{host} resolves only to internal addresses; list it by name in [outbound] allowed_hosts to reach it (link-local and cloud metadata addresses are never reached; the node may refuse all internal ones)"
    )]
    Internal {
        /// The host name.
        host: String,
        /// What it resolved to.
        addresses: String,
    },
}

/// Which addresses a call may connect to once it is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Public addresses only: the host is allowed through a wildcard.
    Public,
    /// Internal addresses too: the host is listed by its exact name or address.
    Internal,
}

/// Whether `scheme://host:port` may be called under `allowed`, before any lookup: the
/// allow-list, and for an address literal the SSRF guard too. `host` is bare (an IPv6
/// address without brackets). A name's addresses are checked when the client resolves it.
/// `listed_internal` is the node's policy: whether a host listed by name may be internal at
/// all (`--outbound-internal listed`, the default) or not (`deny`).
pub fn check_destination(
    allowed: &AllowedHosts,
    scheme: Scheme,
    host: &str,
    port: u16,
    listed_internal: bool,
) -> Result<Reach, Refusal> {
    if allowed.allowing(scheme, host, port).is_none() {
        let shown = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        return Err(Refusal::NotAllowed {
            url: format!(
                "{}://{shown}:{port}",
                if scheme == Scheme::Https { "https" } else { "http" }
            ),
        });
    }
    let reach = if listed_internal && allowed.allows_internal(scheme, host, port) {
        Reach::Internal
    } else {
        Reach::Public
    };
    if let Ok(address) = host.parse::<IpAddr>()
        && ((reach == Reach::Public && is_internal(address)) || is_never_reachable(address))
    {
        return Err(Refusal::Internal {
            host: host.to_string(),
            addresses: address.to_string(),
        });
    }
    Ok(reach)
}

/// The addresses `host` resolves to that `reach` may connect to.
pub async fn guarded_lookup(host: &str, port: u16, reach: Reach) -> Result<Vec<SocketAddr>, Refusal> {
    let resolved: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(address) => vec![SocketAddr::new(address, port)],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|error| Refusal::Unresolved {
                host: host.to_string(),
                reason: error.to_string(),
            })?
            .collect(),
    };
    let (usable, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = resolved.into_iter().partition(|address| {
        !is_never_reachable(address.ip()) && (reach == Reach::Internal || !is_internal(address.ip()))
    });
    if usable.is_empty() {
        let addresses = refused
            .iter()
            .map(|address| address.ip().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(if addresses.is_empty() {
            Refusal::Unresolved {
                host: host.to_string(),
                reason: "no addresses".into(),
            }
        } else {
            Refusal::Internal {
                host: host.to_string(),
                addresses,
            }
        });
    }
    Ok(usable)
}

/// The client's resolver: every name is looked up and guarded here.
struct GuardedResolver(Reach);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let (host, reach) = (name.as_str().to_string(), self.0);
        Box::pin(async move {
            // The port is set by the client from the URL.
            let addresses = guarded_lookup(&host, 0, reach).await?;
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The refusal inside a client error, if the guard refused the call.
pub fn refusal_in(error: &reqwest::Error) -> Option<&Refusal> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = source {
        if let Some(refusal) = error.downcast_ref::<Refusal>() {
            return Some(refusal);
        }
        source = error.source();
    }
    None
}

/// Why the node's outbound client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OutboundSetupError {
    #[error("cannot read the outbound CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("the outbound CA file {path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("cannot build the outbound HTTP client: {0}")]
    Client(String),
}

/// How long connecting may take at most (a call's own deadline may be shorter).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The node's outbound HTTP client: pooled keep-alive connections shared by every
/// function, TLS checked against the system's roots plus the operator's extra CA. It runs
/// on the node's tokio runtime; guest threads block on it (see `wasi_http`).
pub struct OutboundClient {
    public: reqwest::Client,
    internal: reqwest::Client,
    /// The trust roots, for the origin clients made later ([`OutboundClient::origin_client`]).
    root_store: Arc<rustls::RootCertStore>,
    runtime: tokio::runtime::Handle,
    roots: usize,
    /// Whether a host listed by name may be internal (see [`check_destination`]).
    listed_internal: bool,
    /// Calls waiting at once on the whole node: each holds a guest thread.
    waits: Arc<tokio::sync::Semaphore>,
    max_waits: usize,
}

/// Default for how many outbound calls may wait at once on a node: each blocks a thread,
/// and threads are a node-wide resource (tokio's blocking pool has 512).
pub const DEFAULT_MAX_WAITS: usize = 256;

/// How the node treats internal addresses for hosts a manifest lists by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InternalPolicy {
    /// A host listed by its exact name or address may be internal (loopback, private);
    /// the default, for operators whose tenants reach their own internal services.
    #[default]
    Listed,
    /// No function reaches an internal address, listed or not.
    Deny,
}

impl std::fmt::Debug for OutboundClient {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("OutboundClient")
            .field("roots", &self.roots)
            .finish()
    }
}

impl OutboundClient {
    /// Builds the client on the current tokio runtime. `extra_ca` is a PEM file of CA
    /// certificates trusted beside the system's.
    pub fn new(extra_ca: Option<&Path>) -> Result<Arc<OutboundClient>, OutboundSetupError> {
        OutboundClient::with_policy(extra_ca, InternalPolicy::Listed, DEFAULT_MAX_WAITS)
    }

    /// [`OutboundClient::new`] with the node's internal-address policy and its cap on calls
    /// waiting at once.
    pub fn with_policy(
        extra_ca: Option<&Path>,
        internal: InternalPolicy,
        max_waits: usize,
    ) -> Result<Arc<OutboundClient>, OutboundSetupError> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject;

        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for error in &native.errors {
            tracing::warn!(%error, "a system CA certificate could not be loaded");
        }
        let (added, ignored) = roots.add_parsable_certificates(native.certs);
        if ignored > 0 {
            tracing::debug!(ignored, "system CA certificates rustls cannot use");
        }
        let mut count = added;
        if let Some(path) = extra_ca {
            let shown = path.display().to_string();
            let pem = std::fs::read(path).map_err(|error| OutboundSetupError::CaFile {
                path: shown.clone(),
                reason: error.to_string(),
            })?;
            let certificates = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| OutboundSetupError::CaFile {
                    path: shown.clone(),
                    reason: error.to_string(),
                })?;
            if certificates.is_empty() {
                return Err(OutboundSetupError::NoCertificate { path: shown });
            }
            for certificate in certificates {
                roots
                    .add(certificate)
                    .map_err(|error| OutboundSetupError::CaFile {
                        path: shown.clone(),
                        reason: error.to_string(),
                    })?;
                count += 1;
            }
        }
        let roots = Arc::new(roots);
        let build = |reach: Reach| {
            let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|error| OutboundSetupError::Client(error.to_string()))?
            .with_root_certificates(Arc::clone(&roots))
            .with_no_client_auth();
            tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            reqwest::Client::builder()
                .tls_backend_preconfigured(tls)
                .dns_resolver(GuardedResolver(reach))
                .no_proxy()
                // A redirect is the guest's to follow: each hop passes the allow-list again.
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(CONNECT_TIMEOUT)
                .pool_idle_timeout(Duration::from_secs(60))
                .pool_max_idle_per_host(32)
                .build()
                .map_err(|error| OutboundSetupError::Client(error.to_string()))
        };
        Ok(Arc::new(OutboundClient {
            public: build(Reach::Public)?,
            internal: build(Reach::Internal)?,
            root_store: Arc::clone(&roots),
            runtime: tokio::runtime::Handle::current(),
            roots: count,
            listed_internal: internal == InternalPolicy::Listed,
            waits: Arc::new(tokio::sync::Semaphore::new(max_waits.max(1))),
            max_waits: max_waits.max(1),
        }))
    }

    /// The trust roots outbound calls use (the system's and `--outbound-ca`), for the
    /// origins' connections (`router::origin`).
    pub fn tls_roots(&self) -> Arc<rustls::RootCertStore> {
        Arc::clone(&self.root_store)
    }

    /// The pool for calls of this reach.
    pub fn client(&self, reach: Reach) -> &reqwest::Client {
        match reach {
            Reach::Public => &self.public,
            Reach::Internal => &self.internal,
        }
    }

    /// The runtime the client's connections live on.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Whether a host listed by name may be internal.
    pub fn listed_internal(&self) -> bool {
        self.listed_internal
    }

    /// A slot for one waiting call, or `None` when the node's cap is reached.
    pub fn try_wait(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.waits).try_acquire_owned().ok()
    }

    /// The node's cap on calls waiting at once.
    pub fn max_waits(&self) -> usize {
        self.max_waits
    }

    /// How many CA certificates are trusted.
    pub fn trusted_roots(&self) -> usize {
        self.roots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(entries: &[&str]) -> AllowedHosts {
        AllowedHosts::parse(entries).unwrap()
    }

    /// The whole check a call goes through: destination, then the guarded lookup.
    async fn checked_addresses(
        allowed: &AllowedHosts,
        scheme: Scheme,
        host: &str,
        port: u16,
    ) -> Result<Vec<SocketAddr>, Refusal> {
        let reach = check_destination(allowed, scheme, host, port, true)?;
        guarded_lookup(host, port, reach).await
    }

    #[tokio::test]
    async fn nothing_listed_nothing_reached() {
        let refusal = checked_addresses(&AllowedHosts::default(), Scheme::Https, "example.com", 443)
            .await
            .unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "https://example.com:443 is not in [outbound] allowed_hosts"
        );
    }

    #[tokio::test]
    async fn a_wildcard_does_not_reach_loopback_but_a_listed_name_does() {
        let wildcard = allowed(&["*://*:*"]);
        let refusal = checked_addresses(&wildcard, Scheme::Http, "localhost", 8080)
            .await
            .unwrap_err();
        assert!(matches!(refusal, Refusal::Internal { .. }), "{refusal}");
        assert!(refusal.to_string().contains("list it by name"), "{refusal}");
        let refusal = checked_addresses(&wildcard, Scheme::Http, "169.254.169.254", 80)
            .await
            .unwrap_err();
        assert!(matches!(refusal, Refusal::Internal { .. }), "{refusal}");

        let listed = allowed(&["http://localhost:8080", "http://127.0.0.1:9"]);
        let addresses = checked_addresses(&listed, Scheme::Http, "localhost", 8080)
            .await
            .unwrap();
        assert!(!addresses.is_empty());
        assert!(
            addresses
                .iter()
                .all(|address| address.ip().is_loopback() && address.port() == 8080)
        );
        let addresses = checked_addresses(&listed, Scheme::Http, "127.0.0.1", 9)
            .await
            .unwrap();
        assert_eq!(addresses, ["127.0.0.1:9".parse::<SocketAddr>().unwrap()]);

        // Listed or not, metadata is never reached; and a node may deny all internal ones.
        let metadata = allowed(&["http://169.254.169.254"]);
        let refusal = checked_addresses(&metadata, Scheme::Http, "169.254.169.254", 80)
            .await
            .unwrap_err();
        assert!(matches!(refusal, Refusal::Internal { .. }), "{refusal}");
        let refusal = checked_addresses(&wildcard, Scheme::Http, "localhost", 8080)
            .await
            .unwrap_err();
        assert!(
            !refusal.to_string().contains("127.0.0.1"),
            "addresses stay out of the function's log: {refusal}"
        );
        let refusal = check_destination(&listed, Scheme::Http, "127.0.0.1", 9, false).unwrap_err();
        assert!(matches!(refusal, Refusal::Internal { .. }), "{refusal}");
        assert_eq!(
            check_destination(&listed, Scheme::Http, "localhost", 8080, false),
            Ok(Reach::Public)
        );
    }
}
