//! The node's admin listener changes the node (`POST`/`DELETE /drain`) only for its
//! operator: with the node's token, or from loopback without any sign of a browser. A web
//! page (an `Origin`, `Sec-Fetch-Site: cross-site`), a DNS-rebinding page (its own name in
//! `Host`) and a wrong token are refused with a reason, and the node does not drain.

mod support;

use support::*;

/// `(method, Host, headers, expected status, words of the expected reason)`.
type Refusal<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, u16, &'a str);

fn drain_state(admin: &str) -> String {
    let response = get(admin, "127.0.0.1", "/drain");
    assert_eq!(response.status, 200);
    response.text().trim().to_string()
}

#[test]
fn drain_needs_the_token_or_a_plain_loopback_call() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let node = start_edge_node(&url, &dir.path().join("node"), &[]);
    let admin = node.admin.as_str();
    wait_ready(admin);
    let port = admin.rsplit_once(':').unwrap().1;
    let loopback_host = format!("127.0.0.1:{port}");
    let bearer = format!("Bearer {TOKEN}");

    // What a web page in a browser on the same machine, or a rebound name, can send.
    let refused: [Refusal; 6] = [
        (
            "POST",
            loopback_host.as_str(),
            vec![("Origin", "http://evil.example")],
            403,
            "Origin",
        ),
        (
            "POST",
            loopback_host.as_str(),
            vec![("Origin", "null")],
            403,
            "Origin",
        ),
        (
            "POST",
            loopback_host.as_str(),
            vec![("Sec-Fetch-Site", "cross-site")],
            403,
            "Sec-Fetch-Site",
        ),
        (
            "POST",
            "evil.example:9090",
            vec![],
            403,
            "the Host must be loopback",
        ),
        (
            "POST",
            loopback_host.as_str(),
            vec![("Authorization", "Bearer not-the-token")],
            401,
            "invalid token",
        ),
        (
            "POST",
            loopback_host.as_str(),
            vec![("Authorization", "Basic dXNlcjpwYXNz")],
            401,
            "expected `Authorization: Bearer",
        ),
    ];
    for (method, host, headers, status, reason) in refused {
        let response = http_request(admin, method, host, "/drain", &headers, b"").expect("admin answers");
        assert_eq!(
            response.status,
            status,
            "{method} /drain Host {host} {headers:?}: {}",
            response.text()
        );
        assert!(
            response.text().contains(reason),
            "{headers:?}: {}",
            response.text()
        );
        assert_eq!(
            drain_state(admin),
            "serving",
            "refused {headers:?} drained the node"
        );
        assert_eq!(get(admin, "127.0.0.1", "/readyz").status, 200);
    }

    // The operator with the token, from anywhere (here with a browser's headers and
    // another name, which the token makes irrelevant).
    let response = http_request(
        admin,
        "POST",
        "admin.example",
        "/drain",
        &[("Authorization", &bearer), ("Origin", "https://ops.example")],
        b"",
    )
    .unwrap();
    assert_eq!((response.status, response.text().trim()), (200, "draining"));
    assert_eq!(drain_state(admin), "draining");
    assert_eq!(get(admin, "127.0.0.1", "/readyz").status, 503);

    // A refused DELETE leaves it draining.
    let response = http_request(
        admin,
        "DELETE",
        &loopback_host,
        "/drain",
        &[("Origin", "http://evil.example")],
        b"",
    )
    .unwrap();
    assert_eq!(response.status, 403, "{}", response.text());
    assert_eq!(drain_state(admin), "draining");

    // The operator on the machine, without a token: curl sends neither Origin nor a
    // foreign Host.
    for host in [loopback_host.as_str(), "localhost"] {
        let response = http_request(admin, "DELETE", host, "/drain", &[], b"").unwrap();
        assert_eq!(
            (response.status, response.text().trim()),
            (200, "serving"),
            "Host {host}"
        );
        let response = http_request(admin, "POST", host, "/drain", &[], b"").unwrap();
        assert_eq!(
            (response.status, response.text().trim()),
            (200, "draining"),
            "Host {host}"
        );
    }
    let response = http_request(admin, "DELETE", "[::1]", "/drain", &[], b"").unwrap();
    assert_eq!((response.status, response.text().trim()), (200, "serving"));
}
