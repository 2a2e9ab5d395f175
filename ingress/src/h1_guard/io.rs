//! The I/O half of the guard: [`GuardedIo`] sits between the socket and hyper, feeds what
//! it reads to an [`H1Validator`] and hands hyper only the bytes the validator released.
//! A refused head becomes [`SYNTHETIC_REQUEST`] and a refused chunked body a failed read;
//! either way the verdict is recorded in the connection's [`GuardState`], where the
//! service finds it ([`GuardState::rejection_for`]). So is an upgrade request, after whose
//! head reads go straight through ([`GuardState::upgrade_requested`]). It also times the
//! request heads (the header timeout hyper cannot apply to bytes it never sees).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::validator::{H1Limits, H1Validator, Rejection, Stage, Violation};

/// What the guard found on one connection, shared with the connection's service.
///
/// A connection is refused at most once (it closes after), and asks to upgrade at most once
/// (the guard checks nothing after), so these are write-once cells: the per-request checks
/// are an atomic load each.
#[derive(Debug, Default)]
pub struct GuardState {
    rejection: OnceLock<(u64, Rejection)>,
    upgrade: OnceLock<u64>,
}

impl GuardState {
    pub fn new() -> Arc<Self> {
        Arc::new(GuardState::default())
    }

    /// The rejection recorded for the `request_index`-th request (0-based) of the connection.
    pub fn rejection_for(&self, request_index: u64) -> Option<Rejection> {
        self.rejection
            .get()
            .filter(|(index, _)| *index == request_index)
            .map(|(_, rejection)| rejection.clone())
    }

    /// Records that the `request_index`-th request is refused; the first record wins.
    pub fn record(&self, request_index: u64, rejection: Rejection) {
        let _ = self.rejection.set((request_index, rejection));
    }

    /// Whether the `request_index`-th request asked to upgrade the connection, so that the
    /// guard passes every byte after its head through unchecked. Only a 101 may answer it
    /// and keep the connection: after any other answer the connection must close (the
    /// service sets `Connection: close`), since the next request would not be checked.
    pub fn upgrade_requested(&self, request_index: u64) -> bool {
        self.upgrade.get() == Some(&request_index)
    }

    /// Records that the `request_index`-th request asked to upgrade; the first record wins.
    pub fn record_upgrade(&self, request_index: u64) {
        let _ = self.upgrade.set(request_index);
    }
}

/// The request hyper is handed in place of a refused head: minimal, valid, and closing.
pub const SYNTHETIC_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: rejected.invalid\r\nconnection: close\r\n\r\n";

/// How the read side of a [`GuardedIo`] behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadMode {
    /// Checking HTTP/1 framing.
    Validating,
    /// HTTP/2 prior knowledge, or after an upgrade request's head: reads go straight
    /// through.
    Passthrough,
    /// A chunked body was refused: the next read fails, so hyper fails the body.
    FailBody(&'static str),
    /// Refused: the reader has what it needs; reads discard what the client still sends.
    Draining,
    /// Refused and the client finished sending: reads stay pending until hyper closes.
    Silent,
    /// Ended by the guard (header timeout before any byte): reads return end of stream.
    Ended,
}

/// Bytes read per read call when bytes are held back.
const READ_CHUNK: usize = 8 * 1024;
/// Reads a drain makes before yielding.
const DRAIN_ROUNDS: usize = 16;

/// An I/O stream that validates HTTP/1.1 requests on their way to hyper.
pub struct GuardedIo<S> {
    inner: S,
    validator: H1Validator,
    state: Arc<GuardState>,
    /// Bytes read but not yet handed on, in `buffer[start..end]`: `[start..released]` may go,
    /// `[released..end]` is held back. `buffer[end..]` is spare room (kept initialised).
    buffer: Vec<u8>,
    start: usize,
    released: usize,
    end: usize,
    mode: ReadMode,
    header_timeout: Option<Duration>,
    /// When the time for the current head started counting: the connection's start for the
    /// first head, the first byte of any later one; `None` when no head is being awaited
    /// (the connection's idle timeout covers the gaps between requests).
    head_clock: Option<Instant>,
    head_timer: Option<Pin<Box<Sleep>>>,
}

impl<S> GuardedIo<S> {
    pub fn new(inner: S, limits: H1Limits, state: Arc<GuardState>) -> Self {
        GuardedIo {
            inner,
            validator: H1Validator::new(limits),
            state,
            buffer: Vec::new(),
            start: 0,
            released: 0,
            end: 0,
            mode: ReadMode::Validating,
            header_timeout: None,
            head_clock: Some(Instant::now()),
            head_timer: None,
        }
    }

    /// Gives a client `timeout` to send a whole request head (the first one counted from the
    /// connection's start).
    pub fn with_header_timeout(mut self, timeout: Duration) -> Self {
        self.header_timeout = Some(timeout);
        self
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Acts on what the validator said about the bytes just fed.
    fn after_feed(&mut self, outcome: Result<(), Violation>) {
        match outcome {
            Ok(()) if self.validator.is_passthrough() => {
                self.mode = ReadMode::Passthrough;
                self.head_clock = None;
            }
            Ok(()) => {
                if let Some(index) = self.validator.upgraded_request() {
                    // Recorded before hyper is handed the head, so the service finds it.
                    tracing::trace!(index, "HTTP/1 upgrade requested; passing bytes through");
                    self.state.record_upgrade(index);
                    self.mode = ReadMode::Passthrough;
                    self.head_clock = None;
                } else if !self.validator.reading_head() {
                    self.head_clock = None;
                } else if self.validator.held() > 0 {
                    self.head_clock.get_or_insert_with(Instant::now);
                } else if self.validator.request_index() > 0 {
                    self.head_clock = None;
                }
            }
            Err(violation) => self.refuse(violation),
        }
        if self.head_clock.is_none() {
            // A registered timer would wake the connection for nothing when it expires.
            self.head_timer = None;
        }
    }

    /// Records `violation` and arranges what hyper reads next.
    fn refuse(&mut self, violation: Violation) {
        tracing::debug!(
            index = violation.request_index,
            status = %violation.rejection.status,
            reason = violation.rejection.reason,
            "HTTP/1 request refused"
        );
        self.state
            .record(violation.request_index, violation.rejection.clone());
        self.head_clock = None;
        // The held bytes belong to the refused request: drop them.
        self.end = self.released;
        match violation.stage {
            Stage::Head => {
                self.append(SYNTHETIC_REQUEST);
                self.released = self.end;
                self.mode = ReadMode::Draining;
            }
            Stage::Body => self.mode = ReadMode::FailBody(violation.rejection.reason),
        }
    }

    /// Appends `bytes` after `buffer[..end]`.
    fn append(&mut self, bytes: &[u8]) {
        self.make_room(bytes.len());
        self.buffer[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Ensures `buffer[end..]` has at least `room` bytes, moving unread bytes to the front.
    fn make_room(&mut self, room: usize) {
        if self.start > 0 {
            self.buffer.copy_within(self.start..self.end, 0);
            self.released -= self.start;
            self.end -= self.start;
            self.start = 0;
        }
        if self.buffer.len() < self.end + room {
            self.buffer.resize(self.end + room, 0);
        }
    }

    /// Whether the header timeout has passed for the head being awaited; if so the mode or
    /// the buffer changed and the read should be retried.
    fn head_timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        let (Some(timeout), Some(started)) = (self.header_timeout, self.head_clock) else {
            return false;
        };
        let deadline = started + timeout;
        let timer = self
            .head_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        self.head_clock = None;
        match self.validator.time_out() {
            Some(violation) => self.refuse(violation),
            None => self.mode = ReadMode::Ended,
        }
        true
    }
}

impl<S: AsyncRead + Unpin> GuardedIo<S> {
    /// Reads and discards what the client still sends after a refusal, so the socket is
    /// empty when it closes (a close with unread bytes sends a reset, which can destroy the
    /// response on its way). Never returns bytes.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut scratch = [0u8; 2048];
        for _ in 0..DRAIN_ROUNDS {
            let mut discard = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut discard) {
                Poll::Ready(Ok(())) if discard.filled().is_empty() => {
                    self.mode = ReadMode::Silent;
                    return Poll::Pending;
                }
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => {
                    self.mode = ReadMode::Silent;
                    return Poll::Pending;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for GuardedIo<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.start < this.released {
                let n = (this.released - this.start).min(buf.remaining());
                buf.put_slice(&this.buffer[this.start..this.start + n]);
                this.start += n;
                if this.start == this.end {
                    (this.start, this.released, this.end) = (0, 0, 0);
                }
                return Poll::Ready(Ok(()));
            }
            match this.mode {
                ReadMode::Validating => {}
                ReadMode::Passthrough => return Pin::new(&mut this.inner).poll_read(cx, buf),
                ReadMode::FailBody(reason) => {
                    this.mode = ReadMode::Draining;
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, reason)));
                }
                ReadMode::Draining => return this.poll_drain(cx),
                ReadMode::Silent => return Poll::Pending,
                ReadMode::Ended => return Poll::Ready(Ok(())),
            }
            if this.end == 0 {
                // Nothing held: read into the caller's buffer and check the bytes in place.
                let filled_before = buf.filled().len();
                match Pin::new(&mut this.inner).poll_read(cx, buf) {
                    Poll::Pending => {
                        if this.head_timed_out(cx) {
                            continue;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Ready(Ok(())) => {}
                }
                let fresh = &buf.filled()[filled_before..];
                if fresh.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                let fed_before = this.validator.fed();
                let outcome = this.validator.feed(fresh);
                let release = (this.validator.release_to() - fed_before) as usize;
                if release < fresh.len() {
                    if outcome.is_ok() {
                        this.append(&fresh[release..]);
                    }
                    buf.set_filled(filled_before + release);
                }
                this.after_feed(outcome);
                if release > 0 {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // Bytes are held back: read after them, then check the new bytes.
            this.make_room(READ_CHUNK);
            let old_end = this.end;
            let mut spare = ReadBuf::new(&mut this.buffer[old_end..]);
            let polled = Pin::new(&mut this.inner).poll_read(cx, &mut spare);
            let read = spare.filled().len();
            match polled {
                Poll::Pending => {
                    if this.head_timed_out(cx) {
                        continue;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Ready(Ok(())) => {}
            }
            if read == 0 {
                // End of stream inside a head or framing line: the reader never sees it.
                (this.start, this.released, this.end) = (0, 0, 0);
                return Poll::Ready(Ok(()));
            }
            this.end += read;
            let outcome = this.validator.feed(&this.buffer[old_end..this.end]);
            this.released = this.end - this.validator.held() as usize;
            this.after_feed(outcome);
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for GuardedIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.mode == ReadMode::Draining {
            // Last chance to empty the socket before the close (hyper stops reading after a
            // failed body).
            let _ = self.poll_drain(cx);
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
