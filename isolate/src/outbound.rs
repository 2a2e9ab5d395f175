//! Where an outbound call may connect: the allow-list, then DNS, then the SSRF guard, in
//! that order, before any byte leaves the node.
//!
//! ```text
//! scheme://host:port ─▶ AllowedHosts::allowing ─ no ─▶ Refusal::NotAllowed
//!                         │ yes
//!                         ▼
//!                   resolve host (an address literal resolves to itself)
//!                         ▼
//!   every address internal-checked (atoll_core::outbound::is_internal); internal ones are
//!   dropped unless the host is listed by name ─ none left ─▶ Refusal::Internal
//!                         ▼
//!   the checked addresses: the caller connects to exactly these
//! ```
//!
//! The caller must connect to the addresses returned here and to nothing it resolves again
//! (DNS rebinding: a second lookup may answer an internal address); the host name still goes
//! in `Host` and the TLS server name.

use std::net::SocketAddr;

use atoll_core::outbound::{AllowedHosts, Scheme, is_internal};

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
    /// Every address is internal and the host was not listed by name.
    #[error(
        "{host} resolves only to internal addresses ({addresses}); list it by name in [outbound] allowed_hosts to reach it"
    )]
    Internal {
        /// The host name.
        host: String,
        /// What it resolved to.
        addresses: String,
    },
}

/// The addresses a call to `scheme://host:port` may connect to, under `allowed`.
pub async fn checked_addresses(
    allowed: &AllowedHosts,
    scheme: Scheme,
    host: &str,
    port: u16,
) -> Result<Vec<SocketAddr>, Refusal> {
    let url = format!(
        "{}://{host}:{port}",
        if scheme == Scheme::Https { "https" } else { "http" }
    );
    if allowed.allowing(scheme, host, port).is_none() {
        return Err(Refusal::NotAllowed { url });
    }
    let resolved: Vec<SocketAddr> = match host.parse::<std::net::IpAddr>() {
        Ok(address) => vec![SocketAddr::new(address, port)],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|error| Refusal::Unresolved {
                host: host.to_string(),
                reason: error.to_string(),
            })?
            .collect(),
    };
    let internal_allowed = allowed.allows_internal(scheme, host, port);
    let (usable, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = resolved
        .into_iter()
        .partition(|address| internal_allowed || !is_internal(address.ip()));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(entries: &[&str]) -> AllowedHosts {
        AllowedHosts::parse(entries).unwrap()
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
    }
}
