//! atoll-ingress: how requests reach a node, and nothing of what answers them.
//!
//! - [`activity`]: what a connection is doing, for the idle and header timeouts.

pub mod activity;
