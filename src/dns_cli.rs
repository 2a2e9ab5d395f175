//! `atoll dns` flags, and their translation into a [`DnsConfig`] and a [`ControlPlane`]:
//! the DNS library (`atoll-dns`) is run from a config and a control plane, and this is the
//! command line that makes them.
//!
//! Every flag value is parsed by clap through the parsers of [`atoll_dns::config`], so a bad
//! CIDR or zone is refused with the flag's name before anything binds; [`DnsArgs::config`]
//! repeats the cross-flag checks for callers that build `DnsArgs` by hand.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use anyhow::{Context, bail};
use atoll_control::{ControlPlane, RegistryClient};

use atoll_dns::config::{
    DEFAULT_MAX_UDP_PAYLOAD, DnsConfig, DomainName, FallbackRule, MAX_UDP_PAYLOAD, MIN_UDP_PAYLOAD, NsFlag,
    RegionMap, RegionRule, name_servers, parse_ttl, parse_zone,
};
use atoll_dns::rrl::RateLimit;
use atoll_dns::{bind, serve};

/// `atoll dns`: the cluster's authoritative DNS.
#[derive(clap::Args, Clone)]
#[command(group(clap::ArgGroup::new("source").args(["store", "registry"]).required(true)))]
pub struct DnsArgs {
    /// UDP and TCP address to answer on (port 0: any free port, the same for both).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:5353")]
    pub listen: SocketAddr,

    /// A zone to be authoritative for (repeatable; at least one). Names below no zone are
    /// REFUSED.
    #[arg(long = "zone", value_name = "ZONE", required = true, value_parser = parse_zone)]
    pub zones: Vec<DomainName>,

    /// Read members and routes from this NATS JetStream store (`nats://HOST:PORT`), as
    /// the registries do.
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,

    /// Read members and routes from this registry (`http://HOST:PORT`).
    #[arg(long, value_name = "URL")]
    pub registry: Option<String>,

    /// Registry API token (with --registry).
    #[arg(long, env = "ATOLL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Clients in CIDR are served from REGION (repeatable; the most specific prefix wins),
    /// e.g. `10.1.0.0/16=eu`.
    #[arg(long = "region-map", value_name = "CIDR=REGION")]
    pub region_map: Vec<RegionRule>,

    /// Region of clients no --region-map covers.
    #[arg(long, value_name = "REGION", default_value = "default")]
    pub default_region: String,

    /// Where REGION's clients go, in order, when it has no healthy node (repeatable), e.g.
    /// `eu=us,ap`; after the list (or without one), every other region by name.
    #[arg(long = "region-fallback", value_name = "REGION=R1,R2")]
    pub region_fallback: Vec<FallbackRule>,

    /// TTL of A/AAAA answers and negative answers.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_ttl)]
    pub ttl: Duration,

    /// A name server of the zones, with its address served as glue (repeatable), e.g.
    /// `ns1.example.com=192.0.2.1`. Default: `ns1.<zone>`, with the --listen IP as its
    /// address unless that is unspecified (0.0.0.0, ::).
    #[arg(long = "ns", value_name = "NAME=IP")]
    pub ns: Vec<NsFlag>,

    /// Largest UDP response, whatever larger EDNS buffer a client claims; what does not
    /// fit is sent truncated (TC=1) and the client retries over TCP. 1232 is the DNS flag
    /// day 2020 value (no IP fragmentation).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_UDP_PAYLOAD,
          value_parser = clap::value_parser!(u16).range(i64::from(MIN_UDP_PAYLOAD)..=i64::from(MAX_UDP_PAYLOAD)))]
    pub max_udp_payload: u16,

    /// UDP responses a second per client prefix (/24 IPv4, /56 IPv6), the burst allowed
    /// at once too; over it, responses are dropped or slipped (--rate-limit-slip). TCP is
    /// never limited. 0: off.
    #[arg(long, value_name = "N", default_value_t = 20,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub rate_limit: u32,

    /// Over the rate limit, every Nth response is sent empty with TC=1 (so a real client
    /// behind a spoofed prefix retries over TCP) and the others are dropped; 0 drops all,
    /// 1 truncates all.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(0..=100))]
    pub rate_limit_slip: u32,
}

impl std::fmt::Debug for DnsArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("DnsArgs")
            .field("listen", &self.listen)
            .field("zones", &self.zones)
            .field("store", &self.store)
            .field("registry", &self.registry)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("region_map", &self.region_map)
            .field("default_region", &self.default_region)
            .field("region_fallback", &self.region_fallback)
            .field("ttl", &self.ttl)
            .field("ns", &self.ns)
            .field("max_udp_payload", &self.max_udp_payload)
            .field("rate_limit", &self.rate_limit)
            .field("rate_limit_slip", &self.rate_limit_slip)
            .finish()
    }
}

impl DnsArgs {
    /// The answer configuration these flags describe.
    pub fn config(&self) -> anyhow::Result<DnsConfig> {
        if self.zones.is_empty() {
            bail!("--zone: give at least one zone");
        }
        if self.default_region.is_empty() || self.default_region.contains(char::is_whitespace) {
            bail!("--default-region: {:?} is not a region name", self.default_region);
        }
        let mut fallback: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for rule in &self.region_fallback {
            if fallback.insert(rule.region.clone(), rule.then.clone()).is_some() {
                bail!("--region-fallback: region {:?} is given twice", rule.region);
            }
        }
        let ttl = u32::try_from(self.ttl.as_secs()).context("--ttl is too long")?;
        if ttl == 0 {
            bail!("--ttl: at least 1s");
        }
        if !(MIN_UDP_PAYLOAD..=MAX_UDP_PAYLOAD).contains(&self.max_udp_payload) {
            bail!(
                "--max-udp-payload: {} is not between {MIN_UDP_PAYLOAD} and {MAX_UDP_PAYLOAD}",
                self.max_udp_payload
            );
        }
        let rate_limit = NonZeroU32::new(self.rate_limit).map(|per_second| RateLimit {
            per_second,
            slip: self.rate_limit_slip,
        });
        let listen_ip = self.listen.ip();
        let default_glue = (!listen_ip.is_unspecified()).then_some(listen_ip.to_canonical());
        Ok(DnsConfig {
            zones: name_servers(&self.zones, &self.ns, default_glue),
            region_map: RegionMap::new(self.region_map.iter().cloned()),
            default_region: self.default_region.clone(),
            fallback,
            ttl,
            max_udp_payload: self.max_udp_payload,
            rate_limit,
        })
    }

    /// Connects to the source the flags name (exactly one of --store, --registry).
    pub async fn source(&self) -> anyhow::Result<ControlPlane> {
        match (&self.store, &self.registry) {
            (Some(_), Some(_)) => bail!("--store and --registry: give one of them, not both"),
            (None, None) => bail!("--store or --registry: give one of them"),
            (Some(url), None) => {
                if !url.starts_with("nats://") {
                    bail!("--store: {url:?} is not a nats:// URL");
                }
                // Connected by the poller, so the DNS starts (and answers SOA/NS) while
                // NATS is down.
                Ok(ControlPlane::nats(url.clone()))
            }
            (None, Some(url)) => {
                let client = RegistryClient::new(url, self.token.clone()).context("--registry")?;
                Ok(ControlPlane::Registry(client))
            }
        }
    }
}

/// Runs `atoll dns` until `shutdown` completes: validates the flags, connects to the
/// source, binds, prints `dns listening on udp://ADDR tcp://ADDR` (the real port when
/// asked for port 0), then serves (`atoll_dns::serve`).
pub async fn run(args: DnsArgs, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let config = args.config()?;
    let source = args.source().await?;
    let (udp, tcp) = bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", args.listen))?;
    let addr = udp.local_addr()?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "dns listening on udp://{addr} tcp://{addr}")?;
        stdout.flush()?;
    }
    serve(config, source, udp, tcp, shutdown).await
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        dns: DnsArgs,
    }

    fn parse(args: &[&str]) -> Result<DnsArgs, String> {
        Cli::try_parse_from(std::iter::once("dns").chain(args.iter().copied()))
            .map(|cli| cli.dns)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_repeatable_flags() {
        let args = parse(&[
            "--zone",
            "example.com",
            "--zone",
            "Example.ORG.",
            "--registry",
            "http://127.0.0.1:7070",
            "--region-map",
            "10.1.0.0/16=eu",
            "--region-map",
            "10.2.0.0/16=us",
            "--region-fallback",
            "eu=us,ap",
            "--ns",
            "ns1.example.com=192.0.2.1",
        ])
        .unwrap();
        assert_eq!(args.listen, "127.0.0.1:5353".parse::<SocketAddr>().unwrap());
        assert_eq!(args.ttl, Duration::from_secs(5));
        assert_eq!(args.default_region, "default");
        let config = args.config().unwrap();
        assert_eq!(config.zones.len(), 2);
        assert_eq!(config.zones[1].name.as_str(), "example.org");
        assert_eq!(config.ttl, 5);
        assert_eq!(config.fallback["eu"], ["us", "ap"]);
        assert_eq!(config.max_udp_payload, 1232);
        assert_eq!(
            config.rate_limit,
            Some(RateLimit {
                per_second: NonZeroU32::new(20).unwrap(),
                slip: 2
            })
        );
        assert_eq!(config.client_region(Some("10.2.3.4".parse().unwrap())), "us");
        assert_eq!(
            config.client_region(Some("192.0.2.9".parse().unwrap())),
            "default"
        );
    }

    #[test]
    fn bad_values_name_their_flag() {
        let base = ["--zone", "example.com", "--registry", "http://r"];
        let cases: [(&[&str], &str); 12] = [
            (&["--region-map", "10.0.0.0/33=eu"], "--region-map"),
            (&["--region-map", "eu"], "--region-map"),
            (&["--zone", "bad zone"], "--zone"),
            (&["--ns", "ns1.example.com=not-an-ip"], "--ns"),
            (&["--ttl", "0s"], "--ttl"),
            (&["--region-fallback", "eu"], "--region-fallback"),
            (&["--listen", "nowhere"], "--listen"),
            (&["--max-udp-payload", "511"], "--max-udp-payload"),
            (&["--max-udp-payload", "65535"], "--max-udp-payload"),
            (&["--rate-limit", "lots"], "--rate-limit"),
            (&["--rate-limit", "2000000"], "--rate-limit"),
            (&["--rate-limit-slip", "x"], "--rate-limit-slip"),
        ];
        for (extra, flag) in cases {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            let error = parse(&args).unwrap_err();
            assert!(error.contains(flag), "{extra:?}: {error}");
        }
        let error = parse(&["--registry", "http://r"]).unwrap_err();
        assert!(error.contains("--zone"), "{error}");
        let error = parse(&["--zone", "example.com"]).unwrap_err();
        assert!(
            error.contains("--store") && error.contains("--registry"),
            "{error}"
        );
        let error = parse(&[
            "--zone",
            "example.com",
            "--store",
            "nats://x:4222",
            "--registry",
            "http://r",
        ])
        .unwrap_err();
        assert!(
            error.contains("--store") && error.contains("--registry"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn sources_are_checked_by_hand_too() {
        let mut args = parse(&["--zone", "example.com", "--registry", "http://r:1"]).unwrap();
        args.store = Some("nats://127.0.0.1:1".into());
        let error = args.source().await.unwrap_err().to_string();
        assert!(
            error.contains("--store") && error.contains("--registry"),
            "{error}"
        );
        args.registry = None;
        args.store = Some("http://127.0.0.1:1".into());
        let error = args.source().await.unwrap_err().to_string();
        assert!(error.contains("--store"), "{error}");
        args.store = None;
        args.registry = Some("not a url".into());
        let error = format!("{:#}", args.source().await.unwrap_err());
        assert!(error.contains("--registry"), "{error}");
        args.region_fallback = vec!["eu=us".parse().unwrap(), "eu=ap".parse().unwrap()];
        let error = args.config().unwrap_err().to_string();
        assert!(error.contains("--region-fallback"), "{error}");
    }

    #[test]
    fn rate_limit_zero_is_off_and_limits_are_checked_by_hand_too() {
        let base = ["--zone", "example.com", "--registry", "http://r"];
        let args: Vec<&str> = base
            .iter()
            .chain(&[
                "--rate-limit",
                "0",
                "--max-udp-payload",
                "512",
                "--rate-limit-slip",
                "0",
            ])
            .copied()
            .collect();
        let mut args = parse(&args).unwrap();
        let config = args.config().unwrap();
        assert_eq!(config.rate_limit, None);
        assert_eq!(config.max_udp_payload, 512);
        args.rate_limit = 5;
        assert_eq!(args.config().unwrap().rate_limit.unwrap().slip, 0);
        args.max_udp_payload = 100;
        let error = args.config().unwrap_err().to_string();
        assert!(error.contains("--max-udp-payload"), "{error}");
    }

    #[test]
    fn default_ns_glue_is_the_listen_ip_when_specific() {
        let args = parse(&[
            "--zone",
            "example.com",
            "--registry",
            "http://r",
            "--listen",
            "192.0.2.5:53",
        ])
        .unwrap();
        let zone = &args.config().unwrap().zones[0];
        assert_eq!(zone.ns[0].name.as_str(), "ns1.example.com");
        assert_eq!(
            zone.ns[0].addrs,
            ["192.0.2.5".parse::<std::net::IpAddr>().unwrap()]
        );
        let args = parse(&[
            "--zone",
            "example.com",
            "--registry",
            "http://r",
            "--listen",
            "0.0.0.0:53",
        ])
        .unwrap();
        assert!(args.config().unwrap().zones[0].ns[0].addrs.is_empty());
    }
}
