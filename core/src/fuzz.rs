//! Fuzz targets for what a push hands the registry as text: the manifest
//! ([`Manifest::parse`]) and its route patterns ([`RoutePattern`]).
//!
//! Property tests (proptest, stable Rust) with a bounded number of cases, run with the other
//! tests; `PROPTEST_CASES=100000 cargo nextest run -p atoll-core fuzz` runs them longer.
//! Manifests are built from a grammar of plausible and hostile values (serialised by the
//! `toml` crate, so quoting is right), then mutated byte by byte; seeds are in
//! `fuzz-corpus/`. A failing case is written to `proptest-regressions/` and replayed first.
//!
//! What is asserted is what the modules promise: a refusal is one line starting with
//! `manifest: ` (or `route "…" is invalid: …`); an accepted manifest holds only valid values
//! and comes back unchanged through TOML and JSON; an accepted route prints in a canonical
//! form that parses back to itself, and matches exactly the hosts and paths its docs say.

use std::time::Duration;

use proptest::prelude::*;
use proptest::sample::select;

use crate::manifest::{MAX_MEMORY_BYTES, MAX_MIN_INSTANCES, MAX_NAME_LEN, MAX_TIMEOUT};
use crate::route::{HostPattern, RoutePattern};
use crate::{Manifest, ManifestError};

use atoll_testkit::fuzz::config;

/// The seed inputs of one target: every file in `fuzz-corpus/<target>/`, as text.
fn corpus(target: &str) -> Vec<String> {
    atoll_testkit::fuzz::corpus(env!("CARGO_MANIFEST_DIR"), target)
        .into_iter()
        .map(|seed| String::from_utf8(seed).unwrap())
        .collect()
}

/// Byte-level mutations of a text (see [`atoll_testkit::fuzz::mutate`]); the result is
/// read back lossily, as a body that is not UTF-8 would be refused before it got this far.
fn mutate(text: String, mutations: &[(usize, u8, u8)]) -> String {
    String::from_utf8_lossy(&atoll_testkit::fuzz::mutate(text.into_bytes(), mutations)).into_owned()
}

fn mutations() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec(
        (
            any::<usize>(),
            any::<u8>(),
            prop_oneof![select(&b"\"'=[]{}.,\n\\ #\0-*/:"[..]), any::<u8>()],
        ),
        0..4,
    )
}

/// A choice from `pool` whose first `good` entries are valid: one of those `weight` times out
/// of `weight + 1`, anything in the pool otherwise, so that most inputs get past the first
/// check and exercise the rest.
fn biased(pool: &'static [&'static str], good: usize, weight: u32) -> impl Strategy<Value = &'static str> {
    prop_oneof![weight => select(&pool[..good]), 1 => select(pool)]
}

/// Byte mutations half of the time.
fn some_mutations() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop_oneof![Just(Vec::new()), mutations()]
}

// ---------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------

/// Host labels, valid first (9).
const LABELS: &[&str] = &[
    "a",
    "example",
    "com",
    "shop",
    "localhost",
    "xn--bcher-kva",
    "a-b",
    "0",
    "Ex",
    "-a",
    "a-",
    "*",
    "a*",
    "",
    "a_b",
    "\u{e4}",
    "a b",
    "a:80",
    "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijk",
    "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijkl",
];
/// Path segments, valid first (8).
const SEGMENTS: &[&str] = &[
    "", "echo", "api", "v1", ".", "%2e%2e", "\u{e9}", "A", "..", "a?b", "a#b", "a b", "\t", "a%2Fb", "\\",
];

fn route_text() -> impl Strategy<Value = String> {
    let host = (
        prop::option::weighted(0.2, biased(&["*.", "*", "**.", ".", "http://"], 1, 6)),
        prop::collection::vec(biased(LABELS, 9, 12), 1..5),
        prop::option::weighted(0.03, select(&[":80", ".", ":"][..])),
    )
        .prop_map(|(prefix, labels, suffix)| {
            format!(
                "{}{}{}",
                prefix.unwrap_or(""),
                labels.join("."),
                suffix.unwrap_or("")
            )
        });
    let path = prop::option::weighted(0.4, prop::collection::vec(biased(SEGMENTS, 8, 12), 1..5))
        .prop_map(|segments| segments.map(|s| format!("/{}", s.join("/"))).unwrap_or_default());
    prop_oneof![
        8 => (host, path).prop_map(|(host, path)| host + &path),
        1 => "\\PC{0,24}",
        1 => "[a-z*./]{0,16}",
    ]
}

/// What the route docs say `pattern` matches, computed without the route module.
fn reference_host_match(pattern: &HostPattern, host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host);
    match pattern {
        HostPattern::Exact(name) => host == name,
        HostPattern::Wildcard { suffix } => host
            .strip_suffix(suffix.as_str())
            .and_then(|front| front.strip_suffix('.'))
            .is_some_and(|front| !front.is_empty()),
    }
}

fn check_route(input: &str, hosts: &[String], paths: &[String]) {
    let pattern = match input.parse::<RoutePattern>() {
        Err(error) => {
            let message = error.to_string();
            assert!(
                message.starts_with(&format!("route {input:?} is invalid: ")),
                "{message}"
            );
            assert!(!message.contains('\n'), "{message}");
            return;
        }
        Ok(pattern) => pattern,
    };
    let canonical = pattern.to_string();
    assert_eq!(
        canonical.parse::<RoutePattern>().as_ref(),
        Ok(&pattern),
        "{input:?} → {canonical:?}"
    );
    assert_eq!(
        serde_json::from_str::<RoutePattern>(&serde_json::to_string(&pattern).unwrap()).unwrap(),
        pattern
    );
    assert!(
        canonical.bytes().all(|b| b.is_ascii_graphic() || b >= 0x80),
        "{canonical:?}"
    );
    let host_name = match &pattern.host {
        HostPattern::Exact(name) => name.clone(),
        HostPattern::Wildcard { suffix } => suffix.clone(),
    };
    assert!(host_name.len() <= 253, "{canonical:?}");
    for label in host_name.split('.') {
        assert!((1..=63).contains(&label.len()), "{canonical:?}");
        assert!(
            label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "{canonical:?}"
        );
        assert!(!label.starts_with('-') && !label.ends_with('-'), "{canonical:?}");
    }
    if let Some(prefix) = &pattern.path_prefix {
        assert!(prefix.starts_with('/') && !prefix.ends_with('/'), "{canonical:?}");
        assert!(!prefix.contains(['?', '#']), "{canonical:?}");
        assert!(!prefix.split('/').any(|segment| segment == ".."), "{canonical:?}");
    }

    // The hosts it names match, in any case and with a trailing dot; a wildcard never
    // matches its own suffix.
    match &pattern.host {
        HostPattern::Exact(name) => {
            assert!(pattern.host.matches(name));
            assert!(pattern.host.matches(&name.to_ascii_uppercase()));
            assert!(pattern.host.matches(&format!("{name}.")));
        }
        HostPattern::Wildcard { suffix } => {
            assert!(pattern.host.matches(&format!("x.{suffix}")));
            assert!(
                pattern
                    .host
                    .matches(&format!("A.B.{}", suffix.to_ascii_uppercase()))
            );
            assert!(!pattern.host.matches(suffix));
            assert!(!pattern.host.matches(&format!(".{suffix}")));
        }
    }
    for host in hosts.iter().map(String::as_str).chain([host_name.as_str()]) {
        assert_eq!(
            pattern.host.matches(host),
            reference_host_match(&pattern.host, host),
            "{canonical:?} against host {host:?}"
        );
    }
    for path in paths {
        let expected = match &pattern.path_prefix {
            None => true,
            Some(prefix) => path == prefix || path.starts_with(&format!("{prefix}/")),
        };
        assert_eq!(
            pattern.matches_path(path),
            expected,
            "{canonical:?} against path {path:?}"
        );
    }
}

/// Request hosts and paths to match against: near misses of the pattern and noise.
fn probes(input: &str) -> (Vec<String>, Vec<String>) {
    let (host, path) = match input.find('/') {
        Some(i) => (&input[..i], &input[i..]),
        None => (input, ""),
    };
    let bare = host.trim_start_matches("*.");
    let hosts = vec![
        bare.to_string(),
        format!("x.{bare}"),
        format!("x{bare}"),
        format!(".{bare}"),
        format!("..{bare}"),
        format!("{bare}."),
        format!("{bare}.."),
        format!("\u{e9}.{bare}"),
        format!("{bare}.evil"),
        bare.to_uppercase(),
        String::new(),
    ];
    let trimmed = path.trim_end_matches('/');
    let paths = vec![
        path.to_string(),
        trimmed.to_string(),
        format!("{trimmed}/"),
        format!("{trimmed}/x"),
        format!("{trimmed}x"),
        format!("{trimmed}%2F"),
        "/".into(),
        String::new(),
    ];
    (hosts, paths)
}

proptest! {
    #![proptest_config(config(10_000))]

    #[test]
    fn fuzz_route_patterns(input in route_text(), mutations in some_mutations()) {
        let input = mutate(input, &mutations);
        let (hosts, paths) = probes(&input);
        check_route(&input, &hosts, &paths);
    }

    /// Arbitrary request hosts never panic a match (a host is sliced by byte offsets).
    #[test]
    fn fuzz_route_matching_hosts(
        input in route_text(),
        host in "\\PC{0,12}(\\.[a-z]{1,4}){0,3}\\.?",
        path in "\\PC{0,16}",
    ) {
        check_route(&input, &[host], &[path]);
    }
}

#[test]
fn fuzz_route_seeds() {
    for seed in corpus("routes") {
        for input in seed.lines() {
            let (hosts, paths) = probes(input);
            check_route(input, &hosts, &paths);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Manifest
// ---------------------------------------------------------------------------------------

/// Function names, valid first (4).
const NAMES: &[&str] = &[
    "echo",
    "hello-world",
    "a",
    "0",
    "-echo",
    "echo-",
    "Echo",
    "e_cho",
    "",
    "\u{e9}cho",
    "a b",
    "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijk",
    "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefghijkl",
];
/// Sizes, valid first (9).
const SIZES: &[&str] = &[
    "64MiB",
    "1B",
    "4GiB",
    "4096MiB",
    "1 GiB",
    " 1GiB ",
    "1GB",
    "1kB",
    "1KB",
    "0B",
    "4097MiB",
    "5GB",
    "1kb",
    "18446744073709551615GiB",
    "99999999999999999999B",
    "1.5MiB",
    "-1MiB",
    "",
    "MiB",
    "64",
    "64 ",
    "0x10MiB",
    "\u{661}MiB",
];
/// Durations, valid first (6).
const DURATIONS: &[&str] = &[
    "10s",
    "15m",
    "100ms",
    "10ms",
    " 5s ",
    "1s 1s",
    "0s",
    "15m 1s",
    "16m",
    "1h",
    "9ms",
    "1ns",
    "garbage",
    "1e3s",
    "",
    "18446744073709551615s",
    "-1s",
    "1 sec",
];
/// `[env]` keys, valid first (3), and values.
const ENV_KEYS: &[&str] = &[
    "GREETING", "_X1", "a", "1A", "", "A-B", "A=B", "A B", "\u{c4}", "A\0",
];
const ENV_VALUES: &[&str] = &["hi", "", "a=b", "line\nbreak", "\u{1f600}", "\r\n", "nul\0byte"];
/// `wasm` paths, valid first (2).
const WASM_PATHS: &[&str] = &["m.wasm", "../x.wasm", "", " ", "a\0.wasm"];

/// A manifest as a TOML table: each field present or not, well-typed most of the time.
fn manifest_table() -> impl Strategy<Value = toml::Table> {
    let string = |pool: &'static [&'static str], good: usize| {
        prop_oneof![
            24 => biased(pool, good, 8).prop_map(|s| toml::Value::String(s.into())),
            1 => any::<i64>().prop_map(toml::Value::Integer),
            1 => Just(toml::Value::Array(vec![])),
        ]
    };
    let integer = prop_oneof![
        4 => 0..300i64,
        1 => Just(0i64),
        1 => Just(257),
        1 => Just(i64::from(u32::MAX)),
        1 => Just(i64::from(u32::MAX) + 1),
        1 => Just(-1),
        1 => any::<i64>(),
    ]
    .prop_map(toml::Value::Integer);
    let route = prop_oneof![
        6 => (biased(&["", "*."], 1, 3), prop::collection::vec(select(&LABELS[..9]), 1..4), prop::option::of(select(&SEGMENTS[1..4])))
            .prop_map(|(wildcard, labels, path)| {
                format!("{wildcard}{}{}", labels.join("."), path.map(|p| format!("/{p}")).unwrap_or_default())
            }),
        1 => route_text(),
    ];
    let routes = prop::collection::vec(route, 0..4)
        .prop_map(|routes| toml::Value::Array(routes.into_iter().map(toml::Value::String).collect()));
    let env = prop::collection::vec((biased(ENV_KEYS, 3, 8), biased(ENV_VALUES, 6, 8)), 0..3);
    let limits = (
        prop::option::of(string(SIZES, 9)),
        prop::option::of(string(DURATIONS, 6)),
        prop::option::of(string(SIZES, 9)),
        prop::option::weighted(0.05, Just(())),
    );
    let scale = (
        prop::option::of(integer.clone()),
        prop::option::of(integer.clone()),
        prop::option::of(integer),
        prop::option::of(string(DURATIONS, 6)),
    );
    (
        prop::option::weighted(0.98, string(NAMES, 4)),
        prop::option::weighted(0.98, string(WASM_PATHS, 2)),
        prop::option::weighted(0.98, routes),
        prop::option::weighted(0.4, env),
        prop::option::weighted(0.5, limits),
        prop::option::weighted(0.4, scale),
        prop::option::weighted(0.03, select(&["rotues", "Name", "limits.memory"][..])),
    )
        .prop_map(|(name, wasm, routes, env, limits, scale, stray)| {
            let mut table = toml::Table::new();
            let put = |table: &mut toml::Table, key: &str, value: Option<toml::Value>| {
                if let Some(value) = value {
                    table.insert(key.into(), value);
                }
            };
            put(&mut table, "name", name);
            put(&mut table, "wasm", wasm);
            put(&mut table, "routes", routes);
            if let Some(env) = env {
                let env = env
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), toml::Value::String(v.into())))
                    .collect();
                table.insert("env".into(), toml::Value::Table(env));
            }
            if let Some((memory, timeout, response, unknown)) = limits {
                let mut limits = toml::Table::new();
                put(&mut limits, "memory", memory);
                put(&mut limits, "timeout", timeout);
                put(&mut limits, "response", response);
                put(&mut limits, "cpu", unknown.map(|()| toml::Value::Integer(1)));
                table.insert("limits".into(), toml::Value::Table(limits));
            }
            if let Some((min_instances, max_concurrency, max_queue, idle_timeout)) = scale {
                let mut scale = toml::Table::new();
                put(&mut scale, "min_instances", min_instances);
                put(&mut scale, "max_concurrency", max_concurrency);
                put(&mut scale, "max_queue", max_queue);
                put(&mut scale, "idle_timeout", idle_timeout);
                table.insert("scale".into(), toml::Value::Table(scale));
            }
            put(
                &mut table,
                stray.unwrap_or("name"),
                stray.map(|_| toml::Value::Boolean(true)),
            );
            table
        })
}

fn manifest_text() -> impl Strategy<Value = String> {
    prop_oneof![
        12 => manifest_table().prop_map(|table| toml::to_string(&table).unwrap()),
        1 => select(corpus("manifests")),
        1 => "\\PC{0,64}",
    ]
}

fn check_manifest(text: &str) {
    let manifest = match Manifest::parse(text) {
        Err(error) => {
            let message = error.to_string();
            assert!(message.starts_with("manifest: "), "{message}");
            assert!(!message.contains('\n'), "{message}");
            assert!(!matches!(error, ManifestError::Io { .. }));
            return;
        }
        Ok(manifest) => manifest,
    };
    let shown = format!("{text:?} → {manifest:?}");

    // Only valid values get through.
    crate::manifest::check_name(&manifest.name).unwrap();
    assert!(manifest.name.len() <= MAX_NAME_LEN);
    assert!(!manifest.wasm.trim().is_empty(), "{shown}");
    assert!(!manifest.routes.is_empty(), "{shown}");
    for (index, route) in manifest.routes.iter().enumerate() {
        let pattern: RoutePattern = route.parse().unwrap_or_else(|e| panic!("{e}: {shown}"));
        assert_eq!(&pattern.to_string(), route, "routes are canonical: {shown}");
        assert!(!manifest.routes[..index].contains(route), "{shown}");
    }
    assert_eq!(manifest.route_patterns().len(), manifest.routes.len());
    for (key, value) in &manifest.env {
        let mut bytes = key.bytes();
        assert!(
            bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "{shown}"
        );
        assert!(!value.contains('\0'), "{shown}");
    }
    let memory = manifest.limits.memory_bytes();
    assert!(memory > 0 && memory <= MAX_MEMORY_BYTES, "{shown}");
    let response = manifest.limits.response_bytes();
    assert!(response > 0 && response <= MAX_MEMORY_BYTES, "{shown}");
    let timeout = manifest.limits.timeout();
    assert!(timeout > Duration::ZERO && timeout <= MAX_TIMEOUT, "{shown}");
    if let Some(idle) = &manifest.scale.idle_timeout {
        assert_eq!(
            manifest.scale.idle_timeout(),
            humantime::parse_duration(idle).unwrap(),
            "{shown}"
        );
    }
    let scale = &manifest.scale;
    assert!(scale.max_concurrency() >= 1, "{shown}");
    assert!(scale.min_instances() <= MAX_MIN_INSTANCES, "{shown}");
    assert!(scale.min_instances() <= scale.max_concurrency(), "{shown}");

    // It comes back unchanged through TOML (a manifest written back) and JSON (how it
    // travels to nodes), and parsing it again changes nothing.
    let toml_text = toml::to_string(&manifest).unwrap();
    assert_eq!(Manifest::parse(&toml_text).unwrap(), manifest, "{toml_text}");
    let json = serde_json::to_string(&manifest).unwrap();
    assert_eq!(
        serde_json::from_str::<Manifest>(&json).unwrap(),
        manifest,
        "{json}"
    );
}

proptest! {
    #![proptest_config(config(5000))]

    #[test]
    fn fuzz_manifest(text in manifest_text(), mutations in some_mutations()) {
        check_manifest(&mutate(text, &mutations));
    }
}

#[test]
fn fuzz_manifest_seeds() {
    for seed in corpus("manifests") {
        check_manifest(&seed);
    }
}
