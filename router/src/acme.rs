//! Automatic certificates (ACME, RFC 8555) for every routed domain.
//!
//! STUB: the real manager replaces it.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use dashmap::DashMap;

use crate::served::Routing;
use crate::tls::Certificates;

/// Which challenge proves control of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    TlsAlpn01,
    Http01,
}

#[derive(Debug, Clone)]
pub struct AcmeOptions {
    /// The ACME directory URL.
    pub directory: String,
    pub email: Option<String>,
    /// PEM file of a CA to trust for the ACME server's own TLS (pebble, step-ca).
    pub ca_cert: Option<PathBuf>,
    pub challenge: ChallengeKind,
    /// Where the account and certificates are kept (`DATA/acme`).
    pub state_dir: PathBuf,
}

/// HTTP-01 key authorizations by token, answered on `/.well-known/acme-challenge/TOKEN`.
#[derive(Debug, Default)]
pub struct Http01Challenges {
    tokens: DashMap<String, String>,
}

impl Http01Challenges {
    pub fn new() -> Arc<Self> {
        Arc::new(Http01Challenges::default())
    }

    pub fn insert(&self, token: &str, key_authorization: &str) {
        self.tokens
            .insert(token.to_string(), key_authorization.to_string());
    }

    pub fn remove(&self, token: &str) {
        self.tokens.remove(token);
    }

    pub fn key_authorization(&self, token: &str) -> Option<String> {
        self.tokens.get(token).map(|value| value.clone())
    }
}

/// Obtains, stores, reloads and renews certificates for `routing`'s exact hosts until
/// `shutdown`.
pub async fn run(
    options: AcmeOptions,
    certificates: Arc<Certificates>,
    http01: Arc<Http01Challenges>,
    routing: Arc<Routing>,
    shutdown: impl Future<Output = ()>,
) {
    let _ = (options, certificates, http01, routing);
    shutdown.await;
}
