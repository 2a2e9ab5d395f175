//! TLS certificates chosen by SNI, from a directory that is watched, and from ACME.
//!
//! Users point many domains at one node, so certificates are selected per connection from
//! the client's SNI: an exact name first, then a wildcard one label up (`*.example.com`
//! covers `a.example.com`, not `a.b.example.com`). Certificates come from two sources:
//! `--certs DIR` (PEM pairs `NAME.crt` + `NAME.key`; the certificate's DNS SANs decide what
//! it serves, the file name does not), reloaded when the files change, and certificates the
//! ACME manager obtains. A pair that fails to load is logged and the previous version of that
//! pair keeps serving: bad input loses nothing.
//!
//! The same [`Certificates`] answers the 421 check ([`crate::server::misdirected`]): a
//! request's `Host` must be covered by the certificate its connection was served, or the
//! client reused a connection for a name we never proved (RFC 9110 §15.5.20).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use atoll_core::host::certificate_name_matches;
use dashmap::DashMap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// ALPN protocol of the ACME TLS-ALPN-01 challenge (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// ALPN for HTTP/2 and HTTP/1.1 over TLS, in the server's order of preference.
pub const TCP_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];
/// ALPN for HTTP/3.
pub const QUIC_ALPN: &[u8] = b"h3";

/// How often `--certs DIR` is checked for changes.
pub const CERT_DIR_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// One certificate chain with its key and what it covers.
#[derive(Debug)]
pub struct CertificateEntry {
    pub key: Arc<CertifiedKey>,
    /// Lower-case DNS names from the leaf's subjectAltName; may include `*.parent` wildcards.
    pub names: Vec<String>,
    pub not_after: SystemTime,
    /// Where it came from: a file path, or `acme`.
    pub source: String,
}

impl CertificateEntry {
    /// Parses a PEM chain and key, checking that they belong together.
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], source: &str) -> Result<Self, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|error| format!("certificate PEM: {error}"))?;
        if chain.is_empty() {
            return Err("no CERTIFICATE block in the PEM".into());
        }
        let key =
            PrivateKeyDer::from_pem_slice(key_pem).map_err(|error| format!("private key PEM: {error}"))?;
        Self::from_der(chain, key, source)
    }

    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        source: &str,
    ) -> Result<Self, String> {
        let (names, not_after) = leaf_names_and_expiry(&chain[0])?;
        let certified = CertifiedKey::from_der(chain, key, provider())
            .map_err(|error| format!("certificate and key: {error}"))?;
        Ok(CertificateEntry {
            key: Arc::new(certified),
            names,
            not_after,
            source: source.to_string(),
        })
    }

    /// Whether this certificate is valid for `host` (a bare, lower-case name).
    pub fn covers(&self, host: &str) -> bool {
        self.names.iter().any(|name| certificate_name_matches(name, host))
    }
}

fn leaf_names_and_expiry(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, SystemTime), String> {
    use x509_parser::prelude::*;
    let (_, certificate) =
        X509Certificate::from_der(leaf.as_ref()).map_err(|error| format!("certificate: {error}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = certificate.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push(dns.trim_end_matches('.').to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        return Err("the certificate names no DNS subjectAltName".into());
    }
    let timestamp = certificate.validity().not_after.timestamp();
    let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(timestamp.max(0) as u64);
    Ok((names, not_after))
}

/// The process's crypto provider: aws-lc-rs with rustls' default (strong-only) suites.
pub fn provider() -> &'static Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER.get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// Certificates loaded from a directory, indexed by name.
#[derive(Debug, Default)]
struct DirectoryTable {
    /// File stem → entry; kept so a pair that stops loading keeps its last good version.
    by_stem: BTreeMap<String, Arc<CertificateEntry>>,
    exact: HashMap<String, Arc<CertificateEntry>>,
    wildcard: HashMap<String, Arc<CertificateEntry>>,
}

impl DirectoryTable {
    fn from_entries(by_stem: BTreeMap<String, Arc<CertificateEntry>>) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        // Sorted by stem, first wins: a deterministic choice when two files claim a name.
        for entry in by_stem.values() {
            for name in &entry.names {
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard
                        .entry(parent.to_string())
                        .or_insert_with(|| Arc::clone(entry)),
                    None => exact.entry(name.clone()).or_insert_with(|| Arc::clone(entry)),
                };
            }
        }
        DirectoryTable {
            by_stem,
            exact,
            wildcard,
        }
    }
}

/// Every certificate the node can serve, selected by SNI. Cheap to share; lookups are
/// lock-free for the directory table and sharded for ACME certificates.
#[derive(Debug, Default)]
pub struct Certificates {
    directory: ArcSwap<DirectoryTable>,
    /// Certificates obtained by ACME, by domain.
    managed: DashMap<String, Arc<CertificateEntry>>,
    /// TLS-ALPN-01 challenge certificates, by domain, while a validation is pending.
    alpn_challenges: DashMap<String, Arc<CertifiedKey>>,
}

impl Certificates {
    pub fn new() -> Arc<Self> {
        Arc::new(Certificates::default())
    }

    /// Loads every `NAME.crt` + `NAME.key` pair in `dir`. Pairs that fail keep their previous
    /// version (if any); their errors are returned so a first start can refuse them loudly.
    pub fn load_dir(&self, dir: &Path) -> Result<usize, Vec<CertificateError>> {
        let stems = match pair_stems(dir) {
            Ok(stems) => stems,
            Err(source) => {
                return Err(vec![CertificateError::Io {
                    path: dir.to_path_buf(),
                    source,
                }]);
            }
        };
        let previous = self.directory.load();
        let mut by_stem = BTreeMap::new();
        let mut errors = Vec::new();
        for stem in stems {
            let cert_path = dir.join(format!("{stem}.crt"));
            let key_path = dir.join(format!("{stem}.key"));
            match load_pair(&cert_path, &key_path) {
                Ok(entry) => {
                    by_stem.insert(stem, Arc::new(entry));
                }
                Err(error) => {
                    if let Some(old) = previous.by_stem.get(&stem) {
                        by_stem.insert(stem, Arc::clone(old));
                    }
                    errors.push(error);
                }
            }
        }
        let loaded = by_stem.len();
        self.directory
            .store(Arc::new(DirectoryTable::from_entries(by_stem)));
        if errors.is_empty() {
            Ok(loaded)
        } else {
            Err(errors)
        }
    }

    /// Reloads `dir` whenever its pairs change (checked every [`CERT_DIR_POLL`]), until
    /// `shutdown`. Polling, not inotify: it sees edits made by any tool (including atomic
    /// renames and bind-mounted secrets) and costs one `stat` per file per second.
    pub async fn watch_dir(self: Arc<Self>, dir: PathBuf, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut seen = dir_fingerprint(&dir);
        loop {
            tokio::select! {
                () = tokio::time::sleep(CERT_DIR_POLL) => {}
                () = &mut shutdown => return,
            }
            let now = dir_fingerprint(&dir);
            if now == seen {
                continue;
            }
            seen = now;
            match self.load_dir(&dir) {
                Ok(count) => {
                    tracing::info!(dir = %dir.display(), certificates = count, "certificates reloaded")
                }
                Err(errors) => {
                    for error in errors {
                        tracing::error!(%error, "certificate not reloaded; keeping the previous one");
                    }
                }
            }
        }
    }

    /// Installs (or replaces) a certificate obtained for `domain` by ACME.
    pub fn set_managed(&self, domain: &str, entry: Arc<CertificateEntry>) {
        self.managed.insert(domain.to_ascii_lowercase(), entry);
    }

    pub fn managed(&self, domain: &str) -> Option<Arc<CertificateEntry>> {
        self.managed.get(domain).map(|entry| Arc::clone(&entry))
    }

    pub fn set_alpn_challenge(&self, domain: &str, key: Arc<CertifiedKey>) {
        self.alpn_challenges.insert(domain.to_ascii_lowercase(), key);
    }

    pub fn clear_alpn_challenge(&self, domain: &str) {
        self.alpn_challenges.remove(domain);
    }

    /// Whether a certificate from `--certs` covers `domain` (then ACME leaves it alone).
    pub fn has_static_for(&self, domain: &str) -> bool {
        let table = self.directory.load();
        lookup(&table.exact, &table.wildcard, domain).is_some()
    }

    /// The certificate a handshake for `server_name` is served (`None` SNI: the first
    /// certificate in file order, for clients that connect by address).
    pub fn select(&self, server_name: Option<&str>) -> Option<Arc<CertificateEntry>> {
        let table = self.directory.load();
        let Some(name) = server_name else {
            return table.by_stem.values().next().cloned();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(entry) = table.exact.get(&name) {
            return Some(Arc::clone(entry));
        }
        if let Some(entry) = self.managed.get(&name) {
            return Some(Arc::clone(&entry));
        }
        lookup(&table.exact, &table.wildcard, &name)
    }

    /// Whether `host` (from the request) may be served on a connection whose handshake named
    /// `server_name`: the certificate that handshake got must cover `host`.
    pub fn host_allowed(&self, server_name: Option<&str>, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if server_name.is_some_and(|name| name.eq_ignore_ascii_case(&host)) {
            return true;
        }
        self.select(server_name).is_some_and(|entry| entry.covers(&host))
    }

    /// Number of certificates from the directory and from ACME.
    pub fn len(&self) -> usize {
        self.directory.load().by_stem.len() + self.managed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn lookup(
    exact: &HashMap<String, Arc<CertificateEntry>>,
    wildcard: &HashMap<String, Arc<CertificateEntry>>,
    name: &str,
) -> Option<Arc<CertificateEntry>> {
    if let Some(entry) = exact.get(name) {
        return Some(Arc::clone(entry));
    }
    let (_, parent) = name.split_once('.')?;
    wildcard.get(parent).cloned()
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|protocol| protocol == ACME_TLS_ALPN));
        if acme {
            let name = hello.server_name()?.to_ascii_lowercase();
            return self.alpn_challenges.get(&name).map(|key| Arc::clone(&key));
        }
        self.select(hello.server_name())
            .map(|entry| Arc::clone(&entry.key))
    }
}

/// A rustls server configuration over `certificates` with hardened defaults: TLS 1.3 and
/// 1.2 only, rustls' suites (AEAD only, forward secret), session tickets and a session cache
/// for resumption, no 0-RTT.
pub fn server_config(
    certificates: Arc<Certificates>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(Arc::clone(provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(certificates);
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()?;
    config.session_storage = ServerSessionMemoryCache::new(16 * 1024);
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// The TCP listener's configuration: h2 and HTTP/1.1, plus the ACME TLS-ALPN-01 protocol.
pub fn tcp_server_config(certificates: Arc<Certificates>) -> Result<Arc<ServerConfig>, rustls::Error> {
    server_config(certificates, &[TCP_ALPN[0], TCP_ALPN[1], ACME_TLS_ALPN])
}

fn pair_stems(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut stems = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|extension| extension == "crt")
            && let Some(stem) = path.file_stem().and_then(|stem| stem.to_str())
            && path.with_extension("key").exists()
        {
            stems.push(stem.to_string());
        }
    }
    stems.sort();
    Ok(stems)
}

fn load_pair(cert_path: &Path, key_path: &Path) -> Result<CertificateEntry, CertificateError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| CertificateError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let source = cert_path.display().to_string();
    CertificateEntry::from_pem(&cert_pem, &key_pem, &source).map_err(|message| CertificateError::Invalid {
        path: cert_path.to_path_buf(),
        message,
    })
}

/// Names, sizes and modification times of the `.crt`/`.key` files: what a reload follows.
fn dir_fingerprint(dir: &Path) -> Vec<(String, u64, Option<SystemTime>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut fingerprint: Vec<_> = entries
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .path()
                .extension()
                .is_some_and(|extension| extension == "crt" || extension == "key")
        })
        .filter_map(|entry| {
            let metadata = entry.metadata().ok()?;
            Some((
                entry.file_name().to_string_lossy().into_owned(),
                metadata.len(),
                metadata.modified().ok(),
            ))
        })
        .collect();
    fingerprint.sort();
    fingerprint
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|name| name.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write_pair(dir: &Path, stem: &str, names: &[&str]) {
        let (cert, key) = self_signed(names);
        std::fs::write(dir.join(format!("{stem}.key")), key).unwrap();
        std::fs::write(dir.join(format!("{stem}.crt")), cert).unwrap();
    }

    #[test]
    fn selects_by_sni_exact_before_wildcard() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a", &["a.test"]);
        write_pair(dir.path(), "wild", &["*.b.test"]);
        write_pair(dir.path(), "exact-b", &["x.b.test"]);
        let certificates = Certificates::new();
        assert_eq!(certificates.load_dir(dir.path()).unwrap(), 3);
        let source = |name: &str| certificates.select(Some(name)).map(|entry| entry.source.clone());
        assert!(source("a.test").unwrap().ends_with("a.crt"));
        assert!(source("A.Test.").unwrap().ends_with("a.crt"));
        assert!(source("y.b.test").unwrap().ends_with("wild.crt"));
        assert!(source("x.b.test").unwrap().ends_with("exact-b.crt"));
        assert_eq!(source("nothing.test"), None);
        assert!(certificates.host_allowed(Some("a.test"), "a.test"));
        assert!(!certificates.host_allowed(Some("a.test"), "y.b.test"));
        assert!(certificates.host_allowed(Some("y.b.test"), "z.b.test"));
    }

    #[test]
    fn a_broken_pair_keeps_its_previous_version() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "a", &["a.test"]);
        let certificates = Certificates::new();
        certificates.load_dir(dir.path()).unwrap();
        std::fs::write(dir.path().join("a.crt"), "not a certificate").unwrap();
        let errors = certificates.load_dir(dir.path()).unwrap_err();
        assert!(errors[0].to_string().contains("a.crt"), "{}", errors[0]);
        assert!(certificates.select(Some("a.test")).is_some());
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let (cert, _) = self_signed(&["a.test"]);
        let (_, other_key) = self_signed(&["a.test"]);
        let error = CertificateEntry::from_pem(cert.as_bytes(), other_key.as_bytes(), "x").unwrap_err();
        assert!(error.contains("key"), "{error}");
    }

    #[test]
    fn a_certificate_without_dns_names_is_refused() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let error = CertificateEntry::from_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes(), "x")
            .unwrap_err();
        assert!(error.contains("DNS"), "{error}");
    }
}
