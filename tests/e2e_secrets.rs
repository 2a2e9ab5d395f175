//! Secrets with real processes: set from stdin, sealed by the registry, opened by a node
//! that holds the key and handed to requests; never in clear on either disk, in an API
//! answer, the watch stream or a log; a node without the key does not serve the function.

mod support;

use std::path::Path;
use std::process::Stdio;

use support::*;

const HOST: &str = "vault.localhost";
const SECRET: &str = "s3cr3t-Zq9-value";

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap().flatten() {
                stack.push(entry.path());
            }
        } else if let Ok(bytes) = std::fs::read(&path)
            && bytes.windows(needle.len()).any(|window| window == needle)
        {
            found.push(path.display().to_string());
        }
    }
    found
}

/// `atoll secret set vault KEY` with `value` on stdin.
fn secret_set(url: &str, key: &str, value: &str, dir: &Path) -> std::process::Output {
    let input = dir.join("secret-input");
    std::fs::write(&input, format!("{value}\n")).unwrap();
    let output = atoll_with(&["secret", "set", "vault", key, "--registry", url], |command| {
        command.stdin(Stdio::from(std::fs::File::open(&input).unwrap()));
    });
    std::fs::remove_file(&input).unwrap();
    output
}

#[test]
fn a_secret_reaches_the_function_and_nothing_else_holds_it_in_clear() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("secrets.key");
    std::fs::write(&key_file, format!("{}\n", "3a".repeat(32))).unwrap();
    let key_arg = key_file.to_str().unwrap();
    let registry_data = dir.path().join("registry");
    let mut registry = Process::spawn(
        "registry",
        &[
            "registry",
            "--listen",
            "127.0.0.1:0",
            "--data",
            registry_data.to_str().unwrap(),
            "--secrets-key-file",
            key_arg,
        ],
    );
    let line = registry.wait_for_line("registry listening on ", STARTUP);
    let url = line["registry listening on ".len()..].trim().to_string();
    let node_data = dir.path().join("node");
    let node = start_edge_node(&url, &node_data, &["--secrets-key-file", key_arg]);
    let http = node.http.clone().unwrap();
    // A node without the key.
    let keyless = start_edge_node(&url, &dir.path().join("keyless"), &[]);
    let keyless_http = keyless.http.clone().unwrap();

    let manifest = write_manifest(
        &dir.path().join("fn"),
        "vault",
        &example_wasm("echo"),
        &[HOST],
        "[env]\nGREETING = \"public\"\n",
    );
    assert_eq!(push_ok(&url, &manifest), 1);
    wait_for_body(
        &http,
        HOST,
        "/",
        |r| r.text().contains("GREETING=public"),
        STARTUP,
    );
    wait_for_body(
        &keyless_http,
        HOST,
        "/",
        |r| r.text().contains("GREETING=public"),
        STARTUP,
    );

    // Bad names are refused and store nothing.
    let big = "x".repeat(64 * 1024 + 1);
    for (name, value, message) in [
        ("lower-case", "x", "not an environment variable name"),
        // A client's `Api-Token` header would fill it.
        ("HTTP_API_TOKEN", "x", "set by each request"),
        ("BIG", big.as_str(), "limit"),
    ] {
        let refused = secret_set(&url, name, value, dir.path());
        assert!(!refused.status.success(), "{name}");
        assert!(stderr(&refused).contains(message), "{name}: {}", stderr(&refused));
    }

    let out = expect_success("secret set", &secret_set(&url, "GREETING", SECRET, dir.path()));
    assert_eq!(out.trim(), "vault: secret GREETING set");
    // The secret takes the manifest variable's place, for requests.
    wait_for_body(
        &http,
        HOST,
        "/",
        |r| r.text().contains(&format!("GREETING={SECRET}\n")),
        STARTUP,
    );
    // The node without the key keeps serving what it had and says why it cannot go on.
    keyless
        .process
        .wait_for_stderr("this node has no secrets key", STARTUP);
    assert!(get(&keyless_http, HOST, "/").text().contains("GREETING=public"));

    let listed = expect_success(
        "secret ls",
        &atoll(&["secret", "ls", "vault", "--registry", &url]),
    );
    assert_eq!(listed.trim(), "GREETING");

    // Nowhere in clear: the registry's and the nodes' disks (state, cached deployments,
    // modules, compiled artifacts and memory images), API answers, the watch stream, logs.
    assert!(
        !files_containing(&registry_data, b"public").is_empty(),
        "the scan reads the store (the manifest's own value is there)"
    );
    for data in [&registry_data, &node_data, &dir.path().join("keyless")] {
        assert_eq!(files_containing(data, SECRET.as_bytes()), Vec::<String>::new());
    }
    let api = |path: &str| {
        let response = http_request(
            url_addr(&url),
            "GET",
            url_addr(&url),
            path,
            &[("Authorization", &format!("Bearer {TOKEN}"))],
            b"",
        )
        .unwrap();
        assert_eq!(response.status, 200, "{path}: {}", response.text());
        response.text()
    };
    for path in [
        "/v1/functions",
        "/v1/functions/vault/versions",
        "/v1/functions/vault/secrets",
    ] {
        assert!(!api(path).contains(SECRET), "{path}");
    }
    // The watch stream carries the sealed form (a live stream: read what the catch-up sent).
    let mut watch = std::net::TcpStream::connect(url_addr(&url)).unwrap();
    {
        use std::io::{Read, Write};
        write!(
            watch,
            "GET /v1/watch?since=0 HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        )
        .unwrap();
        watch
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut seen = Vec::new();
        let mut buffer = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("\"synced\"") {
            let read = watch.read(&mut buffer).expect("the catch-up");
            assert!(read > 0, "the stream ended");
            seen.extend_from_slice(&buffer[..read]);
        }
        let seen = String::from_utf8_lossy(&seen);
        assert!(
            seen.contains("\"GREETING\"") && seen.contains("\"sealed\""),
            "{seen}"
        );
        assert!(!seen.contains(SECRET));
    }
    for process in [&registry, &node.process, &keyless.process] {
        assert!(!process.logs().contains(SECRET), "{}", process.logs());
    }

    // Removed: the manifest's value again; removing it twice is a 404 that says so.
    let out = expect_success(
        "secret rm",
        &atoll(&["secret", "rm", "vault", "GREETING", "--registry", &url]),
    );
    assert_eq!(out.trim(), "vault: secret GREETING removed");
    wait_for_body(
        &http,
        HOST,
        "/",
        |r| r.text().contains("GREETING=public\n"),
        STARTUP,
    );
    let again = atoll(&["secret", "rm", "vault", "GREETING", "--registry", &url]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("has no secret GREETING"),
        "{}",
        stderr(&again)
    );
}
