//! The function manifest, `atoll.toml`, which sits beside the module.
//!
//! Parsing follows "TOML → file struct → validated value": serde reads the file into
//! [`Manifest`] with `deny_unknown_fields` everywhere (a typo such as `rotues` is an
//! error naming the key, never silently ignored), then [`Manifest::parse`] checks every
//! field so that nothing downstream — the store, the router, a node — ever sees a
//! manifest that is not valid. Routes are rewritten to their canonical form
//! ([`crate::RoutePattern`]'s `Display`), so two spellings of one route compare equal.
//!
//! ```toml
//! name = "echo"          # [a-z0-9-], 1..=63 chars, no leading/trailing '-'
//! wasm = "echo.wasm"     # the module, relative to the manifest; required unless `origins`
//! origins = ["http://10.0.0.5:3000"]  # optional; servers to proxy to (see crate::origin)
//! routes = ["echo.example.com", "*.echo.example.com", "api.example.com/echo"]
//! [env]                  # optional; keys [A-Za-z_][A-Za-z0-9_]*
//! GREETING = "hi"
//! [limits]               # optional
//! memory = "64MiB"       # default 128MiB; B, KiB, MiB, GiB, KB, MB, GB; 0 < m <= 4GiB
//! timeout = "10s"        # default 30s; humantime syntax; 0 < t <= 15m
//! response = "16MiB"     # default 32MiB: largest response (headers + body) a function may write
//! [scale]                # optional; per function, per node
//! min_instances = 0      # default 0: instances kept ready (reserved) even when idle
//! max_concurrency = 64   # default 64: requests running at once; more wait in the queue
//! max_queue = 1024       # default 1024: requests waiting; beyond it 503 + Retry-After
//! idle_timeout = "60s"   # default 60s: without requests, ready instances go back to min
//! [outbound]             # optional; what the `wasi_experimental_http` import may reach
//! allowed_hosts = ["https://api.example.com", "https://*.example.com:8443"]  # default: none
//! max_requests = 50      # default 50 calls per request; at most 1000
//! max_concurrent = 6     # default 6 responses open at once; at most 64
//! max_response = "8MiB"  # default 8MiB: the response bodies open at once, together
//! [kv]                   # optional; key-value stores the function may use (atoll_kv)
//! stores = ["todo"]      # store names, like function names; at most 16
//! [services]             # optional; functions this one calls in-process (service bindings)
//! AUTH = "auth"          # the guest sees ATOLL_SERVICE_AUTH=http://auth.atoll.internal
//! [origin]               # optional, with `origins`; health checks, timeouts, retries
//! health_path = "/"  health_interval = "5s"  connect_timeout = "2s"  timeout = "30s"  retries = 1
//! [[cron]]               # optional, at most 8; scheduled runs (see crate::cron)
//! schedule = "*/5 * * * *"  # cron pattern in UTC; 5 fields, or 6 with seconds first
//! path = "/tasks/cleanup"   # requested as a GET with X_ATOLL_TRIGGER=cron
//! ```
//!
//! The same struct travels as JSON from the registry to nodes, so it is `Serialize` too.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::route::{RouteError, RoutePattern};

/// The file name looked up when [`Manifest::load`] is given a directory.
pub const MANIFEST_FILE: &str = "atoll.toml";
/// Memory limit when `[limits] memory` is absent: 128 MiB.
pub const DEFAULT_MEMORY_BYTES: u64 = 128 << 20;
/// Largest memory limit: 4 GiB (the 32-bit Wasm address space).
pub const MAX_MEMORY_BYTES: u64 = 4 << 30;
/// Timeout when `[limits] timeout` is absent.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest timeout.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Longest function name.
pub const MAX_NAME_LEN: usize = 63;

/// A function's manifest. Build one with [`Manifest::parse`] (or [`Manifest::load`]) so
/// that it is validated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Function name: `[a-z0-9-]`, 1..=63 chars, not starting or ending with `-`;
    /// unique in the registry. Required.
    pub name: String,
    /// Path of the module, relative to the manifest. Required unless `origins` is set;
    /// empty for a route to origins only.
    #[serde(default)]
    pub wasm: String,
    /// Origin servers: without a module, the route proxies to them; with one, the function
    /// reaches them at `http://origin.atoll.internal`. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub origins: Vec<String>,
    /// How the node talks to the origins.
    #[serde(default, skip_serializing_if = "crate::origin::OriginOptions::is_default")]
    pub origin: crate::origin::OriginOptions,
    /// `host[/path-prefix]` patterns, canonical form, at least one, no duplicates.
    pub routes: Vec<String>,
    /// Environment passed to the function. Default: empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Resource limits. Default: all defaults.
    #[serde(default)]
    pub limits: Limits,
    /// Scaling per node. Default: all defaults.
    #[serde(default, skip_serializing_if = "Scale::is_default")]
    pub scale: Scale,
    /// Outbound HTTP. Default: nothing may be reached.
    #[serde(default, skip_serializing_if = "Outbound::is_default")]
    pub outbound: Outbound,
    /// Service bindings: a binding name (an environment key) to the function it calls.
    /// Default: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, String>,
    /// Key-value stores granted. Default: none.
    #[serde(default, skip_serializing_if = "Kv::is_default")]
    pub kv: Kv,
    /// Scheduled runs. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cron: Vec<CronEntry>,
}

/// One `[[cron]]` entry: a GET of `path` at every tick of `schedule`, on one node of the
/// cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CronEntry {
    pub schedule: String,
    pub path: String,
}

/// `[kv]`: the key-value stores a function may use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kv {
    /// Store names (see [`crate::kv`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stores: Vec<String>,
}

impl Kv {
    fn is_default(&self) -> bool {
        self.stores.is_empty()
    }

    fn validate(&self) -> Result<(), String> {
        if self.stores.len() > crate::kv::MAX_STORES {
            return Err(format!(
                "kv.stores lists {} stores; at most {} are allowed",
                self.stores.len(),
                crate::kv::MAX_STORES
            ));
        }
        for (index, store) in self.stores.iter().enumerate() {
            crate::kv::check_store_name(store).map_err(|error| format!("kv.stores: {error}"))?;
            if self.stores[..index].contains(store) {
                return Err(format!("kv.stores lists {store:?} twice"));
            }
        }
        Ok(())
    }
}

/// Most `[services]` bindings one manifest may have.
pub const MAX_SERVICES: usize = 64;
/// The host suffix of service bindings: `http://NAME.atoll.internal/…` calls function NAME.
pub const SERVICE_DOMAIN: &str = "atoll.internal";

/// The URL a binding gives the guest (`ATOLL_SERVICE_<KEY>`) for `function`.
pub fn service_url(function: &str) -> String {
    format!("http://{function}.{SERVICE_DOMAIN}")
}

/// Default `[outbound] max_requests`: outbound calls one request may make.
pub const DEFAULT_OUTBOUND_REQUESTS: u32 = 50;
/// Largest `[outbound] max_requests`.
pub const MAX_OUTBOUND_REQUESTS: u32 = 1000;
/// Default `[outbound] max_concurrent`: responses one request may hold open at once.
pub const DEFAULT_OUTBOUND_CONCURRENT: u32 = 6;
/// Largest `[outbound] max_concurrent`.
pub const MAX_OUTBOUND_CONCURRENT: u32 = 64;
/// Default `[outbound] max_response`: 8 MiB of response bodies held at once.
pub const DEFAULT_OUTBOUND_RESPONSE_BYTES: u64 = 8 << 20;
/// Largest `[outbound] max_response`: the host holds these bytes outside the guest's memory.
pub const MAX_OUTBOUND_RESPONSE_BYTES: u64 = 64 << 20;

/// `[outbound]`: where the function may call out to, and how much. Read the effective
/// limits with the accessor methods.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outbound {
    /// Spin's syntax (see [`crate::outbound`]). Default: empty, nothing allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
    /// Outbound calls per request. Default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    /// Responses held open (not yet closed) at once. Default 6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Response bodies held open at once, together, e.g. `"8MiB"`. Default 8MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_response: Option<String>,
}

impl Outbound {
    fn is_default(&self) -> bool {
        *self == Outbound::default()
    }

    /// The allow-list, parsed. Infallible for a manifest that went through
    /// [`Manifest::parse`]; a hand-built manifest with a bad entry allows nothing.
    pub fn allowed_hosts(&self) -> crate::outbound::AllowedHosts {
        crate::outbound::AllowedHosts::parse(&self.allowed_hosts).unwrap_or_default()
    }

    pub fn max_requests(&self) -> u32 {
        self.max_requests.unwrap_or(DEFAULT_OUTBOUND_REQUESTS)
    }

    pub fn max_concurrent(&self) -> u32 {
        self.max_concurrent.unwrap_or(DEFAULT_OUTBOUND_CONCURRENT)
    }

    pub fn max_response_bytes(&self) -> u64 {
        self.max_response
            .as_deref()
            .and_then(|m| parse_memory(m).ok())
            .unwrap_or(DEFAULT_OUTBOUND_RESPONSE_BYTES)
    }

    fn validate(&self) -> Result<(), String> {
        crate::outbound::AllowedHosts::parse(&self.allowed_hosts)
            .map_err(|error| format!("outbound.allowed_hosts: {error}"))?;
        match self.max_requests {
            Some(0) => return Err("outbound.max_requests must be at least 1".into()),
            Some(n) if n > MAX_OUTBOUND_REQUESTS => {
                return Err(format!(
                    "outbound.max_requests must be at most {MAX_OUTBOUND_REQUESTS}"
                ));
            }
            _ => {}
        }
        match self.max_concurrent {
            Some(0) => return Err("outbound.max_concurrent must be at least 1".into()),
            Some(n) if n > MAX_OUTBOUND_CONCURRENT => {
                return Err(format!(
                    "outbound.max_concurrent must be at most {MAX_OUTBOUND_CONCURRENT}"
                ));
            }
            _ => {}
        }
        if let Some(text) = &self.max_response {
            let bytes = parse_memory(text)
                .map_err(|reason| format!("outbound.max_response {text:?} is invalid: {reason}"))?;
            if bytes > MAX_OUTBOUND_RESPONSE_BYTES {
                return Err(format!(
                    "outbound.max_response {text:?} is invalid: it is over the {}MiB maximum",
                    MAX_OUTBOUND_RESPONSE_BYTES >> 20
                ));
            }
        }
        Ok(())
    }
}

/// Default `[scale] max_concurrency`.
pub const DEFAULT_MAX_CONCURRENCY: u32 = 64;
/// Default `[scale] max_queue`.
pub const DEFAULT_MAX_QUEUE: u32 = 1024;
/// Default `[scale] idle_timeout`.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest `[scale] min_instances` (each holds a reserved instance).
pub const MAX_MIN_INSTANCES: u32 = 256;
/// Default `[limits] response`: 32 MiB.
pub const DEFAULT_RESPONSE_BYTES: u64 = 32 << 20;
/// Largest `[limits] response` (a response up to 256 KiB is buffered whole; a larger one is
/// streamed, and counted against this as it goes).
pub const MAX_RESPONSE_BYTES: u64 = 128 << 20;
/// Largest `[scale] max_concurrency`.
pub const MAX_CONCURRENCY: u32 = 1024;
/// Largest `[scale] max_queue`.
pub const MAX_QUEUE: u32 = 10_000;
/// Most `[env]` entries, and their largest total size (`KEY=value` plus a NUL each): every
/// request copies the environment into the guest, and the manifest travels in every watch
/// event to every node.
pub const MAX_ENV_ENTRIES: usize = 256;
pub const MAX_ENV_BYTES: usize = 64 << 10;
/// Most routes one function may have, and the longest route.
pub const MAX_ROUTES: usize = 64;
pub const MAX_ROUTE_LEN: usize = 2048;

/// `[scale]`: how a node runs instances of the function. Read the effective values with
/// the accessor methods.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scale {
    /// Instances kept ready even when idle (reserved). Default 0: scale to zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_instances: Option<u32>,
    /// Requests running at once on a node. Default 64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Requests waiting for a free slot; beyond it the node answers 503. Default 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queue: Option<u32>,
    /// Time without requests after which ready instances are released. Default 60s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
}

impl Scale {
    fn is_default(&self) -> bool {
        *self == Scale::default()
    }

    pub fn min_instances(&self) -> u32 {
        self.min_instances.unwrap_or(0)
    }

    pub fn max_concurrency(&self) -> u32 {
        self.max_concurrency.unwrap_or(DEFAULT_MAX_CONCURRENCY)
    }

    pub fn max_queue(&self) -> u32 {
        self.max_queue.unwrap_or(DEFAULT_MAX_QUEUE)
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
            .as_deref()
            .and_then(|t| humantime::parse_duration(t).ok())
            .unwrap_or(DEFAULT_IDLE_TIMEOUT)
    }

    fn validate(&self) -> Result<(), String> {
        if self.max_concurrency == Some(0) {
            return Err("scale.max_concurrency must be at least 1".into());
        }
        if self.max_concurrency() > MAX_CONCURRENCY {
            return Err(format!("scale.max_concurrency must be at most {MAX_CONCURRENCY}"));
        }
        if self.max_queue() > MAX_QUEUE {
            return Err(format!("scale.max_queue must be at most {MAX_QUEUE}"));
        }
        if self.min_instances() > MAX_MIN_INSTANCES {
            return Err(format!("scale.min_instances must be at most {MAX_MIN_INSTANCES}"));
        }
        if self.min_instances() > self.max_concurrency() {
            return Err("scale.min_instances must not exceed scale.max_concurrency".into());
        }
        if let Some(text) = &self.idle_timeout {
            match humantime::parse_duration(text) {
                Ok(duration) if duration >= Duration::from_millis(10) => {}
                Ok(_) => return Err(format!("scale.idle_timeout {text:?} is invalid: at least 10ms")),
                Err(error) => return Err(format!("scale.idle_timeout {text:?} is invalid: {error}")),
            }
        }
        Ok(())
    }
}

/// `[limits]`: kept as written (so the manifest round-trips); read the effective values
/// with [`Limits::memory_bytes`] and [`Limits::timeout`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Linear memory cap, e.g. `"64MiB"`. Default 128MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Wall-clock limit per request, e.g. `"10s"`. Default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Largest response (headers and body) a request may produce, e.g. `"16MiB"`.
    /// Default 32MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
}

/// Why a manifest was refused. Display is one line starting with `manifest: `.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not TOML, an unknown key, a missing field or a value of the wrong type.
    #[error("manifest: {0}")]
    Syntax(String),
    /// A field whose value breaks a rule.
    #[error("manifest: {0}")]
    Invalid(String),
    /// One of `routes` does not parse. (Not `#[from]`: that would also make the route error
    /// the `source`, and a cause chain printed in full, as the CLI does, would repeat it.)
    #[error("manifest: {0}")]
    Route(RouteError),
    /// The file could not be read.
    #[error("manifest: cannot read {}: {source}", path.display())]
    Io {
        /// The file (or directory) that was asked for.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
}

impl From<RouteError> for ManifestError {
    fn from(error: RouteError) -> Self {
        ManifestError::Route(error)
    }
}

impl Manifest {
    /// Parses `atoll.toml` text and validates every field. Routes come back in their
    /// canonical form.
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let mut manifest: Manifest =
            toml::from_str(text).map_err(|e| ManifestError::Syntax(toml_message(text, &e)))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Reads and parses a manifest. `path` is either the `atoll.toml` file or a directory
    /// holding one. Returns the manifest and the module's path, resolved against the
    /// manifest's directory.
    pub fn load(path: &Path) -> Result<(Manifest, PathBuf), ManifestError> {
        let file = if path.is_dir() {
            path.join(MANIFEST_FILE)
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|source| ManifestError::Io {
            path: file.clone(),
            source,
        })?;
        let manifest = Manifest::parse(&text)?;
        let dir = file.parent().unwrap_or(Path::new(""));
        let wasm = dir.join(&manifest.wasm);
        Ok((manifest, wasm))
    }

    /// Whether the route only proxies to origins (no module).
    pub fn is_origin_only(&self) -> bool {
        self.wasm.is_empty() && !self.origins.is_empty()
    }

    /// The origins, parsed. Infallible for a manifest that went through [`Manifest::parse`].
    pub fn origin_urls(&self) -> Vec<crate::origin::OriginUrl> {
        self.origins
            .iter()
            .filter_map(|text| crate::origin::OriginUrl::parse(text).ok())
            .collect()
    }

    fn validate_origins(&self) -> Result<(), String> {
        if self.wasm.trim().is_empty() && !self.wasm.is_empty() {
            return Err("`wasm` must not be empty".into());
        }
        if self.wasm.is_empty() && self.origins.is_empty() {
            return Err("`wasm` is required (or `origins`, for a route to origin servers)".into());
        }
        if self.origins.len() > crate::origin::MAX_ORIGINS {
            return Err(format!(
                "`origins` lists {} servers; at most {} are allowed",
                self.origins.len(),
                crate::origin::MAX_ORIGINS
            ));
        }
        let mut seen = Vec::new();
        for text in &self.origins {
            let origin = crate::origin::OriginUrl::parse(text)?;
            if seen.contains(&origin) {
                return Err(format!("origin {text:?} is listed twice"));
            }
            seen.push(origin);
        }
        if self.origins.is_empty() && !self.origin.is_default() {
            return Err("[origin] needs `origins`".into());
        }
        self.origin.validate()?;
        if self.is_origin_only() {
            let needs_module = [
                (!self.env.is_empty(), "[env]"),
                (!self.outbound.is_default(), "[outbound]"),
                (!self.services.is_empty(), "[services]"),
                (!self.kv.is_default(), "[kv]"),
                (!self.cron.is_empty(), "[[cron]]"),
                (!self.scale.is_default(), "[scale]"),
            ];
            if let Some((_, section)) = needs_module.iter().find(|(set, _)| *set) {
                return Err(format!(
                    "{section} needs a `wasm` module; this route only proxies to `origins`"
                ));
            }
        }
        if self.services.values().any(|function| function == "origin") {
            return Err(format!(
                "services: `origin` cannot be bound: http://{} is this function's own origins",
                crate::origin::ORIGIN_HOST
            ));
        }
        Ok(())
    }

    /// The routes, parsed. Infallible for a manifest that went through [`Manifest::parse`];
    /// entries that do not parse (a hand-built manifest) are skipped.
    pub fn route_patterns(&self) -> Vec<RoutePattern> {
        self.routes.iter().filter_map(|r| r.parse().ok()).collect()
    }

    /// Checks every rule and canonicalises the routes.
    fn validate(&mut self) -> Result<(), ManifestError> {
        check_name(&self.name).map_err(ManifestError::Invalid)?;
        self.validate_origins().map_err(ManifestError::Invalid)?;
        if self.routes.is_empty() {
            return Err(ManifestError::Invalid(
                "`routes` must list at least one route".into(),
            ));
        }
        if self.routes.len() > MAX_ROUTES {
            return Err(ManifestError::Invalid(format!(
                "`routes` lists {} routes; at most {MAX_ROUTES} are allowed",
                self.routes.len()
            )));
        }
        let mut canonical: Vec<String> = Vec::with_capacity(self.routes.len());
        for route in &self.routes {
            if route.len() > MAX_ROUTE_LEN {
                return Err(ManifestError::Invalid(format!(
                    "a route is {} bytes long; at most {MAX_ROUTE_LEN} are allowed",
                    route.len()
                )));
            }
            let pattern: RoutePattern = route.parse()?;
            let text = pattern.to_string();
            if canonical.contains(&text) {
                return Err(ManifestError::Invalid(format!("route {route:?} is listed twice")));
            }
            canonical.push(text);
        }
        self.routes = canonical;
        if self.env.len() > MAX_ENV_ENTRIES {
            return Err(ManifestError::Invalid(format!(
                "env has {} entries; at most {MAX_ENV_ENTRIES} are allowed",
                self.env.len()
            )));
        }
        let env_bytes: usize = self
            .env
            .iter()
            .map(|(key, value)| key.len() + value.len() + 2)
            .sum();
        if env_bytes > MAX_ENV_BYTES {
            return Err(ManifestError::Invalid(format!(
                "env is {env_bytes} bytes; at most {} KiB are allowed",
                MAX_ENV_BYTES >> 10
            )));
        }
        for (key, value) in &self.env {
            if !is_env_key(key) {
                return Err(ManifestError::Invalid(format!(
                    "env key {key:?} is invalid: keys are [A-Za-z_][A-Za-z0-9_]*"
                )));
            }
            if value.contains('\0') {
                return Err(ManifestError::Invalid(format!(
                    "env value of {key} contains a NUL byte"
                )));
            }
        }
        if let Some(memory) = &self.limits.memory {
            parse_memory(memory).map_err(|reason| {
                ManifestError::Invalid(format!("limits.memory {memory:?} is invalid: {reason}"))
            })?;
        }
        if let Some(response) = &self.limits.response {
            let bytes = parse_memory(response).map_err(|reason| {
                ManifestError::Invalid(format!("limits.response {response:?} is invalid: {reason}"))
            })?;
            if bytes > MAX_RESPONSE_BYTES {
                return Err(ManifestError::Invalid(format!(
                    "limits.response {response:?} is invalid: it is over the {}MiB maximum",
                    MAX_RESPONSE_BYTES >> 20
                )));
            }
        }
        self.scale.validate().map_err(ManifestError::Invalid)?;
        self.outbound.validate().map_err(ManifestError::Invalid)?;
        self.kv.validate().map_err(ManifestError::Invalid)?;
        if self.cron.len() > crate::cron::MAX_ENTRIES {
            return Err(ManifestError::Invalid(format!(
                "cron has {} entries; at most {} are allowed",
                self.cron.len(),
                crate::cron::MAX_ENTRIES
            )));
        }
        for (index, entry) in self.cron.iter().enumerate() {
            entry
                .schedule
                .parse::<crate::cron::Schedule>()
                .map(drop)
                .and_then(|()| crate::cron::check_path(&entry.path))
                .map_err(|reason| ManifestError::Invalid(format!("cron[{index}]: {reason}")))?;
        }
        if self.services.len() > MAX_SERVICES {
            return Err(ManifestError::Invalid(format!(
                "services has {} bindings; at most {MAX_SERVICES} are allowed",
                self.services.len()
            )));
        }
        for (binding, function) in &self.services {
            if !is_env_key(binding) {
                return Err(ManifestError::Invalid(format!(
                    "services binding {binding:?} is invalid: bindings are [A-Za-z_][A-Za-z0-9_]* (the guest sees ATOLL_SERVICE_<BINDING>)"
                )));
            }
            check_name(function)
                .map_err(|reason| ManifestError::Invalid(format!("services.{binding}: function {reason}")))?;
        }
        if let Some(timeout) = &self.limits.timeout {
            parse_timeout(timeout).map_err(|reason| {
                ManifestError::Invalid(format!("limits.timeout {timeout:?} is invalid: {reason}"))
            })?;
        }
        Ok(())
    }
}

impl Limits {
    /// The memory limit in bytes, default applied.
    pub fn memory_bytes(&self) -> u64 {
        self.memory
            .as_deref()
            .and_then(|m| parse_memory(m).ok())
            .unwrap_or(DEFAULT_MEMORY_BYTES)
    }

    /// The response size cap in bytes, default applied.
    pub fn response_bytes(&self) -> u64 {
        self.response
            .as_deref()
            .and_then(|m| parse_memory(m).ok())
            .unwrap_or(DEFAULT_RESPONSE_BYTES)
    }

    /// The per-request timeout, default applied.
    pub fn timeout(&self) -> Duration {
        self.timeout
            .as_deref()
            .and_then(|t| parse_timeout(t).ok())
            .unwrap_or(DEFAULT_TIMEOUT)
    }
}

/// Checks a function name: `[a-z0-9-]`, 1..=63 chars, no leading or trailing `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("name {name:?} is invalid: {why}"));
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("it is longer than 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("only a-z, 0-9 and '-' are allowed");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("it must not start or end with '-'");
    }
    Ok(())
}

fn is_env_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `"64MiB"`, `"64 MiB"`, `"1GB"`: an integer and a unit, at most 4 GiB (what a manifest's
/// sizes and a node's ceilings are written as).
pub fn parse_size(text: &str) -> Result<u64, String> {
    parse_memory(text)
}

fn parse_memory(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = (&text[..digits_end], text[digits_end..].trim_start());
    if number.is_empty() {
        return Err("expected an integer and a unit, as in \"64MiB\"".into());
    }
    let multiplier: u64 = match unit {
        "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "" => return Err("a unit is required (B, KiB, MiB, GiB, KB, MB, GB)".into()),
        other => {
            return Err(format!(
                "unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
            ));
        }
    };
    let bytes = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .filter(|b| *b <= MAX_MEMORY_BYTES)
        .ok_or_else(|| "it is over the 4GiB maximum".to_string())?;
    if bytes == 0 {
        return Err("it must be greater than zero".into());
    }
    Ok(bytes)
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim()).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("it must be greater than zero".into());
    }
    if duration > MAX_TIMEOUT {
        return Err("it is over the 15m maximum".into());
    }
    Ok(duration)
}

/// toml's own Display is several lines with a source snippet; keep one line: the message
/// plus where it is.
fn toml_message(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("{message} (line {line})")
        }
        None => message,
    }
}

#[cfg(any(test, feature = "test-support"))]
impl Manifest {
    /// A valid manifest for `name` serving `routes`, for the stores' unit tests (other
    /// crates enable the `test-support` feature in their dev-dependencies). Panics on an
    /// invalid name or route.
    pub fn for_tests(name: &str, routes: &[&str]) -> Manifest {
        let routes: Vec<String> = routes.iter().map(|r| format!("{r:?}")).collect();
        Manifest::parse(&format!(
            "name = {name:?}\nwasm = \"m.wasm\"\nroutes = [{}]",
            routes.join(", ")
        ))
        .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
name = "echo"
wasm = "echo.wasm"
routes = ["Echo.Example.com", "*.echo.example.com", "api.example.com/echo/"]
[env]
GREETING = "hi"
_X1 = ""
[limits]
memory = "64MiB"
timeout = "10s"
"#;

    fn error(text: &str) -> String {
        let e = Manifest::parse(text).expect_err("should be refused");
        let message = e.to_string();
        assert!(!message.contains('\n'), "one line: {message}");
        assert!(message.starts_with("manifest: "), "{message}");
        message
    }

    fn with(extra: &str) -> String {
        format!("name = \"echo\"\nwasm = \"echo.wasm\"\nroutes = [\"a.com\"]\n{extra}")
    }

    #[test]
    fn full_manifest() {
        let m = Manifest::parse(FULL).unwrap();
        assert_eq!(m.name, "echo");
        assert_eq!(m.wasm, "echo.wasm");
        assert_eq!(
            m.routes,
            ["echo.example.com", "*.echo.example.com", "api.example.com/echo"]
        );
        assert_eq!(m.env.get("GREETING").map(String::as_str), Some("hi"));
        assert_eq!(m.env.len(), 2);
        assert_eq!(m.limits.memory_bytes(), 64 << 20);
        assert_eq!(m.limits.timeout(), Duration::from_secs(10));
        assert_eq!(m.route_patterns().len(), 3);
        // Travels as JSON unchanged.
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);
    }

    #[test]
    fn defaults() {
        let m = Manifest::parse(&with("")).unwrap();
        assert!(m.env.is_empty());
        assert_eq!(m.limits, Limits::default());
        assert_eq!(m.limits.memory_bytes(), 128 << 20);
        assert_eq!(m.limits.timeout(), Duration::from_secs(30));
        assert_eq!(m.limits.response_bytes(), 32 << 20);
        assert_eq!(m.scale.min_instances(), 0);
        assert_eq!(m.scale.max_concurrency(), 64);
        assert_eq!(m.scale.max_queue(), 1024);
        assert_eq!(m.scale.idle_timeout(), Duration::from_secs(60));
    }

    #[test]
    fn scale_section() {
        let m = Manifest::parse(&with(
            "[scale]\nmin_instances = 2\nmax_concurrency = 8\nmax_queue = 0\nidle_timeout = \"5s\"",
        ))
        .unwrap();
        assert_eq!(m.scale.min_instances(), 2);
        assert_eq!(m.scale.max_concurrency(), 8);
        assert_eq!(m.scale.max_queue(), 0);
        assert_eq!(m.scale.idle_timeout(), Duration::from_secs(5));
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);

        assert!(error(&with("[scale]\nmax_concurrency = 0")).contains("max_concurrency"));
        assert!(error(&with("[scale]\nmin_instances = 9\nmax_concurrency = 8")).contains("min_instances"));
        assert!(error(&with("[scale]\nidle_timeout = \"soon\"")).contains("idle_timeout"));
        assert!(error(&with("[scale]\nreplicas = 3")).contains("unknown field `replicas`"));
        assert!(error(&with("[limits]\nresponse = \"lots\"")).contains("limits.response"));
    }

    #[test]
    fn memory_units() {
        for (text, bytes) in [
            ("1B", 1),
            ("2KiB", 2048),
            ("3 MiB", 3 << 20),
            ("4GiB", 4 << 30),
            ("5KB", 5000),
            ("6MB", 6_000_000),
            ("4GB", 4_000_000_000),
        ] {
            assert_eq!(parse_memory(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn unknown_top_level_key() {
        let m = error(&with("colour = \"red\""));
        assert!(m.contains("unknown field `colour`"), "{m}");
    }

    #[test]
    fn unknown_limits_key() {
        let m = error(&with("[limits]\ncpu = \"1\""));
        assert!(m.contains("unknown field `cpu`"), "{m}");
    }

    #[test]
    fn bad_names() {
        for name in ["", "Echo", "-echo", "echo-", "ec_ho", "e.cho", &"a".repeat(64)] {
            let text = format!("name = {name:?}\nwasm = \"a.wasm\"\nroutes = [\"a.com\"]");
            let m = error(&text);
            assert!(m.contains("name"), "{m}");
        }
        Manifest::parse(&format!(
            "name = \"{}\"\nwasm = \"a.wasm\"\nroutes = [\"a.com\"]",
            "a".repeat(63)
        ))
        .unwrap();
    }

    #[test]
    fn bad_route() {
        let m = error("name = \"e\"\nwasm = \"e.wasm\"\nroutes = [\"a b\"]");
        assert!(m.starts_with("manifest: route \"a b\" is invalid: "), "{m}");
        let m = error("name = \"e\"\nwasm = \"e.wasm\"\nroutes = [\"a.com\", \"A.com/\"]");
        assert!(m.contains("listed twice"), "{m}");
    }

    #[test]
    fn empty_routes() {
        let m = error("name = \"e\"\nwasm = \"e.wasm\"\nroutes = []");
        assert!(m.contains("at least one route"), "{m}");
        let m = error("name = \"e\"\nwasm = \"e.wasm\"");
        assert!(m.contains("missing field `routes`"), "{m}");
    }

    #[test]
    fn bad_memory() {
        for memory in ["0MiB", "64", "64XB", "5GiB", "MiB", "-1MiB", "1.5GiB"] {
            let m = error(&with(&format!("[limits]\nmemory = {memory:?}")));
            assert!(m.contains("limits.memory"), "{m}");
        }
    }

    #[test]
    fn bad_timeout() {
        for timeout in ["0s", "16m", "soon", "10"] {
            let m = error(&with(&format!("[limits]\ntimeout = {timeout:?}")));
            assert!(m.contains("limits.timeout"), "{m}");
        }
        assert!(Manifest::parse(&with("[limits]\ntimeout = \"15m\"")).is_ok());
        assert!(Manifest::parse(&with("[limits]\ntimeout = \"500ms\"")).is_ok());
    }

    #[test]
    fn origins_replace_or_sit_behind_the_module() {
        let proxy = Manifest::parse(
            "name = \"shop\"\nroutes = [\"shop.com\"]\norigins = [\"http://10.0.0.5:3000\", \"http://10.0.0.6:3000\"]\n[origin]\nhealth_path = \"/healthz\"\n",
        )
        .unwrap();
        assert!(proxy.is_origin_only());
        assert_eq!(proxy.origin_urls().len(), 2);
        assert_eq!(proxy.origin.health_path(), "/healthz");
        let behind = Manifest::parse(
            "name = \"shop\"\nwasm = \"s.wasm\"\nroutes = [\"shop.com\"]\norigins = [\"http://10.0.0.5:3000\"]\n",
        )
        .unwrap();
        assert!(!behind.is_origin_only());
        let base = "name = \"shop\"\nroutes = [\"shop.com\"]\n";
        assert!(error(base).contains("`wasm` is required (or `origins`"));
        assert!(error(&format!("{base}origins = [\"10.0.0.5\"]\n")).contains("must start with http://"));
        assert!(
            error(&format!("{base}origins = [\"http://a\", \"http://a:80\"]\n")).contains("listed twice")
        );
        assert!(
            error(&format!(
                "{base}origins = [\"http://a\"]\n[kv]\nstores = [\"x\"]\n"
            ))
            .contains("[kv] needs a `wasm` module")
        );
        assert!(
            error(&format!("{base}wasm = \"s.wasm\"\n[origin]\nretries = 1\n"))
                .contains("[origin] needs `origins`")
        );
    }

    #[test]
    fn missing_or_empty_wasm() {
        let m = error("name = \"e\"\nroutes = [\"a.com\"]");
        assert!(m.contains("`wasm` is required"), "{m}");
        let m = error("name = \"e\"\nwasm = \"\"\nroutes = [\"a.com\"]");
        assert!(m.contains("`wasm` is required"), "{m}");
        let m = error("name = \"e\"\nwasm = \" \"\nroutes = [\"a.com\"]");
        assert!(m.contains("`wasm` must not be empty"), "{m}");
    }

    #[test]
    fn bad_env() {
        let m = error(&with("[env]\n\"1X\" = \"a\""));
        assert!(m.contains("env key \"1X\""), "{m}");
        let m = error(&with("[env]\nX = 1"));
        assert!(m.contains("invalid type"), "{m}");
    }

    #[test]
    fn values_without_ceilings_are_refused() {
        for (extra, expected) in [
            ("[limits]\nresponse = \"4GiB\"", "over the 128MiB maximum"),
            (
                "[scale]\nmax_concurrency = 100000",
                "max_concurrency must be at most 1024",
            ),
            (
                "[scale]\nmax_queue = 4000000000",
                "max_queue must be at most 10000",
            ),
        ] {
            let m = error(&with(extra));
            assert!(m.contains(expected), "{extra}: {m}");
        }
        let big_env = format!("[env]\nBIG = \"{}\"", "x".repeat(MAX_ENV_BYTES));
        assert!(error(&with(&big_env)).contains("at most 64 KiB"));
        let many: String = (0..=MAX_ENV_ENTRIES).map(|i| format!("K{i} = \"v\"\n")).collect();
        assert!(error(&with(&format!("[env]\n{many}"))).contains("at most 256 are allowed"));
        let routes: Vec<String> = (0..=MAX_ROUTES).map(|i| format!("\"r{i}.com\"")).collect();
        let text = format!(
            "name = \"echo\"\nwasm = \"echo.wasm\"\nroutes = [{}]\n",
            routes.join(",")
        );
        assert!(error(&text).contains("at most 64 are allowed"));
        // At the ceilings is fine.
        let fine = format!(
            "[env]\nBIG = \"{}\"\n[limits]\nresponse = \"128MiB\"\n[scale]\nmax_concurrency = 1024\nmax_queue = 10000",
            "x".repeat(MAX_ENV_BYTES - 5)
        );
        Manifest::parse(&with(&fine)).unwrap();
    }

    /// Limits at push match what nodes accept: the largest manifest the ceilings allow
    /// travels in one watch line (a node refuses longer lines, which would stop its sync).
    #[test]
    fn the_largest_manifest_fits_a_watch_line() {
        let path = format!("/{}", "p".repeat(MAX_ROUTE_LEN - 80));
        let routes: Vec<String> = (0..MAX_ROUTES)
            .map(|i| format!("\"{}{i}.example.com{path}\"", "a".repeat(60)))
            .collect();
        let env: String = (0..MAX_ENV_ENTRIES)
            .map(|i| {
                format!(
                    "K{i:03} = \"{}\"\n",
                    "v".repeat(MAX_ENV_BYTES / MAX_ENV_ENTRIES - 8)
                )
            })
            .collect();
        let text = format!(
            "name = \"{}\"\nwasm = \"x.wasm\"\nroutes = [{}]\n[env]\n{env}",
            "n".repeat(MAX_NAME_LEN),
            routes.join(",")
        );
        let manifest = Manifest::parse(&text).unwrap();
        let line = serde_json::to_vec(&manifest).unwrap();
        assert!(line.len() < crate::watch::MAX_LINE / 16, "{} bytes", line.len());
        let too_long = format!(
            "name = \"x\"\nwasm = \"x.wasm\"\nroutes = [\"a.com/{}\"]\n",
            "p".repeat(MAX_ROUTE_LEN)
        );
        assert!(error(&too_long).contains("at most 2048 are allowed"));
    }

    #[test]
    fn not_toml() {
        let m = error("name = ");
        assert!(m.contains("line 1"), "{m}");
    }

    #[test]
    fn load_file_or_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("atoll.toml"), FULL).unwrap();
        let (m, wasm) = Manifest::load(dir.path()).unwrap();
        assert_eq!(m.name, "echo");
        assert_eq!(wasm, dir.path().join("echo.wasm"));
        let (_, wasm) = Manifest::load(&dir.path().join("atoll.toml")).unwrap();
        assert_eq!(wasm, dir.path().join("echo.wasm"));
        let e = Manifest::load(&dir.path().join("nope")).unwrap_err();
        assert!(e.to_string().starts_with("manifest: cannot read "), "{e}");
    }

    #[test]
    fn outbound_is_denied_by_default_and_checked_when_given() {
        let base = "name = \"x\"\nwasm = \"x.wasm\"\nroutes = [\"a.com\"]\n";
        let manifest = Manifest::parse(base).unwrap();
        assert!(manifest.outbound.allowed_hosts().is_empty());
        assert_eq!(manifest.outbound.max_requests(), DEFAULT_OUTBOUND_REQUESTS);
        assert_eq!(manifest.outbound.max_concurrent(), DEFAULT_OUTBOUND_CONCURRENT);
        assert_eq!(
            manifest.outbound.max_response_bytes(),
            DEFAULT_OUTBOUND_RESPONSE_BYTES
        );
        assert!(!serde_json::to_string(&manifest).unwrap().contains("outbound"));

        let given = format!(
            "{base}[outbound]\nallowed_hosts = [\"https://api.example.com\", \"*://*:*\"]\nmax_requests = 3\nmax_concurrent = 2\nmax_response = \"1MiB\"\n"
        );
        let manifest = Manifest::parse(&given).unwrap();
        let allowed = manifest.outbound.allowed_hosts();
        assert!(allowed.allows_internal(crate::outbound::Scheme::Https, "api.example.com", 443));
        assert_eq!(manifest.outbound.max_requests(), 3);
        assert_eq!(manifest.outbound.max_concurrent(), 2);
        assert_eq!(manifest.outbound.max_response_bytes(), 1 << 20);
        let json = serde_json::to_string(&manifest).unwrap();
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), manifest);

        let bad_entry = error(&format!(
            "{base}[outbound]\nallowed_hosts = [\"api.example.com\"]\n"
        ));
        assert!(
            bad_entry.contains("outbound.allowed_hosts") && bad_entry.contains("give a scheme"),
            "{bad_entry}"
        );
        assert!(error(&format!("{base}[outbound]\nmax_requests = 0\n")).contains("at least 1"));
        assert!(error(&format!("{base}[outbound]\nmax_concurrent = 65\n")).contains("at most 64"));
        assert!(error(&format!("{base}[outbound]\nmax_response = \"1GiB\"\n")).contains("64MiB maximum"));
        assert!(error(&format!("{base}[outbound]\nallowed = []\n")).contains("unknown field"));
    }

    #[test]
    fn services_bind_names_to_functions() {
        let base = "name = \"bff\"\nwasm = \"x.wasm\"\nroutes = [\"a.com\"]\n";
        let manifest = Manifest::parse(&format!(
            "{base}[services]\nAUTH = \"auth\"\ntodo_api = \"todo\"\n"
        ))
        .unwrap();
        assert_eq!(manifest.services["AUTH"], "auth");
        assert_eq!(manifest.services["todo_api"], "todo");
        assert_eq!(service_url("auth"), "http://auth.atoll.internal");
        let json = serde_json::to_string(&manifest).unwrap();
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), manifest);
        assert!(error(&format!("{base}[services]\n\"A-B\" = \"auth\"\n")).contains("bindings are"));
        assert!(
            error(&format!("{base}[services]\nAUTH = \"Auth!\"\n")).contains("services.AUTH: function name")
        );
    }

    #[test]
    fn cron_entries_are_checked() {
        let base = "name = \"t\"\nwasm = \"t.wasm\"\nroutes = [\"t.localhost\"]\n";
        let manifest = Manifest::parse(&format!(
            "{base}[[cron]]\nschedule = \"*/5 * * * *\"\npath = \"/tasks/x\"\n"
        ))
        .unwrap();
        assert_eq!(manifest.cron[0].path, "/tasks/x");
        assert!(
            error(&format!(
                "{base}[[cron]]\nschedule = \"61 * * * *\"\npath = \"/x\"\n"
            ))
            .contains("cron[0]: schedule \"61 * * * *\" is not a cron pattern")
        );
        assert!(
            error(&format!(
                "{base}[[cron]]\nschedule = \"* * * * *\"\npath = \"x\"\n"
            ))
            .contains("cron[0]: path \"x\" must start with /")
        );
        let nine = "[[cron]]\nschedule = \"* * * * *\"\npath = \"/x\"\n".repeat(9);
        assert!(error(&format!("{base}{nine}")).contains("at most 8"));
    }

    #[test]
    fn kv_grants_named_stores() {
        let base = "name = \"todo\"\nwasm = \"x.wasm\"\nroutes = [\"a.com\"]\n";
        let manifest = Manifest::parse(&format!("{base}[kv]\nstores = [\"todo\", \"shared\"]\n")).unwrap();
        assert_eq!(manifest.kv.stores, ["todo", "shared"]);
        assert!(error(&format!("{base}[kv]\nstores = [\"a\", \"a\"]\n")).contains("twice"));
        assert!(error(&format!("{base}[kv]\nstores = [\"Bad\"]\n")).contains("kv.stores: store name"));
    }
}
