//! Which function answers a request: host + path → target, most specific match first.
//!
//! Precedence, from most to least specific:
//! 1. an exact host (`api.example.com`) beats any wildcard;
//! 2. among wildcards, the longest suffix wins (`*.eu.example.com` over `*.example.com`);
//! 3. for the same host pattern, the longest path prefix wins (`/api/v2` over `/api` over
//!    none), matched on whole segments (`/echo` covers `/echo/x`, not `/echoes`).
//!
//! If an exact host has routes but none covers the path, wildcards are still tried. The
//! table is immutable once built: the node builds a new one for every change and swaps it in
//! with an `ArcSwap`, so lookups never take a lock and in-flight requests keep the table they
//! started with. The table is generic over its target so the matching rules are tested
//! without functions or sockets.

use std::collections::HashMap;

use crate::host::normalize_host;
use crate::route::{HostPattern, RoutePattern};

/// One route and what it leads to.
#[derive(Debug, Clone)]
pub struct RouteEntry<T> {
    pub pattern: RoutePattern,
    pub target: T,
}

/// The result of a lookup.
#[derive(Debug)]
pub struct RouteMatch<'a, T> {
    pub pattern: &'a RoutePattern,
    pub target: &'a T,
}

/// Routes indexed by host.
#[derive(Debug, Clone)]
pub struct RouteTable<T> {
    exact: HashMap<String, Vec<RouteEntry<T>>>,
    wildcard: HashMap<String, Vec<RouteEntry<T>>>,
    len: usize,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        RouteTable {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            len: 0,
        }
    }
}

impl<T> RouteTable<T> {
    /// Builds a table. When two entries have the same pattern the first one wins, so callers
    /// pass entries in a deterministic order.
    pub fn new(entries: impl IntoIterator<Item = RouteEntry<T>>) -> Self {
        let mut table = RouteTable::default();
        for entry in entries {
            let bucket = match &entry.pattern.host {
                HostPattern::Exact(host) => table.exact.entry(host.clone()).or_default(),
                HostPattern::Wildcard { suffix } => table.wildcard.entry(suffix.clone()).or_default(),
            };
            if bucket.iter().any(|existing| existing.pattern == entry.pattern) {
                continue;
            }
            bucket.push(entry);
            table.len += 1;
        }
        for bucket in table.exact.values_mut().chain(table.wildcard.values_mut()) {
            bucket.sort_by_key(|entry| {
                std::cmp::Reverse(entry.pattern.path_prefix.as_ref().map_or(0, String::len))
            });
        }
        table
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most specific route covering `host` (as sent: any case, optional port, optional
    /// trailing dot) and `path`.
    pub fn lookup(&self, host: &str, path: &str) -> Option<RouteMatch<'_, T>> {
        let host = normalize_host(host);
        if let Some(found) = self
            .exact
            .get(host.as_ref())
            .and_then(|bucket| first_matching(bucket, path))
        {
            return Some(found);
        }
        if self.wildcard.is_empty() {
            return None;
        }
        // Walk the suffixes from longest to shortest: for a.b.example.com try
        // b.example.com, example.com, com.
        let mut rest = host.as_ref();
        while let Some(dot) = rest.find('.') {
            rest = &rest[dot + 1..];
            if let Some(found) = self
                .wildcard
                .get(rest)
                .and_then(|bucket| first_matching(bucket, path))
            {
                return Some(found);
            }
        }
        None
    }

    /// Every entry, for listings.
    /// The exact (non-wildcard) host names that have routes, unordered.
    pub fn exact_hosts(&self) -> impl Iterator<Item = &str> {
        self.exact.keys().map(String::as_str)
    }

    pub fn entries(&self) -> impl Iterator<Item = &RouteEntry<T>> {
        self.exact.values().chain(self.wildcard.values()).flatten()
    }
}

fn first_matching<'a, T>(bucket: &'a [RouteEntry<T>], path: &str) -> Option<RouteMatch<'a, T>> {
    bucket
        .iter()
        .find(|entry| entry.pattern.matches_path(path))
        .map(|entry| RouteMatch {
            pattern: &entry.pattern,
            target: &entry.target,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(routes: &[(&str, &'static str)]) -> RouteTable<&'static str> {
        RouteTable::new(routes.iter().map(|(route, target)| RouteEntry {
            pattern: route.parse().unwrap(),
            target: *target,
        }))
    }

    fn target(table: &RouteTable<&'static str>, host: &str, path: &str) -> Option<&'static str> {
        table.lookup(host, path).map(|found| *found.target)
    }

    #[test]
    fn exact_host_matches_any_path() {
        let table = table(&[("echo.example.com", "echo")]);
        assert_eq!(target(&table, "echo.example.com", "/"), Some("echo"));
        assert_eq!(target(&table, "echo.example.com", "/a/b"), Some("echo"));
        assert_eq!(target(&table, "other.example.com", "/"), None);
    }

    #[test]
    fn host_is_case_insensitive_and_ignores_port_and_trailing_dot() {
        let table = table(&[("echo.example.com", "echo")]);
        assert_eq!(target(&table, "ECHO.Example.COM", "/"), Some("echo"));
        assert_eq!(target(&table, "echo.example.com:8080", "/"), Some("echo"));
        assert_eq!(target(&table, "echo.example.com.", "/"), Some("echo"));
    }

    #[test]
    fn wildcard_matches_subdomains_but_not_the_apex() {
        let table = table(&[("*.example.com", "wild")]);
        assert_eq!(target(&table, "a.example.com", "/"), Some("wild"));
        assert_eq!(target(&table, "a.b.example.com", "/"), Some("wild"));
        assert_eq!(target(&table, "example.com", "/"), None);
        assert_eq!(target(&table, "notexample.com", "/"), None);
    }

    #[test]
    fn exact_beats_wildcard() {
        let table = table(&[("*.example.com", "wild"), ("api.example.com", "api")]);
        assert_eq!(target(&table, "api.example.com", "/"), Some("api"));
        assert_eq!(target(&table, "www.example.com", "/"), Some("wild"));
    }

    #[test]
    fn longest_wildcard_suffix_wins() {
        let table = table(&[("*.example.com", "broad"), ("*.eu.example.com", "eu")]);
        assert_eq!(target(&table, "x.eu.example.com", "/"), Some("eu"));
        assert_eq!(target(&table, "x.us.example.com", "/"), Some("broad"));
        assert_eq!(target(&table, "eu.example.com", "/"), Some("broad"));
    }

    #[test]
    fn longest_path_prefix_wins_on_segment_boundaries() {
        let table = table(&[
            ("api.example.com", "root"),
            ("api.example.com/echo", "echo"),
            ("api.example.com/echo/v2", "echo2"),
        ]);
        assert_eq!(target(&table, "api.example.com", "/echo"), Some("echo"));
        assert_eq!(target(&table, "api.example.com", "/echo/"), Some("echo"));
        assert_eq!(target(&table, "api.example.com", "/echo/x"), Some("echo"));
        assert_eq!(target(&table, "api.example.com", "/echo/v2/x"), Some("echo2"));
        assert_eq!(target(&table, "api.example.com", "/echoes"), Some("root"));
        assert_eq!(target(&table, "api.example.com", "/"), Some("root"));
    }

    #[test]
    fn exact_host_without_matching_prefix_falls_back_to_wildcard() {
        let table = table(&[("api.example.com/echo", "echo"), ("*.example.com", "wild")]);
        assert_eq!(target(&table, "api.example.com", "/echo/1"), Some("echo"));
        assert_eq!(target(&table, "api.example.com", "/other"), Some("wild"));
    }

    #[test]
    fn prefix_only_routes_do_not_cover_other_paths() {
        let table = table(&[("api.example.com/echo", "echo")]);
        assert_eq!(target(&table, "api.example.com", "/"), None);
    }

    #[test]
    fn first_entry_wins_for_duplicate_patterns() {
        let table = table(&[("a.example.com", "first"), ("a.example.com", "second")]);
        assert_eq!(target(&table, "a.example.com", "/"), Some("first"));
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn matched_pattern_is_reported() {
        let table = table(&[("api.example.com/echo", "echo")]);
        let found = table.lookup("api.example.com", "/echo/1").unwrap();
        assert_eq!(found.pattern.to_string(), "api.example.com/echo");
    }

    #[test]
    fn ipv6_literal_keeps_its_colons() {
        assert_eq!(normalize_host("[::1]:8080"), "[::1]");
        assert_eq!(normalize_host("[::1]"), "[::1]");
    }
}
