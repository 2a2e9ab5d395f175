//! Route patterns: the `host[/path-prefix]` strings in a manifest's `routes`.
//!
//! One parser serves both sides of the system: the registry validates routes when a
//! function is pushed (and compares their canonical form to refuse two functions claiming
//! the same route), and the router matches requests against the very same type, so what
//! the registry accepts is exactly what a node can serve.
//!
//! Syntax: a host name, lowercased, made of dot-separated labels of `[a-z0-9-]` (1..=63
//! chars each, no leading/trailing `-`, at most 253 chars in all); the whole first label
//! may be `*` (`*.example.com` matches any name *below* `example.com`, never
//! `example.com` itself). Single-label hosts such as `localhost` are fine. A port is not
//! allowed: routes select by host name only. An optional path prefix follows: it starts
//! with `/`, holds no `?`, `#`, whitespace or control characters, no `..` segment, and
//! loses its trailing `/` (a bare `/` means "no prefix"). A prefix matches whole path
//! segments: `/echo` matches `/echo` and `/echo/x`, not `/echoes`.
//!
//! `Display` prints the canonical form, and parsing that form gives back the same value.
//!
//! Two routes *overlap* when some request would match both ([`RoutePattern::overlaps`]):
//! the registry refuses a route that overlaps one of another function's, which is what
//! makes a function the owner of its hosts (see [`crate::rules::check_routes`]). A host
//! pattern *covers* another when it matches every host the other does
//! ([`HostPattern::covers`]): what a deploy token's domains must do for each route it pushes.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::host::is_below;

/// Longest host name, in characters (RFC 1035, without the trailing dot).
const MAX_HOST_LEN: usize = 253;
/// Longest label (RFC 1035).
const MAX_LABEL_LEN: usize = 63;

/// A parsed, canonical route: which host (or hosts) and, optionally, which path prefix.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoutePattern {
    /// The host part.
    pub host: HostPattern,
    /// The path prefix, starting with `/` and without a trailing `/`; `None` for the
    /// whole host.
    pub path_prefix: Option<String>,
}

/// The host part of a route.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    /// Exactly this host name (lowercase).
    Exact(String),
    /// `*.suffix`: any host name with at least one label in front of `suffix`.
    Wildcard {
        /// The part after `*.` (lowercase), e.g. `example.com`.
        suffix: String,
    },
}

/// Why a route string was refused. Display: `route "INPUT" is invalid: REASON`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route {input:?} is invalid: {reason}")]
pub struct RouteError {
    /// The string as given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl HostPattern {
    /// Whether `host` (a request's host name, without port) is covered by this pattern.
    /// Comparison is ASCII case-insensitive; a single trailing dot on `host` is ignored.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        match self {
            HostPattern::Exact(name) => host.eq_ignore_ascii_case(name),
            HostPattern::Wildcard { suffix } => is_below(host, suffix),
        }
    }
}

impl HostPattern {
    /// Whether some host name matches both patterns. Overlapping patterns are always
    /// nested: one of them covers the other.
    pub fn overlaps(&self, other: &HostPattern) -> bool {
        self.covers(other) || other.covers(self)
    }

    /// Whether this pattern matches every host that `other` matches: `*.a.com` covers
    /// `b.a.com`, `*.b.a.com` and itself, but not `a.com`; an exact name covers only itself.
    pub fn covers(&self, other: &HostPattern) -> bool {
        match (self, other) {
            (HostPattern::Exact(a), HostPattern::Exact(b)) => a == b,
            (HostPattern::Exact(_), HostPattern::Wildcard { .. }) => false,
            (HostPattern::Wildcard { suffix }, HostPattern::Exact(name)) => is_below(name, suffix),
            (HostPattern::Wildcard { suffix }, HostPattern::Wildcard { suffix: theirs }) => {
                theirs == suffix || is_below(theirs, suffix)
            }
        }
    }
}

/// Whether path prefix `a` and `b` (`None`: the whole host) share a path.
fn paths_overlap(a: Option<&str>, b: Option<&str>) -> bool {
    match (a, b) {
        (None, _) | (_, None) => true,
        (Some(a), Some(b)) => path_within(a, b) || path_within(b, a),
    }
}

/// Whether every path under prefix `inner` is under prefix `outer` (whole segments).
fn path_within(inner: &str, outer: &str) -> bool {
    inner
        .strip_prefix(outer)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl FromStr for HostPattern {
    type Err = RouteError;

    /// A host pattern alone (`example.com`, `*.example.com`), as in a deploy token's domains.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let route: RoutePattern = input.parse()?;
        if route.path_prefix.is_some() {
            return Err(RouteError {
                input: input.to_owned(),
                reason: "a domain has no path".into(),
            });
        }
        Ok(route.host)
    }
}

impl Serialize for HostPattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Wildcard { suffix } => write!(f, "*.{suffix}"),
        }
    }
}

impl RoutePattern {
    /// Whether a request for `host` and `path` is covered by this route. The path prefix
    /// matches whole segments: `/echo` covers `/echo`, `/echo/` and `/echo/x`, but not
    /// `/echoes`.
    pub fn matches(&self, host: &str, path: &str) -> bool {
        self.host.matches(host) && self.matches_path(path)
    }

    /// Whether some request matches both routes: their hosts overlap and so do their
    /// paths (a route without a prefix takes every path of its hosts).
    pub fn overlaps(&self, other: &RoutePattern) -> bool {
        self.host.overlaps(&other.host)
            && paths_overlap(self.path_prefix.as_deref(), other.path_prefix.as_deref())
    }

    /// The requests both routes match, as a route (`None` when they do not overlap): the
    /// narrower host and the longer path prefix.
    pub fn overlap(&self, other: &RoutePattern) -> Option<RoutePattern> {
        if !self.overlaps(other) {
            return None;
        }
        let host = if self.host.covers(&other.host) {
            other.host.clone()
        } else {
            self.host.clone()
        };
        let path_prefix = match (&self.path_prefix, &other.path_prefix) {
            (None, path) | (path, None) => path.clone(),
            (Some(a), Some(b)) => Some(if a.len() >= b.len() { a } else { b }.clone()),
        };
        Some(RoutePattern { host, path_prefix })
    }

    /// The path half of [`RoutePattern::matches`].
    pub fn matches_path(&self, path: &str) -> bool {
        match &self.path_prefix {
            None => true,
            Some(prefix) => match path.strip_prefix(prefix.as_str()) {
                Some(rest) => rest.is_empty() || rest.starts_with('/'),
                None => false,
            },
        }
    }
}

impl fmt::Display for RoutePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.host)?;
        if let Some(prefix) = &self.path_prefix {
            f.write_str(prefix)?;
        }
        Ok(())
    }
}

impl FromStr for RoutePattern {
    type Err = RouteError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let fail = |reason: String| RouteError {
            input: input.to_owned(),
            reason,
        };
        if input.is_empty() {
            return Err(fail("it is empty".into()));
        }
        if let Some(c) = input.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(fail(format!(
                "it contains {}",
                if c.is_whitespace() {
                    "whitespace"
                } else {
                    "a control character"
                }
            )));
        }
        if input.contains("://") {
            return Err(fail("a route is host[/path-prefix], without a scheme".into()));
        }
        let (host, path) = match input.find('/') {
            Some(i) => (&input[..i], Some(&input[i..])),
            None => (input, None),
        };
        let host = parse_host(host).map_err(fail)?;
        let path_prefix = match path {
            Some(path) => parse_path(path).map_err(fail)?,
            None => None,
        };
        Ok(RoutePattern { host, path_prefix })
    }
}

fn parse_host(host: &str) -> Result<HostPattern, String> {
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    if host.contains(':') {
        return Err("a port is not allowed (routes select by host name)".into());
    }
    if !host.is_ascii() {
        return Err("the host must be ASCII (use the punycode xn-- form)".into());
    }
    let host = host.to_ascii_lowercase();
    if host.len() > MAX_HOST_LEN {
        return Err(format!(
            "the host is {} characters, over {MAX_HOST_LEN}",
            host.len()
        ));
    }
    let (wildcard, rest) = match host.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None if host == "*" => {
            return Err("a wildcard needs a domain after it, as in *.example.com".into());
        }
        None => (false, host.as_str()),
    };
    for label in rest.split('.') {
        check_label(label)?;
    }
    Ok(if wildcard {
        HostPattern::Wildcard {
            suffix: rest.to_owned(),
        }
    } else {
        HostPattern::Exact(rest.to_owned())
    })
}

fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("the host has an empty label".into());
    }
    if label.contains('*') {
        return Err("`*` is only allowed as the whole first label, as in *.example.com".into());
    }
    if label.len() > MAX_LABEL_LEN {
        return Err(format!(
            "label {label:?} is {} characters, over {MAX_LABEL_LEN}",
            label.len()
        ));
    }
    if let Some(c) = label
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!("label {label:?} contains {c:?} (allowed: a-z, 0-9, -)"));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!("label {label:?} starts or ends with '-'"));
    }
    Ok(())
}

fn parse_path(path: &str) -> Result<Option<String>, String> {
    debug_assert!(path.starts_with('/'));
    if let Some(c) = path.chars().find(|c| matches!(c, '?' | '#')) {
        return Err(format!("the path prefix contains {c:?}"));
    }
    if path.split('/').any(|segment| segment == "..") {
        return Err("the path prefix contains a `..` segment".into());
    }
    let trimmed = path.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        None
    } else {
        Some(trimmed.to_owned())
    })
}

impl Serialize for RoutePattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RoutePattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> RoutePattern {
        s.parse().unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    fn reason(s: &str) -> String {
        s.parse::<RoutePattern>()
            .expect_err(&format!("{s:?} should be refused"))
            .to_string()
    }

    #[test]
    fn valid_patterns_and_canonical_form() {
        let cases = [
            ("echo.example.com", "echo.example.com"),
            ("Echo.Example.COM", "echo.example.com"),
            ("*.echo.example.com", "*.echo.example.com"),
            ("api.example.com/echo", "api.example.com/echo"),
            ("api.example.com/echo/", "api.example.com/echo"),
            ("api.example.com/", "api.example.com"),
            ("api.example.com/a/b/c", "api.example.com/a/b/c"),
            ("localhost", "localhost"),
            ("localhost/x", "localhost/x"),
            ("a-b.c0.d", "a-b.c0.d"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ];
        for (input, canonical) in cases {
            let route = parse(input);
            assert_eq!(route.to_string(), canonical, "{input}");
            assert_eq!(parse(canonical), route, "round trip of {input}");
        }
    }

    #[test]
    fn parts() {
        let r = parse("*.Example.com/API/");
        assert_eq!(
            r.host,
            HostPattern::Wildcard {
                suffix: "example.com".into()
            }
        );
        // Paths are case-sensitive and kept as given.
        assert_eq!(r.path_prefix.as_deref(), Some("/API"));
        let r = parse("example.com");
        assert_eq!(r.host, HostPattern::Exact("example.com".into()));
        assert_eq!(r.path_prefix, None);
    }

    #[test]
    fn length_limits() {
        let label63 = "a".repeat(63);
        parse(&format!("{label63}.com"));
        assert!(reason(&format!("{}a.com", label63)).contains("over 63"));
        // 4 × 63 + 3 dots = 255 > 253.
        let long = [label63.as_str(); 4].join(".");
        assert!(reason(&long).contains("over 253"));
        let ok = format!("{}.{}", [label63.as_str(); 3].join("."), "a".repeat(61));
        assert_eq!(ok.len(), 253);
        parse(&ok);
    }

    #[test]
    fn invalid_patterns() {
        let cases = [
            ("", "empty"),
            ("a b", "whitespace"),
            ("a.com/x y", "whitespace"),
            ("example.com:8080", "port"),
            ("*", "wildcard"),
            ("*.", "empty label"),
            ("a.*.com", "`*`"),
            ("*a.com", "`*`"),
            ("**.com", "`*`"),
            ("a..com", "empty label"),
            (".a.com", "empty label"),
            ("a.com.", "empty label"),
            ("-a.com", "starts or ends"),
            ("a-.com", "starts or ends"),
            ("a_b.com", "'_'"),
            ("bücher.de", "ASCII"),
            ("/echo", "host is empty"),
            ("a.com/x?y", "'?'"),
            ("a.com/x#y", "'#'"),
            ("a.com/../x", "`..`"),
            ("a.com/x/..", "`..`"),
            ("https://a.com", "scheme"),
        ];
        for (input, needle) in cases {
            let message = reason(input);
            assert!(message.contains(needle), "{input:?}: {message}");
            assert!(message.starts_with(&format!("route {input:?} is invalid: ")));
        }
    }

    #[test]
    fn matching() {
        let wild = parse("*.example.com");
        assert!(wild.matches("a.example.com", "/"));
        assert!(wild.matches("a.b.example.com", "/x"));
        assert!(wild.matches("A.Example.Com", "/x"));
        assert!(!wild.matches("example.com", "/"));
        assert!(!wild.matches(".example.com", "/"));
        assert!(!wild.matches("aexample.com", "/"));

        let exact = parse("api.example.com/echo");
        assert!(exact.matches("api.example.com", "/echo"));
        assert!(exact.matches("api.example.com.", "/echo/"));
        assert!(exact.matches("api.example.com", "/echo/x"));
        assert!(!exact.matches("api.example.com", "/echoes"));
        assert!(!exact.matches("api.example.com", "/"));
        assert!(!exact.matches("x.api.example.com", "/echo"));
    }

    #[test]
    fn overlaps_and_covers() {
        let overlapping = [
            (
                "shop.localhost",
                "shop.localhost/checkout",
                "shop.localhost/checkout",
            ),
            ("*.shop.localhost", "login.shop.localhost", "login.shop.localhost"),
            ("*.shop.localhost", "a.b.shop.localhost/x", "a.b.shop.localhost/x"),
            ("*.shop.localhost", "*.b.shop.localhost", "*.b.shop.localhost"),
            (
                "*.shop.localhost/a",
                "x.shop.localhost/a/b",
                "x.shop.localhost/a/b",
            ),
            ("api.localhost/a", "api.localhost/a", "api.localhost/a"),
            ("api.localhost/a", "api.localhost/a/b", "api.localhost/a/b"),
        ];
        for (a, b, both) in overlapping {
            let (a, b) = (parse(a), parse(b));
            assert!(a.overlaps(&b) && b.overlaps(&a), "{a} and {b}");
            assert_eq!(a.overlap(&b), Some(parse(both)), "{a} and {b}");
            assert_eq!(b.overlap(&a), Some(parse(both)), "{b} and {a}");
        }
        let apart = [
            ("shop.localhost", "login.shop.localhost"),
            ("*.shop.localhost", "shop.localhost"),
            ("*.shop.localhost", "xshop.localhost"),
            ("*.a.shop.localhost", "b.shop.localhost"),
            ("api.localhost/a", "api.localhost/ab"),
            ("api.localhost/a", "api.localhost/b"),
            ("*.shop.localhost/a", "x.shop.localhost/b"),
        ];
        for (a, b) in apart {
            let (a, b) = (parse(a), parse(b));
            assert!(!a.overlaps(&b) && !b.overlaps(&a), "{a} and {b}");
            assert_eq!(a.overlap(&b), None);
        }

        let host = |s: &str| s.parse::<HostPattern>().unwrap();
        assert!(host("*.a.com").covers(&host("b.a.com")));
        assert!(host("*.a.com").covers(&host("*.b.a.com")));
        assert!(host("*.a.com").covers(&host("*.a.com")));
        assert!(!host("*.a.com").covers(&host("a.com")));
        assert!(!host("a.com").covers(&host("b.a.com")));
        assert!(!host("b.a.com").covers(&host("*.a.com")));
        assert!(host("a.com").covers(&host("A.com")));
        let err = "a.com/x".parse::<HostPattern>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "route \"a.com/x\" is invalid: a domain has no path"
        );
    }

    #[test]
    fn serde_as_string() {
        let r = parse("*.a.com/p");
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, "\"*.a.com/p\"");
        assert_eq!(serde_json::from_str::<RoutePattern>(&json).unwrap(), r);
        assert!(serde_json::from_str::<RoutePattern>("\"a b\"").is_err());
    }
}
