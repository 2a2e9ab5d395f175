//! Pushes the registry must refuse: each fails with a non-zero exit and a one-line reason,
//! and leaves the registry exactly as it was (`atoll versions` and `atoll ls` unchanged).

mod support;

use std::path::Path;

use support::*;

/// A registry with `hello` v1 pushed, and what `versions hello` / `ls` print.
struct Fixture {
    dir: tempfile::TempDir,
    _registry: Process,
    url: String,
    before: (String, String),
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (registry, url) = start_registry(&dir.path().join("registry"));
        assert_eq!(push_ok(&url, &example("hello")), 1);
        let before = (versions(&url, "hello"), ls(&url));
        Fixture {
            dir,
            _registry: registry,
            url,
            before,
        }
    }

    /// A function folder `sub` inside the fixture's tempdir.
    fn path(&self, sub: &str) -> std::path::PathBuf {
        self.dir.path().join(sub)
    }

    /// Runs `push` on `path` and checks that it was refused with a reason containing every
    /// one of `needles`, and that nothing changed in the registry. Returns stderr.
    fn refused(&self, path: &Path, needles: &[&str]) -> String {
        let output = push(&self.url, path);
        self.check_refused(&output, needles)
    }

    fn check_refused(&self, output: &std::process::Output, needles: &[&str]) -> String {
        let err = stderr(output);
        assert!(
            !output.status.success(),
            "push was accepted:\nstdout: {}\nstderr: {err}",
            stdout(output)
        );
        assert!(
            stdout(output).is_empty(),
            "a refused push printed {:?}",
            stdout(output)
        );
        assert!(err.starts_with("error: "), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
        for needle in needles {
            assert!(err.contains(needle), "stderr lacks `{needle}`: {err}");
        }
        self.assert_unchanged();
        eprintln!("refused as expected: {}", err.trim_end());
        err
    }

    fn assert_unchanged(&self) {
        let now = (versions(&self.url, "hello"), ls(&self.url));
        assert_eq!(now, self.before, "the registry changed after a refused push");
    }
}

/// Deterministic junk (xorshift), starting with bytes that are not the Wasm magic.
fn junk(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

#[test]
fn refuses_a_module_that_is_not_wasm() {
    let fixture = Fixture::new();
    let folder = fixture.path("junk");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("junk.wasm"), junk(4096)).unwrap();
    let manifest = write_manifest(
        &folder,
        "hello",
        &folder.join("junk.wasm"),
        &["hello.localhost"],
        "",
    );
    fixture.refused(&manifest, &["invalid module", "422"]);

    // A valid Wasm module that is not a WASI command (no `_start`) is refused too.
    std::fs::write(folder.join("empty.wasm"), b"\0asm\x01\0\0\0").unwrap();
    let manifest = write_manifest(
        &folder,
        "hello",
        &folder.join("empty.wasm"),
        &["hello.localhost"],
        "",
    );
    fixture.refused(&manifest, &["invalid module"]);
}

#[test]
fn refuses_bad_manifests() {
    let fixture = Fixture::new();
    let wasm = example_wasm("hello");
    let wasm = wasm.to_str().unwrap();

    // Not TOML.
    let folder = fixture.path("syntax");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("atoll.toml"),
        format!("name = \"hello\nwasm = {wasm:?}\nroutes = [\"hello.localhost\"]\n"),
    )
    .unwrap();
    fixture.refused(&folder, &["manifest", "line 1"]);

    // An unknown key is named.
    let manifest = write_manifest(
        &fixture.path("unknown-key"),
        "hello",
        Path::new(wasm),
        &["hello.localhost"],
        "colour = \"red\"\n",
    );
    fixture.refused(&manifest, &["colour"]);
    // …also in [limits].
    let manifest = write_manifest(
        &fixture.path("unknown-limit"),
        "hello",
        Path::new(wasm),
        &["hello.localhost"],
        "[limits]\nmemroy = \"64MiB\"\n",
    );
    fixture.refused(&manifest, &["memroy"]);

    // A route that is not `host[/prefix]`.
    let manifest = write_manifest(
        &fixture.path("bad-route"),
        "hello",
        Path::new(wasm),
        &["http://hello.localhost/x"],
        "",
    );
    let err = fixture.refused(&manifest, &["route", "http://hello.localhost/x"]);
    assert_eq!(err.matches("is invalid").count(), 1, "reason repeated: {err}");
    let manifest = write_manifest(
        &fixture.path("bad-route-2"),
        "hello",
        Path::new(wasm),
        &["bad host.localhost"],
        "",
    );
    fixture.refused(&manifest, &["route", "bad host.localhost"]);

    // A bad name.
    let manifest = write_manifest(
        &fixture.path("bad-name"),
        "Hello_World",
        Path::new(wasm),
        &["hw.localhost"],
        "",
    );
    fixture.refused(&manifest, &["Hello_World"]);

    // A route another function serves: 409 naming the owner.
    let manifest = write_manifest(
        &fixture.path("conflict"),
        "thief",
        Path::new(wasm),
        &["hello.localhost"],
        "",
    );
    fixture.refused(&manifest, &["409", "hello.localhost", "`hello`"]);

    // The registry refuses a bad manifest on its own, whatever the client checked.
    let (status, body) = raw_push(
        &fixture.url,
        Some(TOKEN),
        "name = \"hello\"\nwasm = \"x.wasm\"\nroutes = [\"hello.localhost\"]\ncolour = \"red\"\n",
        &std::fs::read(wasm).unwrap(),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("colour"), "{body}");
    fixture.assert_unchanged();
}

#[test]
fn refuses_an_oversized_module() {
    let fixture = Fixture::new();
    let folder = fixture.path("big");
    std::fs::create_dir_all(&folder).unwrap();
    // 65 MiB: over the default 64 MiB limit. A valid module, so only the size is wrong.
    let hello = std::fs::read(example_wasm("hello")).unwrap();
    std::fs::write(folder.join("big.wasm"), padded_module(&hello, 65 << 20, 0)).unwrap();
    let manifest = write_manifest(
        &folder,
        "hello",
        &folder.join("big.wasm"),
        &["hello.localhost"],
        "",
    );
    let err = fixture.refused(&manifest, &["413"]);
    assert!(err.contains("64 MiB"), "the limit is not named: {err}");
}

#[test]
fn refuses_missing_and_wrong_tokens() {
    let fixture = Fixture::new();
    let hello = example("hello");
    let hello = hello.to_str().unwrap();

    let output = atoll_with(&["push", hello, "--registry", &fixture.url], |c| {
        c.env_remove("ATOLL_TOKEN");
    });
    fixture.check_refused(&output, &["401", "missing bearer token"]);

    let output = atoll(&[
        "push",
        hello,
        "--registry",
        &fixture.url,
        "--token",
        "not-the-token",
    ]);
    fixture.check_refused(&output, &["401", "invalid token"]);

    let output = atoll_with(&["push", hello, "--registry", &fixture.url], |c| {
        c.env("ATOLL_TOKEN", "also-wrong");
    });
    fixture.check_refused(&output, &["401", "invalid token"]);

    // Reads need the token too.
    let output = atoll_with(&["ls", "--registry", &fixture.url], |c| {
        c.env_remove("ATOLL_TOKEN");
    });
    assert!(!output.status.success());
    assert!(stderr(&output).contains("401"), "{}", stderr(&output));

    // The same on the wire.
    let addr = url_addr(&fixture.url);
    let response = http_get(addr, addr, "/v1/functions").unwrap();
    assert_eq!(response.status, 401, "{}", response.text());
    assert_eq!(response.header("www-authenticate"), Some("Bearer"));
    assert!(response.text().contains("\"error\""), "{}", response.text());
    let wrong = http_request(
        addr,
        "GET",
        addr,
        "/v1/functions",
        &[("Authorization", "Bearer nope")],
        b"",
    )
    .unwrap();
    assert_eq!(wrong.status, 401, "{}", wrong.text());
    let right = http_request(
        addr,
        "GET",
        addr,
        "/v1/functions",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        b"",
    )
    .unwrap();
    assert_eq!(right.status, 200, "{}", right.text());
    let listed: serde_json::Value = serde_json::from_slice(&right.body).unwrap();
    assert_eq!(listed[0]["name"], "hello", "{listed}");

    let wasm = std::fs::read(example_wasm("hello")).unwrap();
    let manifest = "name = \"hello\"\nwasm = \"x.wasm\"\nroutes = [\"hello.localhost\"]\n";
    let (status, body) = raw_push(&fixture.url, None, manifest, &wasm);
    assert_eq!(status, 401, "{body}");
    let (status, body) = raw_push(&fixture.url, Some("nope"), manifest, &wasm);
    assert_eq!(status, 401, "{body}");
    fixture.assert_unchanged();

    // The health check needs no token.
    assert_eq!(http_get(addr, addr, "/healthz").unwrap().status, 200);
}

/// A push straight on the wire (multipart), bypassing the CLI's own checks.
fn raw_push(url: &str, token: Option<&str>, manifest: &str, module: &[u8]) -> (u16, String) {
    let boundary = "atoll-e2e-boundary-7d1f";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"manifest\"\r\n\r\n{manifest}\r\n\
             --{boundary}\r\nContent-Disposition: form-data; name=\"module\"; filename=\"m.wasm\"\r\n\
             Content-Type: application/wasm\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(module);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let authorization = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", content_type.as_str())];
    if let Some(authorization) = &authorization {
        headers.push(("Authorization", authorization.as_str()));
    }
    let addr = url_addr(url);
    let response = http_request(addr, "POST", addr, "/v1/functions", &headers, &body).unwrap();
    (response.status, response.text())
}

#[test]
fn refuses_what_a_deploy_token_does_not_cover_and_routes_another_function_owns() {
    let fixture = Fixture::new();
    let wasm = example_wasm("hello");
    let created = atoll(&[
        "token",
        "create",
        "--scope",
        "deploy",
        "--functions",
        "shop-*",
        "--domains",
        "shop.localhost,*.shop.localhost",
        "--registry",
        &fixture.url,
    ]);
    let token = expect_success("token create", &created).trim().to_string();
    assert!(token.starts_with("atoll_"), "{token}");
    assert!(stderr(&created).contains("deploy functions shop-* domains shop.localhost,*.shop.localhost"));
    let as_deploy = |path: &Path| {
        atoll_with(
            &["push", path.to_str().unwrap(), "--registry", &fixture.url],
            |c| {
                c.env("ATOLL_TOKEN", &token);
            },
        )
    };

    // Someone else's function, and a route outside its domains: 403, nothing changes.
    let output = as_deploy(&example("hello"));
    fixture.check_refused(&output, &["403", "function `hello` is not one of its functions"]);
    let outside = write_manifest(
        &fixture.path("outside"),
        "shop-web",
        &wasm,
        &["shop.localhost", "web.localhost"],
        "",
    );
    let output = as_deploy(&outside);
    fixture.check_refused(
        &output,
        &["403", "route \"web.localhost\" is outside its domains"],
    );

    // A path under a host another function owns: 409 naming it.
    let under = write_manifest(
        &fixture.path("under"),
        "thief",
        &wasm,
        &["hello.localhost/checkout"],
        "",
    );
    fixture.refused(
        &under,
        &["409", "hello.localhost/checkout belongs to function `hello`"],
    );

    // Within its grant: accepted; then revoked, it is refused.
    let inside = write_manifest(
        &fixture.path("inside"),
        "shop-web",
        &wasm,
        &["shop.localhost", "www.shop.localhost"],
        "",
    );
    let output = as_deploy(&inside);
    assert!(expect_success("push", &output).starts_with("shop-web v1 "));
    let listed = expect_success("token ls", &atoll(&["token", "ls", "--registry", &fixture.url]));
    let id = listed
        .lines()
        .nth(1)
        .and_then(|line| line.split_whitespace().next())
        .unwrap_or_else(|| panic!("no token listed: {listed}"))
        .to_string();
    assert!(token.contains(&id), "{listed}");
    expect_success(
        "token revoke",
        &atoll(&["token", "revoke", &id, "--registry", &fixture.url]),
    );
    let output = as_deploy(&inside);
    assert!(stderr(&output).contains("401"), "{}", stderr(&output));
}
