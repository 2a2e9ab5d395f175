//! The function model: what the registry stores and what nodes serve.
//!
//! A function is a name with an append-only list of immutable versions (v1, v2, …), each
//! pinning a module by its SHA-256 and the manifest it was pushed with, plus an `active`
//! pointer. Pushing appends a version and activates it; rolling back only moves the
//! pointer, so every version ever pushed stays fetchable and can be re-activated.
//!
//! `mod_revision` is the global store revision of the function's last change; the watch
//! stream uses it to send a node exactly the functions that changed since the revision it
//! last applied (see [`crate::watch`]). A [`Deployment`] is the slice of a record a node
//! needs to serve the function, and nothing more.

use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;
use crate::secrets::SealedSecrets;
use crate::traffic::{StickyKey, TrafficSplit};

/// One immutable version of a function.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// 1, 2, 3, … in push order, per function.
    pub version: u64,
    /// SHA-256 of the module, lowercase hex (64 chars); names the blob.
    pub sha256: String,
    /// The manifest pushed with the module (routes canonical).
    pub manifest: Manifest,
    /// When it was pushed, RFC 3339 to the second, UTC.
    pub created_at: String,
    /// Module size in bytes.
    pub size: u64,
}

/// A function and its whole history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionRecord {
    /// The function's name (also its key in the store).
    pub name: String,
    /// Every version ever pushed, ascending; never removed or changed.
    pub versions: Vec<Version>,
    /// The version served now.
    pub active: u64,
    /// Store revision of this function's last change (push, rollback, traffic).
    pub mod_revision: u64,
    /// A gray release in progress: requests shared between versions (`active` is the one
    /// with the largest share). `None`: every request goes to `active`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<TrafficSplit>,
    /// Secrets (every version's), sealed with the operator's key.
    #[serde(default, skip_serializing_if = "SealedSecrets::is_empty")]
    pub secrets: SealedSecrets,
}

/// What a node serves for one function: everything it needs, nothing else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// The function's name.
    pub name: String,
    /// The active version number.
    pub version: u64,
    /// SHA-256 of the module to fetch from `/v1/blobs/{sha256}` (and to verify).
    pub sha256: String,
    /// Routes, env and limits of that version.
    pub manifest: Manifest,
    /// The function's traffic split, when it has one: every version in it (the active one
    /// too), each to prepare before the split takes effect on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic: Option<DeployedSplit>,
    /// The function's secrets, sealed: opened by the node when it prepares the version.
    #[serde(default, skip_serializing_if = "SealedSecrets::is_empty")]
    pub secrets: SealedSecrets,
}

/// A traffic split as nodes serve it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployedSplit {
    /// Newest version first, as [`crate::traffic::choose`] takes them.
    pub versions: Vec<SplitVersion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<StickyKey>,
}

/// One version of a split: its share, and what a node needs to serve it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitVersion {
    pub version: u64,
    pub percent: u8,
    pub sha256: String,
    pub manifest: Manifest,
}

impl FunctionRecord {
    /// The version with this number.
    pub fn version(&self, version: u64) -> Option<&Version> {
        self.versions.iter().find(|v| v.version == version)
    }

    /// The active version (always present in a record from the store).
    pub fn active_version(&self) -> Option<&Version> {
        self.version(self.active)
    }

    /// The highest version number, 0 if none.
    pub fn latest(&self) -> u64 {
        self.versions.iter().map(|v| v.version).max().unwrap_or(0)
    }

    /// What a node should serve for this function now.
    pub fn deployment(&self) -> Option<Deployment> {
        let traffic = self.traffic.as_ref().map(|split| DeployedSplit {
            versions: split
                .shares
                .iter()
                .filter_map(|share| {
                    self.version(share.version).map(|v| SplitVersion {
                        version: v.version,
                        percent: share.percent,
                        sha256: v.sha256.clone(),
                        manifest: v.manifest.clone(),
                    })
                })
                .collect(),
            sticky: split.sticky.clone(),
        });
        self.active_version().map(|v| Deployment {
            name: self.name.clone(),
            version: v.version,
            sha256: v.sha256.clone(),
            manifest: v.manifest.clone(),
            traffic,
            secrets: self.secrets.clone(),
        })
    }
}
