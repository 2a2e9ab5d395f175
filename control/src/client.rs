//! The HTTP client of the registry API, used by the CLI (`atoll push/ls/versions/rollback/token`)
//! and by nodes (blob fetch, watch).
//!
//! Errors are shaped for the person reading them: an answer from the registry becomes
//! `registry answered 409 Conflict: <the registry's own message>`, a network failure
//! `cannot reach registry at URL: <root cause>` — one line each, ready for a CLI to print.
//!
//! [`RegistryClient::watch`] turns the NDJSON body into a stream of [`WatchEvent`]s, joining
//! lines split across chunk boundaries. It sets no overall timeout (the stream lives as
//! long as the node); the registry sends heartbeats, so a node can put a timeout on each
//! `next()` to detect a dead connection.

use std::pin::Pin;
use std::time::Duration;

use atoll_core::kv::{KeyPage, KvEntry, KvError, KvWritten};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::{Response, StatusCode, Url};
use serde::de::DeserializeOwned;

use atoll_core::api_types::{
    ErrorResponse, FunctionSummary, PushResponse, RollbackRequest, RollbackResponse, VersionsResponse,
};
use atoll_core::watch::WatchEvent;

/// Connect timeout for every request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Whole-request timeout for small calls (not push, blob or watch).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// A heartbeat older than the member TTL is worthless: give up on it well before.
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);
/// Whole-request timeout for uploading or downloading a module.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);

/// What went wrong talking to the registry. Display is one line.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL is unusable.
    #[error("invalid registry URL {url:?}: {reason}")]
    InvalidUrl {
        /// As given.
        url: String,
        /// Why.
        reason: String,
    },
    /// No HTTP answer: connection refused, DNS, timeout, reset.
    #[error("cannot reach registry at {url}: {message}")]
    Unreachable {
        /// The registry's base URL.
        url: String,
        /// The root cause, one line.
        message: String,
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
    /// The registry answered with an error status.
    #[error("registry answered {status}: {message}")]
    Status {
        /// The HTTP status.
        status: StatusCode,
        /// The registry's `error` message (or the raw body).
        message: String,
    },
    /// The registry's answer could not be understood.
    #[error("unexpected answer from registry at {url}: {message}")]
    Protocol {
        /// The registry's base URL.
        url: String,
        /// What was wrong.
        message: String,
    },
}

impl ClientError {
    /// The HTTP status, when the registry answered with an error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of one registry.
#[derive(Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("RegistryClient")
            .field("base", &self.base.as_str())
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl RegistryClient {
    /// A client for the registry at `base_url` (`http://host:port`, optionally with a path
    /// prefix), sending `token` as a bearer token when given.
    pub fn new(base_url: &str, token: Option<String>) -> Result<Self, ClientError> {
        let invalid = |reason: String| ClientError::InvalidUrl {
            url: base_url.to_owned(),
            reason,
        };
        let mut base = Url::parse(base_url).map_err(|e| invalid(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(invalid("the scheme must be http or https".into()));
        }
        if base.cannot_be_a_base() || base.host_str().is_none() {
            return Err(invalid("it has no host".into()));
        }
        base.set_query(None);
        base.set_fragment(None);
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        Ok(RegistryClient {
            http,
            base,
            token: token.filter(|t| !t.is_empty()),
        })
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        self.base.as_str()
    }

    /// Pushes a module with its manifest (the `atoll.toml` text).
    pub async fn push(&self, manifest_text: &str, module: Vec<u8>) -> Result<PushResponse, ClientError> {
        self.push_with_traffic(manifest_text, module, true).await
    }

    /// [`Self::push`]; without `takes_traffic` the version joins the function's traffic
    /// split at 0% (`atoll push --no-traffic`).
    pub async fn push_with_traffic(
        &self,
        manifest_text: &str,
        module: Vec<u8>,
        takes_traffic: bool,
    ) -> Result<PushResponse, ClientError> {
        let module = reqwest::multipart::Part::bytes(module)
            .file_name("module.wasm")
            .mime_str("application/wasm")
            .map_err(|e| self.unreachable(e))?;
        let form = reqwest::multipart::Form::new()
            .text("manifest", manifest_text.to_owned())
            .part("module", module);
        let mut request = self
            .request(reqwest::Method::POST, &["v1", "functions"])
            .timeout(TRANSFER_TIMEOUT)
            .multipart(form);
        if !takes_traffic {
            request = request.query(&[("no_traffic", "true")]);
        }
        self.json(request).await
    }

    /// Every function, sorted by name.
    pub async fn list(&self) -> Result<Vec<FunctionSummary>, ClientError> {
        let request = self
            .request(reqwest::Method::GET, &["v1", "functions"])
            .timeout(REQUEST_TIMEOUT);
        self.json(request).await
    }

    /// Sends this node's heartbeat; the answer is the cluster's members (as `nodes`), so
    /// a node learns its peers with the same round trip.
    pub async fn announce(
        &self,
        announcement: &atoll_core::membership::NodeAnnouncement,
    ) -> Result<Vec<atoll_core::membership::MemberStatus>, ClientError> {
        let request = self
            .request(reqwest::Method::PUT, &["v1", "nodes", &announcement.name])
            .timeout(HEARTBEAT_TIMEOUT)
            .json(announcement);
        self.json(request).await
    }

    /// The cluster's members as the registry last heard from them.
    pub async fn nodes(&self) -> Result<Vec<atoll_core::membership::MemberStatus>, ClientError> {
        let request = self
            .request(reqwest::Method::GET, &["v1", "nodes"])
            .timeout(REQUEST_TIMEOUT);
        self.json(request).await
    }

    /// Claims one cron tick for this node: `true` if this call was first (run it).
    pub async fn cron_claim(&self, run: &atoll_core::cron::CronRun) -> Result<bool, ClientError> {
        let request = self
            .request(reqwest::Method::POST, &["v1", "cron", &run.function])
            .timeout(REQUEST_TIMEOUT)
            .json(run);
        match self.send(request).await {
            Ok(_) => Ok(true),
            Err(ClientError::Status { status, .. }) if status == StatusCode::CONFLICT => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Records how a claimed tick's run ended.
    pub async fn cron_finish(&self, run: &atoll_core::cron::CronRun) -> Result<(), ClientError> {
        let request = self
            .request(reqwest::Method::PUT, &["v1", "cron", &run.function])
            .timeout(REQUEST_TIMEOUT)
            .json(run);
        self.send(request).await.map(drop)
    }

    /// A function's last cron runs, newest first.
    pub async fn cron_runs(&self, function: &str) -> Result<Vec<atoll_core::cron::CronRun>, ClientError> {
        let request = self
            .request(reqwest::Method::GET, &["v1", "cron", function])
            .timeout(REQUEST_TIMEOUT);
        self.json(request).await
    }

    /// One function's versions.
    pub async fn versions(&self, name: &str) -> Result<VersionsResponse, ClientError> {
        let request = self
            .request(reqwest::Method::GET, &["v1", "functions", name, "versions"])
            .timeout(REQUEST_TIMEOUT);
        self.json(request).await
    }

    /// Activates `to`, or by default the version before the active one.
    pub async fn rollback(&self, name: &str, to: Option<u64>) -> Result<RollbackResponse, ClientError> {
        let request = self
            .request(reqwest::Method::POST, &["v1", "functions", name, "rollback"])
            .timeout(REQUEST_TIMEOUT)
            .json(&RollbackRequest { to });
        self.json(request).await
    }

    /// Shares `name`'s requests between versions (`atoll traffic`, `atoll promote`).
    pub async fn traffic(
        &self,
        name: &str,
        split: &atoll_core::api_types::TrafficRequest,
    ) -> Result<atoll_core::api_types::TrafficResponse, ClientError> {
        let request = self
            .request(reqwest::Method::POST, &["v1", "functions", name, "traffic"])
            .timeout(REQUEST_TIMEOUT)
            .json(split);
        self.json(request).await
    }

    /// Mints a token (needs an admin token); the answer holds the token, shown this once.
    pub async fn create_token(
        &self,
        grant: &atoll_core::auth::Grant,
    ) -> Result<atoll_core::auth::CreatedToken, ClientError> {
        let request = self
            .request(reqwest::Method::POST, &["v1", "tokens"])
            .timeout(REQUEST_TIMEOUT)
            .json(grant);
        self.json(request).await
    }

    /// Every minted token (needs an admin token).
    pub async fn tokens(&self) -> Result<Vec<atoll_core::auth::TokenInfo>, ClientError> {
        let request = self
            .request(reqwest::Method::GET, &["v1", "tokens"])
            .timeout(REQUEST_TIMEOUT);
        self.json(request).await
    }

    /// Revokes the token with this id (needs an admin token).
    pub async fn revoke_token(&self, id: &str) -> Result<(), ClientError> {
        let request = self
            .request(reqwest::Method::DELETE, &["v1", "tokens", id])
            .timeout(REQUEST_TIMEOUT);
        self.send(request).await.map(drop)
    }

    /// Sets function `name`'s secret `key` (sealed by the registry at once).
    pub async fn secret_set(&self, name: &str, key: &str, value: Vec<u8>) -> Result<(), ClientError> {
        let request = self
            .request(reqwest::Method::PUT, &["v1", "functions", name, "secrets", key])
            .timeout(REQUEST_TIMEOUT)
            .body(value);
        self.send(request).await.map(drop)
    }

    /// The names of function `name`'s secrets.
    pub async fn secret_list(
        &self,
        name: &str,
    ) -> Result<atoll_core::api_types::SecretsResponse, ClientError> {
        let request = self
            .request(reqwest::Method::GET, &["v1", "functions", name, "secrets"])
            .timeout(REQUEST_TIMEOUT);
        self.json(request).await
    }

    /// Removes function `name`'s secret `key`.
    pub async fn secret_remove(&self, name: &str, key: &str) -> Result<(), ClientError> {
        let request = self
            .request(
                reqwest::Method::DELETE,
                &["v1", "functions", name, "secrets", key],
            )
            .timeout(REQUEST_TIMEOUT);
        self.send(request).await.map(drop)
    }

    /// The module bytes with this SHA-256 (the caller verifies the digest).
    pub async fn blob(&self, sha256: &str) -> Result<Bytes, ClientError> {
        let request = self
            .request(reqwest::Method::GET, &["v1", "blobs", sha256])
            .timeout(TRANSFER_TIMEOUT);
        let response = self.send(request).await?;
        response.bytes().await.map_err(|e| self.unreachable(e))
    }

    /// Watches changes after revision `since` (0: everything): `Put`s for the catch-up,
    /// `Synced`, then live `Put`s and `Heartbeat`s. The stream ends when the registry
    /// closes the connection, and yields an error if it breaks.
    pub async fn watch(
        &self,
        since: u64,
    ) -> Result<impl Stream<Item = Result<WatchEvent, ClientError>> + Send + Unpin + use<>, ClientError> {
        let mut url = self.url(&["v1", "watch"]);
        url.query_pairs_mut().append_pair("since", &since.to_string());
        let request = self.authorize(self.http.get(url));
        let response = self.send(request).await?;
        let base = self.base.to_string();
        let reader = LineReader {
            body: Box::pin(response.bytes_stream()),
            buffer: Vec::new(),
            done: false,
            base,
        };
        let stream = futures_util::stream::unfold(reader, |mut reader| async move {
            let item = reader.next_event().await?;
            if item.is_err() {
                reader.done = true;
            }
            Some((item, reader))
        });
        Ok(Box::pin(stream))
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// One key's value and revision; `None` when absent.
    pub async fn kv_get(&self, store: &str, key: &str) -> Result<Option<KvEntry>, KvError> {
        let request = self
            .request(reqwest::Method::GET, &["v1", "kv", store, key])
            .timeout(REQUEST_TIMEOUT);
        let response = match self.kv_send(request).await {
            Ok(response) => response,
            Err(KvError::NotFound) => return Ok(None),
            Err(error) => return Err(error),
        };
        let Some(revision) = kv_revision(&response) else {
            return Err(KvError::Unavailable(
                "the registry's answer carries no revision: not a KV value".into(),
            ));
        };
        let value = response
            .bytes()
            .await
            .map_err(|error| KvError::Unavailable(error.to_string()))?;
        Ok(Some(KvEntry {
            value: value.to_vec(),
            revision,
        }))
    }

    /// Writes a value, expiring after `ttl` seconds if given, only if the key is at
    /// `if_revision` if given (0: only if absent).
    pub async fn kv_set(
        &self,
        store: &str,
        key: &str,
        value: Vec<u8>,
        ttl: Option<u64>,
        if_revision: Option<u64>,
    ) -> Result<KvWritten, KvError> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(ttl) = ttl {
            query.push(("ttl", ttl.to_string()));
        }
        if let Some(revision) = if_revision {
            query.push(("if_revision", revision.to_string()));
        }
        let request = self
            .request(reqwest::Method::PUT, &["v1", "kv", store, key])
            .query(&query)
            .timeout(REQUEST_TIMEOUT)
            .body(value);
        self.kv_json(request).await
    }

    /// Adds `delta` to the key's integer value.
    pub async fn kv_increment(&self, store: &str, key: &str, delta: i64) -> Result<KvWritten, KvError> {
        let request = self
            .request(reqwest::Method::POST, &["v1", "kv", store, key])
            .query(&[("increment", delta.to_string())])
            .timeout(REQUEST_TIMEOUT);
        self.kv_json(request).await
    }

    /// Deletes a key; whether it existed.
    pub async fn kv_delete(&self, store: &str, key: &str) -> Result<bool, KvError> {
        let request = self
            .request(reqwest::Method::DELETE, &["v1", "kv", store, key])
            .timeout(REQUEST_TIMEOUT);
        match self.kv_send(request).await {
            Ok(_) => Ok(true),
            Err(KvError::NotFound) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// A page of keys starting with `prefix`, after `cursor`.
    pub async fn kv_list(
        &self,
        store: &str,
        prefix: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, KvError> {
        let mut query = vec![("prefix", prefix.to_string()), ("limit", limit.to_string())];
        if let Some(cursor) = cursor {
            query.push(("cursor", cursor.to_string()));
        }
        let request = self
            .request(reqwest::Method::GET, &["v1", "kv", store])
            .query(&query)
            .timeout(REQUEST_TIMEOUT);
        self.kv_json(request).await
    }

    /// Sends a KV request; an error status becomes the [`KvError`] it stands for.
    async fn kv_send(&self, request: reqwest::RequestBuilder) -> Result<Response, KvError> {
        let response = request
            .send()
            .await
            .map_err(|error| KvError::Unavailable(self.unreachable(error).to_string()))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let revision = kv_revision(&response);
        let body = response.bytes().await.unwrap_or_default();
        let message = serde_json::from_slice::<ErrorResponse>(&body)
            .map(|error| error.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        Err(match status {
            StatusCode::NOT_FOUND => KvError::NotFound,
            StatusCode::CONFLICT => match revision {
                Some(current) => KvError::Conflict { current },
                None => KvError::NotANumber,
            },
            StatusCode::BAD_REQUEST => KvError::Invalid(message),
            StatusCode::FORBIDDEN => KvError::NotGranted(message),
            _ => KvError::Unavailable(format!("registry answered {status}: {message}")),
        })
    }

    async fn kv_json<T: DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> Result<T, KvError> {
        let response = self.kv_send(request).await?;
        let body = response
            .bytes()
            .await
            .map_err(|error| KvError::Unavailable(error.to_string()))?;
        serde_json::from_slice(&body)
            .map_err(|error| KvError::Unavailable(format!("unexpected answer: {error}")))
    }

    fn request(&self, method: reqwest::Method, segments: &[&str]) -> reqwest::RequestBuilder {
        self.authorize(self.http.request(method, self.url(segments)))
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends, and turns an error status into [`ClientError::Status`].
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Response, ClientError> {
        let response = request.send().await.map_err(|e| self.unreachable(e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.unwrap_or_default();
        let message = match serde_json::from_slice::<ErrorResponse>(&body) {
            Ok(error) => error.error,
            Err(_) => {
                let text = String::from_utf8_lossy(&body);
                let line = text.lines().next().unwrap_or("").trim();
                if line.is_empty() {
                    status.canonical_reason().unwrap_or("error").to_owned()
                } else {
                    line.chars().take(200).collect()
                }
            }
        };
        Err(ClientError::Status { status, message })
    }

    async fn json<T: DeserializeOwned>(&self, request: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let response = self.send(request).await?;
        let body = response.bytes().await.map_err(|e| self.unreachable(e))?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol {
            url: self.base.to_string(),
            message: e.to_string(),
        })
    }

    fn unreachable(&self, error: reqwest::Error) -> ClientError {
        unreachable_error(self.base.as_str(), error)
    }
}

fn unreachable_error(url: &str, error: reqwest::Error) -> ClientError {
    // reqwest's own message is generic ("error sending request for url (…)"); the root
    // cause ("Connection refused") is what the reader needs.
    let mut message = if error.is_timeout() {
        "timed out".to_owned()
    } else {
        error.to_string()
    };
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message = cause.to_string();
        source = cause.source();
    }
    ClientError::Unreachable {
        url: url.to_owned(),
        message,
        source: error,
    }
}

/// Splits the watch body into lines across chunk boundaries.
struct LineReader {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    buffer: Vec<u8>,
    done: bool,
    base: String,
}

impl LineReader {
    async fn next_event(&mut self) -> Option<Result<WatchEvent, ClientError>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                return Some(serde_json::from_slice(line).map_err(|e| ClientError::Protocol {
                    url: self.base.clone(),
                    message: format!("bad watch event: {e}"),
                }));
            }
            if self.buffer.len() > atoll_core::watch::MAX_LINE {
                return Some(Err(ClientError::Protocol {
                    url: self.base.clone(),
                    message: "watch event line too long".into(),
                }));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(e)) => return Some(Err(unreachable_error(&self.base, e))),
                None => {
                    self.done = true;
                    let rest = std::mem::take(&mut self.buffer);
                    let rest = rest.trim_ascii();
                    if rest.is_empty() {
                        return None;
                    }
                    return Some(serde_json::from_slice(rest).map_err(|e| ClientError::Protocol {
                        url: self.base.clone(),
                        message: format!("bad watch event: {e}"),
                    }));
                }
            }
        }
    }
}

/// The header a KV answer carries its key's revision in (as the registry's API sets it).
pub const KV_REVISION_HEADER: &str = "atoll-kv-revision";

fn kv_revision(response: &Response) -> Option<u64> {
    response
        .headers()
        .get(KV_REVISION_HEADER)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = RegistryClient::new("http://127.0.0.1:7070", None).unwrap();
        assert_eq!(
            c.url(&["v1", "functions", "a/b", "versions"]).as_str(),
            "http://127.0.0.1:7070/v1/functions/a%2Fb/versions"
        );
        let c = RegistryClient::new("https://reg.example.com/atoll/", None).unwrap();
        assert_eq!(
            c.url(&["v1", "watch"]).as_str(),
            "https://reg.example.com/atoll/v1/watch"
        );
        for bad in ["", "127.0.0.1:7070", "ftp://x", "http://"] {
            let e = RegistryClient::new(bad, None).unwrap_err();
            assert!(e.to_string().starts_with("invalid registry URL"), "{e}");
        }
    }

    #[tokio::test]
    async fn lines_across_chunks() {
        let events = [
            WatchEvent::Synced { revision: 1 },
            WatchEvent::Heartbeat { revision: 1 },
            WatchEvent::Delete {
                revision: 2,
                name: "f".into(),
            },
        ];
        let bytes: Vec<u8> = events.iter().flat_map(|e| e.to_line()).collect();
        // One byte per chunk, and no newline after the last event.
        let chunks: Vec<reqwest::Result<Bytes>> = bytes[..bytes.len() - 1]
            .iter()
            .map(|b| Ok(Bytes::copy_from_slice(&[*b])))
            .collect();
        let mut reader = LineReader {
            body: Box::pin(futures_util::stream::iter(chunks)),
            buffer: Vec::new(),
            done: false,
            base: "http://x/".into(),
        };
        for expected in &events {
            assert_eq!(&reader.next_event().await.unwrap().unwrap(), expected);
        }
        assert!(reader.next_event().await.is_none());
    }
}
