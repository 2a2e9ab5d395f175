//! A [`HandlerBody`] for the listeners' own tests, which have no function to stream from:
//! whole, or streamed from a channel the test writes to (its length unknown up front).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

use crate::server::{BoxError, HandlerBody};

pub(crate) enum TestBody {
    Whole(Option<Bytes>),
    /// Chunks as the test sends them; ends when the sender is dropped.
    Streamed(mpsc::Receiver<Bytes>),
    /// A streamed body and what must live as long as it does.
    Held {
        body: Box<TestBody>,
        _guard: Box<dyn Send + Sync>,
    },
}

impl TestBody {
    /// A streamed body and the sender of its chunks.
    pub(crate) fn streamed() -> (mpsc::Sender<Bytes>, TestBody) {
        let (sender, receiver) = mpsc::channel(16);
        (sender, TestBody::Streamed(receiver))
    }
}

impl HandlerBody for TestBody {
    fn whole(bytes: Bytes) -> Self {
        TestBody::Whole(Some(bytes))
    }

    fn empty() -> Self {
        TestBody::Whole(None)
    }

    fn holding(self, guard: impl Send + Sync + 'static) -> Self {
        match self {
            TestBody::Whole(_) => self,
            streamed => TestBody::Held {
                body: Box::new(streamed),
                _guard: Box::new(guard),
            },
        }
    }
}

impl Body for TestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            TestBody::Whole(bytes) => {
                Poll::Ready(bytes.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b))))
            }
            TestBody::Streamed(receiver) => receiver
                .poll_recv(context)
                .map(|chunk| chunk.map(|chunk| Ok(Frame::data(chunk)))),
            TestBody::Held { body, .. } => Pin::new(body.as_mut()).poll_frame(context),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            TestBody::Whole(bytes) => bytes.as_ref().is_none_or(Bytes::is_empty),
            TestBody::Streamed(_) => false,
            TestBody::Held { body, .. } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            TestBody::Whole(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            TestBody::Streamed(_) => SizeHint::default(),
            TestBody::Held { body, .. } => body.size_hint(),
        }
    }
}
