//! Large responses are streamed, end to end: a 32 MiB response reaches curl over HTTP/1.1
//! (chunked, no `Content-Length`) and h2c whole, while the node's peak RSS grows by far
//! less than the response (it used to buffer it twice over); a function that stops in the
//! middle of its body (here: it spins past its timeout) gives the client the head and what
//! was written, then a broken transfer — never a body that looks complete.

mod support;

use support::*;

#[test]
fn large_responses_stream_and_a_broken_one_never_looks_complete() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let node = start_edge_node(&url, &dir.path().join("node"), &[]);
    let http = node.http.clone().unwrap();
    wait_ready(&node.admin);

    let blocks = 512; // 32 MiB
    let size = blocks as u64 * 64 * 1024;
    let big = dir.path().join("big.wasm");
    std::fs::write(&big, bulk_writer_module(blocks, "")).unwrap();
    let manifest = write_manifest(
        &dir.path().join("big"),
        "big",
        &big,
        &["big.localhost"],
        "[limits]\nresponse = \"64MiB\"\n",
    );
    push_ok(&url, &manifest);
    // 1 MiB, then a spin the 2 s timeout ends.
    let stall = dir.path().join("stall.wasm");
    std::fs::write(&stall, bulk_writer_module(16, "(loop $forever (br $forever))")).unwrap();
    let manifest = write_manifest(
        &dir.path().join("stall"),
        "stall",
        &stall,
        &["stall.localhost"],
        "[limits]\ntimeout = \"2s\"\n",
    );
    push_ok(&url, &manifest);
    wait_for_body(
        &http,
        "big.localhost",
        "/nothing-yet",
        |r| r.status != 404,
        STARTUP,
    );
    let probe = dir.path().join("probe");
    wait_until("stall.localhost is served", || {
        download(&http, "stall.localhost", &probe, &[]).status != 404
    });

    let peak_before = peak_rss(node.process.pid());
    let out = dir.path().join("out");
    let h1 = download(&http, "big.localhost", &out, &[]);
    assert_eq!((h1.exit, h1.status, h1.size), (0, 200, size), "{}", h1.headers);
    assert!(
        h1.headers.contains("transfer-encoding: chunked"),
        "{}",
        h1.headers
    );
    assert!(!h1.headers.contains("content-length"), "{}", h1.headers);
    let body = std::fs::read(&out).unwrap();
    assert!(
        body.iter().all(|&byte| byte == b'x'),
        "the body is the guest's output"
    );
    let h2 = download(&http, "big.localhost", &out, &["--http2-prior-knowledge"]);
    assert_eq!(
        (h2.exit, h2.status, h2.size, h2.http_version.as_str()),
        (0, 200, size, "2"),
        "{}",
        h2.headers
    );
    let growth = peak_rss(node.process.pid()).saturating_sub(peak_before);
    eprintln!("peak RSS grew by {} KiB over two 32 MiB responses", growth / 1024);
    assert!(
        growth < 16 << 20,
        "peak RSS grew by {} MiB: the response was buffered",
        growth >> 20
    );

    // The head and the first MiB arrive; then the body breaks off at the timeout.
    for extra in [&[][..], &["--http2-prior-knowledge"][..]] {
        let broken = download(&http, "stall.localhost", &out, extra);
        assert_eq!(broken.status, 200, "{extra:?}: {}", broken.headers);
        assert!(broken.size >= 1 << 20, "{extra:?}: only {} bytes", broken.size);
        assert_ne!(broken.exit, 0, "{extra:?}: a cut-off body looked complete");
    }
    // The node goes on serving.
    assert_eq!(download(&http, "big.localhost", &out, &[]).size, size);

    // HEAD: the head of a streamed response, and the run completes.
    let head = download(&http, "big.localhost", &out, &["-I"]);
    assert_eq!((head.exit, head.status), (0, 200), "{}", head.headers);
}

#[test]
fn a_response_just_past_the_threshold_arrives_whole_every_time() {
    // 256 KiB of body plus its head: the guest hands the whole output to the pipe in one
    // go and ends at once, so its head and its outcome reach the node together.
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let node = start_edge_node(&url, &dir.path().join("node"), &[]);
    let http = node.http.clone().unwrap();
    let wasm = dir.path().join("edge.wasm");
    std::fs::write(&wasm, bulk_writer_module(4, "")).unwrap();
    let manifest = write_manifest(&dir.path().join("edge"), "edge", &wasm, &["edge.localhost"], "");
    push_ok(&url, &manifest);
    wait_for_body(&http, "edge.localhost", "/", |r| r.status == 200, STARTUP);
    for attempt in 0..40 {
        let response = get(&http, "edge.localhost", "/");
        assert_eq!(response.status, 200, "attempt {attempt}");
        assert_eq!(response.body.len(), 4 * 64 * 1024, "attempt {attempt}");
        assert_eq!(
            response.header("content-type"),
            Some("application/octet-stream"),
            "attempt {attempt}"
        );
    }
}
