//! Listener-level limits, end to end: the connection cap holds new connections back until
//! one closes, instead of letting a client exhaust the node's file descriptors.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

#[test]
fn connections_over_the_cap_wait_until_one_closes() {
    let data = tempfile::tempdir().unwrap();
    let (_registry, registry_url) = start_registry(&data.path().join("registry"));
    let node = start_edge_node(
        &registry_url,
        &data.path().join("node"),
        &["--max-connections", "2"],
    );
    let http = node.http.clone().unwrap();
    push_ok(&registry_url, &example("hello"));
    // Served with a connection that closes afterwards, so it does not count against the cap.
    wait_for_text(&http, "hello.localhost", "/", &hello_body("hello.localhost"));

    let request = b"GET / HTTP/1.1\r\nHost: hello.localhost\r\n\r\n";
    let mut first = TcpStream::connect(&http).unwrap();
    let mut second = TcpStream::connect(&http).unwrap();
    for stream in [&mut first, &mut second] {
        stream.write_all(request).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buffer = [0u8; 512];
        let read = stream.read(&mut buffer).unwrap();
        assert!(
            buffer[..read].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buffer[..read])
        );
    }

    // The third connection is accepted by the kernel but not served while two are open.
    let mut third = TcpStream::connect(&http).unwrap();
    third.write_all(request).unwrap();
    third.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    let mut buffer = [0u8; 512];
    match third.read(&mut buffer) {
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!("the third connection was served over the cap: {other:?}"),
    }

    // Closing one lets it in.
    drop(first);
    let started = Instant::now();
    third.set_read_timeout(Some(STARTUP)).unwrap();
    let read = third.read(&mut buffer).unwrap();
    assert!(
        buffer[..read].starts_with(b"HTTP/1.1 200"),
        "after a close: {}",
        String::from_utf8_lossy(&buffer[..read])
    );
    assert!(started.elapsed() < STARTUP);
    drop(second);
}
