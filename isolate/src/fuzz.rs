//! Fuzz targets for what a guest or a pusher hands the isolate layer: the guest's CGI output
//! ([`cgi::parse_response`]), the environment built from a request ([`cgi::environment`]),
//! and modules ([`Engine::compile`], [`MemoryImage::from_wasm`], the snapshot rewriter
//! [`snapshot::preinitialize`]).
//!
//! Property tests (proptest, stable Rust) with a bounded number of cases, run with the other
//! tests; `PROPTEST_CASES=100000 cargo nextest run -p atoll-isolate fuzz` runs them longer
//! (the module targets compile with cranelift, a few milliseconds a case). CGI outputs come
//! from a grammar of header lines and the seeds in `fuzz-corpus/cgi/`, modules from a
//! grammar of memories, data segments, globals and init functions (written as WAT), both
//! then mutated byte by byte. A failing case is written to `proptest-regressions/` and
//! replayed first from then on.
//!
//! The module targets are differential: a module's copy-on-write image must give the very
//! memory stock wasmer's data-segment copies give, and a pre-initialised module must start
//! with the memory and globals the original has after its init function ran.

use std::sync::LazyLock;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use proptest::prelude::*;
use proptest::sample::select;
use wasmer::{Instance, Module, Store, Value, imports};
use wasmparser::{Parser, Payload};

use crate::cgi::{self, CgiError, CgiRequest, MAX_HEADER_BYTES};
use crate::cow_memory::{self, MemoryImage, MemoryPlan};
use crate::engine::Engine;
use crate::error::IsolateError;
use crate::snapshot::{self, Preinit};

use atoll_testkit::fuzz::{config, mutate};

/// The seed inputs of one target: every file in `fuzz-corpus/<target>/`.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    atoll_testkit::fuzz::corpus(env!("CARGO_MANIFEST_DIR"), target)
}

/// Byte mutations `(position, operation, byte)`: flip, insert or delete, positions modulo
/// the length.
fn mutations(max: usize) -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..max)
}

// ---------------------------------------------------------------------------------------
// CGI output
// ---------------------------------------------------------------------------------------

const CGI_NAMES: &[&str] = &[
    "Content-Type",
    "Status",
    "status",
    "STATUS",
    "Location",
    "Set-Cookie",
    "Connection",
    "Content-Length",
    "Transfer-Encoding",
    "Keep-Alive",
    "TE",
    "Trailer",
    "Upgrade",
    "Proxy-Authenticate",
    "X-A",
    "Bad Name",
    "",
    "X\0",
    "X\u{e9}",
];
const CGI_VALUES: &[&str] = &[
    "200",
    "404 Not Found",
    "204",
    "99",
    "100",
    "999",
    "1000",
    "0200",
    "+200",
    " 200",
    "2OO",
    "200\tOK",
    "",
    "text/plain",
    "a\rb",
    "a\0b",
    "\u{e9}",
    "http://x/",
    "a\x0bb",
    "\u{1}",
];
const CGI_EOLS: &[&str] = &["\n", "\n", "\r\n", "\r\n", "\r\r\n", "\r"];

fn cgi_output() -> impl Strategy<Value = Vec<u8>> {
    let line = (
        select(CGI_NAMES),
        select(&[": ", ":", " : ", ":\t"][..]),
        prop_oneof![
            4 => select(CGI_VALUES).prop_map(String::from),
            1 => "[ -~]{0,10}",
        ],
        prop::bool::weighted(0.03),
        select(CGI_EOLS),
    )
        .prop_map(|(name, separator, value, folded, eol)| {
            let fold = if folded { " x\n" } else { "" };
            format!("{fold}{name}{separator}{value}{eol}")
        });
    let grammar = (
        prop::collection::vec(line, 0..6),
        select(&["\n", "\r\n", "", "\r"][..]),
        prop::collection::vec(any::<u8>(), 0..24),
    )
        .prop_map(|(lines, blank, body)| {
            let mut out = lines.concat().into_bytes();
            out.extend_from_slice(blank.as_bytes());
            out.extend_from_slice(&body);
            out
        });
    (
        prop_oneof![
            6 => grammar,
            2 => select(corpus("cgi")),
            1 => prop::collection::vec(any::<u8>(), 0..64),
        ],
        mutations(3),
    )
        .prop_map(|(bytes, mutations)| mutate(bytes, &mutations))
}

/// The response as a guest could have written it: `Status`, the headers, a blank line, the
/// body.
fn write_cgi(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Vec<u8> {
    let mut out = format!("Status: {}\r\n", status.as_u16()).into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

fn check_cgi_output(output: &[u8]) {
    let shown = String::from_utf8_lossy(output);
    let response = match cgi::parse_response(Bytes::copy_from_slice(output)) {
        Err(error) => {
            // The error reaches the node's log and the 502 page: one line, no control bytes.
            let message = error.to_string();
            assert!(
                message.chars().all(|c| !c.is_control()),
                "{message:?} for {shown:?}"
            );
            if error == CgiError::Empty {
                assert!(output.is_empty());
            }
            return;
        }
        Ok(response) => response,
    };
    let status = response.status.as_u16();
    assert!((100..=999).contains(&status), "{shown:?}");
    for (name, value) in &response.headers {
        assert!(
            !matches!(
                name.as_str(),
                "status"
                    | "connection"
                    | "keep-alive"
                    | "proxy-authenticate"
                    | "proxy-authorization"
                    | "te"
                    | "trailer"
                    | "transfer-encoding"
                    | "upgrade"
                    | "content-length"
            ),
            "{name} passed on: {shown:?}"
        );
        assert!(
            value
                .as_bytes()
                .iter()
                .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f)),
            "control byte in {name}: {shown:?}"
        );
        assert!(
            !value.as_bytes().starts_with(b" ") && !value.as_bytes().ends_with(b" "),
            "{shown:?}"
        );
    }
    // The body is everything after the first empty line, byte for byte.
    let body = &response.body[..];
    assert!(output.ends_with(body), "{shown:?}");
    let head = &output[..output.len() - body.len()];
    assert!(
        head.ends_with(b"\n\n") || head.ends_with(b"\n\r\n") || head == b"\n" || head == b"\r\n",
        "{shown:?}"
    );
    let first_blank = head
        .windows(2)
        .position(|w| w == b"\n\n")
        .into_iter()
        .chain(head.windows(3).position(|w| w == b"\n\r\n"))
        .min();
    if let Some(blank) = first_blank {
        assert!(
            head.len() <= blank + 3,
            "the head goes on after an empty line: {shown:?}"
        );
    }
    assert!(head.len() <= MAX_HEADER_BYTES + 2, "{shown:?}");
    // What a guest could have written to get this response gives it back.
    let again =
        cgi::parse_response(Bytes::from(write_cgi(response.status, &response.headers, body))).unwrap();
    assert_eq!(again, response, "{shown:?}");
}

proptest! {
    #![proptest_config(config(10_000))]

    #[test]
    fn fuzz_cgi_output(output in cgi_output()) {
        check_cgi_output(&output);
    }
}

#[test]
fn fuzz_cgi_output_seeds() {
    for seed in corpus("cgi") {
        check_cgi_output(&seed);
        for cut in 0..seed.len() {
            check_cgi_output(&seed[..cut]);
        }
    }
}

// ---------------------------------------------------------------------------------------
// CGI environment
// ---------------------------------------------------------------------------------------

/// A request path as the router passes it on: `/` and percent-encoded bytes (any of them,
/// `%00` too: a URI may carry it).
fn raw_path() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        "[a-zA-Z0-9._~-]{1,4}",
        Just("/".to_string()),
        any::<u8>().prop_map(|b| format!("%{b:02X}")),
        any::<u8>().prop_map(|b| format!("%{b:02x}")),
        select(&["%", "%0", "%zz", "%%41", "%2F", "%00", "%0A", "%C3%A9", "%FF"][..]).prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..8).prop_map(|pieces| format!("/{}", pieces.concat()))
}

fn header_map() -> impl Strategy<Value = HeaderMap> {
    let name = prop_oneof![
        select(
            &[
                "content-type",
                "content-length",
                "x-a",
                "x_a",
                "accept",
                "cookie",
                "host"
            ][..]
        )
        .prop_map(String::from),
        "[a-z0-9!#$%&'*+.^_`|~-]{1,8}",
    ];
    let value = prop::collection::vec(prop_oneof![0x20u8..0x7f, Just(b'\t'), 0x80u8..=0xff], 0..12);
    prop::collection::vec((name, value), 0..6).prop_map(|fields| {
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            if let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(&value),
            ) {
                headers.append(name, value);
            }
        }
        headers
    })
}

fn cgi_request() -> impl Strategy<Value = CgiRequest> {
    (
        (
            select(&["GET", "POST", "PATCH", "M-SEARCH"][..]),
            raw_path(),
            "[ -~]{0,12}",
            select(&["HTTP/1.1", "HTTP/2.0", "HTTP/3.0"][..]),
            select(&["http", "https"][..]),
        ),
        (
            select(&["a.example", "localhost", "[::1]"][..]),
            select(&[0u16, 80, 443, 8080][..]),
            select(&[0u16, 5555][..]),
            select(&["", "/echo", "/a%2Fb", "/"][..]),
        ),
        header_map(),
        prop::collection::vec(any::<u8>(), 0..4),
    )
        .prop_map(
            |(
                (method, raw_path, query, protocol, scheme),
                (host, port, remote_port, prefix),
                headers,
                body,
            )| {
                CgiRequest {
                    method: method.into(),
                    raw_path,
                    query,
                    protocol: protocol.into(),
                    scheme: scheme.into(),
                    server_name: host.into(),
                    server_port: port,
                    remote_addr: "127.0.0.1".into(),
                    remote_port,
                    matched_route: format!("{host}{prefix}"),
                    route_prefix: prefix.into(),
                    headers,
                    body: Bytes::from(body),
                    service_depth: 0,
                    deadline: None,
                    cron_tick: None,
                }
            },
        )
}

/// A manifest's `[env]` as the registry lets it through: valid keys, no NUL in values; some
/// keys collide with CGI ones.
fn function_env() -> impl Strategy<Value = Vec<(String, String)>> {
    let key = prop_oneof![
        select(
            &[
                "REQUEST_METHOD",
                "PATH_INFO",
                "HTTP_X_A",
                "HTTPS",
                "GREETING",
                "CONTENT_LENGTH"
            ][..]
        )
        .prop_map(String::from),
        "[A-Z_][A-Z0-9_]{0,6}",
    ];
    prop::collection::btree_map(key, "[^\\x00]{0,8}", 0..4).prop_map(|env| env.into_iter().collect())
}

fn check_environment(request: &CgiRequest, function_env: &[(String, String)]) {
    let env = cgi::environment(request, function_env);
    let get = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    for (index, (key, value)) in env.iter().enumerate() {
        // The guest gets `KEY=VALUE` entries separated by NUL: a NUL in either would cut
        // the entry short, an `=` in a key would move the split.
        assert!(!key.is_empty() && !key.contains(['\0', '=']), "{key:?}");
        assert!(!value.contains('\0'), "{key}={value:?} for {request:?}");
        assert!(
            !env[..index].iter().any(|(k, _)| k == key),
            "{key} twice: {env:?}"
        );
    }
    // The manifest's variables are there unless named like a request variable: then the
    // request's value, or nothing, is.
    let cgi_only = cgi::environment(request, &[]);
    for (key, value) in function_env {
        let request_value = cgi_only.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let request_name = request_value.is_some()
            || key.starts_with("HTTP_")
            || ["HTTPS", "CONTENT_TYPE", "CONTENT_LENGTH"].contains(&key.as_str());
        if request_name {
            assert_eq!(get(key), request_value, "{key}");
        } else {
            assert_eq!(get(key), Some(value.as_str()), "{key}");
        }
    }
    assert_eq!(get("REQUEST_METHOD"), Some(request.method.as_str()));
    assert_eq!(get("X_RAW_PATH_INFO"), Some(request.raw_path.as_str()));
    assert_eq!(get("QUERY_STRING"), Some(request.query.as_str()));
    let relative = get("X_RELATIVE_PATH").unwrap();
    assert!(relative.starts_with('/') && (relative == "/" || request.raw_path.ends_with(relative)));
    // PATH_INFO is the path with every valid escape decoded but `%00`.
    assert_eq!(
        get("PATH_INFO"),
        Some(reference_decode(&request.raw_path).as_str())
    );
    assert_eq!(get("HTTPS").is_some(), request.scheme == "https");
    assert_eq!(
        get("CONTENT_LENGTH"),
        (!request.body.is_empty() || request.headers.contains_key(http::header::CONTENT_LENGTH))
            .then(|| request.body.len().to_string())
            .as_deref()
    );
    // Each header but Content-Type and Content-Length is `HTTP_*`, its values joined; a name
    // with `_` is left out, so `x_a` can never pose as (or add to) `x-a`.
    for name in request.headers.keys() {
        let key = format!("HTTP_{}", name.as_str().to_ascii_uppercase().replace('-', "_"));
        let source = name.as_str().replace('_', "-");
        let expected = (source != "content-type" && source != "content-length")
            .then(|| {
                request
                    .headers
                    .get_all(source.as_str())
                    .iter()
                    .collect::<Vec<_>>()
            })
            .filter(|values| !values.is_empty())
            .map(|values| {
                values
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            });
        let found = cgi_only.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone());
        assert_eq!(found, expected, "{key}");
    }
}

/// Percent-decoding as the CGI docs describe it, written plainly.
fn reference_decode(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::new();
    let mut index = 0;
    while index < bytes.len() {
        let escape = bytes
            .get(index + 1..index + 3)
            .filter(|_| bytes[index] == b'%')
            .and_then(|hex| u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok())
            .filter(|&byte| byte != 0 && !bytes[index + 1..index + 3].contains(&b'+'));
        match escape {
            Some(byte) => {
                out.push(byte);
                index += 3;
            }
            None => {
                out.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

proptest! {
    #![proptest_config(config(5000))]

    #[test]
    fn fuzz_cgi_environment(request in cgi_request(), function_env in function_env()) {
        check_environment(&request, &function_env);
    }
}

// ---------------------------------------------------------------------------------------
// Modules
// ---------------------------------------------------------------------------------------

/// The engine every case starts from; each case compiles on its own [`Engine::scratch`], as
/// wasmer keeps an engine's compiled code until the engine is dropped (thousands of cases on
/// one engine reach `vm.max_map_count`).
static ENGINE: LazyLock<Engine> = LazyLock::new(|| Engine::new().unwrap());

#[derive(Debug, Clone, Copy)]
enum GlobalType {
    I32,
    I64,
    F32,
    F64,
    V128,
}

impl GlobalType {
    fn name(self) -> &'static str {
        match self {
            GlobalType::I32 => "i32",
            GlobalType::I64 => "i64",
            GlobalType::F32 => "f32",
            GlobalType::F64 => "f64",
            GlobalType::V128 => "v128",
        }
    }

    fn constant(self, value: i64) -> String {
        match self {
            GlobalType::V128 => format!("(v128.const i64x2 {value} {})", value.wrapping_mul(3)),
            GlobalType::F32 | GlobalType::F64 => format!("({}.const {}.5)", self.name(), value % 100_000),
            GlobalType::I32 => format!("(i32.const {})", value as i32),
            GlobalType::I64 => format!("(i64.const {value})"),
        }
    }
}

#[derive(Debug, Clone)]
struct Global {
    ty: GlobalType,
    mutable: bool,
    initial: i64,
}

#[derive(Debug, Clone)]
enum Segment {
    Active { offset: i32, bytes: Vec<u8> },
    Passive { bytes: Vec<u8> },
}

/// What an init (or start) function does.
#[derive(Debug, Clone)]
enum Op {
    Store8(u32, u8),
    Store32(u32, u32),
    Store64(u32, i64),
    Grow(u32),
    Fill(u32, u8, u32),
    Copy(u32, u32, u32),
    /// `memory.init` of the n-th segment (modulo the count; only passive ones stay usable).
    Init(usize, u32, u32),
    DataDrop(usize),
    /// `global.set` of the n-th mutable global.
    SetGlobal(usize, i64),
    TableSet,
    CallIndirect,
    Unreachable,
}

#[derive(Debug, Clone)]
struct ModuleSpec {
    initial_pages: u32,
    maximum_pages: Option<u32>,
    shared: bool,
    segments: Vec<Segment>,
    globals: Vec<Global>,
    /// The init exports: `wizer.initialize`, `atoll_init`, both on one function, or both
    /// on two.
    init_exports: u8,
    init: Vec<Op>,
    start: Option<Vec<Op>>,
    table: bool,
}

fn address() -> impl Strategy<Value = u32> {
    prop_oneof![
        12 => 0..256u32,
        4 => 0..65536u32,
        2 => 0..(4 * 65536u32),
        1 => any::<u32>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (address(), any::<u8>()).prop_map(|(a, v)| Op::Store8(a, v)),
        3 => (address(), any::<u32>()).prop_map(|(a, v)| Op::Store32(a, v)),
        2 => (address(), any::<i64>()).prop_map(|(a, v)| Op::Store64(a, v)),
        2 => (0..3u32).prop_map(Op::Grow),
        2 => (address(), any::<u8>(), 0..300u32).prop_map(|(a, v, n)| Op::Fill(a, v, n)),
        1 => (address(), address(), 0..300u32).prop_map(|(d, s, n)| Op::Copy(d, s, n)),
        2 => (any::<usize>(), address(), 0..8u32).prop_map(|(i, d, n)| Op::Init(i, d, n)),
        1 => any::<usize>().prop_map(Op::DataDrop),
        4 => (any::<usize>(), any::<i64>()).prop_map(|(i, v)| Op::SetGlobal(i, v)),
        1 => Just(Op::TableSet),
        2 => Just(Op::CallIndirect),
        1 => Just(Op::Unreachable),
    ]
}

fn module_spec() -> impl Strategy<Value = ModuleSpec> {
    let global = (
        select(
            &[
                GlobalType::I32,
                GlobalType::I64,
                GlobalType::F32,
                GlobalType::F64,
                GlobalType::V128,
            ][..],
        ),
        prop::bool::weighted(0.7),
        any::<i32>(),
    )
        .prop_map(|(ty, mutable, initial)| Global {
            ty,
            mutable,
            initial: i64::from(initial),
        });
    let bytes = prop::collection::vec(any::<u8>(), 0..40);
    let segment = prop_oneof![
        4 => (
            prop_oneof![
                8 => 0..512i32,
                2 => 0..65536i32,
                1 => 0..(3 * 65536i32),
                1 => Just(65536 - 4),
                1 => any::<i32>()
            ],
            bytes.clone()
        )
            .prop_map(|(offset, bytes)| Segment::Active { offset, bytes }),
        1 => bytes.prop_map(|bytes| Segment::Passive { bytes }),
    ];
    (
        (
            prop_oneof![1 => Just(0u32), 8 => 1..4u32],
            prop::option::weighted(0.5, 0..4u32),
            prop::bool::weighted(0.05),
        ),
        prop::collection::vec(segment, 0..5),
        prop::collection::vec(global, 0..4),
        prop_oneof![2 => Just(0u8), 6 => Just(1), 3 => Just(2), 1 => Just(3), 1 => Just(4)],
        prop::collection::vec(op(), 0..6),
        prop::option::weighted(0.15, prop::collection::vec(op(), 0..3)),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |((initial_pages, extra, shared), segments, globals, init_exports, init, start, table)| {
                let maximum_pages = extra.map(|extra| initial_pages + extra);
                ModuleSpec {
                    initial_pages,
                    shared: shared && maximum_pages.is_some(),
                    maximum_pages,
                    segments,
                    globals,
                    init_exports,
                    init,
                    start,
                    table,
                }
            },
        )
}

fn wat_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}

impl ModuleSpec {
    /// The body of a function doing `ops`; operations the module could not validate (a
    /// segment or global that does not exist, a table it has not) are left out.
    fn body(&self, ops: &[Op]) -> String {
        let mutable: Vec<(usize, &Global)> = self
            .globals
            .iter()
            .enumerate()
            .filter(|(_, g)| g.mutable)
            .collect();
        let mut body = String::new();
        for op in ops {
            let text = match *op {
                Op::Store8(a, v) => format!("(i32.store8 (i32.const {a}) (i32.const {v}))"),
                Op::Store32(a, v) => format!("(i32.store (i32.const {a}) (i32.const {v}))"),
                Op::Store64(a, v) => format!("(i64.store (i32.const {a}) (i64.const {v}))"),
                Op::Grow(n) => format!("(drop (memory.grow (i32.const {n})))"),
                Op::Fill(a, v, n) => format!("(memory.fill (i32.const {a}) (i32.const {v}) (i32.const {n}))"),
                Op::Copy(d, s, n) => format!("(memory.copy (i32.const {d}) (i32.const {s}) (i32.const {n}))"),
                Op::Init(i, d, n) if !self.segments.is_empty() => format!(
                    "(memory.init {} (i32.const {d}) (i32.const 0) (i32.const {n}))",
                    i % self.segments.len()
                ),
                Op::DataDrop(i) if !self.segments.is_empty() => {
                    format!("(data.drop {})", i % self.segments.len())
                }
                Op::SetGlobal(i, v) if !mutable.is_empty() => {
                    let (index, global) = mutable[i % mutable.len()];
                    format!("(global.set $g{index} {})", global.ty.constant(v))
                }
                Op::TableSet if self.table => "(table.set $t (i32.const 1) (ref.null func))".into(),
                Op::CallIndirect if self.table => "(call_indirect (type $v) (i32.const 0))".into(),
                Op::Unreachable => "(unreachable)".into(),
                _ => continue,
            };
            body.push_str(&text);
            body.push(' ');
        }
        body
    }

    fn wat(&self) -> String {
        let mut wat = String::from("(module\n");
        if self.table {
            wat.push_str("(type $v (func)) (table $t 2 funcref) (elem (i32.const 0) $nop) (func $nop)\n");
        }
        wat.push_str(&format!(
            "(memory (export \"memory\") {} {} {})\n",
            self.initial_pages,
            self.maximum_pages.map(|m| m.to_string()).unwrap_or_default(),
            if self.shared { "shared" } else { "" }
        ));
        for (index, global) in self.globals.iter().enumerate() {
            let ty = if global.mutable {
                format!("(mut {})", global.ty.name())
            } else {
                global.ty.name().to_string()
            };
            wat.push_str(&format!(
                "(global $g{index} (export \"g{index}\") {ty} {})\n",
                global.ty.constant(global.initial)
            ));
        }
        for segment in &self.segments {
            wat.push_str(&match segment {
                Segment::Active { offset, bytes } => {
                    format!("(data (i32.const {offset}) \"{}\")\n", wat_bytes(bytes))
                }
                Segment::Passive { bytes } => format!("(data \"{}\")\n", wat_bytes(bytes)),
            });
        }
        wat.push_str("(func (export \"_start\"))\n");
        let init = self.body(&self.init);
        match self.init_exports {
            0 => {}
            1 => wat.push_str(&format!("(func (export \"wizer.initialize\") {init})\n")),
            2 => wat.push_str(&format!("(func (export \"atoll_init\") {init})\n")),
            3 => wat.push_str(&format!(
                "(func (export \"wizer.initialize\") (export \"atoll_init\") {init})\n"
            )),
            _ => wat.push_str(&format!(
                "(func (export \"wizer.initialize\") {init}) (func (export \"atoll_init\"))\n"
            )),
        }
        if let Some(start) = &self.start {
            wat.push_str(&format!("(func $start {}) (start $start)\n", self.body(start)));
        }
        wat.push(')');
        wat
    }

    fn wasm(&self) -> Vec<u8> {
        let wat = self.wat();
        wasmer::wat2wasm(wat.as_bytes())
            .unwrap_or_else(|error| panic!("{error}\n{wat}"))
            .into_owned()
    }
}

/// A module's state once instantiated (and its init export called): memory and the
/// exported globals, as bits.
#[derive(Debug, PartialEq, Eq)]
struct State {
    memory: Vec<u8>,
    globals: Vec<(String, u128)>,
}

fn bits(value: &Value) -> u128 {
    match *value {
        Value::I32(v) => v as u32 as u128,
        Value::I64(v) => v as u64 as u128,
        Value::F32(v) => v.to_bits() as u128,
        Value::F64(v) => v.to_bits() as u128,
        Value::V128(v) => v,
        _ => u128::MAX,
    }
}

/// Instantiates `module` (no imports), with `plan` armed when given, then calls `call` if
/// named. `Err` when instantiation or the call fails.
fn run_module(
    engine: &Engine,
    module: &Module,
    plan: Option<&MemoryPlan>,
    call: Option<&str>,
) -> Result<State, String> {
    let mut store = Store::new(engine.wasmer().clone());
    let instance = {
        let mut instantiate = || Instance::new(&mut store, module, &imports! {}).map_err(|e| e.to_string());
        match plan {
            Some(plan) => cow_memory::instantiate_with(plan, instantiate),
            None => instantiate(),
        }
    }?;
    if let Some(name) = call {
        let function = instance.exports.get_function(name).map_err(|e| e.to_string())?;
        function.call(&mut store, &[]).map_err(|e| e.to_string())?;
    }
    let memory = instance.exports.get_memory("memory").map_err(|e| e.to_string())?;
    let view = memory.view(&store);
    let mut bytes = vec![0; view.data_size() as usize];
    view.read(0, &mut bytes).map_err(|e| e.to_string())?;
    let mut globals: Vec<(String, u128)> = instance
        .exports
        .iter()
        .globals()
        .filter(|(name, _)| name.starts_with('g'))
        .map(|(name, global)| (name.clone(), bits(&global.get(&mut store))))
        .collect();
    globals.sort();
    Ok(State {
        memory: bytes,
        globals,
    })
}

/// What wasmparser says about a module.
struct Shape {
    /// `(module, name)` of each import.
    imports: Vec<(String, String)>,
    exports: Vec<String>,
    start: bool,
}

/// The [`Shape`] of `wasm`, `None` when it does not parse.
fn shape(wasm: &[u8]) -> Option<Shape> {
    let (mut imports, mut exports, mut start) = (Vec::new(), Vec::new(), false);
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.ok()? {
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import.ok()?;
                    imports.push((import.module.to_string(), import.name.to_string()));
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    exports.push(export.ok()?.name.to_string());
                }
            }
            Payload::StartSection { .. } => start = true,
            _ => {}
        }
    }
    Some(Shape {
        imports,
        exports,
        start,
    })
}

/// Compiling and the memory image: never a panic; an accepted module is a WCGI program; the
/// image gives the memory stock wasmer gives (instantiated only when no guest code runs at
/// instantiation or the module comes from the grammar, whose code always ends).
fn check_module(engine: &Engine, wasm: &[u8], may_run_start: bool) -> Option<Module> {
    let image = MemoryImage::from_wasm(wasm);
    let _ = cow_memory::declared_minimum_bytes(wasm);
    let module = match engine.compile(wasm) {
        Err(IsolateError::Invalid(message)) => {
            assert!(!message.is_empty());
            assert!(engine.validate(wasm).is_err());
            return None;
        }
        Err(other) => panic!("a module is refused as Invalid, not {other:?}"),
        Ok(module) => module,
    };
    assert!(engine.validate(wasm).is_ok());
    let Shape {
        imports,
        exports,
        start,
    } = shape(wasm).expect("a module that compiles parses");
    assert!(exports.iter().any(|e| e == "_start") && exports.iter().any(|e| e == "memory"));
    assert!(
        imports
            .iter()
            .all(|(module, _)| module == crate::wasi::WASI_MODULE),
        "{imports:?}"
    );
    let image = image.expect("a module that compiles parses");
    if let Some(image) = &image {
        let declared = cow_memory::declared_minimum_bytes(wasm).unwrap();
        assert_eq!(u64::from(image.initial_pages()) * 65536, declared);
        assert!(image.len() as u64 <= declared);
    }
    if imports.is_empty() && (may_run_start || !start) {
        let stock = run_module(engine, &module, None, None);
        let plan = MemoryPlan {
            image: image.clone(),
            max_bytes: None,
        };
        let with_image = run_module(engine, &module, Some(&plan), None);
        match (&stock, &with_image) {
            (Ok(stock), Ok(with_image)) => {
                assert!(stock == with_image, "the image differs from stock wasmer")
            }
            (Err(_), Err(_)) => {}
            _ => panic!("stock: {stock:?}, with the image: {with_image:?}"),
        }
    }
    Some(module)
}

fn check_preinitialize(spec: &ModuleSpec, wasm: &[u8]) {
    let engine = &ENGINE.scratch().unwrap();
    let Some(original) = check_module(engine, wasm, true) else {
        return;
    };
    let init_export = match spec.init_exports {
        0 => None,
        2 => Some("atoll_init"),
        _ => Some("wizer.initialize"),
    };
    match snapshot::preinitialize(engine, wasm, &[]) {
        Err(IsolateError::Invalid(message)) => {
            assert!(!message.contains("this is a bug"), "{message}");
        }
        Err(other) => panic!("refused as {other:?}"),
        Ok(Preinit::Unchanged) => assert_eq!(init_export, None),
        Ok(Preinit::Rewritten {
            wasm: rewritten,
            init_export: ran,
        }) => {
            assert_eq!(Some(ran.as_str()), init_export);
            let Shape { exports, start, .. } = shape(&rewritten).unwrap();
            assert!(!start, "a start section is left");
            assert!(
                !exports
                    .iter()
                    .any(|e| snapshot::INIT_EXPORTS.contains(&e.as_str()))
            );
            assert!(!exports.iter().any(|e| e.starts_with("__atoll_snapshot_")));
            let module = check_module(engine, &rewritten, true).expect("the rewritten module compiles");
            let before =
                run_module(engine, &original, None, Some(ran.as_str())).expect("init ran at preinitialize");
            let after = run_module(engine, &module, None, None).expect("the rewritten module instantiates");
            assert!(before == after, "the snapshot differs from the state after init");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        max_shrink_iters: 200,
        ..config(1000)
    })]

    #[test]
    fn fuzz_snapshot_rewriter(spec in module_spec()) {
        check_preinitialize(&spec, &spec.wasm());
    }

    /// Byte mutations of modules: compile and the image never panic, and agree. Nothing is
    /// pre-initialised or started here (a mutated module may loop).
    #[test]
    fn fuzz_module_checks(spec in module_spec(), mutations in mutations(4)) {
        let wasm = mutate(spec.wasm(), &mutations);
        check_module(&ENGINE.scratch().unwrap(), &wasm, false);
    }
}

#[test]
fn fuzz_module_seeds() {
    for seed in corpus("modules") {
        let wasm = wasmer::wat2wasm(&seed).unwrap().into_owned();
        let engine = &ENGINE.scratch().unwrap();
        check_module(engine, &wasm, true);
        if let Ok(Preinit::Rewritten { wasm: rewritten, .. }) = snapshot::preinitialize(engine, &wasm, &[]) {
            check_module(engine, &rewritten, true).unwrap();
        }
    }
}

/// Hand-made response seeds parse as the module docs say.
#[test]
fn fuzz_cgi_seeds_are_meaningful() {
    let seeds = corpus("cgi");
    assert!(
        seeds
            .iter()
            .any(|seed| cgi::parse_response(Bytes::copy_from_slice(seed)).is_ok())
    );
    assert!(
        seeds
            .iter()
            .any(|seed| cgi::parse_response(Bytes::copy_from_slice(seed)).is_err())
    );
}
