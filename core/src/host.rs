//! Host names: the one place that says when a name is below another, what a wildcard
//! covers, and how a host a client sent is normalised.
//!
//! Two wildcard rules exist, on purpose, and both are here:
//! - A **route** or **zone** wildcard (`*.example.com`, a DNS zone) covers every name
//!   strictly below its suffix, at any depth: `a.example.com` and `a.b.example.com`, never
//!   `example.com` itself ([`is_below`]).
//! - A **certificate** wildcard covers exactly one label (RFC 6125 6.4.3):
//!   `*.example.com` is valid for `a.example.com`, not for `a.b.example.com`
//!   ([`certificate_name_matches`]).
//!
//! Names compared here are ASCII; comparisons ignore ASCII case.

use std::borrow::Cow;

/// Whether `name` ends with `.ancestor`, with something in front (ASCII case ignored;
/// neither has a trailing dot). Names are checked label by label where they enter (routes,
/// zones), not here.
pub fn is_below(name: &str, ancestor: &str) -> bool {
    name.len() > ancestor.len() + 1
        && name.as_bytes()[name.len() - ancestor.len() - 1] == b'.'
        && name.as_bytes()[name.len() - ancestor.len()..].eq_ignore_ascii_case(ancestor.as_bytes())
}

/// Whether `name` is `ancestor` or below it.
pub fn is_at_or_below(name: &str, ancestor: &str) -> bool {
    name.eq_ignore_ascii_case(ancestor) || is_below(name, ancestor)
}

/// Whether a certificate's name `pattern` (maybe `*.parent`) is valid for `host` (a bare,
/// lower-case name): a wildcard covers exactly one label.
pub fn certificate_name_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(parent) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => pattern == host,
    }
}

/// Lowercases and strips a port and a trailing dot, borrowing when nothing changes (the
/// common case on the request path).
pub fn normalize_host(host: &str) -> Cow<'_, str> {
    let without_port = match host.rfind(':') {
        // IPv6 literals are bracketed; their colons are not a port separator.
        Some(colon) if !host[colon..].contains(']') => &host[..colon],
        _ => host,
    };
    let trimmed = without_port.strip_suffix('.').unwrap_or(without_port);
    if trimmed.bytes().any(|byte| byte.is_ascii_uppercase()) {
        Cow::Owned(trimmed.to_ascii_lowercase())
    } else {
        Cow::Borrowed(trimmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_means_strictly_below_at_any_depth() {
        assert!(is_below("a.example.com", "example.com"));
        assert!(is_below("a.b.example.com", "example.com"));
        assert!(is_below("A.Example.COM", "example.com"));
        assert!(!is_below("example.com", "example.com"));
        assert!(!is_below("aexample.com", "example.com"));
        assert!(is_at_or_below("example.com", "example.com"));
        assert!(!is_at_or_below("com", "example.com"));
    }

    #[test]
    fn certificate_wildcards_cover_one_label() {
        assert!(certificate_name_matches("*.example.com", "a.example.com"));
        assert!(!certificate_name_matches("*.example.com", "a.b.example.com"));
        assert!(!certificate_name_matches("*.example.com", "example.com"));
        assert!(certificate_name_matches("example.com", "example.com"));
        assert!(!certificate_name_matches("example.com", "a.example.com"));
    }

    #[test]
    fn hosts_lose_port_case_and_trailing_dot() {
        assert_eq!(normalize_host("Example.COM.:8443"), "example.com");
        assert_eq!(normalize_host("[::1]:443"), "[::1]");
        assert_eq!(normalize_host("[::1]"), "[::1]");
        assert!(matches!(normalize_host("a.test"), Cow::Borrowed(_)));
    }
}
