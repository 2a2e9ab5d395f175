//! Shared harness for the end-to-end tests: boots the real `atoll` binary as child processes
//! on loopback (port 0, addresses parsed from what the binary prints), drives the CLI, and
//! talks HTTP/1.1 over a raw `TcpStream`.
//!
//! Rules the helpers follow, so tests stay reliable on a slow shared machine:
//!
//! - Readiness is always polled (short pause between attempts, generous deadline); nothing
//!   sleeps "long enough" for a server to come up.
//! - Every child's stdout and stderr are drained by reader threads into memory, so a pipe
//!   never fills and blocks the server, and a failing assertion can show the server's log.
//! - A [`Process`] is killed (SIGKILL) and reaped when dropped, so a panicking test leaves
//!   no server behind; if the test is panicking, the drop prints the tail of the log.
//!
//! Each test binary compiles this module separately and uses only part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The token every process started by the tests shares.
pub const TOKEN: &str = "atoll-e2e-test-token";
/// Deadline for anything that should be quick but runs on a shared, possibly busy machine.
pub const STARTUP: Duration = Duration::from_secs(30);
/// Pause between two polling attempts.
pub const POLL: Duration = Duration::from_millis(20);

/// The `atoll` binary under test.
pub fn atoll_bin() -> &'static str {
    env!("CARGO_BIN_EXE_atoll")
}

/// `/work/main/examples` (absolute).
pub fn examples_dir() -> PathBuf {
    PathBuf::from(env!("ATOLL_EXAMPLES_DIR"))
}

/// The folder of one bundled example (`hello`, `echo`, `fault`), holding its `atoll.toml`.
pub fn example(name: &str) -> PathBuf {
    examples_dir().join(name)
}

/// The compiled module of one bundled example.
pub fn example_wasm(name: &str) -> PathBuf {
    examples_dir()
        .join("target/wasm32-wasip1/release")
        .join(format!("{name}.wasm"))
}

/// The body `examples/hello` answers for `host`.
pub fn hello_body(host: &str) -> String {
    format!("Hello from Atoll on {host}!\n")
}

// ---------------------------------------------------------------------------------------
// Processes

type Lines = Arc<Mutex<Vec<String>>>;

/// A running `atoll` server process. Killed with SIGKILL (and reaped) when dropped.
pub struct Process {
    label: String,
    child: Child,
    stdout: Lines,
    stderr: Lines,
    exit: Option<ExitStatus>,
}

impl Process {
    /// Starts `atoll ARGS…` with `ATOLL_TOKEN` and `ATOLL_LOG=info` set.
    pub fn spawn(label: &str, args: &[&str]) -> Process {
        let mut command = Command::new(atoll_bin());
        command
            .args(args)
            .env("ATOLL_TOKEN", TOKEN)
            .env("ATOLL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {} {args:?}: {e}", atoll_bin()));
        let stdout = collect_lines(child.stdout.take().expect("piped stdout"));
        let stderr = collect_lines(child.stderr.take().expect("piped stderr"));
        Process {
            label: label.to_string(),
            child,
            stdout,
            stderr,
            exit: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Everything the process printed so far, for panic messages.
    pub fn logs(&self) -> String {
        format!(
            "--- {label} stdout ---\n{}\n--- {label} stderr ---\n{}\n--- end of {label} ---",
            self.stdout_lines().join("\n"),
            self.stderr_lines().join("\n"),
            label = self.label,
        )
    }

    /// Polls stdout until a line starts with `prefix`; returns that line. Panics (with the
    /// process's output) on timeout or if the process exits first.
    pub fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.stdout_lines().into_iter().find(|l| l.starts_with(prefix)) {
                return line;
            }
            if let Some(status) = self.try_exit() {
                // The reader may still hold the last lines: one more look.
                std::thread::sleep(Duration::from_millis(50));
                if let Some(line) = self.stdout_lines().into_iter().find(|l| l.starts_with(prefix)) {
                    return line;
                }
                panic!(
                    "{} exited ({status}) before printing `{prefix}`\n{}",
                    self.label,
                    self.logs()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not print `{prefix}` within {timeout:?}\n{}",
                    self.label,
                    self.logs()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Polls stderr until a line contains `needle`.
    pub fn wait_for_stderr(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.stderr_lines().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not log `{needle}` within {timeout:?}\n{}",
                    self.label,
                    self.logs()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The exit status, if the process has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().expect("try_wait");
        }
        self.exit
    }

    /// Sends SIGTERM (through `kill(1)`: the workspace forbids `unsafe`).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Sends SIGKILL and reaps the process.
    pub fn sigkill(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            self.exit = Some(self.child.wait().expect("wait after kill"));
        }
    }

    /// Polls until the process exits; panics with its logs after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return status;
            }
            if Instant::now() > deadline {
                panic!("{} did not exit within {timeout:?}\n{}", self.label, self.logs());
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let stderr = self.stderr_lines();
            let tail = &stderr[stderr.len().saturating_sub(40)..];
            eprintln!(
                "--- {} (pid {}) stderr, last {} lines ---\n{}",
                self.label,
                self.pid(),
                tail.len(),
                tail.join("\n")
            );
        }
        self.sigkill();
    }
}

fn collect_lines(stream: impl Read + Send + 'static) -> Lines {
    let lines: Lines = Arc::default();
    let sink = lines.clone();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line).trim_end().to_string();
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push(text);
                }
            }
        }
    });
    lines
}

/// Starts `atoll registry` on `127.0.0.1:0` with its store in `data`; returns the process and
/// its URL (`http://127.0.0.1:PORT`).
pub fn start_registry(data: &Path) -> (Process, String) {
    let data = data.to_str().expect("utf-8 path");
    let mut process = Process::spawn(
        "registry",
        &["registry", "--listen", "127.0.0.1:0", "--data", data],
    );
    let line = process.wait_for_line("registry listening on ", STARTUP);
    let url = line["registry listening on ".len()..].trim().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "unexpected line: {line}");
    (process, url)
}

/// Starts `atoll node` following `registry_url`, with its cache in `data`; returns the
/// process, its traffic address and its admin address (`127.0.0.1:PORT` each).
pub fn start_node(registry_url: &str, data: &Path) -> (Process, String, String) {
    let node = start_edge_node(registry_url, data, &[]);
    let http = node.http.expect("the node printed its http address");
    (node.process, http, node.admin)
}

/// `atoll node --name NAME` following `control` (`--registry URL` or `--store nats://…`);
/// the process and its HTTP address.
pub fn start_named_node(control: &[&str; 2], name: &str, data: &Path) -> (Process, String) {
    let data = data.to_str().unwrap();
    let mut process = Process::spawn(
        name,
        &[
            "node",
            control[0],
            control[1],
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--data",
            data,
            "--name",
            name,
            "--region",
            "test",
        ],
    );
    process.wait_for_line("admin listening on http://", STARTUP);
    let http = process
        .stdout_lines()
        .into_iter()
        .find_map(|line| {
            line.strip_prefix("node listening on http://")
                .map(|s| s.trim().to_string())
        })
        .expect("an HTTP listener");
    (process, http)
}

/// A node started with extra flags, and every address it printed.
pub struct EdgeNode {
    pub process: Process,
    /// Cleartext `127.0.0.1:PORT`, unless started with `--no-cleartext`.
    pub http: Option<String>,
    /// TLS `127.0.0.1:PORT`, when started with `--tls-listen`.
    pub https: Option<String>,
    /// HTTP/3 UDP `127.0.0.1:PORT`, when TLS is on and HTTP/3 is not disabled.
    pub h3: Option<String>,
    pub admin: String,
}

/// Starts `atoll node` on `127.0.0.1:0` with `extra` flags appended (e.g. `--tls-listen
/// 127.0.0.1:0 --certs DIR`, `--header-timeout 2s`; a `--listen` there replaces the default).
pub fn start_edge_node(registry_url: &str, data: &Path, extra: &[&str]) -> EdgeNode {
    let data = data.to_str().expect("utf-8 path");
    let mut args = vec!["node", "--registry", registry_url];
    if !extra.contains(&"--listen") {
        args.extend(["--listen", "127.0.0.1:0"]);
    }
    args.extend([
        "--admin",
        "127.0.0.1:0",
        "--data",
        data,
        "--name",
        "e2e",
        "--region",
        "test",
    ]);
    args.extend_from_slice(extra);
    let mut process = Process::spawn("node", &args);
    // The admin line is printed last, after every traffic listener.
    let admin = process.wait_for_line("admin listening on http://", STARTUP)
        ["admin listening on http://".len()..]
        .trim()
        .to_string();
    let find = |prefix: &str| {
        process
            .stdout_lines()
            .into_iter()
            .find(|line| line.starts_with(prefix))
            .map(|line| line[prefix.len()..].trim().to_string())
    };
    let http = find("node listening on http://");
    let https = find("node listening on https://");
    let h3 = find("node listening on h3://");
    EdgeNode {
        process,
        http,
        https,
        h3,
        admin,
    }
}

// ---------------------------------------------------------------------------------------
// HTTPS through curl

/// What one curl run gave.
pub struct CurlResult {
    pub status: u16,
    pub http_version: String,
    pub body: String,
    pub headers: String,
    pub stderr: String,
}

/// `curl` to `https://HOST:PORT/PATH` connecting to the node's TLS address `https`
/// (`127.0.0.1:PORT`), trusting only `ca`; `extra` flags go before the URL. Status 0: no
/// response (e.g. the certificate did not verify).
pub fn curl_https(https: &str, host: &str, path: &str, ca: &Path, extra: &[&str]) -> CurlResult {
    let port = https.rsplit(':').next().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let headers = scratch.path().join("headers");
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
        .arg("-D")
        .arg(&headers)
        .args(["-w", "\n%{http_code} %{http_version}"])
        .args(extra)
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .expect("run curl");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, tail) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    let mut fields = tail.split_whitespace();
    CurlResult {
        status: fields.next().and_then(|code| code.parse().ok()).unwrap_or(0),
        http_version: fields.next().unwrap_or("").to_string(),
        body: body.to_string(),
        headers: std::fs::read_to_string(&headers).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Polls `check` until it holds; panics naming `what` after [`STARTUP`].
pub fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + STARTUP;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `host:port` of an `http://host:port` URL.
pub fn url_addr(url: &str) -> &str {
    url.trim_start_matches("http://").trim_end_matches('/')
}

// ---------------------------------------------------------------------------------------
// The CLI

/// Runs `atoll ARGS…` to completion with the test token in the environment.
pub fn atoll(args: &[&str]) -> Output {
    atoll_with(args, |_| {})
}

/// Runs `atoll ARGS…` after `adjust` has had a go at the command (e.g. to remove the token).
pub fn atoll_with(args: &[&str], adjust: impl FnOnce(&mut Command)) -> Output {
    let mut command = Command::new(atoll_bin());
    command
        .args(args)
        .env("ATOLL_TOKEN", TOKEN)
        .env("ATOLL_LOG", "info")
        .stdin(Stdio::null());
    adjust(&mut command);
    command
        .output()
        .unwrap_or_else(|e| panic!("running atoll {args:?}: {e}"))
}

/// `atoll push PATH --registry URL`.
pub fn push(registry_url: &str, path: &Path) -> Output {
    atoll(&[
        "push",
        path.to_str().expect("utf-8 path"),
        "--registry",
        registry_url,
    ])
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Panics with the command's output unless it succeeded; returns its stdout.
pub fn expect_success(what: &str, output: &Output) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        stdout(output),
        stderr(output)
    );
    stdout(output)
}

/// A push that must succeed; returns its version number (from `NAME vN sha256:HEX`).
pub fn push_ok(registry_url: &str, path: &Path) -> u64 {
    let out = expect_success(&format!("push {}", path.display()), &push(registry_url, path));
    let line = out.trim();
    let fields: Vec<&str> = line.split(' ').collect();
    assert!(
        fields.len() == 3 && fields[1].starts_with('v') && fields[2].starts_with("sha256:"),
        "push printed `{line}`, expected `NAME vN sha256:HEX`"
    );
    assert_eq!(fields[2].len(), "sha256:".len() + 64, "push printed `{line}`");
    fields[1][1..].parse().expect("version number")
}

/// `atoll versions NAME` output (must succeed).
pub fn versions(registry_url: &str, name: &str) -> String {
    expect_success(
        &format!("versions {name}"),
        &atoll(&["versions", name, "--registry", registry_url]),
    )
}

/// `atoll ls` output (must succeed).
pub fn ls(registry_url: &str) -> String {
    expect_success("ls", &atoll(&["ls", "--registry", registry_url]))
}

/// One row of `atoll versions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRow {
    pub version: u64,
    pub active: bool,
    pub sha256: String,
    pub line: String,
}

/// Parses the `atoll versions` table.
pub fn parse_versions(table: &str) -> Vec<VersionRow> {
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    assert!(
        header.starts_with("VERSION") && header.contains("ACTIVE") && header.contains("SHA256"),
        "unexpected versions header: {table}"
    );
    lines
        .filter(|l| !l.trim().is_empty() && !l.starts_with("traffic:"))
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let version = fields[0]
                .strip_prefix('v')
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("bad versions row: {line}"));
            let active = fields.get(1) == Some(&"*");
            VersionRow {
                version,
                active,
                sha256: fields.last().expect("sha column").to_string(),
                line: line.to_string(),
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Function folders

/// Writes `DIR/atoll.toml` for a function named `name` on `routes`, running `wasm` (absolute
/// path); returns DIR's manifest path.
pub fn write_manifest(dir: &Path, name: &str, wasm: &Path, routes: &[&str], extra: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("create function dir");
    let routes: Vec<String> = routes.iter().map(|r| format!("{r:?}")).collect();
    let text = format!(
        "name = {name:?}\nwasm = {:?}\nroutes = [{}]\n{extra}",
        wasm.to_str().expect("utf-8 path"),
        routes.join(", ")
    );
    let path = dir.join("atoll.toml");
    std::fs::write(&path, text).expect("write atoll.toml");
    path
}

/// `wasm` with a custom section named `pad` of `pad_len` bytes (all `fill`) appended: still a
/// valid module (custom sections may appear anywhere and are ignored by the engine).
pub fn padded_module(wasm: &[u8], pad_len: usize, fill: u8) -> Vec<u8> {
    let name = b"pad";
    let mut payload_len = Vec::new();
    leb128(&mut payload_len, (1 + name.len() + pad_len) as u64);
    let mut out = Vec::with_capacity(wasm.len() + pad_len + 16);
    out.extend_from_slice(wasm);
    out.push(0); // custom section id
    out.extend_from_slice(&payload_len);
    leb128(&mut out, name.len() as u64);
    out.extend_from_slice(name);
    out.resize(out.len() + pad_len, fill);
    out
}

fn leb128(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

// ---------------------------------------------------------------------------------------
// HTTP/1.1 over a raw socket

/// An HTTP response as read off the wire.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Lower-cased names.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
}

/// Sends one request (`Connection: close`) and reads the whole response.
pub fn http_request(
    addr: &str,
    method: &str,
    host: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {e}")))?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    exchange(stream, method, host, target, headers, body)
}

/// Like [`http_request`], but from the local address `source` (to pose as another host
/// on loopback, e.g. a cluster peer).
pub fn http_request_from(
    source: std::net::IpAddr,
    addr: &str,
    method: &str,
    host: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {e}")))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let stream = runtime.block_on(async {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connecting to {addr}"))
            })??;
        stream.into_std()
    })?;
    stream.set_nonblocking(false)?;
    exchange(stream, method, host, target, headers, body)
}

fn exchange(
    mut stream: TcpStream,
    method: &str,
    host: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_write_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// `GET path` with `Host: host`.
pub fn http_get(addr: &str, host: &str, path: &str) -> std::io::Result<Response> {
    http_request(addr, "GET", host, path, &[], b"")
}

/// Like [`http_get`], but panics (naming the request) when no response could be read.
pub fn get(addr: &str, host: &str, path: &str) -> Response {
    http_get(addr, host, path).unwrap_or_else(|e| panic!("GET http://{addr}{path} (Host: {host}): {e}"))
}

fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of response head"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("response head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut headers = BTreeMap::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let rest = &raw[end + 4..];
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        dechunk(rest).ok_or_else(|| bad("bad chunked body"))?
    } else if let Some(length) = headers.get("content-length") {
        let length: usize = length.parse().map_err(|_| bad("bad content-length"))?;
        if rest.len() < length {
            return Err(bad("body shorter than content-length"));
        }
        rest[..length].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Response {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// Polls `GET path` (Host: `host`) until `accept` holds for the response; returns it. Errors
/// (connection refused, reset) count as "not yet". Panics after `timeout` with the last
/// response seen.
pub fn wait_for_body(
    addr: &str,
    host: &str,
    path: &str,
    accept: impl Fn(&Response) -> bool,
    timeout: Duration,
) -> Response {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match http_get(addr, host, path) {
            Ok(response) if accept(&response) => return response,
            Ok(response) => format!("{} {:?}", response.status, response.text()),
            Err(error) => format!("error: {error}"),
        };
        if Instant::now() > deadline {
            panic!("GET http://{addr}{path} (Host: {host}) not as expected within {timeout:?}; last: {last}");
        }
        std::thread::sleep(POLL);
    }
}

/// Polls until `host` answers 200 with exactly `body`.
pub fn wait_for_text(addr: &str, host: &str, path: &str, body: &str) -> Response {
    wait_for_body(
        addr,
        host,
        path,
        |r| r.status == 200 && r.body == body.as_bytes(),
        STARTUP,
    )
}

/// Polls the admin `/readyz` until it answers 200.
pub fn wait_ready(admin: &str) {
    wait_for_body(admin, "admin", "/readyz", |r| r.status == 200, STARTUP);
}

/// The admin `/metrics` text.
pub fn metrics(admin: &str) -> String {
    let response = get(admin, "admin", "/metrics");
    assert_eq!(response.status, 200, "/metrics: {}", response.text());
    response.text()
}

/// The lines of an `echo` answer as `KEY → value` (the raw body after `BODY=` under `BODY`).
pub fn echo_fields(text: &str) -> BTreeMap<String, String> {
    let (head, body) = match text.split_once("\nBODY=") {
        Some((head, body)) => (head, Some(body)),
        None => (text, None),
    };
    let mut fields: BTreeMap<String, String> = head
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if let Some(body) = body {
        fields.insert("BODY".into(), body.to_string());
    }
    fields
}

/// Whether any file under `dir` (recursively) has a name ending in `.tmp`; returns them.
pub fn tmp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".tmp"))
            {
                found.push(path);
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------
// Metrics

/// The value of the Prometheus sample `name{labels…}` in `text`, matching the given labels
/// regardless of their order; the sample must carry exactly these labels (no more, no fewer).
/// `None` when there is no such sample.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((series_name, rest)) => (series_name, parse_labels(rest.strip_suffix('}')?)?),
                None => (series, Vec::new()),
            };
            if series_name != name || series_labels.len() != labels.len() {
                return None;
            }
            let all_match = labels
                .iter()
                .all(|(key, value)| series_labels.iter().any(|(k, v)| k == key && v == value));
            if !all_match {
                return None;
            }
            value.trim().parse().ok()
        })
}

/// `a="x",b="y"` as pairs (values unescaped: `\"`, `\\`, `\n`).
fn parse_labels(text: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim().to_string(), value));
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some(labels)
}

/// The current value of `atoll_instances{function=FUNCTION,state=STATE}` (0 when absent).
pub fn instances(admin: &str, function: &str, state: &str) -> f64 {
    metric_value(
        &metrics(admin),
        "atoll_instances",
        &[("function", function), ("state", state)],
    )
    .unwrap_or(0.0)
}

/// Polls `/metrics` until the sample `name{labels}` satisfies `accept` (absent counts as
/// `None`); returns its value. Panics after `timeout` with the last metrics seen.
pub fn wait_for_metric(
    admin: &str,
    name: &str,
    labels: &[(&str, &str)],
    accept: impl Fn(Option<f64>) -> bool,
    timeout: Duration,
) -> Option<f64> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = metrics(admin);
        let value = metric_value(&text, name, labels);
        if accept(value) {
            return value;
        }
        if Instant::now() > deadline {
            panic!("{name}{labels:?} not as expected within {timeout:?}; last value {value:?}\n{text}");
        }
        std::thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------------------
// A keep-alive HTTP/1.1 client

/// One persistent HTTP/1.1 connection; requests go one after another on it (reconnecting
/// when the server closes it). For tests that send many requests quickly.
pub struct KeepAlive {
    addr: SocketAddr,
    stream: Option<BufReader<TcpStream>>,
    /// Connections opened so far.
    pub connects: usize,
}

impl KeepAlive {
    pub fn new(addr: &str) -> KeepAlive {
        KeepAlive {
            addr: addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}")),
            stream: None,
            connects: 0,
        }
    }

    /// `GET path` with `Host: host` on the persistent connection.
    pub fn get(&mut self, host: &str, path: &str) -> std::io::Result<Response> {
        let reader = match &mut self.stream {
            Some(reader) => reader,
            None => {
                let stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(10))?;
                stream.set_read_timeout(Some(Duration::from_secs(60)))?;
                stream.set_write_timeout(Some(Duration::from_secs(60)))?;
                stream.set_nodelay(true)?;
                self.connects += 1;
                self.stream.insert(BufReader::new(stream))
            }
        };
        let head = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let outcome = reader
            .get_mut()
            .write_all(head.as_bytes())
            .and_then(|()| read_response(reader));
        match outcome {
            Ok(response) => {
                let closing = response
                    .header("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                if closing {
                    self.stream = None;
                }
                Ok(response)
            }
            Err(error) => {
                self.stream = None;
                Err(error)
            }
        }
    }
}

/// Reads one response (head, then a `Content-Length` or chunked body) off a kept-alive
/// connection.
fn read_response(reader: &mut BufReader<TcpStream>) -> std::io::Result<Response> {
    fn read_line(reader: &mut BufReader<TcpStream>) -> std::io::Result<String> {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a response",
            ));
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let status_line = read_line(reader)?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut headers = BTreeMap::new();
    loop {
        let line = read_line(reader)?;
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let mut body = Vec::new();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let size_line = read_line(reader)?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad(format!("bad chunk size {size_line:?}")))?;
            if size == 0 {
                // Trailers, up to the blank line.
                while !read_line(reader)?.is_empty() {}
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..])?;
            read_line(reader)?;
        }
    } else if let Some(length) = headers.get("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| bad(format!("bad content-length {length:?}")))?;
        body.resize(length, 0);
        reader.read_exact(&mut body)?;
    } else if status != 204 && status != 304 {
        reader.read_to_end(&mut body)?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// The peak resident set size of process `pid` (`VmHWM`), in bytes, if Linux reports it.
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line["VmHWM:".len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// A registry and a node following it, both in `dir`.
pub struct Cluster {
    pub url: String,
    pub http: String,
    pub admin: String,
    pub node: Process,
    pub _registry: Process,
}

/// Boots a registry and a node in `dir`.
pub fn boot(dir: &Path) -> Cluster {
    let (registry, url) = start_registry(&dir.join("registry"));
    let (node, http, admin) = start_node(&url, &dir.join("node"));
    Cluster {
        url,
        http,
        admin,
        node,
        _registry: registry,
    }
}

// ---------------------------------------------------------------------------------------
// NATS JetStream

pub use atoll_testkit::NatsServer;

/// `atoll registry --store URL` on a free port; the process and its `http://` URL.
pub fn start_nats_registry(label: &str, nats: &NatsServer) -> (Process, String) {
    let mut process = Process::spawn(
        label,
        &["registry", "--listen", "127.0.0.1:0", "--store", &nats.url],
    );
    let line = process.wait_for_line("registry listening on ", STARTUP);
    let url = line["registry listening on ".len()..].trim().to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "unexpected line: {line}");
    (process, url)
}

/// A WCGI module that writes a CGI head, then `blocks` times 64 KiB of `x` (one `fd_write`
/// each), then runs the WAT instructions `tail` (e.g. a loop that never ends).
pub fn bulk_writer_module(blocks: u32, tail: &str) -> Vec<u8> {
    atoll_testkit::guests::bulk_writer("Content-Type: application/octet-stream\n\n", blocks, tail)
}

/// What one `curl` download saw.
pub struct Download {
    /// curl's exit code (0: complete; 18, 92 and others: the transfer broke off).
    pub exit: i32,
    pub status: u16,
    pub http_version: String,
    pub size: u64,
    /// The response head, lower-cased.
    pub headers: String,
}

impl Download {
    /// The node that served it (`x-atoll-node`), or "".
    pub fn served_by(&self) -> &str {
        self.headers
            .lines()
            .find_map(|line| line.strip_prefix("x-atoll-node:"))
            .map_or("", str::trim)
    }
}

/// curl `http://ADDR/` with `Host: host` into `out` (its head beside it, as `out.headers`);
/// `extra` arguments (flags, `-H` headers) go before the URL.
pub fn download(addr: &str, host: &str, out: &Path, extra: &[&str]) -> Download {
    let headers_file = out.with_extension("headers");
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "60", "-o"])
        .arg(out)
        .arg("-D")
        .arg(&headers_file)
        .args(["-w", "%{http_code} %{size_download} %{http_version}"])
        .args(["-H", &format!("Host: {host}")])
        .args(extra)
        .arg(format!("http://{addr}/"))
        .output()
        .expect("run curl");
    let written = String::from_utf8_lossy(&output.stdout).into_owned();
    let mut fields = written.split_whitespace();
    let status = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
    let size = fields.next().and_then(|f| f.parse().ok()).unwrap_or(0);
    let http_version = fields.next().unwrap_or("").to_string();
    Download {
        exit: output.status.code().unwrap_or(-1),
        status,
        http_version,
        size,
        headers: std::fs::read_to_string(&headers_file)
            .unwrap_or_default()
            .to_ascii_lowercase(),
    }
}

/// The highest resident set size process `pid` has had (`VmHWM`), in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/PID/status")
        * 1024
}
