//! Who may do what at the registry: scoped credentials.
//!
//! One person on one machine needs nothing but the registry's own token (`ATOLL_TOKEN` or
//! `DATA/token`, see `atoll_registry::token`): it is the *root* credential and may do everything,
//! as it always could. Everyone else gets a token minted by an admin
//! (`POST /v1/tokens`, `atoll token create`), with one scope:
//!
//! * `admin` — everything, including minting and revoking tokens;
//! * `deploy` — push, roll back, list and see the versions of functions whose names match
//!   its `functions` patterns (`shop-*`), with routes only on hosts its `domains` cover
//!   (`shop.example.com`, `*.shop.example.com`); it cannot watch or fetch modules (the
//!   watch carries every function's environment);
//! * `node` — what a node and `atoll dns` need: the watch, modules, the function list, the
//!   node list, and heartbeats, for its bound node name only when it has one; no push.
//!
//! A minted token is `atoll_<id>_<secret>`: the id (public, 16 hex digits) finds the
//! credential, and only the SHA-256 of the whole token is stored, compared in constant
//! time. The token itself is shown once, when it is minted. Credentials live in the
//! registry's store (`state.json`, or the NATS KV bucket `atoll_credentials`), so every
//! registry on one NATS cluster knows them and a revoked token stops working everywhere.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::manifest::Manifest;
use crate::route::HostPattern;

/// Prefix of every minted token.
pub const TOKEN_PREFIX: &str = "atoll_";
/// Length of a credential id, in hex digits.
const ID_LEN: usize = 16;

/// What a credential may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Everything.
    Admin,
    /// Its functions, on its domains.
    Deploy,
    /// Heartbeats and what a node reads.
    Node,
}

impl Scope {
    /// `admin`, `deploy`, `node`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Deploy => "deploy",
            Scope::Node => "node",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(text: &str) -> Result<Scope, String> {
        match text {
            "admin" => Ok(Scope::Admin),
            "deploy" => Ok(Scope::Deploy),
            "node" => Ok(Scope::Node),
            other => Err(format!(
                "unknown scope {other:?} (expected admin, deploy or node)"
            )),
        }
    }
}

/// What a credential grants: the body of `POST /v1/tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The scope.
    pub scope: Scope,
    /// `deploy`: function-name patterns (`shop-*`; `*` matches any run of characters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub functions: Vec<String>,
    /// `deploy`: the hosts its routes may use (`shop.example.com`, `*.shop.example.com`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<HostPattern>,
    /// `node`: the only node name it may announce (any when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// A note for people (who has it, what for).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

impl Grant {
    /// Refuses a grant that does not make sense for its scope, naming what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let deploy_only = |what: &str| format!("`{what}` is only for the deploy scope, not {}", self.scope);
        match self.scope {
            Scope::Deploy => {
                if self.functions.is_empty() {
                    return Err("a deploy token needs `functions` (name patterns such as shop-*)".into());
                }
                if self.domains.is_empty() {
                    return Err(
                        "a deploy token needs `domains` (such as shop.example.com, *.shop.example.com)"
                            .into(),
                    );
                }
                if self.node.is_some() {
                    return Err("`node` is only for the node scope, not deploy".into());
                }
                for pattern in &self.functions {
                    check_name_pattern(pattern)?;
                }
            }
            Scope::Admin | Scope::Node => {
                if !self.functions.is_empty() {
                    return Err(deploy_only("functions"));
                }
                if !self.domains.is_empty() {
                    return Err(deploy_only("domains"));
                }
                if self.scope == Scope::Admin && self.node.is_some() {
                    return Err("`node` is only for the node scope, not admin".into());
                }
                if let Some(node) = &self.node
                    && (node.is_empty()
                        || !node
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
                {
                    return Err(format!("node name {node:?} must be letters, digits, `-` or `_`"));
                }
            }
        }
        if self.description.len() > 200 || self.description.chars().any(char::is_control) {
            return Err("the description must be one line of at most 200 bytes".into());
        }
        Ok(())
    }

    /// One line for people: `deploy functions shop-* domains shop.example.com,*.shop.example.com`.
    pub fn summary(&self) -> String {
        let mut text = self.scope.to_string();
        if !self.functions.is_empty() {
            text.push_str(&format!(" functions {}", self.functions.join(",")));
        }
        if !self.domains.is_empty() {
            let domains: Vec<String> = self.domains.iter().map(ToString::to_string).collect();
            text.push_str(&format!(" domains {}", domains.join(",")));
        }
        if let Some(node) = &self.node {
            text.push_str(&format!(" node {node}"));
        }
        text
    }
}

/// `[a-z0-9-*]+`: a function name with `*` wildcards.
fn check_name_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("a function pattern is empty".into());
    }
    if let Some(c) = pattern
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '*'))
    {
        return Err(format!(
            "function pattern {pattern:?} contains {c:?} (allowed: a-z, 0-9, -, *)"
        ));
    }
    Ok(())
}

/// Whether `name` matches the glob `pattern` (`*`: any run of characters, maybe none).
pub fn name_matches(pattern: &str, name: &str) -> bool {
    let (pattern, name) = (pattern.as_bytes(), name.as_bytes());
    let (mut p, mut n) = (0, 0);
    // Where the last `*` was, and the name position it has taken up to.
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if p < pattern.len() && pattern[p] == name[n] {
            p += 1;
            n += 1;
        } else if let Some((star_p, star_n)) = star {
            // Let the `*` take one more character and try again.
            p = star_p + 1;
            n = star_n + 1;
            star = Some((star_p, star_n + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|b| *b == b'*')
}

/// A minted credential as stored: the grant and the SHA-256 of its token, never the token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// Public id (16 hex digits), also inside the token.
    pub id: String,
    /// What it may do.
    #[serde(flatten)]
    pub grant: Grant,
    /// When it was minted, RFC 3339, UTC.
    pub created_at: String,
    /// SHA-256 of the whole token, hex.
    pub token_sha256: String,
}

impl Credential {
    /// A new credential for `grant`, and its token (to show once).
    pub fn mint(grant: Grant) -> std::io::Result<(Credential, String)> {
        let mut id = [0u8; ID_LEN / 2];
        getrandom::fill(&mut id).map_err(|e| std::io::Error::other(e.to_string()))?;
        let id = hex::encode(id);
        let token = format!("{TOKEN_PREFIX}{id}_{}", generate_secret()?);
        let credential = Credential {
            id,
            grant,
            created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            token_sha256: crate::digest::sha256_hex(token.as_bytes()),
        };
        Ok((credential, token))
    }

    /// Whether `token` is this credential's, in time independent of both.
    pub fn verifies(&self, token: &str) -> bool {
        let presented = Sha256::digest(token.as_bytes());
        let mut stored = [0u8; 32];
        if hex::decode_to_slice(&self.token_sha256, &mut stored).is_err() {
            return false;
        }
        presented.as_slice().ct_eq(&stored).into()
    }

    /// What the API shows of it: everything but the hash.
    pub fn info(&self) -> TokenInfo {
        TokenInfo {
            id: self.id.clone(),
            grant: self.grant.clone(),
            created_at: self.created_at.clone(),
        }
    }
}

/// The credential id inside a minted token, if `token` has that form.
pub fn token_id(token: &str) -> Option<&str> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, _secret) = rest.split_once('_')?;
    (id.len() == ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(id)
}

/// Whether `id` has the form of a credential id (16 lowercase hex digits).
pub fn is_credential_id(id: &str) -> bool {
    id.len() == ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A credential as `GET /v1/tokens` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Its id (what `DELETE /v1/tokens/{id}` takes).
    pub id: String,
    /// What it may do.
    #[serde(flatten)]
    pub grant: Grant,
    /// When it was minted.
    pub created_at: String,
}

/// `201` answer to `POST /v1/tokens`: the token, shown this once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    /// The secret to hand to its holder.
    pub token: String,
    /// The credential.
    #[serde(flatten)]
    pub info: TokenInfo,
}

/// Who is calling: the registry's root token, or a minted credential.
#[derive(Clone, Debug)]
pub enum Caller {
    /// The registry's own token (`ATOLL_TOKEN`, `DATA/token`): an admin.
    Root,
    /// A minted credential.
    Token(Credential),
}

/// Why a caller may not do something (403). Display: one line naming the credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Forbidden(pub String);

impl Caller {
    /// The caller's scope.
    pub fn scope(&self) -> Scope {
        match self {
            Caller::Root => Scope::Admin,
            Caller::Token(credential) => credential.grant.scope,
        }
    }

    /// `the root token`, or `token 0123… (deploy functions shop-* …)`.
    pub fn describe(&self) -> String {
        match self {
            Caller::Root => "the root token".into(),
            Caller::Token(credential) => {
                format!("token {} ({})", credential.id, credential.grant.summary())
            }
        }
    }

    /// Refuses unless the caller's scope is one of `scopes`; `action` names what it tried.
    pub fn require(&self, scopes: &[Scope], action: &str) -> Result<(), Forbidden> {
        if scopes.contains(&self.scope()) {
            return Ok(());
        }
        let allowed: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
        Err(Forbidden(format!(
            "{} may not {action} (needs scope {})",
            self.describe(),
            allowed.join(" or ")
        )))
    }

    /// The deploy grant, for a deploy token; `None` for an admin or a node.
    fn deploy_grant(&self) -> Option<&Grant> {
        match self {
            Caller::Token(credential) if credential.grant.scope == Scope::Deploy => Some(&credential.grant),
            _ => None,
        }
    }

    /// Whether the caller may see and change function `name`: an admin any, a deploy
    /// token those its patterns match, a node none (it only reads the list and the watch).
    pub fn may_manage(&self, name: &str) -> bool {
        match self.scope() {
            Scope::Admin => true,
            Scope::Node => false,
            Scope::Deploy => self
                .deploy_grant()
                .is_some_and(|grant| grant.functions.iter().any(|p| name_matches(p, name))),
        }
    }

    /// Refuses unless the caller may manage function `name` ([`Caller::may_manage`]).
    pub fn require_function(&self, name: &str, action: &str) -> Result<(), Forbidden> {
        self.require(&[Scope::Admin, Scope::Deploy], action)?;
        if self.may_manage(name) {
            return Ok(());
        }
        Err(Forbidden(format!(
            "{} may not {action}: function `{name}` is not one of its functions",
            self.describe()
        )))
    }

    /// Refuses a manifest the caller may not serve: a function not its own, or a route on a
    /// host its domains do not cover.
    pub fn require_manifest(&self, manifest: &Manifest, action: &str) -> Result<(), Forbidden> {
        self.require_function(&manifest.name, action)?;
        let Some(grant) = self.deploy_grant() else {
            return Ok(());
        };
        // A binding calls the function on any path, around its routes: binding one is
        // managing it, so a deploy token binds only functions it may manage.
        for (binding, function) in &manifest.services {
            if !self.may_manage(function) {
                return Err(Forbidden(format!(
                    "{} may not {action}: [services] {binding} binds function \"{function}\", which it may not manage",
                    self.describe()
                )));
            }
        }
        for store in &manifest.kv.stores {
            if !self.may_manage(store) {
                return Err(Forbidden(format!(
                    "{} may not {action}: [kv] grants store \"{store}\", which it may not manage",
                    self.describe()
                )));
            }
        }
        for route in manifest.route_patterns() {
            if !grant.domains.iter().any(|domain| domain.covers(&route.host)) {
                let domains: Vec<String> = grant.domains.iter().map(ToString::to_string).collect();
                return Err(Forbidden(format!(
                    "{} may not {action}: route \"{route}\" is outside its domains ({})",
                    self.describe(),
                    domains.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// Refuses a heartbeat for node `name` unless the caller is an admin or a node token
    /// bound to that name (or to none).
    pub fn require_node(&self, name: &str) -> Result<(), Forbidden> {
        self.require(&[Scope::Admin, Scope::Node], "announce a node")?;
        if let Caller::Token(credential) = self
            && let Some(bound) = &credential.grant.node
            && bound != name
        {
            return Err(Forbidden(format!(
                "{} may only announce node `{bound}`, not `{name}`",
                self.describe()
            )));
        }
        Ok(())
    }
}

/// Whether `presented` equals `expected`, in time independent of both (digests are
/// compared, so the length does not leak either).
pub fn token_matches(expected: &str, presented: &str) -> bool {
    let a = Sha256::digest(expected.as_bytes());
    let b = Sha256::digest(presented.as_bytes());
    a.ct_eq(&b).into()
}

/// 32 random bytes from the OS, hex-encoded (64 chars).
pub fn generate_secret() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abc", "abd"));
        assert!(!token_matches("abc", "ab"));
        assert!(!token_matches("abc", "abcd"));
        assert!(!token_matches("abc", ""));
        assert!(token_matches("", ""));
    }

    fn grant(scope: Scope, functions: &[&str], domains: &[&str]) -> Grant {
        Grant {
            scope,
            functions: functions.iter().map(|s| s.to_string()).collect(),
            domains: domains.iter().map(|d| d.parse().unwrap()).collect(),
            node: None,
            description: String::new(),
        }
    }

    #[test]
    fn globs() {
        assert!(name_matches("shop-*", "shop-cart"));
        assert!(name_matches("shop-*", "shop-"));
        assert!(!name_matches("shop-*", "shop"));
        assert!(!name_matches("shop-*", "blog"));
        assert!(name_matches("*", "anything"));
        assert!(name_matches("*-api", "shop-api"));
        assert!(!name_matches("*-api", "shop-api2"));
        assert!(name_matches("a*b*c", "aXXbYYc"));
        assert!(name_matches("a*b*c", "abbc"));
        assert!(!name_matches("a*b*c", "aXXbYY"));
        assert!(name_matches("exact", "exact"));
        assert!(!name_matches("exact", "exact2"));
    }

    #[test]
    fn tokens_verify_by_hash_only() {
        let (credential, token) = Credential::mint(grant(Scope::Node, &[], &[])).unwrap();
        assert_eq!(token_id(&token), Some(credential.id.as_str()));
        assert!(credential.verifies(&token));
        assert!(!credential.verifies(&format!("{token}x")));
        assert!(!credential.verifies(""));
        let json = serde_json::to_string(&credential).unwrap();
        assert!(
            !json.contains(&token[TOKEN_PREFIX.len() + ID_LEN + 1..]),
            "{json}"
        );
        let (other, other_token) = Credential::mint(grant(Scope::Node, &[], &[])).unwrap();
        assert_ne!((other.id, other_token), (credential.id, token));
        assert_eq!(token_id("atoll_0123_x"), None);
        assert_eq!(token_id("plain-root-token"), None);
    }

    #[test]
    fn grants_are_validated() {
        grant(Scope::Deploy, &["shop-*"], &["shop.com"])
            .validate()
            .unwrap();
        grant(Scope::Admin, &[], &[]).validate().unwrap();
        let cases = [
            (grant(Scope::Deploy, &[], &["shop.com"]), "needs `functions`"),
            (grant(Scope::Deploy, &["shop-*"], &[]), "needs `domains`"),
            (grant(Scope::Deploy, &["Shop"], &["shop.com"]), "'S'"),
            (grant(Scope::Node, &["x"], &[]), "only for the deploy scope"),
            (
                grant(Scope::Admin, &[], &["shop.com"]),
                "only for the deploy scope",
            ),
        ];
        for (grant, needle) in cases {
            let err = grant.validate().unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn deploy_scope() {
        let (credential, _) =
            Credential::mint(grant(Scope::Deploy, &["shop-*"], &["shop.com", "*.shop.com"])).unwrap();
        let caller = Caller::Token(credential);
        let ok = Manifest::for_tests("shop-cart", &["shop.com/cart", "a.b.shop.com", "*.x.shop.com"]);
        caller.require_manifest(&ok, "push").unwrap();
        // Binding a function is calling it around its routes: only one it may manage.
        let mut binds = ok.clone();
        binds.services.insert("CART".into(), "shop-stock".into());
        caller.require_manifest(&binds, "push").unwrap();
        binds.services.insert("BANK".into(), "bank-api".into());
        let err = caller.require_manifest(&binds, "push").unwrap_err();
        assert!(
            err.0.contains("[services] BANK binds function \"bank-api\""),
            "{err}"
        );
        let mut stores = ok.clone();
        stores.kv.stores = vec!["shop-cart".into()];
        caller.require_manifest(&stores, "push").unwrap();
        stores.kv.stores.push("bank".into());
        let err = caller.require_manifest(&stores, "push").unwrap_err();
        assert!(err.0.contains("[kv] grants store \"bank\""), "{err}");
        let err = caller
            .require_manifest(&Manifest::for_tests("blog", &["shop.com"]), "push")
            .unwrap_err();
        assert!(
            err.0.contains("function `blog` is not one of its functions"),
            "{err}"
        );
        let err = caller
            .require_manifest(&Manifest::for_tests("shop-x", &["blog.com"]), "push")
            .unwrap_err();
        assert!(
            err.0.contains("route \"blog.com\" is outside its domains"),
            "{err}"
        );
        assert!(caller.require(&[Scope::Admin, Scope::Node], "watch").is_err());
        assert!(caller.require_node("n1").is_err());
        assert!(Caller::Root.require_manifest(&ok, "push").is_ok());
    }

    #[test]
    fn node_scope() {
        let mut bound = grant(Scope::Node, &[], &[]);
        bound.node = Some("n1".into());
        let caller = Caller::Token(Credential::mint(bound).unwrap().0);
        caller.require_node("n1").unwrap();
        let err = caller.require_node("n2").unwrap_err();
        assert!(err.0.contains("may only announce node `n1`, not `n2`"), "{err}");
        assert!(
            caller
                .require_manifest(&Manifest::for_tests("f", &["f.com"]), "push")
                .is_err()
        );
        assert!(!caller.may_manage("f"));
    }
}
