//! The JSON bodies of the registry's HTTP API, shared by the server ([`crate::api`]) and
//! the client ([`crate::client`]) so the two cannot drift apart.

use serde::{Deserialize, Serialize};

use crate::model::Version;

/// `201` answer to `POST /v1/functions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushResponse {
    /// The function.
    pub name: String,
    /// The version just created (now active).
    pub version: u64,
    /// SHA-256 of the module, hex.
    pub sha256: String,
}

/// One entry of `GET /v1/functions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionSummary {
    /// The function.
    pub name: String,
    /// The active version.
    pub active: u64,
    /// How many versions exist.
    pub versions: u64,
    /// Routes of the active version.
    pub routes: Vec<String>,
    /// SHA-256 of the active version's module.
    pub sha256: String,
}

/// Answer to `GET /v1/functions/{name}/versions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionsResponse {
    /// The function.
    pub name: String,
    /// The active version.
    pub active: u64,
    /// Every version, ascending.
    pub versions: Vec<Version>,
    /// The gray release in progress, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<crate::traffic::TrafficSplit>,
}

/// Body of `POST /v1/functions/{name}/traffic`: the versions and their whole percentages
/// (adding up to 100), and what keeps a client on one version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficRequest {
    pub shares: Vec<crate::traffic::Share>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<crate::traffic::StickyKey>,
}

/// `GET /v1/functions/{name}/secrets`: the names only; values never leave the registry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretsResponse {
    pub name: String,
    pub secrets: Vec<String>,
}

/// Answer to a traffic change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficResponse {
    pub name: String,
    /// The version with the largest share, whose routes the function serves.
    pub active: u64,
    /// The split now; `None` when every request goes to `active`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<crate::traffic::TrafficSplit>,
}

/// Body of `POST /v1/functions/{name}/rollback` (an empty body means `{}`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The version to activate; default: the highest version below the active one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
}

/// Answer to a rollback.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackResponse {
    /// The function.
    pub name: String,
    /// The version now active.
    pub active: u64,
    /// Its module's SHA-256.
    pub sha256: String,
}

/// Body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// One line naming the problem.
    pub error: String,
}
