//! The store's error, shared by both stores (embedded, NATS), the registry's API that maps
//! it to an HTTP status, and the tools that read a store.

use std::io;

/// What went wrong in the store; each variant maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such function, version or blob (404).
    #[error("{0}")]
    NotFound(String),
    /// The change clashes with the current state, e.g. a route another function serves (409).
    #[error("{0}")]
    Conflict(String),
    /// The request itself is malformed (400).
    #[error("{0}")]
    Invalid(String),
    /// Too big to store (413).
    #[error("{0}")]
    TooLarge(String),
    /// The disk failed us (500).
    #[error("store: {context}: {source}")]
    Io {
        /// What the store was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}
