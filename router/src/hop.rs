//! The hop header: what a forwarding node tells the peer it forwards to, signed.
//!
//! A node that forwards a request says who the client was, whether it came over TLS, and
//! which version of the function it expects to run. The peer believes the client and the
//! scheme only if the value carries a valid HMAC-SHA256 made with the cluster key, a secret
//! every node shares: an address alone proves nothing (any host that can reach a node can
//! send the headers, and a peer's address can be reused or shared). The MAC also covers the
//! request's method, host and target and a timestamp, so a value cannot be moved to another
//! request, and is refused after [`MAX_AGE`] (so a recorded one cannot be replayed later).
//!
//! ```text
//! x-atoll-hop: node=a1;fn=hello;v=3;sha256=<hex>;client=198.51.100.7:5123;scheme=https;t=1764480000;sig=<hex>
//!              └──────────────────── signed, with method, host and target ──────────────┘
//! ```
//!
//! The expected version is honoured even without a valid signature: it can only make the
//! peer refuse to run something (the forwarding node then serves the request itself), never
//! make it believe anything.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;

/// How far a hop's timestamp may be from this node's clock (either way): bounds replay,
/// and is the clock skew nodes may have.
pub const MAX_AGE: u64 = 30;
/// Shortest cluster key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 16;
/// Separates the MAC of a hop from any other use of the same key.
const CONTEXT: &[u8] = b"atoll-hop-v1";
/// Derives the default cluster key from the registry token.
const TOKEN_DERIVATION: &[u8] = b"atoll cluster key from token v1";

/// The secret nodes sign their forwards with.
#[derive(Clone)]
pub struct ClusterKey(hmac::Key);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// Why a cluster key is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ClusterKeyError {
    #[error("the cluster key is {0} bytes; use at least {MIN_KEY_BYTES} (e.g. `openssl rand -hex 32`)")]
    TooShort(usize),
    #[error("reading the cluster key file {path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl ClusterKey {
    /// A key from a secret (`--cluster-key`), surrounding whitespace ignored.
    pub fn new(secret: &[u8]) -> Result<Self, ClusterKeyError> {
        let secret = secret.trim_ascii();
        if secret.len() < MIN_KEY_BYTES {
            return Err(ClusterKeyError::TooShort(secret.len()));
        }
        Ok(ClusterKey(hmac::Key::new(hmac::HMAC_SHA256, secret)))
    }

    /// A key from a file's contents (`--cluster-key-file`).
    pub fn from_file(path: &Path) -> Result<Self, ClusterKeyError> {
        let bytes = std::fs::read(path).map_err(|source| ClusterKeyError::File {
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(&bytes)
    }

    /// The default: derived from the registry token, which the nodes of a cluster share.
    /// Derived rather than used as is, so a MAC never exposes anything about the token.
    pub fn from_token(token: &str) -> Self {
        let derivation = hmac::Key::new(hmac::HMAC_SHA256, TOKEN_DERIVATION);
        let derived = hmac::sign(&derivation, token.trim().as_bytes());
        ClusterKey(hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()))
    }
}

/// What the request being forwarded is: the MAC covers it, so a hop value only fits it.
#[derive(Debug, Clone, Copy)]
pub struct Bound<'a> {
    pub method: &'a str,
    /// The host as the client gave it.
    pub host: &'a str,
    /// Path and query.
    pub target: &'a str,
}

/// What a hop value says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopClaims {
    /// The forwarding node (for logs).
    pub node: String,
    /// The function and version the forwarding node serves for this request.
    pub function: String,
    pub version: u64,
    pub sha256: String,
    /// The client, as the forwarding node saw it.
    pub client: SocketAddr,
    /// The client came over TLS or QUIC.
    pub https: bool,
    /// Seconds since the Unix epoch, when the forward was made.
    pub time: u64,
}

/// Why a hop value is not believed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HopError {
    #[error("the hop header is not a signed hop value: {0}")]
    Malformed(String),
    #[error("this node has no cluster key to check the hop's signature with")]
    NoKey,
    #[error("the hop is not signed")]
    Unsigned,
    #[error("the hop's signature does not verify (do the nodes share the cluster key?)")]
    BadSignature,
    #[error("the hop is {0} s away from this node's clock (more than {MAX_AGE} s)")]
    Expired(i64),
}

/// A hop value as read by the peer: what it claims (if it parses) and whether it is
/// believed.
#[derive(Debug)]
pub struct Reading {
    pub claims: Option<HopClaims>,
    pub verified: Result<(), HopError>,
}

impl Reading {
    /// The claims, only if the signature verified and the hop is recent.
    pub fn trusted(&self) -> Option<&HopClaims> {
        self.verified.as_ref().ok().and(self.claims.as_ref())
    }
}

impl HopClaims {
    fn fields(&self) -> String {
        format!(
            "node={};fn={};v={};sha256={};client={};scheme={};t={}",
            self.node,
            self.function,
            self.version,
            self.sha256,
            self.client,
            if self.https { "https" } else { "http" },
            self.time
        )
    }

    /// The header value: the claims, signed with `key` for `request` (unsigned without a
    /// key: peers then honour the version but believe nothing).
    pub fn encode(&self, key: Option<&ClusterKey>, request: Bound<'_>) -> String {
        let fields = self.fields();
        match key {
            Some(key) => {
                let tag = hmac::sign(&key.0, &signed_bytes(&fields, request));
                format!("{fields};sig={}", hex::encode(tag.as_ref()))
            }
            None => fields,
        }
    }

    /// Reads a header value for `request` at `now` (seconds since the epoch).
    pub fn read(value: &str, key: Option<&ClusterKey>, request: Bound<'_>, now: u64) -> Reading {
        let (fields, signature) = match value.rsplit_once(";sig=") {
            Some((fields, signature)) => (fields, Some(signature)),
            None => (value, None),
        };
        let claims = match parse(fields) {
            Ok(claims) => claims,
            Err(error) => {
                return Reading {
                    claims: None,
                    verified: Err(error),
                };
            }
        };
        let verified = (|| {
            let signature = signature.ok_or(HopError::Unsigned)?;
            let key = key.ok_or(HopError::NoKey)?;
            let tag = hex::decode(signature).map_err(|_| HopError::BadSignature)?;
            hmac::verify(&key.0, &signed_bytes(fields, request), &tag).map_err(|_| HopError::BadSignature)?;
            let skew =
                i64::try_from(now).unwrap_or(i64::MAX) - i64::try_from(claims.time).unwrap_or(i64::MAX);
            if skew.unsigned_abs() > MAX_AGE {
                return Err(HopError::Expired(skew));
            }
            Ok(())
        })();
        Reading {
            claims: Some(claims),
            verified,
        }
    }
}

/// Seconds since the Unix epoch, for [`HopClaims::time`].
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

fn signed_bytes(fields: &str, request: Bound<'_>) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(
        CONTEXT.len() + fields.len() + request.method.len() + request.host.len() + request.target.len() + 4,
    );
    for part in [
        CONTEXT,
        fields.as_bytes(),
        request.method.as_bytes(),
        request.host.as_bytes(),
        request.target.as_bytes(),
    ] {
        bytes.extend_from_slice(part);
        bytes.push(b'\n');
    }
    bytes
}

fn parse(fields: &str) -> Result<HopClaims, HopError> {
    let mut node = None;
    let mut function = None;
    let mut version = None;
    let mut sha256 = None;
    let mut client = None;
    let mut https = None;
    let mut time = None;
    for field in fields.split(';') {
        let Some((name, value)) = field.split_once('=') else {
            return Err(HopError::Malformed(format!("`{field}` is not NAME=VALUE")));
        };
        let bad = |what: &str| HopError::Malformed(format!("{what} `{value}`"));
        match name.trim() {
            "node" => node = Some(value.to_string()),
            "fn" => function = Some(value.to_string()),
            "v" => version = Some(value.parse::<u64>().map_err(|_| bad("version"))?),
            "sha256" => sha256 = Some(value.to_string()),
            "client" => client = Some(value.parse::<SocketAddr>().map_err(|_| bad("client address"))?),
            "scheme" => {
                https = Some(match value {
                    "https" => true,
                    "http" => false,
                    _ => return Err(bad("scheme")),
                })
            }
            "t" => time = Some(value.parse::<u64>().map_err(|_| bad("time"))?),
            // Later fields are ignored by this version, not refused.
            _ => {}
        }
    }
    let missing = |name: &str| HopError::Malformed(format!("no `{name}=`"));
    Ok(HopClaims {
        node: node.unwrap_or_default(),
        function: function.ok_or_else(|| missing("fn"))?,
        version: version.ok_or_else(|| missing("v"))?,
        sha256: sha256.ok_or_else(|| missing("sha256"))?,
        client: client.ok_or_else(|| missing("client"))?,
        https: https.ok_or_else(|| missing("scheme"))?,
        time: time.ok_or_else(|| missing("t"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_480_000;

    fn claims() -> HopClaims {
        HopClaims {
            node: "a1".into(),
            function: "hello".into(),
            version: 3,
            sha256: "ab".repeat(32),
            client: "198.51.100.7:5123".parse().unwrap(),
            https: true,
            time: NOW,
        }
    }

    fn request() -> Bound<'static> {
        Bound {
            method: "POST",
            host: "hello.localhost",
            target: "/x?q=1",
        }
    }

    fn key(secret: &str) -> ClusterKey {
        ClusterKey::new(secret.as_bytes()).unwrap()
    }

    #[test]
    fn a_signed_hop_is_believed_for_its_request_only() {
        let key = key("a shared secret of the cluster");
        let value = claims().encode(Some(&key), request());
        let reading = HopClaims::read(&value, Some(&key), request(), NOW + 5);
        assert_eq!(reading.trusted(), Some(&claims()));

        for other in [
            Bound {
                method: "GET",
                ..request()
            },
            Bound {
                host: "other.localhost",
                ..request()
            },
            Bound {
                target: "/x?q=2",
                ..request()
            },
        ] {
            let reading = HopClaims::read(&value, Some(&key), other, NOW);
            assert_eq!(reading.verified, Err(HopError::BadSignature), "{other:?}");
            assert!(reading.trusted().is_none());
        }
    }

    #[test]
    fn forged_altered_unsigned_or_old_hops_are_not_believed() {
        let key = key("a shared secret of the cluster");
        let value = claims().encode(Some(&key), request());
        let read =
            |value: &str, with: Option<&ClusterKey>, now: u64| HopClaims::read(value, with, request(), now);

        // Another key (a node of another cluster, or a guess).
        let other = super::tests::key("not the cluster's secret at all");
        assert_eq!(
            read(&value, Some(&other), NOW).verified,
            Err(HopError::BadSignature)
        );
        // A claim changed after signing.
        let altered = value.replace("client=198.51.100.7:5123", "client=192.0.2.1:1");
        assert_eq!(
            read(&altered, Some(&key), NOW).verified,
            Err(HopError::BadSignature)
        );
        let altered = value.replace("scheme=https", "scheme=http");
        assert_eq!(
            read(&altered, Some(&key), NOW).verified,
            Err(HopError::BadSignature)
        );
        // No signature, a garbage one, no key here.
        let unsigned = claims().encode(None, request());
        assert_eq!(read(&unsigned, Some(&key), NOW).verified, Err(HopError::Unsigned));
        let garbage = format!("{unsigned};sig=zz");
        assert_eq!(
            read(&garbage, Some(&key), NOW).verified,
            Err(HopError::BadSignature)
        );
        assert_eq!(read(&value, None, NOW).verified, Err(HopError::NoKey));
        // Replayed later than MAX_AGE, or from too far in the future.
        assert_eq!(
            read(&value, Some(&key), NOW + MAX_AGE + 1).verified,
            Err(HopError::Expired(31))
        );
        assert_eq!(
            read(&value, Some(&key), NOW - MAX_AGE - 1).verified,
            Err(HopError::Expired(-31))
        );
        assert!(read(&value, Some(&key), NOW + MAX_AGE).verified.is_ok());
        // Not a hop value at all (a client's, an older node's).
        let reading = read("test", Some(&key), NOW);
        assert!(reading.claims.is_none() && reading.trusted().is_none());
    }

    #[test]
    fn the_expected_version_is_read_even_when_not_believed() {
        let unsigned = claims().encode(None, request());
        let reading = HopClaims::read(&unsigned, None, request(), NOW);
        assert_eq!(reading.claims, Some(claims()));
        assert!(reading.trusted().is_none());
    }

    #[test]
    fn keys_are_checked_and_derived() {
        assert!(matches!(
            ClusterKey::new(b"  short \n"),
            Err(ClusterKeyError::TooShort(5))
        ));
        // Whitespace around a key (a file's newline) does not change it.
        let value = claims().encode(Some(&key("0123456789abcdef")), request());
        let padded = ClusterKey::new(b"0123456789abcdef\n").unwrap();
        assert!(
            HopClaims::read(&value, Some(&padded), request(), NOW)
                .verified
                .is_ok()
        );
        // Nodes with one token derive one key; another token, another key.
        let from_token = claims().encode(Some(&ClusterKey::from_token("token-1")), request());
        let same = ClusterKey::from_token("token-1");
        let other = ClusterKey::from_token("token-2");
        assert!(
            HopClaims::read(&from_token, Some(&same), request(), NOW)
                .verified
                .is_ok()
        );
        assert!(
            HopClaims::read(&from_token, Some(&other), request(), NOW)
                .verified
                .is_err()
        );
        // The token itself is not the key.
        let raw = ClusterKey::new(b"token-1-is-long-enough").unwrap();
        let derived = ClusterKey::from_token("token-1-is-long-enough");
        let signed = claims().encode(Some(&raw), request());
        assert!(
            HopClaims::read(&signed, Some(&derived), request(), NOW)
                .verified
                .is_err()
        );
    }
}
