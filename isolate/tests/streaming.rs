//! Responses past the streaming threshold go out while the guest writes them: the head is
//! handed over first, the body flows through a bounded pipe (the guest waits for a slow
//! reader), and every way a run can end after its head — finished, trapped, the reader
//! gone, the deadline — ends the body accordingly and returns in bounded time.

mod common;

use std::future::poll_fn;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use atoll_isolate::{
    BodyAborted, BodyReader, Invocation, InvokeError, LoadedFunction, StreamedResponse, StreamingOutput,
};
use common::request;

/// The longest any case here may take before it counts as hung.
const HUNG: Duration = Duration::from_secs(30);
const BLOCK: usize = 64 * 1024;

/// A guest that writes a CGI head, then `blocks` times 64 KiB of `x` in one `fd_write`
/// each, then runs `tail`.
fn writer_guest(blocks: u32, tail: &str) -> Vec<u8> {
    let head = "Content-Type: application/octet-stream\nX-Streamed: yes\n\n";
    atoll_testkit::guests::bulk_writer(head, blocks, tail)
}

fn function(wasm: &[u8], max_response: usize) -> LoadedFunction {
    common::load(wasm, "streaming", |config| {
        config.max_response_bytes = max_response
    })
}

/// A run on its own thread, with the head (if the response streams) and the outcome.
struct Run {
    heads: mpsc::Receiver<StreamedResponse>,
    outcome: mpsc::Receiver<Result<Invocation, InvokeError>>,
    interrupt: atoll_isolate::InterruptHandle,
}

fn start(function: &LoadedFunction) -> Run {
    let ready = function.prepare().unwrap();
    let interrupt = ready.interrupt_handle();
    let (head_sender, heads) = mpsc::channel();
    let (outcome_sender, outcome) = mpsc::channel();
    std::thread::spawn(move || {
        let streaming = StreamingOutput::new(move |head| {
            let _ = head_sender.send(head);
        });
        let _ = outcome_sender.send(ready.run_streaming(&request(), Some(streaming)));
    });
    Run {
        heads,
        outcome,
        interrupt,
    }
}

impl Run {
    fn head(&self) -> StreamedResponse {
        self.heads.recv_timeout(HUNG).expect("the response streams")
    }

    fn outcome(&self) -> Result<Invocation, InvokeError> {
        self.outcome.recv_timeout(HUNG).expect("the run returns")
    }
}

/// Reads the whole body: its bytes, and the error that ended it if it was aborted.
async fn drain(reader: &mut BodyReader) -> (Vec<u8>, Option<BodyAborted>) {
    let mut body = Vec::new();
    loop {
        match poll_fn(|context| reader.poll_chunk(context)).await {
            None => return (body, None),
            Some(Ok(chunk)) => body.extend_from_slice(&chunk),
            Some(Err(aborted)) => return (body, Some(aborted)),
        }
    }
}

#[tokio::test]
async fn a_large_response_is_streamed_while_the_guest_writes_it() {
    // 16 MiB of body against a 256 KiB threshold and pipe: it cannot all be buffered.
    let blocks = 256;
    let function = function(&writer_guest(blocks, ""), 32 << 20);
    let run = start(&function);
    let mut head = run.head();
    assert_eq!(head.status, 200);
    assert_eq!(head.headers["x-streamed"], "yes");
    assert_eq!(head.headers["content-type"], "application/octet-stream");
    // The pipe is bounded: the guest is held until the reader takes the body (given time
    // to finish if it were not).
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        run.outcome.try_recv().is_err(),
        "the guest finished 16 MiB before any of it was read"
    );
    let (body, aborted) = drain(&mut head.body).await;
    assert!(aborted.is_none(), "{aborted:?}");
    assert_eq!(body.len(), blocks as usize * BLOCK);
    assert!(body.iter().all(|&byte| byte == b'x'));
    let invocation = run.outcome().unwrap();
    assert_eq!(invocation.streamed, Some(body.len() as u64));
}

#[test]
fn a_response_under_the_threshold_is_whole() {
    let function = function(&writer_guest(2, ""), 32 << 20);
    let run = start(&function);
    let invocation = run.outcome().unwrap();
    assert!(run.heads.try_recv().is_err(), "a 128 KiB response was streamed");
    assert_eq!(invocation.streamed, None);
    assert_eq!(invocation.response.body.len(), 2 * BLOCK);
}

#[tokio::test]
async fn a_trap_after_the_head_aborts_the_body() {
    let function = function(&writer_guest(8, "(unreachable)"), 32 << 20);
    let run = start(&function);
    let mut head = run.head();
    let (body, aborted) = drain(&mut head.body).await;
    assert!(aborted.is_some(), "a trapped run's body ended as if complete");
    assert!(body.len() >= 4 * BLOCK, "{}", body.len());
    assert!(matches!(run.outcome(), Err(InvokeError::Trap { .. })));
}

#[test]
fn a_client_that_goes_away_stops_the_guest() {
    let function = function(&writer_guest(100_000, ""), usize::MAX);
    let run = start(&function);
    let head = run.head();
    let started = Instant::now();
    drop(head);
    match run.outcome() {
        Err(InvokeError::ClientGone { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_guest_held_by_a_reader_that_never_reads_stops_at_the_deadline() {
    let function = function(&writer_guest(100_000, ""), usize::MAX);
    let run = start(&function);
    let _head = run.head();
    // The guest is now blocked on the full pipe: the stop reaches it inside the host call.
    let stopping = Instant::now();
    let outcome = loop {
        run.interrupt.interrupt();
        if let Ok(outcome) = run.outcome.recv_timeout(Duration::from_millis(20)) {
            break outcome;
        }
        assert!(stopping.elapsed() < HUNG, "the blocked guest never stopped");
    };
    assert!(matches!(outcome, Err(InvokeError::Timeout { .. })), "{outcome:?}");
}

#[tokio::test]
async fn the_response_limit_holds_across_the_stream() {
    // 1 MiB limit, 2 MiB written: the body streams, then is aborted at the limit.
    let function = function(&writer_guest(32, ""), 1 << 20);
    let run = start(&function);
    let mut head = run.head();
    let (body, aborted) = drain(&mut head.body).await;
    assert!(aborted.is_some());
    assert!(body.len() <= 1 << 20, "{}", body.len());
    assert!(matches!(run.outcome(), Err(InvokeError::ResponseTooLarge { .. })));
}

#[tokio::test]
async fn many_small_iovecs_of_one_write_go_out_as_few_chunks() {
    // Past the threshold, one fd_write of 4096 iovecs of 16 bytes each.
    let many_iovecs = r#"
        (local.set $i (i32.const 0))
        (block $built
          (loop $build
            (br_if $built (i32.ge_u (local.get $i) (i32.const 4096)))
            (i32.store (i32.add (i32.const 8192) (i32.mul (local.get $i) (i32.const 8))) (i32.const 65536))
            (i32.store (i32.add (i32.const 8196) (i32.mul (local.get $i) (i32.const 8))) (i32.const 16))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $build)))
        (drop (call $fd_write (i32.const 1) (i32.const 8192) (i32.const 4096) (i32.const 16)))"#;
    let function = function(&writer_guest(5, many_iovecs), 32 << 20);
    let run = start(&function);
    let mut head = run.head();
    let (mut chunks, mut bytes) = (0, 0);
    while let Some(chunk) = poll_fn(|context| head.body.poll_chunk(context)).await {
        chunks += 1;
        bytes += chunk.unwrap().len();
    }
    assert_eq!(bytes, 5 * BLOCK + 4096 * 16);
    assert!(chunks < 16, "{chunks} chunks for 6 writes");
    run.outcome().unwrap();
}
