//! Automatic certificates (ACME, RFC 8555) for every routed domain.
//!
//! Users point a domain at a node and push a function routed at it; they expect HTTPS to
//! just work, as Caddy made normal. So the node watches its route table and, for every exact
//! host that could have a public certificate, obtains one from the configured ACME server,
//! keeps it on disk and renews it when a third of its lifetime remains. The manager knows
//! nothing of routes: [`run`] is fed the hosts by a closure it calls every second (the
//! router's `Routing::exact_hosts`).
//!
//! ```text
//! hosts() (the route table's exact hosts), every second
//!   │ keep public DNS names that no --certs certificate covers
//!   ▼
//! one task per domain: renewal(validity, now) ── fresh ──▶ sleep until due (≤ 1 h), decide again
//!                        │ due (or no certificate)
//!                        ▼
//!   new order ─▶ publish the challenge (tls-alpn-01: Certificates, http-01: Http01Challenges)
//!             ─▶ validated ─▶ finalize (CSR, new P-256 key) ─▶ certs/DOMAIN.key, DOMAIN.crt
//!             ─▶ Certificates::set_managed            (failed: back off, try again)
//! ```
//!
//! Design choices:
//! - **Domains are independent.** Each has its own task, its own backoff (1 s doubling to
//!   10 min, with jitter) and its own challenge responses; a domain whose DNS points
//!   elsewhere fails alone and keeps retrying while the others are issued.
//! - **Disk first.** Stored certificates are installed before anything talks to the CA, and a
//!   certificate that is still fresh never causes an order: a restart during a CA outage
//!   serves exactly what it served before (static stability). The account is created lazily,
//!   on the first order, and reused from `account.json` while the directory URL is the same.
//! - **Crash safety.** Files are replaced with [`write_atomically`]; secrets (account key,
//!   certificate keys) are created mode 0600 before they are filled. The key is written
//!   before the certificate, so a crash in between leaves a pair that does not match, which
//!   the next start refuses (logged) and replaces with a new order — never a half-written
//!   file.
//! - **Pure decisions.** Which names qualify ([`is_public_dns_name`]), when to renew
//!   ([`renewal`]) and how long to back off ([`retry_delay`]) are functions of their inputs,
//!   tested without a CA or a clock.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use atoll_core::durable::{remove_stale_temporaries, temporary_path, write_atomically};
use dashmap::DashMap;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, Order,
    OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, CustomExtension, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use tokio::task::{AbortHandle, JoinSet};

use crate::tls::{CertificateEntry, Certificates};

/// Certificates by `outcome`: `issued` (obtained from the CA), `failed` (an attempt that did
/// not end with a certificate), `loaded` (read from disk at start).
pub const CERTIFICATES_TOTAL: &str = "atoll_acme_certificates_total";

/// How often the route table is checked for new or removed domains.
const DOMAIN_POLL: Duration = Duration::from_secs(1);
/// The first retry after a failure; doubles per failure.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between two attempts for a failing domain.
const MAX_RETRY: Duration = Duration::from_secs(10 * 60);
/// The longest sleep before the renewal decision is made again (clocks jump, files change).
const RENEWAL_RECHECK: Duration = Duration::from_secs(60 * 60);
/// How long one attempt (order to installed certificate) may take before it is abandoned.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// How long the CA gets to validate a challenge, and then to issue.
const VALIDATION_TIMEOUT: Duration = Duration::from_secs(120);

/// Which challenge proves control of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// RFC 8737: a self-signed certificate served on the TLS listener to ClientHellos that
    /// offer ALPN `acme-tls/1`.
    TlsAlpn01,
    /// RFC 8555 §8.3: the key authorization at `http://DOMAIN/.well-known/acme-challenge/TOKEN`
    /// on the cleartext listener.
    Http01,
}

impl ChallengeKind {
    fn acme_type(self) -> ChallengeType {
        match self {
            ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
            ChallengeKind::Http01 => ChallengeType::Http01,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ChallengeKind::TlsAlpn01 => "tls-alpn-01",
            ChallengeKind::Http01 => "http-01",
        }
    }
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

// ---------------------------------------------------------------------------------------
// Pure decisions

/// Whether `host` could get a certificate from a public CA: a syntactically valid DNS name
/// with at least two labels, not `localhost` or under it, not an IP literal.
pub fn is_public_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > 253 || host.parse::<IpAddr>().is_ok() {
        return false;
    }
    let host = host.to_ascii_lowercase();
    if host == "localhost" || host.ends_with(".localhost") {
        return false;
    }
    let labels: Vec<&str> = host.split('.').collect();
    if labels.len() < 2 {
        return false;
    }
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
    };
    // A numeric top-level label is an address in disguise (`10.0.0.256`), never a domain.
    let top_level_numeric = labels
        .last()
        .is_some_and(|label| label.bytes().all(|byte| byte.is_ascii_digit()));
    labels.iter().all(|label| label_ok(label)) && !top_level_numeric
}

/// When a certificate is valid, from its leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// What to do about a certificate at some moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// Less than a third of its lifetime remains (or it is unusable): renew now.
    Due,
    /// Fresh: decide again at this time.
    At(SystemTime),
}

/// Renew once less than a third of the certificate's lifetime remains (Let's Encrypt's
/// 90-day certificates: at 60 days, leaving 30 days to retry through an outage).
pub fn renewal(validity: Validity, now: SystemTime) -> Renewal {
    let Ok(lifetime) = validity.not_after.duration_since(validity.not_before) else {
        return Renewal::Due;
    };
    if lifetime.is_zero() {
        return Renewal::Due;
    }
    let renew_at = validity.not_after - lifetime / 3;
    if now >= renew_at {
        Renewal::Due
    } else {
        Renewal::At(renew_at)
    }
}

/// The wait before attempt `failures + 1`, after `failures` (≥ 1) failed in a row:
/// [`FIRST_RETRY`] doubling up to [`MAX_RETRY`], then scaled into its upper half by
/// `jitter` (in `[0, 1)`) so domains that failed together do not retry together.
pub fn retry_delay(failures: u32, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    let ceiling = FIRST_RETRY.saturating_mul(1 << doublings).min(MAX_RETRY);
    ceiling.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

/// A number in `[0, 1)` that differs between calls: std's randomly keyed hasher over the
/// current instant (jitter needs no cryptographic randomness, nor a dependency).
fn jitter() -> f64 {
    use std::hash::BuildHasher;
    let bits = std::collections::hash_map::RandomState::new().hash_one(Instant::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// The validity of `chain`'s leaf.
fn leaf_validity(chain: &[CertificateDer<'_>]) -> Result<Validity, String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let leaf = chain.first().ok_or("empty certificate chain")?;
    let (_, certificate) =
        X509Certificate::from_der(leaf.as_ref()).map_err(|error| format!("certificate: {error}"))?;
    let at = |timestamp: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(timestamp.max(0) as u64);
    Ok(Validity {
        not_before: at(certificate.validity().not_before.timestamp()),
        not_after: at(certificate.validity().not_after.timestamp()),
    })
}

// ---------------------------------------------------------------------------------------
// Errors

/// Why one attempt for a domain failed. Every variant is retried (with backoff); the message
/// names the step and carries the CA's problem detail.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// Reading or writing the state directory.
    #[error("{path}: {source}")]
    Storage { path: PathBuf, source: io::Error },
    /// A local file that cannot be used as it is (`account.json`, `--acme-ca-cert`).
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    /// A request to the ACME server failed: network, TLS, or a problem document.
    #[error("{step}: {source}")]
    Protocol {
        step: &'static str,
        source: instant_acme::Error,
    },
    /// The CA answered, but would not validate or issue; what it said.
    #[error("{step}: {detail}")]
    Refused { step: &'static str, detail: String },
    /// Generating or checking keys and certificates locally.
    #[error("{step}: {message}")]
    Local { step: &'static str, message: String },
    #[error("the attempt took longer than {0:?} and was abandoned")]
    TimedOut(Duration),
}

impl AcmeError {
    /// Whether the CA no longer knows our account (its database was reset): the stored
    /// account must be replaced by a new one.
    fn is_unknown_account(&self) -> bool {
        matches!(
            self,
            AcmeError::Protocol { source: instant_acme::Error::Api(problem), .. }
                if problem.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist")
        )
    }
}

fn protocol(step: &'static str) -> impl FnOnce(instant_acme::Error) -> AcmeError {
    move |source| AcmeError::Protocol { step, source }
}

fn local(step: &'static str) -> impl FnOnce(rcgen::Error) -> AcmeError {
    move |error| AcmeError::Local {
        step,
        message: error.to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// State on disk

/// `account.json`: the credentials and the directory they belong to.
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// The state directory: `account.json` and `certs/DOMAIN.crt` + `certs/DOMAIN.key`.
#[derive(Debug, Clone)]
struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Creates the directories (mode 0700) and removes what a crash left half-written.
    fn open(root: &Path) -> Result<Self, AcmeError> {
        let state = StateDir {
            root: root.to_path_buf(),
        };
        for dir in [state.root.clone(), state.certs_dir()] {
            use std::os::unix::fs::DirBuilderExt;
            let storage = |source| AcmeError::Storage {
                path: dir.clone(),
                source,
            };
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(storage)?;
            remove_stale_temporaries(&dir).map_err(storage)?;
        }
        Ok(state)
    }

    fn certs_dir(&self) -> PathBuf {
        self.root.join("certs")
    }

    fn account_path(&self) -> PathBuf {
        self.root.join("account.json")
    }

    /// `(DOMAIN.crt, DOMAIN.key)`; `domain` has passed [`is_public_dns_name`], so it is a
    /// plain file name.
    fn certificate_paths(&self, domain: &str) -> (PathBuf, PathBuf) {
        let dir = self.certs_dir();
        (
            dir.join(format!("{domain}.crt")),
            dir.join(format!("{domain}.key")),
        )
    }

    /// Every stored pair, by domain, each loaded or with the reason it cannot be used.
    fn load_certificates(&self) -> Vec<(String, Result<CertificateEntry, String>)> {
        let Ok(entries) = std::fs::read_dir(self.certs_dir()) else {
            return Vec::new();
        };
        let mut domains: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                name.strip_suffix(".crt").map(str::to_string)
            })
            .collect();
        domains.sort();
        domains
            .into_iter()
            .map(|domain| {
                let loaded = self.load_certificate(&domain);
                (domain, loaded)
            })
            .collect()
    }

    fn load_certificate(&self, domain: &str) -> Result<CertificateEntry, String> {
        if !is_public_dns_name(domain) {
            return Err("not a domain this manager issues for".into());
        }
        let (cert_path, key_path) = self.certificate_paths(domain);
        let read = |path: &Path| std::fs::read(path).map_err(|error| format!("{}: {error}", path.display()));
        let entry = CertificateEntry::from_pem(&read(&cert_path)?, &read(&key_path)?, "acme")?;
        if !entry.covers(domain) {
            return Err(format!("the certificate does not cover {domain}"));
        }
        Ok(entry)
    }

    /// Stores a certificate chain and its key: the key first (mode 0600), then the chain.
    fn save_certificate(&self, domain: &str, chain_pem: &str, key_pem: &str) -> Result<(), AcmeError> {
        let (cert_path, key_path) = self.certificate_paths(domain);
        write_secret(&key_path, key_pem.as_bytes())?;
        write_atomically(&cert_path, chain_pem.as_bytes()).map_err(|source| AcmeError::Storage {
            path: cert_path,
            source,
        })
    }

    /// The stored account, if there is one. A file that cannot be read as an account is an
    /// error (it is kept, not overwritten: the operator decides).
    fn read_account(&self) -> Result<Option<StoredAccount>, AcmeError> {
        let path = self.account_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|error| AcmeError::BadFile {
                    message: format!("not an ACME account ({error}); remove it to register a new account"),
                    path,
                }),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(AcmeError::Storage { path, source }),
        }
    }

    fn write_account(&self, account: &StoredAccount) -> Result<(), AcmeError> {
        let json = serde_json::to_vec_pretty(account).map_err(|error| AcmeError::Local {
            step: "store account",
            message: error.to_string(),
        })?;
        write_secret(&self.account_path(), &json)
    }
}

/// [`write_atomically`] for a secret: the temporary file is created mode 0600 before the
/// secret is written into it, so no other user can read it at any moment.
fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), AcmeError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let storage = |source| AcmeError::Storage {
        path: path.to_path_buf(),
        source,
    };
    let temporary = temporary_path(path);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(storage)?;
    // `mode` applies only when the file is created; a stale temporary keeps its own.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(storage)?;
    drop(file);
    write_atomically(path, bytes).map_err(storage)
}

// ---------------------------------------------------------------------------------------
// The account

/// The ACME account, created or restored on first use and shared by every domain.
struct Accounts {
    options: AcmeOptions,
    state: StateDir,
    slot: tokio::sync::Mutex<AccountSlot>,
}

#[derive(Default)]
struct AccountSlot {
    account: Option<Account>,
    /// The CA said it does not know the stored account: register a new one.
    ignore_stored: bool,
}

impl Accounts {
    async fn get(&self) -> Result<Account, AcmeError> {
        let mut slot = self.slot.lock().await;
        if let Some(account) = &slot.account {
            return Ok(account.clone());
        }
        let account = self.restore_or_register(slot.ignore_stored).await?;
        slot.account = Some(account.clone());
        slot.ignore_stored = false;
        Ok(account)
    }

    /// Drops the account `stale_id` that the CA no longer knows; the next attempt registers a
    /// new one. A no-op when another domain has replaced it already.
    async fn forget(&self, stale_id: &str) {
        let mut slot = self.slot.lock().await;
        if slot
            .account
            .as_ref()
            .is_some_and(|account| account.id() == stale_id)
        {
            tracing::warn!(
                account = stale_id,
                "the ACME server does not know the stored account"
            );
            slot.account = None;
            slot.ignore_stored = true;
        }
    }

    fn builder(&self) -> Result<instant_acme::AccountBuilder, AcmeError> {
        match &self.options.ca_cert {
            Some(path) => Account::builder_with_root(path).map_err(|error| AcmeError::BadFile {
                path: path.clone(),
                message: format!("cannot use it as the ACME server's CA: {error}"),
            }),
            None => Account::builder().map_err(protocol("HTTP client")),
        }
    }

    async fn restore_or_register(&self, ignore_stored: bool) -> Result<Account, AcmeError> {
        let directory = &self.options.directory;
        let stored = if ignore_stored {
            None
        } else {
            self.state.read_account()?
        };
        match stored {
            Some(stored) if &stored.directory == directory => {
                let account = self
                    .builder()?
                    .from_credentials(stored.credentials)
                    .await
                    .map_err(protocol("restore account"))?;
                tracing::info!(%directory, account = account.id(), "ACME account restored");
                return Ok(account);
            }
            Some(stored) => tracing::info!(
                stored = %stored.directory,
                %directory,
                "account.json belongs to another ACME directory; registering a new account"
            ),
            None => {}
        }
        let contact = self.options.email.as_ref().map(|email| format!("mailto:{email}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let request = NewAccount {
            contact: &contacts,
            terms_of_service_agreed: true,
            only_return_existing: false,
        };
        let (account, credentials) = self
            .builder()?
            .create(&request, directory.clone(), None)
            .await
            .map_err(protocol("register account"))?;
        let stored = StoredAccount {
            directory: directory.clone(),
            credentials,
        };
        let state = self.state.clone();
        run_blocking(move || state.write_account(&stored)).await?;
        tracing::info!(%directory, account = account.id(), "ACME account registered");
        Ok(account)
    }
}

async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, AcmeError> + Send + 'static,
) -> Result<T, AcmeError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| AcmeError::Local {
            step: "store",
            message: error.to_string(),
        })?
}

// ---------------------------------------------------------------------------------------
// Obtaining certificates

/// What every domain task shares.
struct Manager {
    options: AcmeOptions,
    state: StateDir,
    accounts: Accounts,
    certificates: Arc<Certificates>,
    http01: Arc<Http01Challenges>,
}

/// Challenge responses published by one attempt, withdrawn however the attempt ends
/// (success, error, timeout, or its task aborted on shutdown).
struct PublishedChallenges<'a> {
    certificates: &'a Certificates,
    http01: &'a Http01Challenges,
    alpn_domains: Vec<String>,
    http01_tokens: Vec<String>,
}

impl Drop for PublishedChallenges<'_> {
    fn drop(&mut self) {
        for domain in &self.alpn_domains {
            self.certificates.clear_alpn_challenge(domain);
        }
        for token in &self.http01_tokens {
            self.http01.remove(token);
        }
    }
}

/// The TLS-ALPN-01 response for `domain` (RFC 8737 §3): a self-signed certificate naming
/// only `domain`, with the critical `acmeIdentifier` extension holding the SHA-256 digest of
/// the key authorization.
pub fn alpn_challenge_certificate(domain: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|error| error.to_string())?;
    let mut params = CertificateParams::new(vec![domain.to_string()]).map_err(|error| error.to_string())?;
    params.distinguished_name = DistinguishedName::new();
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let certificate = params.self_signed(&key).map_err(|error| error.to_string())?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    // Not `CertifiedKey::from_der`: its consistency check parses the certificate with webpki,
    // which refuses the critical extension every validator of this challenge requires.
    let signing_key = crate::tls::provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|error| error.to_string())?;
    Ok(Arc::new(CertifiedKey::new(
        vec![certificate.der().clone()],
        signing_key,
    )))
}

impl Manager {
    /// Installs every stored certificate; returns how many.
    fn load_stored(&self) -> usize {
        let mut loaded = 0;
        for (domain, result) in self.state.load_certificates() {
            match result {
                Ok(entry) => {
                    tracing::info!(
                        domain = %domain,
                        not_after = %LogTime(entry.not_after),
                        "ACME certificate loaded from disk"
                    );
                    self.certificates.set_managed(&domain, Arc::new(entry));
                    ::metrics::counter!(CERTIFICATES_TOTAL, "outcome" => "loaded").increment(1);
                    loaded += 1;
                }
                Err(error) => tracing::warn!(
                    domain = %domain,
                    dir = %self.state.certs_dir().display(),
                    %error,
                    "stored ACME certificate not usable; a new one will be ordered if the domain is routed"
                ),
            }
        }
        loaded
    }

    /// Keeps `domain`'s certificate fresh until the task is aborted.
    async fn manage_domain(self: Arc<Self>, domain: String) {
        let mut failures: u32 = 0;
        loop {
            let current = self.certificates.managed(&domain);
            let decision = match &current {
                Some(entry) => match leaf_validity(&entry.key.cert) {
                    Ok(validity) => renewal(validity, SystemTime::now()),
                    Err(_) => Renewal::Due,
                },
                None => Renewal::Due,
            };
            if let Renewal::At(renew_at) = decision {
                let wait = renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
                    .min(RENEWAL_RECHECK);
                tracing::debug!(domain = %domain, renew_at = %LogTime(renew_at), "certificate fresh");
                tokio::time::sleep(wait).await;
                continue;
            }
            match &current {
                Some(entry) => tracing::info!(
                    domain = %domain,
                    not_after = %LogTime(entry.not_after),
                    "renewing certificate"
                ),
                None => tracing::info!(domain = %domain, "requesting certificate"),
            }
            let started = Instant::now();
            let outcome = match tokio::time::timeout(ATTEMPT_TIMEOUT, self.obtain(&domain)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(AcmeError::TimedOut(ATTEMPT_TIMEOUT)),
            };
            match outcome {
                Ok(validity) => {
                    ::metrics::counter!(CERTIFICATES_TOTAL, "outcome" => "issued").increment(1);
                    tracing::info!(
                        domain = %domain,
                        not_after = %LogTime(validity.not_after),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "certificate issued and installed"
                    );
                    if renewal(validity, SystemTime::now()) == Renewal::Due {
                        // Otherwise this loop would order again at once, and forever.
                        failures += 1;
                        let delay = retry_delay(failures, jitter());
                        tracing::warn!(
                            domain = %domain,
                            retry_in = ?delay,
                            "the new certificate is already due for renewal; is the clock right?"
                        );
                        tokio::time::sleep(delay).await;
                    } else {
                        failures = 0;
                    }
                }
                Err(error) => {
                    ::metrics::counter!(CERTIFICATES_TOTAL, "outcome" => "failed").increment(1);
                    failures += 1;
                    let delay = retry_delay(failures, jitter());
                    tracing::warn!(
                        domain = %domain,
                        attempt = failures,
                        retry_in = ?delay,
                        error = %error,
                        "certificate not obtained, will retry"
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One attempt: order, challenge, finalize, store, install.
    async fn obtain(&self, domain: &str) -> Result<Validity, AcmeError> {
        let account = self.accounts.get().await?;
        let outcome = self.obtain_with(&account, domain).await;
        if let Err(error) = &outcome
            && error.is_unknown_account()
        {
            self.accounts.forget(account.id()).await;
        }
        outcome
    }

    async fn obtain_with(&self, account: &Account, domain: &str) -> Result<Validity, AcmeError> {
        let identifiers = [Identifier::Dns(domain.to_string())];
        let mut order = account
            .new_order(&NewOrder::new(&identifiers))
            .await
            .map_err(protocol("new order"))?;
        let mut published = PublishedChallenges {
            certificates: &self.certificates,
            http01: &self.http01,
            alpn_domains: Vec::new(),
            http01_tokens: Vec::new(),
        };
        let challenge_kind = self.options.challenge;
        let mut authorizations = order.authorizations();
        while let Some(result) = authorizations.next().await {
            let mut authorization = result.map_err(protocol("fetch authorization"))?;
            match authorization.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                status => {
                    return Err(AcmeError::Refused {
                        step: "authorization",
                        detail: format!("the authorization is {status:?}"),
                    });
                }
            }
            let mut challenge = authorization
                .challenge(challenge_kind.acme_type())
                .ok_or_else(|| AcmeError::Refused {
                    step: "challenge",
                    detail: format!("the CA offers no {} challenge", challenge_kind.name()),
                })?;
            let key_authorization = challenge.key_authorization();
            match challenge_kind {
                ChallengeKind::TlsAlpn01 => {
                    let key = alpn_challenge_certificate(domain, key_authorization.digest().as_ref())
                        .map_err(|message| AcmeError::Local {
                            step: "challenge certificate",
                            message,
                        })?;
                    self.certificates.set_alpn_challenge(domain, key);
                    published.alpn_domains.push(domain.to_string());
                }
                ChallengeKind::Http01 => {
                    self.http01.insert(&challenge.token, key_authorization.as_str());
                    published.http01_tokens.push(challenge.token.clone());
                }
            }
            challenge.set_ready().await.map_err(protocol("challenge ready"))?;
            tracing::info!(
                domain = %domain,
                challenge = challenge_kind.name(),
                "challenge published; waiting for validation"
            );
        }
        let retries = RetryPolicy::new()
            .initial_delay(Duration::from_millis(250))
            .backoff(1.5)
            .timeout(VALIDATION_TIMEOUT);
        match order.poll_ready(&retries).await {
            Ok(OrderStatus::Ready) => {}
            Ok(_) | Err(instant_acme::Error::Api(_)) => {
                return Err(AcmeError::Refused {
                    step: "validation",
                    detail: validation_failure(&mut order).await,
                });
            }
            Err(error) => return Err(protocol("validation")(error)),
        }
        drop(published);

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(local("private key"))?;
        let mut params = CertificateParams::new(vec![domain.to_string()]).map_err(local("CSR"))?;
        params.distinguished_name = DistinguishedName::new();
        let csr = params.serialize_request(&key).map_err(local("CSR"))?;
        order
            .finalize_csr(csr.der())
            .await
            .map_err(protocol("finalize"))?;
        let chain_pem = order
            .poll_certificate(&retries)
            .await
            .map_err(protocol("download certificate"))?;
        let key_pem = key.serialize_pem();
        let entry = CertificateEntry::from_pem(chain_pem.as_bytes(), key_pem.as_bytes(), "acme").map_err(
            |message| AcmeError::Refused {
                step: "issued certificate",
                detail: message,
            },
        )?;
        if !entry.covers(domain) {
            return Err(AcmeError::Refused {
                step: "issued certificate",
                detail: format!("it names {:?}, not {domain}", entry.names),
            });
        }
        let validity = leaf_validity(&entry.key.cert).map_err(|detail| AcmeError::Refused {
            step: "issued certificate",
            detail,
        })?;
        let state = self.state.clone();
        let owned_domain = domain.to_string();
        run_blocking(move || state.save_certificate(&owned_domain, &chain_pem, &key_pem)).await?;
        self.certificates.set_managed(domain, Arc::new(entry));
        Ok(validity)
    }
}

/// Why an order became invalid, in the CA's words: the order's problem and every failed
/// challenge's problem (e.g. `connection refused` from the CA's validation).
async fn validation_failure(order: &mut Order) -> String {
    let mut details = Vec::new();
    if let Some(problem) = &order.state().error {
        details.push(problem.to_string());
    }
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        let Ok(state) = authorization.refresh().await else {
            continue;
        };
        for challenge in &state.challenges {
            // The order's problem often repeats the failed challenge's: say it once.
            if let Some(problem) = &challenge.error
                && !details.contains(&problem.to_string())
            {
                details.push(problem.to_string());
            }
        }
    }
    if details.is_empty() {
        "the order became invalid; the CA gave no detail".into()
    } else {
        details.join("; ")
    }
}

/// A time as logs show it (`Nov 26 12:00:00 2026 +00:00`, the certificate's own notation).
struct LogTime(SystemTime);

impl std::fmt::Display for LogTime {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let seconds = match self.0.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(elapsed) => elapsed.as_secs() as i64,
            Err(before) => -(before.duration().as_secs() as i64),
        };
        match x509_parser::time::ASN1Time::from_timestamp(seconds) {
            Ok(time) => write!(formatter, "{time}"),
            Err(_) => write!(formatter, "@{seconds}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The manager's main loop

/// Obtains, stores, reloads and renews certificates for the hosts `hosts` returns (asked
/// every second: the route table's exact hosts) until `shutdown`.
pub async fn run(
    options: AcmeOptions,
    certificates: Arc<Certificates>,
    http01: Arc<Http01Challenges>,
    hosts: impl Fn() -> Vec<String> + Send,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    // instant-acme's HTTP client takes rustls' process-wide provider; make it ours (a no-op
    // when one is installed already).
    let _ = rustls::crypto::CryptoProvider::install_default((**crate::tls::provider()).clone());
    let state = match StateDir::open(&options.state_dir) {
        Ok(state) => state,
        Err(error) => {
            tracing::error!(%error, "ACME state directory unusable; no certificates will be obtained");
            shutdown.await;
            return;
        }
    };
    let manager = Arc::new(Manager {
        accounts: Accounts {
            options: options.clone(),
            state: state.clone(),
            slot: tokio::sync::Mutex::default(),
        },
        options,
        state,
        certificates: Arc::clone(&certificates),
        http01,
    });
    if let Err(error) = manager.accounts.builder() {
        // Said once at start; every attempt will say it again until the file is fixed.
        tracing::error!(%error, "ACME cannot reach its server until this is fixed");
    }
    let loaded = manager.load_stored();
    tracing::info!(
        directory = %manager.options.directory,
        challenge = manager.options.challenge.name(),
        stored = loaded,
        "ACME manager started"
    );

    let mut tasks = JoinSet::new();
    let mut managed: HashMap<String, AbortHandle> = HashMap::new();
    let mut skipped: HashSet<String> = HashSet::new();
    let mut interval = tokio::time::interval(DOMAIN_POLL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            () = &mut shutdown => break,
        }
        let mut wanted = HashSet::new();
        for host in hosts() {
            let domain = host.trim_end_matches('.').to_ascii_lowercase();
            if !is_public_dns_name(&domain) {
                if skipped.insert(domain.clone()) {
                    tracing::info!(domain = %domain, "not a public DNS name; no ACME certificate");
                }
            } else if certificates.has_static_for(&domain) {
                if skipped.insert(domain.clone()) {
                    tracing::info!(domain = %domain, "covered by a --certs certificate; ACME leaves it alone");
                }
            } else {
                skipped.remove(&domain);
                wanted.insert(domain);
            }
        }
        managed.retain(|domain, task| {
            if !wanted.contains(domain) {
                tracing::info!(domain = %domain, "no longer routed to this node's ACME; stopped managing it");
                task.abort();
                false
            } else {
                // A task only ends by panicking: drop it, and the next tick starts a new one.
                !task.is_finished()
            }
        });
        for domain in wanted {
            if let std::collections::hash_map::Entry::Vacant(slot) = managed.entry(domain) {
                let domain = slot.key().clone();
                slot.insert(tasks.spawn(Arc::clone(&manager).manage_domain(domain)));
            }
        }
        while let Some(finished) = tasks.try_join_next() {
            if let Err(error) = finished
                && error.is_panic()
            {
                tracing::error!(%error, "an ACME domain task panicked; it restarts");
            }
        }
    }
    tasks.shutdown().await;
    tracing::info!("ACME manager stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    fn days(count: u32) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + DAY * count
    }

    #[test]
    fn public_dns_names_qualify() {
        for host in [
            "a.test",
            "example.com",
            "api.example.com",
            "x-1.b2.example.org",
            "example.com.",
        ] {
            assert!(is_public_dns_name(host), "{host}");
        }
    }

    #[test]
    fn local_addresses_and_malformed_names_do_not_qualify() {
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}com", "abcdefghi.".repeat(26));
        for host in [
            "",
            "localhost",
            "hello.localhost",
            "a.b.LOCALHOST",
            "intranet",
            "127.0.0.1",
            "10.0.0.256",
            "::1",
            "[::1]",
            "a..test",
            ".a.test",
            "-a.test",
            "a-.test",
            "a_b.test",
            "a.test:8443",
            "*.a.test",
            "a/b.test",
            "..",
            long_label.as_str(),
            long_name.as_str(),
        ] {
            assert!(!is_public_dns_name(host), "{host:?} should not qualify");
        }
    }

    #[test]
    fn renews_when_a_third_of_the_lifetime_remains() {
        let validity = Validity {
            not_before: days(0),
            not_after: days(90),
        };
        assert_eq!(renewal(validity, days(0)), Renewal::At(days(60)));
        assert_eq!(renewal(validity, days(59)), Renewal::At(days(60)));
        assert_eq!(renewal(validity, days(60)), Renewal::Due);
        assert_eq!(renewal(validity, days(89)), Renewal::Due);
        assert_eq!(renewal(validity, days(120)), Renewal::Due, "expired");
    }

    #[test]
    fn short_and_bogus_lifetimes() {
        let six_days = Validity {
            not_before: days(10),
            not_after: days(16),
        };
        assert_eq!(renewal(six_days, days(11)), Renewal::At(days(14)));
        assert_eq!(renewal(six_days, days(14)), Renewal::Due);
        let backwards = Validity {
            not_before: days(10),
            not_after: days(5),
        };
        assert_eq!(renewal(backwards, days(1)), Renewal::Due);
        let empty = Validity {
            not_before: days(10),
            not_after: days(10),
        };
        assert_eq!(renewal(empty, days(1)), Renewal::Due);
        // Not yet valid (our clock is behind the CA's): still fresh, not a renewal loop.
        assert_eq!(renewal(six_days, days(2)), Renewal::At(days(14)));
    }

    #[test]
    fn retries_back_off_exponentially_with_jitter_up_to_a_cap() {
        assert_eq!(retry_delay(1, 0.0), Duration::from_millis(500));
        assert_eq!(retry_delay(2, 0.0), Duration::from_secs(1));
        assert_eq!(retry_delay(3, 0.0), Duration::from_secs(2));
        assert_eq!(retry_delay(10, 0.0), Duration::from_secs(256));
        assert_eq!(retry_delay(11, 0.0), Duration::from_secs(300), "capped at 10 min");
        assert_eq!(retry_delay(u32::MAX, 0.5), Duration::from_secs(450));
        for failures in 1..40 {
            assert!(retry_delay(failures, 0.999) <= MAX_RETRY);
            assert!(retry_delay(failures + 1, 0.0) >= retry_delay(failures, 0.0));
        }
        let samples: HashSet<u128> = (0..16).map(|_| retry_delay(5, jitter()).as_nanos()).collect();
        assert!(samples.len() > 1, "jitter varies");
        assert!(
            samples
                .iter()
                .all(|&nanos| (8e9..=16e9).contains(&(nanos as f64)))
        );
    }

    #[test]
    fn the_alpn_challenge_certificate_carries_the_acme_identifier() {
        use x509_parser::prelude::*;
        let digest = [7u8; 32];
        let key = alpn_challenge_certificate("a.test", &digest).unwrap();
        let (_, certificate) = X509Certificate::from_der(key.cert[0].as_ref()).unwrap();
        let san = certificate.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names, vec![GeneralName::DNSName("a.test")]);
        let oid = x509_parser::der_parser::oid!(1.3.6.1.5.5.7.1.31);
        let extension = certificate
            .extensions()
            .iter()
            .find(|extension| extension.oid == oid)
            .expect("acmeIdentifier extension");
        assert!(extension.critical);
        // DER OCTET STRING (0x04, length 32) around the digest.
        assert_eq!(extension.value[..2], [0x04, 32]);
        assert_eq!(&extension.value[2..], &digest);
    }

    fn self_signed(domain: &str) -> (String, String) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let certificate = CertificateParams::new(vec![domain.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (certificate.pem(), key.serialize_pem())
    }

    #[test]
    fn stored_certificates_round_trip_with_a_private_key_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(&dir.path().join("acme")).unwrap();
        let (chain, key) = self_signed("a.test");
        state.save_certificate("a.test", &chain, &key).unwrap();
        let (cert_path, key_path) = state.certificate_paths("a.test");
        assert_eq!(std::fs::read_to_string(&cert_path).unwrap(), chain);
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(state.certs_dir()).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert!(!temporary_path(&key_path).exists());

        // A second pair whose key belongs to another certificate, and one for a wrong name.
        let (other_chain, _) = self_signed("b.test");
        state.save_certificate("b.test", &other_chain, &key).unwrap();
        let (c_chain, c_key) = self_signed("other.test");
        state.save_certificate("c.test", &c_chain, &c_key).unwrap();
        let loaded = state.load_certificates();
        let names: Vec<&str> = loaded.iter().map(|(domain, _)| domain.as_str()).collect();
        assert_eq!(names, ["a.test", "b.test", "c.test"]);
        assert!(loaded[0].1.as_ref().unwrap().covers("a.test"));
        let b_error = loaded[1].1.as_ref().unwrap_err();
        assert!(b_error.contains("key"), "{b_error}");
        let c_error = loaded[2].1.as_ref().unwrap_err();
        assert!(c_error.contains("does not cover c.test"), "{c_error}");

        // A crash left a temporary behind: opening removes it.
        std::fs::write(temporary_path(&cert_path), "half").unwrap();
        StateDir::open(&dir.path().join("acme")).unwrap();
        assert!(!temporary_path(&cert_path).exists());
    }

    #[test]
    fn a_corrupt_account_file_is_a_clear_error_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path()).unwrap();
        assert!(state.read_account().unwrap().is_none());
        std::fs::write(state.account_path(), "{ not json").unwrap();
        let error = state.read_account().err().unwrap().to_string();
        assert!(
            error.contains("account.json") && error.contains("remove it"),
            "{error}"
        );
        assert_eq!(
            std::fs::read_to_string(state.account_path()).unwrap(),
            "{ not json"
        );
    }
}
