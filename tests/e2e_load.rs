//! The primer's load test: ApacheBench against a node serving `hello`, 1000 requests with
//! 200 concurrent connections, and not one failure.

mod support;

use std::process::Command;

use support::*;

#[test]
fn ab_1000_requests_200_concurrent_all_succeed() {
    let ab = Command::new("ab").arg("-V").output();
    assert!(
        ab.as_ref().is_ok_and(|o| o.status.success()),
        "`ab` (ApacheBench) is required by this test and was not found: install apache2-utils \
         (e.g. `apt-get install apache2-utils`); error: {:?}",
        ab.err()
    );

    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let (node, http, admin) = start_node(&url, &dir.path().join("node"));
    push_ok(&url, &example("hello"));
    wait_for_text(&http, "hello.localhost", "/", &hello_body("hello.localhost"));

    let output = Command::new("ab")
        .args([
            "-n",
            "1000",
            "-c",
            "200",
            "-s",
            "60",
            "-H",
            "Host: hello.localhost",
            &format!("http://{http}/"),
        ])
        .output()
        .expect("run ab");
    let report = String::from_utf8_lossy(&output.stdout);
    let errors = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "ab failed ({}):\n{report}\n{errors}\n{}",
        output.status,
        node.logs()
    );
    let field = |name: &str| {
        report
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l[name.len()..].trim().to_string())
    };
    assert_eq!(field("Complete requests:").as_deref(), Some("1000"), "{report}");
    assert_eq!(field("Failed requests:").as_deref(), Some("0"), "{report}");
    assert!(
        !report.contains("Non-2xx responses"),
        "some responses were not 2xx:\n{report}"
    );
    assert_eq!(
        field("Document Length:").as_deref(),
        Some(format!("{} bytes", hello_body("hello.localhost").len()).as_str()),
        "{report}"
    );
    let rps = report
        .lines()
        .find(|l| l.starts_with("Requests per second:"))
        .unwrap_or("Requests per second: (missing)");
    eprintln!("ab -n 1000 -c 200: {rps}");

    let metrics = metrics(&admin);
    let served: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"atoll_requests_total{function="hello",version="1",status="200"} "#))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no hello counter:\n{metrics}"));
    assert!(served >= 1001.0, "node counted {served} requests:\n{metrics}");
}
