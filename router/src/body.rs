//! The body of every response the edge sends: whole, or streamed from a guest or a peer.
//!
//! Small answers (errors, redirects, most function responses) are whole, with an exact
//! length, so HTTP/1.1 sends `Content-Length` as before. A function response past the
//! streaming threshold ([`atoll_isolate::stream`]) and a peer's answer to a forwarded
//! request are passed on as they arrive instead of being held whole, so a node's memory per
//! response is bounded by a pipe, not by the function's response limit. A streamed body
//! that breaks (the guest trapped, the peer went away or ran past its time) ends with an
//! error: hyper then closes the HTTP/1.1 connection without the last chunk or resets the
//! HTTP/2 stream, and HTTP/3 resets its stream, so the client never takes a cut-off body
//! for a complete one.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use atoll_ingress::server::{BoxError, HandlerBody};
use atoll_isolate::BodyReader;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::cluster::ForwardInFlight;
use crate::origin_conn::LentConnection;

/// A response body: see the module documentation.
pub enum ResponseBody {
    /// All of it, taken by the first poll.
    Whole(Option<Bytes>),
    /// A guest's output, while the guest writes it.
    Function(BodyReader),
    /// A peer's answer, relayed as it arrives.
    Peer(PeerBody),
    /// An origin's answer, relayed as it arrives.
    Origin(OriginBody),
    /// A streamed body with something that must live as long as it does: the in-flight
    /// marks of the node and of the connection (so its idle timeout does not cut a long
    /// download).
    Held(Box<ResponseBody>, Box<dyn Send + Sync>),
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResponseBody::Whole(bytes) => formatter
                .debug_tuple("Whole")
                .field(&bytes.as_ref().map_or(0, Bytes::len))
                .finish(),
            ResponseBody::Function(_) => formatter.write_str("Function"),
            ResponseBody::Peer(_) => formatter.write_str("Peer"),
            ResponseBody::Origin(_) => formatter.write_str("Origin"),
            ResponseBody::Held(body, _) => formatter.debug_tuple("Held").field(body).finish(),
        }
    }
}

impl ResponseBody {
    pub fn whole(bytes: impl Into<Bytes>) -> Self {
        ResponseBody::Whole(Some(bytes.into()))
    }

    pub fn empty() -> Self {
        ResponseBody::Whole(None)
    }

    /// Whether the body goes out as it arrives (its length is not known up front).
    pub fn is_streamed(&self) -> bool {
        !matches!(self, ResponseBody::Whole(_))
    }

    /// Keeps `guard` alive until a streamed body ends (a whole one ends at once: the guard
    /// is dropped now).
    pub fn holding(self, guard: impl Send + Sync + 'static) -> Self {
        if self.is_streamed() {
            ResponseBody::Held(Box::new(self), Box::new(guard))
        } else {
            self
        }
    }
}

/// What the listeners need of it: their own small answers, an empty body, and the
/// connection's in-flight mark held while a body streams.
impl HandlerBody for ResponseBody {
    fn whole(bytes: Bytes) -> Self {
        ResponseBody::whole(bytes)
    }

    fn empty() -> Self {
        ResponseBody::empty()
    }

    fn holding(self, guard: impl Send + Sync + 'static) -> Self {
        ResponseBody::holding(self, guard)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Whole(bytes) => {
                Poll::Ready(bytes.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b))))
            }
            ResponseBody::Function(reader) => reader
                .poll_chunk(context)
                .map(|chunk| chunk.map(|chunk| chunk.map(Frame::data).map_err(BoxError::from))),
            ResponseBody::Peer(peer) => peer.poll(context),
            ResponseBody::Origin(body) => body.poll(context),
            ResponseBody::Held(body, _) => Pin::new(body.as_mut()).poll_frame(context),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Whole(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            ResponseBody::Function(reader) => reader.is_end_stream(),
            ResponseBody::Peer(peer) => peer.body.is_end_stream(),
            ResponseBody::Origin(origin) => origin.body.is_end_stream(),
            ResponseBody::Held(body, _) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Whole(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            ResponseBody::Function(_) => SizeHint::default(),
            ResponseBody::Peer(peer) => peer.body.size_hint(),
            ResponseBody::Origin(origin) => origin.body.size_hint(),
            ResponseBody::Held(body, _) => body.size_hint(),
        }
    }
}

/// An origin's response body, relayed as it comes, ended with an error when the origin
/// sends nothing for `idle` (a stalled origin must not hold the client's connection and
/// its own forever). It drives the connection its data comes over while it is read
/// ([`LentConnection`]), which goes back to the origin's idle connections when the body
/// ends, and is closed when the body is dropped before that.
pub struct OriginBody {
    body: Incoming,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    connection: Option<LentConnection>,
}

impl OriginBody {
    pub fn new(body: Incoming, idle: Duration, connection: Option<LentConnection>) -> Self {
        OriginBody {
            body,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            connection,
        }
    }

    fn poll(&mut self, context: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(context);
        if let Poll::Pending = polled
            && let Some(connection) = &mut self.connection
            && connection.poll_ended(context)
        {
            // The connection ended: dropped, so the body learns how (its next poll).
            self.connection = None;
            context.waker().wake_by_ref();
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                let next = tokio::time::Instant::now() + self.idle;
                self.timer.as_mut().reset(next);
                // Trailers come last: hyper's servers read nothing after them.
                if frame.is_trailers() || self.body.is_end_stream() {
                    self.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                self.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(error))) => {
                self.connection = None;
                Poll::Ready(Some(Err(BoxError::from(error))))
            }
            Poll::Pending => match self.timer.as_mut().poll(context) {
                Poll::Ready(()) => Poll::Ready(Some(Err(BoxError::from(format!(
                    "the origin sent nothing for {} s",
                    self.idle.as_secs()
                ))))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    /// The body is all read: its connection may serve another request.
    fn finish(&mut self) {
        if let Some(connection) = self.connection.take() {
            connection.release();
        }
    }
}

/// A peer's response body, relayed up to a size limit and a deadline.
pub struct PeerBody {
    body: Incoming,
    remaining: usize,
    limit: usize,
    deadline: Pin<Box<tokio::time::Sleep>>,
    time_limit: Duration,
    /// The forward, in flight at the peer until the body ends.
    forward: Option<ForwardInFlight>,
}

impl PeerBody {
    /// Relays `body` while it stays within `limit` bytes and arrives within `time_limit`;
    /// `forward` is settled when it ends (a body that breaks off counts against the peer).
    pub fn new(body: Incoming, limit: usize, time_limit: Duration, forward: ForwardInFlight) -> Self {
        PeerBody {
            body,
            remaining: limit,
            limit,
            deadline: Box::pin(tokio::time::sleep(time_limit)),
            time_limit,
            forward: Some(forward),
        }
    }

    fn poll(&mut self, context: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = self.poll_peer(context);
        let ended_well = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Err(_))) => false,
            Poll::Ready(Some(Ok(_))) | Poll::Pending => return polled,
        };
        if let Some(forward) = self.forward.take() {
            forward.settle(ended_well);
        }
        polled
    }

    fn poll_peer(&mut self, context: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.deadline.as_mut().poll(context).is_ready() {
            return Poll::Ready(Some(Err(format!(
                "the peer's answer did not end within {:?}",
                self.time_limit
            )
            .into())));
        }
        match Pin::new(&mut self.body).poll_frame(context) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if data.len() > self.remaining {
                        return Poll::Ready(Some(Err(format!(
                            "the peer's answer is over the {}-byte limit",
                            self.limit
                        )
                        .into())));
                    }
                    self.remaining -= data.len();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_whole_body_has_its_exact_length_and_ends() {
        let body = ResponseBody::whole("hello");
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        let empty = ResponseBody::empty();
        assert_eq!(empty.size_hint().exact(), Some(0));
        assert!(empty.is_end_stream());
    }

    #[tokio::test]
    async fn a_function_body_streams_and_an_aborted_one_fails() {
        let (mut writer, reader) = atoll_isolate::stream::body_pipe(1024);
        let body = ResponseBody::Function(reader);
        assert!(body.is_streamed());
        assert_eq!(body.size_hint().exact(), None);
        writer.send(Bytes::from_static(b"part"), || false).unwrap();
        writer.abort("trapped");
        assert!(body.collect().await.is_err());
    }
}
