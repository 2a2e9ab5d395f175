//! The HTTP/3 frame length limit.
//!
//! h3 0.0.8 reads a frame other than DATA into memory until it is complete, whatever length
//! its header declares. The wrappers here sit between h3 and h3-quinn, watch the frame
//! headers going by on every framed stream the client opens (requests and the control stream)
//! and refuse a frame that declares more than the limit, before its payload arrives.

use std::task::{Context, Poll};

use bytes::Bytes;
use h3::quic::{self as h3_quic, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};

use crate::server::ServerLimits;

/// The longest frame other than DATA a client may send: room for a header section twice
/// the `max_header_bytes` limit (so a section a little over it still gets h3's 431), and
/// never under 64 KiB.
pub fn max_frame_bytes(limits: &ServerLimits) -> u64 {
    (2 * limits.max_header_bytes as u64).max(64 * 1024)
}

/// HTTP/3 frame type of DATA (RFC 9114 §7.2.1), the one frame h3 streams.
const DATA_FRAME: u64 = 0x0;
/// Unidirectional stream type of the control stream (RFC 9114 §6.2.1).
const CONTROL_STREAM: u64 = 0x0;

/// A frame refused by [`FrameLimit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("HTTP/3 frame of type {frame_type:#x} declares {length} bytes, over the {max} byte limit")]
pub struct FrameTooLarge {
    pub frame_type: u64,
    pub length: u64,
    pub max: u64,
}

/// Where a [`FrameLimit`] is in its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FramePosition {
    /// A unidirectional stream's first bytes: its type (only the control stream is framed).
    StreamType { head: [u8; 8], filled: usize },
    /// A frame's type and length varints.
    FrameHead { head: [u8; 16], filled: usize },
    /// Inside a frame's payload.
    Payload { remaining: u64 },
    /// Not framed (QPACK and unknown unidirectional streams): nothing to watch.
    Unframed,
    /// A frame was refused; the stream is done.
    Refused(FrameTooLarge),
}

/// Sans-IO watcher of the HTTP/3 frame headers on one receive stream: fed the bytes as they
/// arrive, it refuses a frame other than DATA whose declared length is over the limit.
#[derive(Debug, Clone)]
pub struct FrameLimit {
    max: u64,
    position: FramePosition,
}

impl FrameLimit {
    /// For a request stream: frames from the first byte.
    pub fn request_stream(max: u64) -> FrameLimit {
        FrameLimit {
            max,
            position: FramePosition::FrameHead {
                head: [0; 16],
                filled: 0,
            },
        }
    }

    /// For a unidirectional stream: a stream type, then frames if it is the control stream.
    pub fn unidirectional_stream(max: u64) -> FrameLimit {
        FrameLimit {
            max,
            position: FramePosition::StreamType {
                head: [0; 8],
                filled: 0,
            },
        }
    }

    /// Follows `bytes`, the stream's next bytes.
    pub fn observe(&mut self, mut bytes: &[u8]) -> Result<(), FrameTooLarge> {
        while let Some((&byte, rest)) = bytes.split_first() {
            match &mut self.position {
                FramePosition::Unframed => return Ok(()),
                FramePosition::Refused(refused) => return Err(*refused),
                FramePosition::Payload { remaining } => {
                    let skipped = (*remaining).min(bytes.len() as u64);
                    *remaining -= skipped;
                    bytes = &bytes[skipped as usize..];
                    if *remaining == 0 {
                        self.position = FramePosition::FrameHead {
                            head: [0; 16],
                            filled: 0,
                        };
                    }
                    continue;
                }
                FramePosition::StreamType { head, filled } => {
                    head[*filled] = byte;
                    *filled += 1;
                    if let Some((stream_type, _)) = varint(&head[..*filled]) {
                        self.position = if stream_type == CONTROL_STREAM {
                            FramePosition::FrameHead {
                                head: [0; 16],
                                filled: 0,
                            }
                        } else {
                            FramePosition::Unframed
                        };
                    }
                }
                FramePosition::FrameHead { head, filled } => {
                    head[*filled] = byte;
                    *filled += 1;
                    let parsed = varint(&head[..*filled])
                        .and_then(|(frame_type, used)| Some((frame_type, varint(&head[used..*filled])?.0)));
                    if let Some((frame_type, length)) = parsed {
                        self.position = if frame_type != DATA_FRAME && length > self.max {
                            FramePosition::Refused(FrameTooLarge {
                                frame_type,
                                length,
                                max: self.max,
                            })
                        } else if length == 0 {
                            FramePosition::FrameHead {
                                head: [0; 16],
                                filled: 0,
                            }
                        } else {
                            FramePosition::Payload { remaining: length }
                        };
                        if let FramePosition::Refused(refused) = self.position {
                            return Err(refused);
                        }
                    }
                }
            }
            bytes = rest;
        }
        Ok(())
    }
}

/// A QUIC variable-length integer at the start of `bytes` and its encoded length, if complete
/// (RFC 9000 §16).
fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let first = *bytes.first()?;
    let length = 1usize << (first >> 6);
    let encoded = bytes.get(..length)?;
    let value = encoded[1..].iter().fold(u64::from(first & 0x3f), |value, &byte| {
        (value << 8) | u64::from(byte)
    });
    Some((value, length))
}

/// h3-quinn's connection, with every stream the client opens watched by a [`FrameLimit`].
pub struct GuardedConnection {
    inner: h3_quinn::Connection,
    opener: GuardedOpener,
}

impl GuardedConnection {
    pub(super) fn new(inner: h3_quinn::Connection, max_frame: u64) -> Self {
        let opener = GuardedOpener {
            inner: h3_quic::Connection::<Bytes>::opener(&inner),
            max_frame,
        };
        GuardedConnection { inner, opener }
    }
}

impl h3_quic::Connection<Bytes> for GuardedConnection {
    type RecvStream = GuardedRecv;
    type OpenStreams = GuardedOpener;

    fn poll_accept_recv(
        &mut self,
        context: &mut Context<'_>,
    ) -> Poll<Result<GuardedRecv, ConnectionErrorIncoming>> {
        let accepted = h3_quic::Connection::<Bytes>::poll_accept_recv(&mut self.inner, context);
        accepted.map_ok(|stream| GuardedRecv {
            inner: stream,
            limit: FrameLimit::unidirectional_stream(self.opener.max_frame),
        })
    }

    fn poll_accept_bidi(
        &mut self,
        context: &mut Context<'_>,
    ) -> Poll<Result<GuardedBidi, ConnectionErrorIncoming>> {
        let accepted = h3_quic::Connection::<Bytes>::poll_accept_bidi(&mut self.inner, context);
        accepted.map_ok(|stream| GuardedBidi::new(stream, self.opener.max_frame))
    }

    fn opener(&self) -> GuardedOpener {
        self.opener.clone()
    }
}

impl h3_quic::OpenStreams<Bytes> for GuardedConnection {
    type BidiStream = GuardedBidi;
    type SendStream = h3_quinn::SendStream<Bytes>;

    fn poll_open_bidi(
        &mut self,
        context: &mut Context<'_>,
    ) -> Poll<Result<GuardedBidi, StreamErrorIncoming>> {
        self.opener.poll_open_bidi(context)
    }

    fn poll_open_send(
        &mut self,
        context: &mut Context<'_>,
    ) -> Poll<Result<h3_quinn::SendStream<Bytes>, StreamErrorIncoming>> {
        self.opener.poll_open_send(context)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        self.opener.close(code, reason);
    }
}

/// Opens streams on a [`GuardedConnection`].
#[derive(Clone)]
pub struct GuardedOpener {
    inner: h3_quinn::OpenStreams,
    max_frame: u64,
}

impl h3_quic::OpenStreams<Bytes> for GuardedOpener {
    type BidiStream = GuardedBidi;
    type SendStream = h3_quinn::SendStream<Bytes>;

    fn poll_open_bidi(
        &mut self,
        context: &mut Context<'_>,
    ) -> Poll<Result<GuardedBidi, StreamErrorIncoming>> {
        let opened = h3_quic::OpenStreams::<Bytes>::poll_open_bidi(&mut self.inner, context);
        opened.map_ok(|stream| GuardedBidi::new(stream, self.max_frame))
    }

    fn poll_open_send(
        &mut self,
        context: &mut Context<'_>,
    ) -> Poll<Result<h3_quinn::SendStream<Bytes>, StreamErrorIncoming>> {
        h3_quic::OpenStreams::<Bytes>::poll_open_send(&mut self.inner, context)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        h3_quic::OpenStreams::<Bytes>::close(&mut self.inner, code, reason);
    }
}

/// A request stream whose receive side is watched.
pub struct GuardedBidi {
    send: h3_quinn::SendStream<Bytes>,
    recv: GuardedRecv,
}

impl GuardedBidi {
    fn new(stream: h3_quinn::BidiStream<Bytes>, max_frame: u64) -> Self {
        let (send, recv) = h3_quic::BidiStream::split(stream);
        GuardedBidi {
            send,
            recv: GuardedRecv {
                inner: recv,
                limit: FrameLimit::request_stream(max_frame),
            },
        }
    }
}

impl h3_quic::BidiStream<Bytes> for GuardedBidi {
    type SendStream = h3_quinn::SendStream<Bytes>;
    type RecvStream = GuardedRecv;

    fn split(self) -> (Self::SendStream, Self::RecvStream) {
        (self.send, self.recv)
    }
}

impl h3_quic::RecvStream for GuardedBidi {
    type Buf = Bytes;

    fn poll_data(&mut self, context: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        let polled = self.recv.poll_data(context);
        if matches!(self.recv.limit.position, FramePosition::Refused(_)) {
            // Still reading the request head: there will be no response either.
            h3_quic::SendStream::<Bytes>::reset(&mut self.send, EXCESSIVE_LOAD);
        }
        polled
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.recv.stop_sending(error_code);
    }

    fn recv_id(&self) -> StreamId {
        self.recv.recv_id()
    }
}

impl h3_quic::SendStream<Bytes> for GuardedBidi {
    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_ready(context)
    }

    fn send_data<T: Into<WriteBuf<Bytes>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.send.send_data(data)
    }

    fn poll_finish(&mut self, context: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.send.poll_finish(context)
    }

    fn reset(&mut self, reset_code: u64) {
        self.send.reset(reset_code);
    }

    fn send_id(&self) -> StreamId {
        self.send.send_id()
    }
}

/// `H3_EXCESSIVE_LOAD`: what a stream that sent a frame over the limit is stopped with.
const EXCESSIVE_LOAD: u64 = 0x107;

/// h3-quinn's receive stream, watched by a [`FrameLimit`].
pub struct GuardedRecv {
    inner: h3_quinn::RecvStream,
    limit: FrameLimit,
}

impl h3_quic::RecvStream for GuardedRecv {
    type Buf = Bytes;

    fn poll_data(&mut self, context: &mut Context<'_>) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        if let FramePosition::Refused(refused) = self.limit.position {
            return Poll::Ready(Err(StreamErrorIncoming::Unknown(Box::new(refused))));
        }
        let polled = self.inner.poll_data(context);
        if let Poll::Ready(Ok(Some(bytes))) = &polled
            && let Err(refused) = self.limit.observe(bytes)
        {
            tracing::debug!(stream = %self.inner.recv_id(), %refused, "HTTP/3 stream stopped");
            self.inner.stop_sending(EXCESSIVE_LOAD);
            return Poll::Ready(Err(StreamErrorIncoming::Unknown(Box::new(refused))));
        }
        polled
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.inner.stop_sending(error_code);
    }

    fn recv_id(&self) -> StreamId {
        self.inner.recv_id()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame header: type and length as QUIC varints.
    fn frame_head(frame_type: u64, length: u64) -> Vec<u8> {
        let mut bytes = Vec::new();
        for value in [frame_type, length] {
            match value {
                0..=0x3f => bytes.push(value as u8),
                0x40..=0x3fff => bytes.extend_from_slice(&(0x4000 | value as u16).to_be_bytes()),
                0x4000..=0x3fff_ffff => bytes.extend_from_slice(&(0x8000_0000 | value as u32).to_be_bytes()),
                _ => bytes.extend_from_slice(&(0xc000_0000_0000_0000 | value).to_be_bytes()),
            }
        }
        bytes
    }

    #[test]
    fn the_frame_limit_lets_requests_through_and_refuses_huge_headers() {
        const HEADERS: u64 = 0x1;
        let max = 1000;
        // HEADERS within the limit, a big DATA frame, an unknown (grease) frame, trailers:
        // fed in every chunking from one byte at a time to all at once.
        let mut stream = frame_head(HEADERS, 900);
        stream.extend(vec![7; 900]);
        stream.extend(frame_head(DATA_FRAME, 1 << 20));
        stream.extend(vec![0; 1 << 20]);
        stream.extend(frame_head(0x21, 3));
        stream.extend([1, 2, 3]);
        stream.extend(frame_head(HEADERS, 0));
        for chunk in [1, 2, 3, 7, 1500, stream.len()] {
            let mut limit = FrameLimit::request_stream(max);
            for piece in stream.chunks(chunk) {
                assert_eq!(limit.observe(piece), Ok(()), "chunks of {chunk}");
            }
        }

        let refused = FrameTooLarge {
            frame_type: HEADERS,
            length: 1 << 40,
            max,
        };
        let mut limit = FrameLimit::request_stream(max);
        let huge = frame_head(HEADERS, 1 << 40);
        assert_eq!(
            limit.observe(&huge[..3]),
            Ok(()),
            "the length is not complete yet"
        );
        assert_eq!(limit.observe(&huge[3..]), Err(refused));
        assert_eq!(limit.observe(&[0; 10]), Err(refused), "stays refused");

        let mut limit = FrameLimit::request_stream(max);
        assert!(
            limit.observe(&frame_head(0x21, max + 1)).is_err(),
            "unknown frames too"
        );
    }

    #[test]
    fn the_frame_limit_watches_the_control_stream_only() {
        let max = 100;
        let mut control = FrameLimit::unidirectional_stream(max);
        let mut bytes = vec![CONTROL_STREAM as u8];
        bytes.extend(frame_head(0x4, 6)); // SETTINGS
        bytes.extend([1, 0, 6, 0x44, 0, 0]);
        assert_eq!(control.observe(&bytes), Ok(()));
        assert!(control.observe(&frame_head(0x21, 101)).is_err());

        // A QPACK encoder stream (type 2) carries instructions, not frames.
        let mut encoder = FrameLimit::unidirectional_stream(max);
        assert_eq!(encoder.observe(&[0x02, 0xff, 0xff, 0xff, 0xff]), Ok(()));
        // A two-byte stream type split across reads.
        let mut grease = FrameLimit::unidirectional_stream(max);
        assert_eq!(grease.observe(&[0x40]), Ok(()));
        assert_eq!(grease.observe(&[0x21, 0x01, 0xff, 0xff]), Ok(()));
    }
}
