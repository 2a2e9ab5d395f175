//! atoll-ingress: how requests reach a node, and nothing of what answers them.
//!
//! ```text
//! TCP (h1 / h2c) ─┐                                    ┌─ h1_guard: strict HTTP/1.1 framing
//! TLS (h2 / h1) ──┼▶ server::serve_with ──────────────┤  421 (server::misdirected), Alt-Svc
//! QUIC (h3) ──────┴▶ quic::serve_quic                  └─▶ Handler::handle ─▶ Response<Handler::Body>
//!                      ▲ tls::Certificates (SNI: --certs DIR, acme::run fed the hosts to cover)
//! ```
//!
//! The node (atoll-router) hands these listeners a [`server::Handler`]; this crate knows no
//! functions, routes, registries, clusters or isolates, and depends on atoll-core alone.
//!
//! - [`server`]: TCP and TLS accept loops with the edge's limits and graceful shutdown, the
//!   [`server::Handler`] trait and its body ([`server::HandlerBody`]), the one 421 check.
//! - [`h1_guard`]: strict HTTP/1.1 framing in front of hyper; [`quic`]: HTTP/3.
//! - [`tls`]: certificates by SNI; [`acme`]: obtaining and renewing them.
//! - [`activity`]: what a connection is doing, for the idle and header timeouts (the
//!   registry's API uses it too).

pub mod acme;
pub mod activity;
pub mod h1_guard;
pub mod quic;
pub mod server;
pub mod tls;
pub mod workers;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod test_body;
