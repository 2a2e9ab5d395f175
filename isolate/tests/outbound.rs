//! The `wasi_experimental_http` import against a real origin on loopback: the ABI call by
//! call (codes, out-parameters and their exact widths, handles), every refusal with its
//! log line, the limits, the deadline, and HTTPS trusted through an operator's CA.
//!
//! The guests are hand-written so each test controls exactly what the guest passes; the
//! end-to-end tests run the WAGI guest crate itself (examples/outbound).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_core::outbound::AllowedHosts;
use atoll_isolate::outbound::OutboundClient;
use atoll_isolate::wasi_http::{OutboundAccess, code};
use atoll_isolate::{Invocation, InvokeError, LoadedFunction};
use atoll_testkit::origin::{TestCa, TestOrigin};

// Where the guest keeps things in its memory.
const URL: u32 = 1024;
const METHOD: u32 = 2048;
const HEADERS: u32 = 2100;
const BODY: u32 = 2600;
const NAME: u32 = 3072; // "content-type"
const MISSING: u32 = 3100; // "x-missing"
const OUT: u32 = 4096; // 512 bytes written to stdout after the CGI head, 0xAA until set
const STATUS: u32 = 4224;
const HANDLE: u32 = 4228;
const COUNT_A: u32 = 4232;
const COUNT_B: u32 = 4236;
const COUNT_C: u32 = 4240;
const VALUE: u32 = 4256; // 64 bytes
const ALL: u32 = 4320; // 160 bytes
const READ: u32 = 4480; // 128 bytes

/// A guest that makes `calls` in order, each storing its code in the next slot, then
/// writes the 512 bytes at `OUT` as its response body.
struct Guest {
    url: String,
    method: String,
    headers: String,
    body: String,
    calls: Vec<String>,
}

fn escape(text: &str) -> String {
    text.bytes().map(|b| format!("\\{b:02x}")).collect()
}

impl Guest {
    fn new(url: &str) -> Guest {
        Guest {
            url: url.into(),
            method: "GET".into(),
            headers: String::new(),
            body: String::new(),
            calls: Vec::new(),
        }
    }

    /// A call whose code is stored in the next slot; `call` is the `(call …)` expression.
    fn call(mut self, call: &str) -> Guest {
        let slot = OUT + 4 * self.calls.len() as u32;
        self.calls.push(format!("(i32.store (i32.const {slot}) {call})"));
        self
    }

    fn req(self) -> Guest {
        let call = format!(
            "(call $req (i32.const {URL}) (i32.const {}) (i32.const {METHOD}) (i32.const {}) (i32.const {HEADERS}) (i32.const {}) (i32.const {BODY}) (i32.const {}) (i32.const {STATUS}) (i32.const {HANDLE}))",
            self.url.len(),
            self.method.len(),
            self.headers.len(),
            self.body.len()
        );
        self.call(&call)
    }

    fn close_handle(self) -> Guest {
        self.call(&format!("(call $close (i32.load (i32.const {HANDLE})))"))
    }

    fn wasm(&self) -> Vec<u8> {
        let wat = format!(
            r#"(module
              (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
              (import "wasi_experimental_http" "req" (func $req (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
              (import "wasi_experimental_http" "close" (func $close (param i32) (result i32)))
              (import "wasi_experimental_http" "header_get" (func $header_get (param i32 i32 i32 i32 i32 i32) (result i32)))
              (import "wasi_experimental_http" "headers_get_all" (func $headers_get_all (param i32 i32 i32 i32) (result i32)))
              (import "wasi_experimental_http" "body_read" (func $body_read (param i32 i32 i32 i32) (result i32)))
              (memory (export "memory") 1)
              (data (i32.const 0) "Status: 200\r\n\r\n")
              (data (i32.const {URL}) "{url}")
              (data (i32.const {METHOD}) "{method}")
              (data (i32.const {HEADERS}) "{headers}")
              (data (i32.const {BODY}) "{body}")
              (data (i32.const {NAME}) "content-type")
              (data (i32.const {MISSING}) "x-missing")
              (data (i32.const {OUT}) "{filler}")
              (func (export "_start")
                {calls}
                (i32.store (i32.const 256) (i32.const 0))
                (i32.store (i32.const 260) (i32.const 15))
                (i32.store (i32.const 264) (i32.const {OUT}))
                (i32.store (i32.const 268) (i32.const 512))
                (drop (call $fd_write (i32.const 1) (i32.const 256) (i32.const 2) (i32.const 300)))))"#,
            url = escape(&self.url),
            method = escape(&self.method),
            headers = escape(&self.headers),
            body = escape(&self.body),
            filler = "\\aa".repeat(512),
            calls = self.calls.join("\n"),
        );
        wasmer::wat2wasm(wat.as_bytes()).unwrap().to_vec()
    }
}

/// What the guest left at `OUT`.
struct Results(Vec<u8>);

impl Results {
    fn at(&self, address: u32) -> &[u8] {
        &self.0[(address - OUT) as usize..]
    }
    fn u32_at(&self, address: u32) -> u32 {
        u32::from_le_bytes(self.at(address)[..4].try_into().unwrap())
    }
    fn code(&self, slot: usize) -> i32 {
        self.u32_at(OUT + 4 * slot as u32) as i32
    }
    fn codes(&self, count: usize) -> Vec<i32> {
        (0..count).map(|slot| self.code(slot)).collect()
    }
    fn status(&self) -> u16 {
        u16::from_le_bytes(self.at(STATUS)[..2].try_into().unwrap())
    }
    fn text(&self, address: u32, length: u32) -> String {
        String::from_utf8_lossy(&self.at(address)[..length as usize]).into_owned()
    }
}

fn access(client: &Arc<OutboundClient>, allowed: &[&str]) -> OutboundAccess {
    OutboundAccess {
        client: Arc::clone(client),
        function: "caller".into(),
        services: Vec::new(),
        origins: false,
        service_caller: None,
        allowed: AllowedHosts::parse(allowed).unwrap(),
        max_requests: 50,
        max_concurrent: 6,
        max_response_bytes: 8 << 20,
    }
}

fn load(guest: &Guest, access: Option<OutboundAccess>, timeout: Duration) -> LoadedFunction {
    common::load(&guest.wasm(), "caller", |config| {
        config.outbound = access.map(Arc::new);
        config.timeout = timeout;
    })
}

/// Runs the function once, off the runtime (the guest blocks its thread).
async fn run(function: LoadedFunction) -> Result<Invocation, InvokeError> {
    tokio::task::spawn_blocking(move || function.invoke(&common::request()))
        .await
        .unwrap()
}

async fn call_out(guest: Guest, access: Option<OutboundAccess>) -> (Results, String) {
    let invocation = run(load(&guest, access, Duration::from_secs(30))).await.unwrap();
    (
        Results(invocation.response.body.to_vec()),
        String::from_utf8_lossy(&invocation.log).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_reads_status_headers_and_body_as_the_abi_says() {
    let origin = TestOrigin::http().await;
    let client = OutboundClient::new(None).unwrap();
    let handle = format!("(i32.load (i32.const {HANDLE}))");
    let guest = Guest::new(&origin.url("/hello"))
        .req() // 0
        .call(&format!(
            "(call $header_get {handle} (i32.const {NAME}) (i32.const 12) (i32.const {VALUE}) (i32.const 64) (i32.const {COUNT_A}))"
        )) // 1
        .call(&format!(
            "(call $header_get {handle} (i32.const {NAME}) (i32.const 12) (i32.const {VALUE}) (i32.const 2) (i32.const {COUNT_A}))"
        )) // 2: too small
        .call(&format!(
            "(call $header_get {handle} (i32.const {MISSING}) (i32.const 9) (i32.const {VALUE}) (i32.const 64) (i32.const {COUNT_A}))"
        )) // 3: absent
        .call(&format!(
            "(call $headers_get_all {handle} (i32.const {ALL}) (i32.const 160) (i32.const {COUNT_B}))"
        )) // 4
        .call(&format!(
            "(call $headers_get_all {handle} (i32.const {ALL}) (i32.const 3) (i32.const {COUNT_B}))"
        )) // 5: too small
        .call(&format!("(call $body_read {handle} (i32.const {READ}) (i32.const 5) (i32.const {COUNT_C}))")) // 6
        .call(&format!(
            "(call $body_read {handle} (i32.const {}) (i32.const 100) (i32.const {COUNT_C}))",
            READ + 5
        )) // 7
        .call(&format!(
            "(call $body_read {handle} (i32.const {}) (i32.const 100) (i32.const {COUNT_A}))",
            READ + 100
        )) // 8: the end
        .call(&format!("(call $body_read (i32.const 9) (i32.const {READ}) (i32.const 5) (i32.const {COUNT_C}))")) // 9
        .close_handle() // 10
        .call(&format!("(call $body_read {handle} (i32.const {READ}) (i32.const 5) (i32.const {COUNT_C}))")) // 11: closed
        .call("(call $close (i32.const 77))") // 12
        .call(&format!(
            "(call $req (i32.const 65530) (i32.const 100) (i32.const {METHOD}) (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 0) (i32.const {STATUS}) (i32.const {HANDLE}))"
        )) // 13: the URL runs off memory
        .call(&format!(
            "(call $header_get {handle} (i32.const {NAME}) (i32.const 12) (i32.const 70000) (i32.const 64) (i32.const {COUNT_A}))"
        )); // 14: handle closed
    let (results, log) = call_out(
        guest,
        Some(access(&client, &[&format!("http://{}", origin.address)])),
    )
    .await;
    assert_eq!(
        results.codes(15),
        [
            code::SUCCESS,
            code::SUCCESS,
            code::BUFFER_TOO_SMALL,
            code::HEADER_NOT_FOUND,
            code::SUCCESS,
            code::BUFFER_TOO_SMALL,
            code::SUCCESS,
            code::SUCCESS,
            code::SUCCESS,
            code::INVALID_HANDLE,
            code::SUCCESS,
            code::INVALID_HANDLE,
            code::SUCCESS,
            code::BUFFER_TOO_SMALL,
            code::INVALID_HANDLE,
        ],
        "log: {log}"
    );
    assert_eq!(results.status(), 200);
    // The status is a u16: the two bytes after it are untouched.
    assert_eq!(&results.at(STATUS + 2)[..2], [0xaa, 0xaa]);
    assert_eq!(results.u32_at(HANDLE), 0, "the first handle is 0");
    assert_eq!(results.text(VALUE, 10), "text/plain");
    let all = results.text(ALL, results.u32_at(COUNT_B));
    assert!(all.contains("content-type:text/plain\n"), "{all:?}");
    assert!(all.contains("x-multi:a\nx-multi:b\n"), "{all:?}");
    assert_eq!(results.u32_at(COUNT_C), 12);
    assert_eq!(results.text(READ, 17), "hello from origin");
    assert_eq!(results.u32_at(COUNT_A), 0, "0 bytes read: the end of the body");
    assert_eq!(origin.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_headers_and_body_reach_the_origin_and_framing_headers_do_not() {
    let origin = TestOrigin::http().await;
    let client = OutboundClient::new(None).unwrap();
    let mut guest = Guest::new(&origin.url("/echo"));
    guest.method = "PUT".into();
    guest.headers = "x-test:one\nx-other:two\ncontent-length:999\n".into();
    guest.body = "the body".into();
    let handle = format!("(i32.load (i32.const {HANDLE}))");
    let guest = guest.req().call(&format!(
        "(call $body_read {handle} (i32.const {READ}) (i32.const 128) (i32.const {COUNT_C}))"
    ));
    let (results, log) = call_out(
        guest,
        Some(access(&client, &[&format!("http://{}", origin.address)])),
    )
    .await;
    assert_eq!(results.codes(2), [0, 0], "{log}");
    let echoed = results.text(READ, results.u32_at(COUNT_C));
    assert_eq!(
        echoed,
        "method=PUT\nheader atoll-hops=1\nheader x-other=two\nheader x-test=one\nbody=the body"
    );
}

/// One `req` under `allowed` (or no access at all), with the given method and headers.
async fn refused(url: &str, allowed: Option<&[&str]>, method: &str, headers: &str) -> (i32, String) {
    let client = OutboundClient::new(None).unwrap();
    let mut guest = Guest::new(url);
    guest.method = method.into();
    guest.headers = headers.into();
    let (results, log) = call_out(guest.req(), allowed.map(|allowed| access(&client, allowed))).await;
    (results.code(0), log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_the_abi_codes_with_a_line_in_the_log() {
    let origin = TestOrigin::http().await;
    let hello = origin.url("/hello");
    let port = origin.address.port();

    let (code, log) = refused(&hello, Some(&["https://example.com"]), "GET", "").await;
    assert_eq!(code, code::DESTINATION_NOT_ALLOWED);
    assert!(
        log.contains(&format!(
            "http://127.0.0.1:{port} is not in [outbound] allowed_hosts"
        )),
        "{log}"
    );

    // The SSRF guard: a wildcard does not reach loopback, by address or by name.
    let (code, log) = refused(&hello, Some(&["*://*:*"]), "GET", "").await;
    assert_eq!(code, code::DESTINATION_NOT_ALLOWED);
    assert!(log.contains("internal addresses"), "{log}");
    let by_name = format!("http://localhost:{port}/hello");
    let (code, log) = refused(&by_name, Some(&["*://*:*"]), "GET", "").await;
    assert_eq!(code, code::DESTINATION_NOT_ALLOWED);
    assert!(
        log.contains("localhost resolves only to internal addresses"),
        "{log}"
    );
    // Listed by name, the same host is reached.
    let listed = format!("http://localhost:{port}");
    let (code, log) = refused(&by_name, Some(&[listed.as_str()]), "GET", "").await;
    assert_eq!(code, code::SUCCESS, "{log}");

    let (code, log) = refused(&hello, None, "GET", "").await;
    assert_eq!(code, code::DESTINATION_NOT_ALLOWED);
    assert!(log.contains("not available"), "{log}");

    let allowed = [format!("http://{}", origin.address)];
    let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
    assert_eq!(
        refused(&hello, Some(&allowed), "G T", "").await.0,
        code::INVALID_METHOD
    );
    assert_eq!(
        refused(&hello, Some(&allowed), "GET", "a:b\n\nc:d").await.0,
        code::INVALID_ENCODING
    );
    // As the original host: its client failed on another scheme (REQUEST_ERROR).
    let (code, log) = refused("ftp://127.0.0.1/x", Some(&allowed), "GET", "").await;
    assert_eq!(code, code::REQUEST_ERROR);
    assert!(log.contains("not http or https"), "{log}");
    // Redirects are the guest's to follow: it sees the 302.
    let client = OutboundClient::new(None).unwrap();
    let (results, _) = call_out(
        Guest::new(&origin.url("/redirect")).req(),
        Some(access(&client, &allowed)),
    )
    .await;
    assert_eq!((results.code(0), results.status()), (code::SUCCESS, 302));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_hold_per_request() {
    let origin = TestOrigin::http().await;
    let client = OutboundClient::new(None).unwrap();
    let allowed = [format!("http://{}", origin.address)];
    let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();

    // Open responses: the third while two are open is refused; closing one makes room.
    let mut limited = access(&client, &allowed);
    limited.max_concurrent = 2;
    let guest = Guest::new(&origin.url("/hello"))
        .req()
        .req()
        .req()
        .close_handle()
        .req();
    let (results, log) = call_out(guest, Some(limited)).await;
    assert_eq!(results.codes(5), [0, 0, code::TOO_MANY_SESSIONS, 0, 0]);
    assert!(log.contains("2 responses are open"), "{log}");

    // Calls per request, closed or not.
    let mut limited = access(&client, &allowed);
    limited.max_requests = 2;
    let guest = Guest::new(&origin.url("/hello"))
        .req()
        .close_handle()
        .req()
        .close_handle()
        .req();
    let (results, log) = call_out(guest, Some(limited)).await;
    assert_eq!(results.codes(5), [0, 0, 0, 0, code::TOO_MANY_SESSIONS]);
    assert!(log.contains("made 2 calls"), "{log}");

    // Response bytes held at once: 17 fit in 20, the next 17 do not until the first closes.
    let mut limited = access(&client, &allowed);
    limited.max_response_bytes = 20;
    let guest = Guest::new(&origin.url("/hello")).req().req().close_handle().req();
    let (results, log) = call_out(guest, Some(limited)).await;
    assert_eq!(results.codes(4), [0, code::REQUEST_ERROR, 0, 0], "{log}");
    assert!(log.contains("max_response"), "{log}");
    let served = origin.requests();
    assert!(served >= 8, "{served}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_never_outlives_the_function_timeout() {
    let origin = TestOrigin::http().await;
    let client = OutboundClient::new(None).unwrap();
    let allowed = [format!("http://{}", origin.address)];
    let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
    let guest = Guest::new(&origin.url("/slow")).req();

    // The deadline passes while the call waits: the run ends as a timeout.
    let started = Instant::now();
    let outcome = run(load(
        &guest,
        Some(access(&client, &allowed)),
        Duration::from_millis(300),
    ))
    .await;
    let took = started.elapsed();
    let Err(InvokeError::Timeout { log, .. }) = outcome else {
        panic!("expected a timeout, got {outcome:?}");
    };
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert!(
        String::from_utf8_lossy(&log).contains("no response within"),
        "{}",
        String::from_utf8_lossy(&log)
    );

    // Stopped from outside (the node's deadline, a shutdown): the wait ends at once.
    let function = load(&guest, Some(access(&client, &allowed)), Duration::from_secs(60));
    let ready = function.prepare().unwrap();
    let interrupt = ready.interrupt_handle();
    let started = Instant::now();
    let running = tokio::task::spawn_blocking(move || ready.run(&common::request()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    interrupt.interrupt();
    let outcome = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(outcome, Err(InvokeError::Timeout { .. })), "{outcome:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_is_trusted_through_the_operators_ca_only() {
    let ca = TestCa::new();
    let origin = TestOrigin::https(&ca).await;
    let allowed = [format!("https://localhost:{}", origin.address.port())];
    let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
    let handle = format!("(i32.load (i32.const {HANDLE}))");
    let guest = || {
        Guest::new(&origin.url("/hello")).req().call(&format!(
            "(call $body_read {handle} (i32.const {READ}) (i32.const 128) (i32.const {COUNT_C}))"
        ))
    };

    let directory = tempfile::tempdir().unwrap();
    let ca_file = directory.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let trusting = OutboundClient::new(Some(&ca_file)).unwrap();
    let (results, log) = call_out(guest(), Some(access(&trusting, &allowed))).await;
    assert_eq!(results.codes(2), [0, 0], "{log}");
    assert_eq!(results.status(), 200);
    assert_eq!(results.text(READ, results.u32_at(COUNT_C)), "hello from origin");

    let system_only = OutboundClient::new(None).unwrap();
    let (results, log) = call_out(guest(), Some(access(&system_only, &allowed))).await;
    assert_eq!(results.code(0), code::REQUEST_ERROR);
    assert!(log.to_lowercase().contains("certificate"), "{log}");

    let not_pem = directory.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let error = OutboundClient::new(Some(&not_pem)).unwrap_err().to_string();
    assert!(error.contains("holds no PEM certificate"), "{error}");
    let error = OutboundClient::new(Some(&directory.path().join("absent.pem")))
        .unwrap_err()
        .to_string();
    assert!(error.contains("cannot read the outbound CA file"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_forms_and_shared_connections_do_not_get_around_the_guard() {
    let origin = TestOrigin::http().await;
    let port = origin.address.port();
    let client = OutboundClient::new(None).unwrap();
    let one_call = |url: String, allowed: &[&str]| {
        let access = access(&client, allowed);
        async move {
            let (results, log) = call_out(Guest::new(&url).req(), Some(access)).await;
            (results.code(0), log)
        }
    };
    // Loopback spelled every way a URL allows, under a wildcard.
    for url in [
        format!("http://2130706433:{port}/hello"),
        format!("http://0x7f.1:{port}/hello"),
        format!("http://127.1:{port}/hello"),
        format!("http://[::ffff:127.0.0.1]:{port}/hello"),
        format!("http://[::127.0.0.1]:{port}/hello"),
        format!("http://LOCALHOST:{port}/hello"),
    ] {
        let (code, log) = one_call(url.clone(), &["*://*:*"]).await;
        assert_eq!(code, code::DESTINATION_NOT_ALLOWED, "{url}: {log}");
    }
    // A trailing dot: refused by the guard, or not even resolved here.
    let (code, log) = one_call(format!("http://localhost.:{port}/hello"), &["*://*:*"]).await;
    assert_ne!(code, code::SUCCESS, "{log}");
    // A service host with a trailing dot is still a service call, never DNS.
    let (code, log) = one_call("http://auth.atoll.internal./".into(), &["*://*:*"]).await;
    assert_eq!(code, code::DESTINATION_NOT_ALLOWED, "{log}");
    assert!(log.contains("no [services] binding"), "{log}");
    // Cloud metadata, even listed by address.
    let (code, log) = one_call(
        "http://169.254.169.254/latest/meta-data/".into(),
        &["http://169.254.169.254"],
    )
    .await;
    assert_eq!(code, code::DESTINATION_NOT_ALLOWED, "{log}");

    // One function listing localhost by name leaves a pooled connection to it; another,
    // allowed only by a wildcard, on the same client, is still refused.
    let listed = format!("http://localhost:{port}");
    let url = format!("http://localhost:{port}/hello");
    let (code, log) = one_call(url.clone(), &[listed.as_str()]).await;
    assert_eq!(code, code::SUCCESS, "{log}");
    let (code, log) = one_call(url, &["*://*:*"]).await;
    assert_eq!(code, code::DESTINATION_NOT_ALLOWED, "{log}");
    assert_eq!(origin.requests(), 1, "only the listed call reached the origin");
}
