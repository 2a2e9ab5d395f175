//! Origin servers: a route that forwards to servers instead of running a function, as a
//! reverse proxy does (`origins = ["http://10.0.0.5:3000", …]`), and the `[origin]`
//! options. A function with a module may list origins too: it reaches them through
//! `http://origin.atoll.internal/…` ([`ORIGIN_HOST`]), e.g. to check a request before
//! passing it on.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Most origins one manifest may list.
pub const MAX_ORIGINS: usize = 16;
/// The host a function's outbound call uses to reach its own origins.
pub const ORIGIN_HOST: &str = "origin.atoll.internal";
/// Defaults of `[origin]`.
pub const DEFAULT_HEALTH_PATH: &str = "/";
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_RETRIES: u32 = 1;
/// Bounds of `[origin]`.
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_HEALTH_INTERVAL: Duration = Duration::from_secs(3600);
pub const MAX_TIMEOUT: Duration = Duration::from_secs(15 * 60);
pub const MAX_RETRIES: u32 = 3;

/// One origin: `http` or `https`, a host (name, IPv4, or `[IPv6]`) and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginUrl {
    pub https: bool,
    /// As written (a bracketed IPv6 address keeps its brackets).
    pub host: String,
    pub port: u16,
}

impl OriginUrl {
    /// `scheme://host:port`, the base every proxied path is appended to.
    pub fn base(&self) -> String {
        format!(
            "{}://{}:{}",
            if self.https { "https" } else { "http" },
            self.host,
            self.port
        )
    }

    /// Parses `http://host[:port][/]`: no path, query, fragment or credentials.
    pub fn parse(text: &str) -> Result<OriginUrl, String> {
        let (https, rest) = if let Some(rest) = text.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = text.strip_prefix("https://") {
            (true, rest)
        } else {
            return Err(format!("origin {text:?} must start with http:// or https://"));
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
            return Err(format!(
                "origin {text:?} must be scheme://host[:port], without a path, query or credentials"
            ));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (address, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("origin {text:?} has an unclosed [IPv6 address]"))?;
            address
                .parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("origin {text:?} has an invalid IPv6 address"))?;
            let port = match after {
                "" => None,
                _ => Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| format!("origin {text:?} has junk after the address"))?,
                ),
            };
            (format!("[{address}]"), port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host.to_string(), Some(port)),
                None => (authority.to_string(), None),
            }
        };
        if !host.starts_with('[')
            && (host.is_empty()
                || host.len() > 253
                || !host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-')))
        {
            return Err(format!("origin {text:?} has an invalid host"));
        }
        let port = match port {
            None => {
                if https {
                    443
                } else {
                    80
                }
            }
            Some(port) => match port.parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => return Err(format!("origin {text:?} has an invalid port")),
            },
        };
        Ok(OriginUrl {
            https,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

/// `[origin]`: how the node talks to the origins. Read the effective values with the
/// accessor methods.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginOptions {
    /// Path of the active health check (a GET; healthy below 500). Default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_path: Option<String>,
    /// Time between health checks of each origin. Default 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_interval: Option<String>,
    /// Time to connect. Default 2s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// Time for the origin's response head. Default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Tries of an idempotent request on another origin after a failure. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
}

fn duration(text: Option<&str>, default: Duration) -> Duration {
    text.and_then(|text| humantime::parse_duration(text.trim()).ok())
        .unwrap_or(default)
}

impl OriginOptions {
    pub fn is_default(&self) -> bool {
        *self == OriginOptions::default()
    }

    pub fn health_path(&self) -> &str {
        self.health_path.as_deref().unwrap_or(DEFAULT_HEALTH_PATH)
    }

    pub fn health_interval(&self) -> Duration {
        duration(self.health_interval.as_deref(), DEFAULT_HEALTH_INTERVAL)
    }

    pub fn connect_timeout(&self) -> Duration {
        duration(self.connect_timeout.as_deref(), DEFAULT_CONNECT_TIMEOUT)
    }

    pub fn timeout(&self) -> Duration {
        duration(self.timeout.as_deref(), DEFAULT_TIMEOUT)
    }

    pub fn retries(&self) -> u32 {
        self.retries.unwrap_or(DEFAULT_RETRIES)
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if let Some(path) = &self.health_path
            && (!path.starts_with('/')
                || path.len() > 1024
                || path.chars().any(|c| c.is_control() || c == ' '))
        {
            return Err(format!(
                "origin.health_path {path:?} must be a path starting with /"
            ));
        }
        let bounded = |name: &str, text: &Option<String>, min: Duration, max: Duration| {
            let Some(text) = text else { return Ok(()) };
            let value = humantime::parse_duration(text.trim())
                .map_err(|error| format!("origin.{name} {text:?} is invalid: {error}"))?;
            if value < min || value > max {
                return Err(format!(
                    "origin.{name} {text:?} must be {} to {}",
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ));
            }
            Ok(())
        };
        bounded(
            "health_interval",
            &self.health_interval,
            MIN_HEALTH_INTERVAL,
            MAX_HEALTH_INTERVAL,
        )?;
        bounded(
            "connect_timeout",
            &self.connect_timeout,
            Duration::from_millis(10),
            Duration::from_secs(60),
        )?;
        bounded("timeout", &self.timeout, Duration::from_millis(10), MAX_TIMEOUT)?;
        if self.retries.is_some_and(|retries| retries > MAX_RETRIES) {
            return Err(format!("origin.retries must be at most {MAX_RETRIES}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_scheme_host_and_port() {
        let origin = OriginUrl::parse("http://10.0.0.5:3000").unwrap();
        assert_eq!(
            (origin.https, origin.host.as_str(), origin.port),
            (false, "10.0.0.5", 3000)
        );
        assert_eq!(origin.base(), "http://10.0.0.5:3000");
        assert_eq!(
            OriginUrl::parse("https://API.example.com/").unwrap().base(),
            "https://api.example.com:443"
        );
        assert_eq!(
            OriginUrl::parse("http://[::1]:8080").unwrap().base(),
            "http://[::1]:8080"
        );
        for bad in [
            "10.0.0.5:3000",
            "ftp://a",
            "http://",
            "http://a/path",
            "http://u:p@a",
            "http://a:0",
            "http://a:99999",
            "http://[::1",
            "http://a b",
            "http://a?x",
        ] {
            assert!(OriginUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn options_have_defaults_and_bounds() {
        let options = OriginOptions::default();
        assert_eq!(options.health_path(), "/");
        assert_eq!(options.retries(), 1);
        assert_eq!(options.timeout(), DEFAULT_TIMEOUT);
        let set = OriginOptions {
            health_interval: Some("2s".into()),
            retries: Some(2),
            ..OriginOptions::default()
        };
        assert!(set.validate().is_ok());
        assert_eq!(set.health_interval(), Duration::from_secs(2));
        let bad = OriginOptions {
            retries: Some(9),
            ..OriginOptions::default()
        };
        assert!(bad.validate().unwrap_err().contains("at most 3"));
        let bad = OriginOptions {
            health_path: Some("healthz".into()),
            ..OriginOptions::default()
        };
        assert!(bad.validate().is_err());
    }
}
