//! Gray release: how a function's requests are shared between its versions, and the
//! choice of a version for one request.
//!
//! A split names up to [`MAX_SPLIT_VERSIONS`] versions with whole percentages that add up
//! to 100 (0 is allowed: such a version is prepared on every node and reachable only by
//! pinning it with the `x-atoll-version` request header). Every node makes the same choice
//! for the same request without talking to any other: the request's sticky key (a header,
//! a cookie or the client address), hashed with a fixed function, is a point in
//! `0..10_000`, and the versions cover that range newest first. The newest version's range
//! starts at 0 and only grows with its share, so a user once moved to it stays on it while
//! its share rises (Knative and Cloudflare's gradual deployments behave the same way).
//! Without a sticky key each request draws the point at random.
//!
//! The hash is FNV-1a, written out here (eight lines) rather than taken from `std`, whose
//! `DefaultHasher` may change between Rust releases: nodes built apart must agree.

use serde::{Deserialize, Serialize};

/// Most versions one split may name.
pub const MAX_SPLIT_VERSIONS: usize = 8;
/// The points a request's key maps to: percentages in hundredths.
const POINTS: u64 = 10_000;

/// What keeps one client on one version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum StickyKey {
    /// A request header's value (`header:X-User`).
    Header(String),
    /// A cookie's value (`cookie:uid`).
    Cookie(String),
    /// The client's address (`ip`).
    Ip,
}

impl std::fmt::Display for StickyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StickyKey::Header(name) => write!(f, "header:{name}"),
            StickyKey::Cookie(name) => write!(f, "cookie:{name}"),
            StickyKey::Ip => f.write_str("ip"),
        }
    }
}

impl std::str::FromStr for StickyKey {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let token = |name: &str| {
            !name.is_empty()
                && name.len() <= 128
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        match text.split_once(':') {
            _ if text == "ip" => Ok(StickyKey::Ip),
            Some(("header", name)) if token(name) => Ok(StickyKey::Header(name.to_ascii_lowercase())),
            Some(("cookie", name)) if token(name) => Ok(StickyKey::Cookie(name.to_string())),
            _ => Err(format!(
                "sticky key `{text}` is not `header:NAME`, `cookie:NAME` or `ip`"
            )),
        }
    }
}

impl TryFrom<String> for StickyKey {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<StickyKey> for String {
    fn from(key: StickyKey) -> String {
        key.to_string()
    }
}

/// One version's share of a split.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    pub version: u64,
    /// Whole percent, 0..=100.
    pub percent: u8,
}

/// A function's traffic split, as the registry keeps it: shares newest version first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficSplit {
    pub shares: Vec<Share>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<StickyKey>,
}

impl TrafficSplit {
    /// A checked split: 1..=[`MAX_SPLIT_VERSIONS`] distinct versions whose percentages add
    /// up to 100, sorted newest first. Whether the versions exist is the caller's check.
    pub fn new(mut shares: Vec<Share>, sticky: Option<StickyKey>) -> Result<Self, String> {
        if shares.is_empty() {
            return Err("a traffic split names at least one version".into());
        }
        if shares.len() > MAX_SPLIT_VERSIONS {
            return Err(format!(
                "a traffic split names at most {MAX_SPLIT_VERSIONS} versions, not {}",
                shares.len()
            ));
        }
        shares.sort_by_key(|share| std::cmp::Reverse(share.version));
        if let Some(pair) = shares.windows(2).find(|pair| pair[0].version == pair[1].version) {
            return Err(format!("v{} is named twice", pair[0].version));
        }
        if let Some(share) = shares.iter().find(|share| share.percent > 100) {
            return Err(format!(
                "v{} has {}%: a share is 0 to 100",
                share.version, share.percent
            ));
        }
        let total: u32 = shares.iter().map(|share| u32::from(share.percent)).sum();
        if total != 100 {
            return Err(format!("the shares add up to {total}%, not 100%"));
        }
        Ok(TrafficSplit { shares, sticky })
    }

    /// The version that takes the largest share (the older one on a tie): the function's
    /// active version while the split lasts, whose routes the function serves.
    pub fn leading(&self) -> u64 {
        self.shares
            .iter()
            .max_by(|a, b| a.percent.cmp(&b.percent).then(b.version.cmp(&a.version)))
            .map_or(0, |share| share.version)
    }

    /// Whether the split is only "all to one version" (then it is no split at all).
    pub fn is_whole(&self) -> bool {
        self.shares.len() == 1 && self.sticky.is_none()
    }
}

/// The point in `0..10_000` a sticky key's value falls on (FNV-1a 64 of the function's
/// name, a zero byte and the value, so two functions split the same users differently).
pub fn point_of(function: &str, key: &[u8]) -> u16 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for byte in function.bytes().chain([0]).chain(key.iter().copied()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(PRIME);
    }
    (hash % POINTS) as u16
}

/// The index of the share `point` falls in, for `percents` listed newest version first.
pub fn choose(percents: impl IntoIterator<Item = u8>, point: u16) -> usize {
    let mut end = 0u64;
    let mut last = 0;
    for (index, percent) in percents.into_iter().enumerate() {
        if percent == 0 {
            continue;
        }
        last = index;
        end += u64::from(percent) * (POINTS / 100);
        if u64::from(point) < end {
            return index;
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(shares: &[(u64, u8)]) -> Result<TrafficSplit, String> {
        TrafficSplit::new(
            shares
                .iter()
                .map(|&(version, percent)| Share { version, percent })
                .collect(),
            None,
        )
    }

    #[test]
    fn a_split_adds_up_to_100_with_distinct_versions_newest_first() {
        let checked = split(&[(7, 90), (8, 10)]).unwrap();
        assert_eq!(
            checked.shares[0],
            Share {
                version: 8,
                percent: 10
            }
        );
        assert_eq!(checked.leading(), 7);
        assert_eq!(
            split(&[(7, 50), (8, 50)]).unwrap().leading(),
            7,
            "a tie goes to the older"
        );
        assert!(split(&[(7, 90), (8, 20)]).unwrap_err().contains("110%"));
        assert!(
            split(&[(7, 90), (7, 10)])
                .unwrap_err()
                .contains("v7 is named twice")
        );
        assert!(split(&[]).is_err());
        assert!(split(&[(1, 100)]).unwrap().is_whole());
        assert!(!split(&[(1, 100), (2, 0)]).unwrap().is_whole());
    }

    #[test]
    fn sticky_keys_parse_and_print_the_same() {
        for text in ["header:x-user", "cookie:uid", "ip"] {
            let key: StickyKey = text.parse().unwrap();
            assert_eq!(key.to_string(), text);
        }
        assert_eq!(
            "header:X-User".parse::<StickyKey>().unwrap(),
            StickyKey::Header("x-user".into())
        );
        for bad in ["header:", "cookie:a b", "query:x", "", "header:a\nb"] {
            assert!(bad.parse::<StickyKey>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn points_are_spread_evenly_and_the_same_everywhere() {
        // Fixed values (FNV-1a 64 of `shop\0user-1`, modulo 10,000): every node, whatever
        // it was built with, computes these.
        assert_eq!(point_of("shop", b"user-1"), 7034);
        assert_eq!(point_of("cart", b"user-1"), 2284);
        let mut in_first_tenth = 0;
        for user in 0..20_000 {
            if point_of("shop", format!("user-{user}").as_bytes()) < 1_000 {
                in_first_tenth += 1;
            }
        }
        assert!(
            (1_800..2_200).contains(&in_first_tenth),
            "{in_first_tenth} of 20,000 in 10%"
        );
    }

    #[test]
    fn the_newest_versions_range_only_grows_with_its_share() {
        // Newest first: v8's points are 0..share.
        for point in 0..10_000u16 {
            let mut on_new = false;
            for share in 0..=100u8 {
                let chosen = choose([share, 100 - share], point) == 0;
                assert!(
                    !on_new || chosen,
                    "point {point} left the new version at {share}%"
                );
                on_new = chosen;
            }
            assert!(on_new, "everyone is on the new version at 100%");
        }
        assert_eq!(choose([0, 100], 0), 1, "a version at 0% is never drawn");
        assert_eq!(choose([0, 0, 100], 9_999), 2);
    }
}
