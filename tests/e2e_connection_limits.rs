//! Connections that do nothing cannot lock out the control plane: `atoll registry` and a
//! node's admin listener close silent, half-sent and idle connections in bounded time
//! (their `--header-timeout`, `--idle-timeout`), and `atoll ls` still answers while many
//! are open (the registry's `--max-connections` closes the longest-idle one to make room).

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

/// Opens `count` connections to `addr` that each hold a socket without sending a whole
/// request: nothing, one byte, or half a head, in turn.
fn loiterers(addr: &str, count: usize) -> Vec<TcpStream> {
    (0..count)
        .map(|i| {
            let mut stream = TcpStream::connect(addr).expect("connect");
            match i % 3 {
                0 => {}
                1 => stream.write_all(b"G").unwrap(),
                _ => stream
                    .write_all(b"GET /v1/functions HTTP/1.1\r\nHost: registry\r\nAuthor")
                    .unwrap(),
            }
            stream
        })
        .collect()
}

/// Waits until the server has closed every one of `streams`; panics naming how many are
/// still open after `within`.
fn assert_all_closed(streams: Vec<TcpStream>, within: Duration, what: &str) {
    let started = Instant::now();
    let deadline = started + within;
    let mut open = streams;
    while !open.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of the idle connections still open after {:?}",
            open.len(),
            started.elapsed()
        );
        open.retain_mut(|stream| {
            stream.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
            let mut buf = [0u8; 1024];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) => return false,
                    Ok(_) => continue,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        return true;
                    }
                    Err(_) => return false,
                }
            }
        });
        std::thread::sleep(POLL);
    }
}

#[test]
fn the_registry_closes_idle_connections_and_still_lists() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("registry");
    let mut registry = Process::spawn(
        "registry",
        &[
            "registry",
            "--listen",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
            "--max-connections",
            "16",
            "--header-timeout",
            "1s",
            "--idle-timeout",
            "2s",
        ],
    );
    let line = registry.wait_for_line("registry listening on ", STARTUP);
    let url = line["registry listening on ".len()..].trim().to_string();
    let held = loiterers(url_addr(&url), 60);
    // While 60 idle connections are open (over the cap of 16), an authenticated client is
    // served.
    let listed = ls(&url);
    assert!(listed.starts_with("NAME"), "{listed}");
    // Every idle connection is closed within the header timeout (1 s), with ample slack
    // for a busy machine; without the limits they stayed open for minutes.
    assert_all_closed(held, Duration::from_secs(8), "atoll registry");
}

#[test]
fn the_admin_listener_has_the_edges_connection_limits() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let node = start_edge_node(
        &url,
        &dir.path().join("node"),
        &[
            "--max-connections",
            "4",
            "--header-timeout",
            "1s",
            "--idle-timeout",
            "2s",
        ],
    );
    // Twice the cap: four are served (and closed after the 1 s header timeout), four wait
    // for a slot. With the default limits (10 s) they would still be open after 9 s.
    let held = loiterers(&node.admin, 8);
    assert_all_closed(held, Duration::from_secs(9), "the admin listener");
    let health = get(&node.admin, "localhost", "/healthz");
    assert_eq!(health.status, 200, "{}", health.text());
}

#[test]
fn a_connection_thread_count_beyond_the_bound_is_refused_naming_the_flag() {
    let output = std::process::Command::new(atoll_bin())
        .args(["node", "--connection-threads", "5000"])
        .output()
        .unwrap();
    assert!(!output.status.success(), "5000 connection threads were accepted");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--connection-threads") && stderr.contains("0..=1024"),
        "{stderr}"
    );
}
