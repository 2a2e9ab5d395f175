//! HTTP/2 rapid reset (CVE-2023-44487), end to end: a client that opens streams and resets
//! them at once, faster than they can be served, is told ENHANCE_YOUR_CALM and cut off, and
//! the node goes on serving everyone else.

mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_is_cut_off_with_enhance_your_calm() {
    let data = tempfile::tempdir().unwrap();
    let (registry, node) = tokio::task::spawn_blocking({
        let data = data.path().to_path_buf();
        move || {
            let (registry, registry_url) = start_registry(&data.join("registry"));
            let node = start_edge_node(&registry_url, &data.join("node"), &[]);
            push_ok(&registry_url, &example("hello"));
            let http = node.http.clone().unwrap();
            wait_for_text(&http, "hello.localhost", "/", &hello_body("hello.localhost"));
            (registry, node)
        }
    })
    .await
    .unwrap();
    let http = node.http.clone().unwrap();

    // h2c with prior knowledge on the cleartext listener.
    let tcp = tokio::net::TcpStream::connect(&http).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut sent = 0;
    for _ in 0..10_000 {
        client = match client.ready().await {
            Ok(client) => client,
            Err(_) => break,
        };
        let request = http::Request::get("http://hello.localhost/").body(()).unwrap();
        match client.send_request(request, false) {
            Ok((_response, mut stream)) => {
                stream.send_reset(h2::Reason::CANCEL);
                sent += 1;
            }
            Err(_) => break,
        }
    }
    let ended = tokio::time::timeout(STARTUP, connection)
        .await
        .expect("the flooding connection was not closed")
        .unwrap();
    let error = ended.expect_err("the flooding connection ended without an error");
    // The node sends GOAWAY(ENHANCE_YOUR_CALM) and closes; a client still writing its flood
    // may hit the closed socket (broken pipe, reset) before it reads the GOAWAY. Without the
    // limit the connection stays open and the timeout above fails. (The client may have
    // queued its whole flood before it notices, so how many it sent proves nothing.)
    let calmed = error.is_go_away() && error.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
    assert!(calmed || error.is_io(), "after {sent} reset streams: {error}");

    // Everyone else is still served.
    tokio::task::spawn_blocking(move || {
        let response = get(&http, "hello.localhost", "/");
        assert_eq!(response.status, 200);
        assert_eq!(response.text(), hello_body("hello.localhost"));
    })
    .await
    .unwrap();
    drop((registry, node));
}
