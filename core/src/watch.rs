//! The watch stream's event type: what `GET /v1/watch?since=N` sends, one JSON object per
//! line (NDJSON), and what nodes consume.
//!
//! The protocol is "list-watch" as in Kubernetes and etcd, without compaction: every
//! mutation bumps the store's global `revision` and stamps the changed function's
//! `mod_revision`. A watch first replays a [`WatchEvent::Put`] for every function with
//! `mod_revision > since` (all of them for `since = 0`), in revision order, then a
//! [`WatchEvent::Synced`] carrying the current revision — from then on the node holds the
//! full picture — and then streams new `Put`s as mutations commit. Several changes to one
//! function between two wake-ups coalesce into one `Put` of its latest state, which is all
//! a node needs. When idle, a [`WatchEvent::Heartbeat`] every few seconds lets the node
//! tell a quiet registry from a dead connection. A node that reconnects resumes with
//! `since` = the last revision it applied, and misses nothing.

use serde::{Deserialize, Serialize};

use crate::model::Deployment;

/// Longest watch line accepted (a deployment is a few KiB of JSON; the manifest's ceilings
/// keep the largest one far below this, see `manifest::tests`).
pub const MAX_LINE: usize = 16 << 20;

/// One line of the watch stream. Serialised with a `type` tag:
/// `{"type":"put","revision":3,"deployment":{…}}`, `{"type":"synced","revision":3}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
// `Put` is by far the common event and is consumed right away; boxing it would only add an
// allocation per event.
#[allow(clippy::large_enum_variant)]
pub enum WatchEvent {
    /// The function is (now) served at this deployment; `revision` is its `mod_revision`.
    Put {
        /// Revision of the change.
        revision: u64,
        /// What to serve.
        deployment: Deployment,
    },
    /// The function is gone (modelled for deletion; the API does not delete yet).
    Delete {
        /// Revision of the change.
        revision: u64,
        /// The function that was removed.
        name: String,
    },
    /// The initial catch-up is complete: the node has the full picture as of `revision`.
    Synced {
        /// The store's revision at the time of the catch-up.
        revision: u64,
    },
    /// Nothing happened for a while; the connection is alive.
    Heartbeat {
        /// The latest revision the stream has covered.
        revision: u64,
    },
}

impl WatchEvent {
    /// The revision carried by any event.
    pub fn revision(&self) -> u64 {
        match self {
            WatchEvent::Put { revision, .. }
            | WatchEvent::Delete { revision, .. }
            | WatchEvent::Synced { revision }
            | WatchEvent::Heartbeat { revision } => *revision,
        }
    }

    /// The event as one NDJSON line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        // Serialising these plain structs cannot fail.
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let e = WatchEvent::Synced { revision: 7 };
        assert_eq!(e.to_line(), b"{\"type\":\"synced\",\"revision\":7}\n");
        let e = WatchEvent::Delete {
            revision: 2,
            name: "a".into(),
        };
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(json, r#"{"type":"delete","revision":2,"name":"a"}"#);
        assert_eq!(serde_json::from_str::<WatchEvent>(&json).unwrap(), e);
        assert_eq!(e.revision(), 2);
    }
}
