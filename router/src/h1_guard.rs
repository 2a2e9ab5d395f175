//! Strict HTTP/1.1 framing in front of hyper: refuses what could smuggle.
//!
//! STUB: passes bytes through; the real validator replaces it.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size limits on a request head.
#[derive(Debug, Clone, Copy)]
pub struct H1Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
}

/// Why a request was refused: the status and a short reason for the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: StatusCode,
    pub reason: &'static str,
}

/// What the guard found on one connection, shared with the connection's service.
#[derive(Debug, Default)]
pub struct GuardState {
    rejection: Mutex<Option<(u64, Rejection)>>,
}

impl GuardState {
    pub fn new() -> Arc<Self> {
        Arc::new(GuardState::default())
    }

    /// The rejection recorded for the `request_index`-th request (0-based) of the connection.
    pub fn rejection_for(&self, request_index: u64) -> Option<Rejection> {
        let rejection = self.rejection.lock().expect("guard state lock");
        rejection
            .as_ref()
            .filter(|(index, _)| *index == request_index)
            .map(|(_, rejection)| rejection.clone())
    }
}

/// An I/O stream that validates HTTP/1.1 requests on their way to hyper.
pub struct GuardedIo<S> {
    inner: S,
    #[allow(dead_code)]
    limits: H1Limits,
    #[allow(dead_code)]
    state: Arc<GuardState>,
}

impl<S> GuardedIo<S> {
    pub fn new(inner: S, limits: H1Limits, state: Arc<GuardState>) -> Self {
        GuardedIo { inner, limits, state }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for GuardedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GuardedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
