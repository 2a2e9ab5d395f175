//! Response bodies too large to hold: handed to the client while the guest still writes.
//!
//! A guest's stdout is buffered up to a threshold so that small responses keep their
//! exact length (`Content-Length`) and a guest that fails before the threshold still gets
//! a clean 502/504. Past it, the CGI head is parsed, sent, and the rest of the body flows
//! through a [`body_pipe`]: a bounded queue between the guest's thread (which blocks in
//! `fd_write` while the queue is full — backpressure from a slow client) and the async
//! task serving the connection. Host memory per response is bounded by the threshold plus
//! the pipe's capacity, not by the function's response limit.
//!
//! A writer never waits past its run's stop (the deadline), and learns at once when the
//! client went away, so the guest is stopped instead of writing into nothing. A writer
//! dropped without [`BodyWriter::finish`] aborts the body: the client sees a broken
//! response (HTTP/1.1 connection closed before the last chunk, an HTTP/2 or HTTP/3 stream
//! reset), never a truncated one that looks complete.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

/// Stdout bytes kept before a response is streamed: four times the CGI header limit, so a
/// complete head always fits.
pub const DEFAULT_STREAM_THRESHOLD: usize = 256 * 1024;
/// Body bytes queued between a guest and its client before the guest waits.
pub const DEFAULT_PIPE_CAPACITY: usize = 256 * 1024;
/// How often a writer blocked on a full pipe looks at its stop condition.
const STOP_POLL: Duration = Duration::from_millis(5);
/// Longest a writer waits on a reader that takes nothing (nginx's `send_timeout`): a client
/// that stops reading gives up its instance then, not at the function's timeout.
pub const MAX_READER_STALL: Duration = Duration::from_secs(10);
/// What a queued chunk costs beyond its bytes: guests writing a byte at a time must not
/// queue a million chunks in a pipe counted by payload alone.
const CHUNK_OVERHEAD: usize = 64;

/// What a run does with stdout past `threshold` bytes: parse the head, hand it to
/// `on_start` with the body's reader, and stream the rest.
pub struct StreamingOutput {
    pub threshold: usize,
    pub capacity: usize,
    /// Send the head with an empty body and drop the rest of the output (HEAD requests).
    pub discard_body: bool,
    pub on_start: Box<dyn FnOnce(StreamedResponse) + Send>,
}

impl StreamingOutput {
    /// Streams past the default threshold, calling `on_start` when it does.
    pub fn new(on_start: impl FnOnce(StreamedResponse) + Send + 'static) -> Self {
        StreamingOutput {
            threshold: DEFAULT_STREAM_THRESHOLD,
            capacity: DEFAULT_PIPE_CAPACITY,
            discard_body: false,
            on_start: Box::new(on_start),
        }
    }
}

impl std::fmt::Debug for StreamingOutput {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("StreamingOutput")
            .field("threshold", &self.threshold)
            .field("capacity", &self.capacity)
            .finish()
    }
}

/// The head of a response whose body is still being written.
#[derive(Debug)]
pub struct StreamedResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: BodyReader,
}

/// Why a body ended without being finished.
#[derive(Debug, Clone, thiserror::Error)]
#[error("response body aborted: {0}")]
pub struct BodyAborted(pub String);

/// Why a write did not go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The reader is gone: the client disconnected or the response was dropped.
    ReaderGone,
    /// The writer's stop condition held while it waited.
    Stopped,
    /// The reader took nothing for [`MAX_READER_STALL`].
    ReaderStalled,
}

struct PipeState {
    chunks: VecDeque<Bytes>,
    /// Bytes queued, each chunk counted with [`CHUNK_OVERHEAD`].
    queued: usize,
    /// Chunks the reader has taken (its progress).
    taken: u64,
    end: Option<Result<(), BodyAborted>>,
    reader_waker: Option<Waker>,
    reader_gone: bool,
}

struct Pipe {
    state: Mutex<PipeState>,
    /// Signalled when the reader takes a chunk or goes away.
    writable: Condvar,
}

impl Pipe {
    fn lock(&self) -> std::sync::MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A bounded body queue holding at most `capacity` bytes (one chunk may be larger when the
/// queue is empty, so any write can make progress).
pub fn body_pipe(capacity: usize) -> (BodyWriter, BodyReader) {
    body_pipe_with_stall(capacity, MAX_READER_STALL)
}

/// A [`body_pipe`] whose writer gives up on a reader that takes nothing for `max_stall`.
pub fn body_pipe_with_stall(capacity: usize, max_stall: Duration) -> (BodyWriter, BodyReader) {
    let pipe = Arc::new(Pipe {
        state: Mutex::new(PipeState {
            chunks: VecDeque::new(),
            queued: 0,
            taken: 0,
            end: None,
            reader_waker: None,
            reader_gone: false,
        }),
        writable: Condvar::new(),
    });
    (
        BodyWriter {
            pipe: Arc::clone(&pipe),
            capacity,
            max_stall,
            sent: 0,
            ended: false,
        },
        BodyReader { pipe },
    )
}

/// The guest's end of a [`body_pipe`]. Blocking.
pub struct BodyWriter {
    pipe: Arc<Pipe>,
    capacity: usize,
    max_stall: Duration,
    sent: u64,
    ended: bool,
}

impl std::fmt::Debug for BodyWriter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("BodyWriter")
            .field("sent", &self.sent)
            .finish()
    }
}

impl BodyWriter {
    /// Queues `chunk`, waiting while the queue is full until the reader takes some, goes
    /// away, or `stop()` holds (checked every few milliseconds).
    pub fn send(&mut self, chunk: Bytes, stop: impl Fn() -> bool) -> Result<(), SendError> {
        if chunk.is_empty() {
            return Ok(());
        }
        let cost = chunk.len() + CHUNK_OVERHEAD;
        let mut state = self.pipe.lock();
        let mut progress = (state.taken, std::time::Instant::now());
        loop {
            if state.reader_gone {
                return Err(SendError::ReaderGone);
            }
            if state.queued == 0 || state.queued + cost <= self.capacity {
                break;
            }
            if stop() {
                return Err(SendError::Stopped);
            }
            if state.taken != progress.0 {
                progress = (state.taken, std::time::Instant::now());
            } else if progress.1.elapsed() > self.max_stall {
                return Err(SendError::ReaderStalled);
            }
            state = self
                .pipe
                .writable
                .wait_timeout(state, STOP_POLL)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
        self.sent += chunk.len() as u64;
        state.queued += cost;
        state.chunks.push_back(chunk);
        let waker = state.reader_waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Body bytes queued so far.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Ends the body: the reader sees the end once it has taken every chunk.
    pub fn finish(mut self) {
        self.end(Ok(()));
    }

    /// Ends the body as broken: the reader gets the error after the chunks already queued.
    pub fn abort(mut self, reason: impl Into<String>) {
        self.end(Err(BodyAborted(reason.into())));
    }

    fn end(&mut self, end: Result<(), BodyAborted>) {
        if self.ended {
            return;
        }
        self.ended = true;
        let mut state = self.pipe.lock();
        state.end = Some(end);
        let waker = state.reader_waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Drop for BodyWriter {
    fn drop(&mut self) {
        self.end(Err(BodyAborted(
            "the function stopped before finishing its response".into(),
        )));
    }
}

/// The connection's end of a [`body_pipe`].
pub struct BodyReader {
    pipe: Arc<Pipe>,
}

impl std::fmt::Debug for BodyReader {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("BodyReader").finish()
    }
}

impl BodyReader {
    /// The next chunk; `None` once the body finished, an error (after every queued chunk)
    /// when it was aborted.
    pub fn poll_chunk(&mut self, context: &mut Context<'_>) -> Poll<Option<Result<Bytes, BodyAborted>>> {
        let mut state = self.pipe.lock();
        if let Some(chunk) = state.chunks.pop_front() {
            state.queued -= chunk.len() + CHUNK_OVERHEAD;
            state.taken += 1;
            drop(state);
            self.pipe.writable.notify_one();
            return Poll::Ready(Some(Ok(chunk)));
        }
        match &state.end {
            Some(Ok(())) => Poll::Ready(None),
            Some(Err(aborted)) => Poll::Ready(Some(Err(aborted.clone()))),
            None => {
                let waker = context.waker();
                if !state
                    .reader_waker
                    .as_ref()
                    .is_some_and(|stored| stored.will_wake(waker))
                {
                    state.reader_waker = Some(waker.clone());
                }
                Poll::Pending
            }
        }
    }

    /// Whether the body has ended and every chunk was taken.
    pub fn is_end_stream(&self) -> bool {
        let state = self.pipe.lock();
        state.chunks.is_empty() && matches!(state.end, Some(Ok(())))
    }
}

impl Drop for BodyReader {
    fn drop(&mut self) {
        let mut state = self.pipe.lock();
        state.reader_gone = true;
        state.chunks.clear();
        state.queued = 0;
        drop(state);
        self.pipe.writable.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn chunk(length: usize) -> Bytes {
        Bytes::from(vec![7u8; length])
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_pipe_holds_the_writer_until_the_reader_takes_a_chunk() {
        let (mut writer, mut reader) = body_pipe(10);
        writer.send(chunk(6), || false).unwrap();
        let took_second = Arc::new(AtomicBool::new(false));
        let writing = {
            let took_second = Arc::clone(&took_second);
            std::thread::spawn(move || {
                writer.send(chunk(6), || false).unwrap();
                took_second.store(true, Ordering::SeqCst);
                writer.finish();
            })
        };
        // The writer cannot queue 12 bytes in a 10-byte pipe: it is still waiting.
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !took_second.load(Ordering::SeqCst),
            "the writer went past a full pipe"
        );
        let first = poll_fn(|context| reader.poll_chunk(context))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.len(), 6);
        let second = poll_fn(|context| reader.poll_chunk(context))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(second.len(), 6);
        assert!(poll_fn(|context| reader.poll_chunk(context)).await.is_none());
        assert!(reader.is_end_stream());
        writing.join().unwrap();
    }

    #[test]
    fn a_writer_learns_the_reader_is_gone_and_a_stop_ends_its_wait() {
        let (mut writer, reader) = body_pipe(4);
        writer.send(chunk(4), || false).unwrap();
        assert_eq!(writer.send(chunk(4), || true), Err(SendError::Stopped));
        drop(reader);
        assert_eq!(writer.send(chunk(1), || false), Err(SendError::ReaderGone));
    }

    #[tokio::test]
    async fn a_reader_that_takes_nothing_is_given_up_on() {
        let (mut writer, mut reader) = body_pipe_with_stall(200, Duration::from_millis(500));
        writer.send(chunk(100), || false).unwrap();
        let writing = std::thread::spawn(move || {
            // Fits once the reader takes the first chunk; then the reader takes nothing.
            let first = writer.send(chunk(100), || false);
            let started = std::time::Instant::now();
            let second = writer.send(chunk(100), || false);
            (first, second, started.elapsed())
        });
        poll_fn(|context| reader.poll_chunk(context))
            .await
            .unwrap()
            .unwrap();
        let (first, second, waited) = writing.join().unwrap();
        assert_eq!(first, Ok(()));
        assert_eq!(second, Err(SendError::ReaderStalled));
        assert!(waited >= Duration::from_millis(500), "gave up after {waited:?}");
    }

    #[test]
    fn tiny_chunks_count_with_their_overhead() {
        let (mut writer, _reader) = body_pipe(10 * (1 + CHUNK_OVERHEAD));
        for _ in 0..10 {
            writer.send(chunk(1), || false).unwrap();
        }
        // The eleventh byte would pass the capacity its overhead is counted in.
        assert_eq!(writer.send(chunk(1), || true), Err(SendError::Stopped));
    }

    #[tokio::test]
    async fn a_dropped_writer_aborts_after_what_it_queued() {
        let (mut writer, mut reader) = body_pipe(100);
        writer.send(chunk(3), || false).unwrap();
        drop(writer);
        assert_eq!(
            poll_fn(|context| reader.poll_chunk(context))
                .await
                .unwrap()
                .unwrap()
                .len(),
            3
        );
        assert!(
            poll_fn(|context| reader.poll_chunk(context))
                .await
                .unwrap()
                .is_err()
        );
        assert!(!reader.is_end_stream());
    }
}
