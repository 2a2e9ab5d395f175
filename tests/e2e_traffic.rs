//! Gray release with real processes: a registry, two nodes, a function with two versions
//! shared 90/10 and then 50/50 by a sticky header, pinned by `x-atoll-version`, promoted and
//! rolled back.

mod support;

use std::collections::BTreeSet;

use support::*;

const HOST: &str = "canary.localhost";

/// The version that answered (`x-atoll-version`), with `headers` sent.
fn version_of(http: &str, headers: &[(&str, &str)]) -> u64 {
    let response = http_request(http, "GET", HOST, "/", headers, b"").expect("a response");
    assert_eq!(response.status, 200, "{}", response.text());
    response
        .header("x-atoll-version")
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no x-atoll-version on {response:?}"))
}

/// The users among `users` (sent as `x-user: uN`) that `http` gives version 2.
fn on_v2(http: &str, users: impl IntoIterator<Item = u32>) -> BTreeSet<u32> {
    users
        .into_iter()
        .filter(|user| version_of(http, &[("x-user", &format!("u{user}"))]) == 2)
        .collect()
}

fn traffic(url: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["traffic", "canary"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--registry", url]);
    atoll(&all)
}

#[test]
fn a_split_is_the_same_on_every_node_sticky_users_stay_on_the_new_version_and_promote_and_rollback_end_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let (node_a, a, admin_a) = start_node(&url, &dir.path().join("a"));
    let (node_b, b, _admin_b) = start_node(&url, &dir.path().join("b"));
    let manifest = |version: &str| {
        write_manifest(
            &dir.path().join(version),
            "canary",
            &example_wasm("echo"),
            &[HOST],
            &format!("[env]\nGREETING = \"{version}\"\n"),
        )
    };
    assert_eq!(push_ok(&url, &manifest("one")), 1);
    for node in [&a, &b] {
        wait_until("v1 served", || {
            http_get(node, HOST, "/").is_ok_and(|r| r.header("x-atoll-version") == Some("1"))
        });
    }

    // v2 lands at 0%: prepared on both nodes, reached only when pinned.
    let pushed = expect_success(
        "push --no-traffic",
        &atoll(&[
            "push",
            manifest("two").to_str().unwrap(),
            "--no-traffic",
            "--registry",
            &url,
        ]),
    );
    assert!(pushed.starts_with("canary v2 "), "{pushed}");
    for node in [&a, &b] {
        wait_until("v2 pinnable", || {
            http_request(node, "GET", HOST, "/", &[("x-atoll-version", "v2")], b"")
                .is_ok_and(|r| r.status == 200 && r.text().contains("GREETING=two"))
        });
        assert!(
            (0..50).all(|user| version_of(node, &[("x-user", &format!("u{user}"))]) == 1),
            "a version at 0% takes no unpinned request"
        );
    }
    let table = versions(&url, "canary");
    assert!(table.contains("traffic: v2=0% v1=100%"), "{table}");

    // Refused splits change nothing.
    for (args, message) in [
        (&["v1=90", "v2=20"][..], "add up to 110%"),
        (&["v1=90", "v3=10"][..], "has no v3"),
        (
            &["v1=90", "v2=10", "--sticky", "query:x"][..],
            "not `header:NAME`",
        ),
    ] {
        let refused = traffic(&url, args);
        assert!(!refused.status.success(), "{args:?} was accepted");
        assert!(
            stderr(&refused).contains(message),
            "{args:?}: {}",
            stderr(&refused)
        );
    }

    // 90/10 by a sticky header: each node puts each user where the other does, and the
    // shares hold over 2,000 users (1,000 through each node).
    let out = expect_success(
        "traffic 90/10",
        &traffic(&url, &["v1=90", "v2=10", "--sticky", "header:X-User"]),
    );
    assert_eq!(out.trim(), "canary: v2=10% v1=90% (sticky: header:x-user)");
    for node in [&a, &b] {
        wait_until("the split applied", || !on_v2(node, 0..100).is_empty());
    }
    let through_a = on_v2(&a, 0..1000);
    let through_b = on_v2(&b, 1000..2000);
    let share = (through_a.len() + through_b.len()) as f64 / 2000.0 * 100.0;
    assert!(
        (7.0..=13.0).contains(&share),
        "v2 took {share:.1}% of 2,000 users, not 10 ± 3"
    );
    assert_eq!(on_v2(&b, 0..300), on_v2(&a, 0..300), "both nodes choose alike");
    // Without the key a request draws: the share holds too.
    let drawn = (0..2000)
        .filter(|n| version_of(if n % 2 == 0 { &a } else { &b }, &[]) == 2)
        .count() as f64
        / 20.0;
    assert!(
        (7.0..=13.0).contains(&drawn),
        "v2 took {drawn:.1}% of 2,000 draws"
    );

    // The share grows: nobody on v2 goes back.
    let at_ten = on_v2(&a, 0..1000);
    expect_success(
        "traffic 50/50",
        &traffic(&url, &["v1=50", "v2=50", "--sticky", "header:x-user"]),
    );
    for node in [&a, &b] {
        wait_until("the wider split applied", || on_v2(node, 0..100).len() > 25);
    }
    let at_fifty = on_v2(&a, 0..1000);
    assert!(
        at_ten.is_subset(&at_fifty),
        "users moved back to v1 as v2's share grew"
    );
    assert!(
        (400..=600).contains(&at_fifty.len()),
        "{} of 1,000 on v2 at 50%",
        at_fifty.len()
    );
    assert_eq!(on_v2(&b, 0..1000), at_fifty, "node b agrees");

    // Pinning overrides the split; a version nobody serves, or a malformed one, is refused.
    let user_on_v2 = format!("u{}", at_fifty.first().unwrap());
    assert_eq!(
        version_of(&a, &[("x-user", &user_on_v2), ("x-atoll-version", "1")]),
        1
    );
    let missing = http_request(&a, "GET", HOST, "/", &[("x-atoll-version", "9")], b"").unwrap();
    assert_eq!(missing.status, 404);
    assert!(missing.text().contains("serves no v9"), "{}", missing.text());
    let malformed = http_request(&a, "GET", HOST, "/", &[("x-atoll-version", "latest")], b"").unwrap();
    assert_eq!(malformed.status, 400, "{}", malformed.text());

    // Each version's requests are counted under its own label.
    let metrics = metrics(&admin_a);
    for version in ["1", "2"] {
        assert!(
            metric_value(
                &metrics,
                "atoll_requests_total",
                &[("function", "canary"), ("version", version), ("status", "200")]
            )
            .is_some_and(|count| count > 0.0),
            "no requests counted for v{version}"
        );
    }

    // Every change of the split so far took both versions as they were, warm: each was
    // prepared once on the node.
    let prepared = || {
        node_a
            .stderr_lines()
            .iter()
            .filter(|line| line.contains("function ready") && line.contains("function=canary"))
            .count()
    };
    wait_until("the node's log read", || prepared() >= 2);
    assert_eq!(prepared(), 2, "{}", node_a.logs());

    // Promote: everything to v2, the split gone.
    let out = expect_success(
        "promote",
        &atoll(&["promote", "canary", "v2", "--registry", &url]),
    );
    assert_eq!(out.trim(), "canary: all traffic to v2");
    for node in [&a, &b] {
        wait_until("v2 takes everything", || on_v2(node, 0..50).len() == 50);
    }
    assert!(!versions(&url, "canary").contains("traffic:"));
    let active = |version: u64| {
        parse_versions(&versions(&url, "canary"))
            .iter()
            .any(|row| row.version == version && row.active)
    };
    assert!(active(2));

    // v2 leads a split, then is promoted: the active version stays, the split ends.
    let some_on_v1 = |node: &str| on_v2(node, 0..50).len() < 50;
    expect_success("traffic 20/80", &traffic(&url, &["v1=20", "v2=80"]));
    for node in [&a, &b] {
        wait_until("some back on v1", || some_on_v1(node));
    }
    expect_success(
        "promote",
        &atoll(&["promote", "canary", "v2", "--registry", &url]),
    );
    for node in [&a, &b] {
        wait_until("v2 takes everything again", || on_v2(node, 0..50).len() == 50);
    }

    // A rollback during a split goes back where the release started (the oldest version
    // with a share), even when the newer one leads, and ends the split.
    expect_success("traffic 20/80", &traffic(&url, &["v1=20", "v2=80"]));
    for node in [&a, &b] {
        wait_until("some back on v1", || some_on_v1(node));
    }
    let out = expect_success("rollback", &atoll(&["rollback", "canary", "--registry", &url]));
    assert!(out.starts_with("canary v1 "), "{out}");
    for node in [&a, &b] {
        wait_until("v1 takes everything", || on_v2(node, 0..50).is_empty());
    }
    assert!(!versions(&url, "canary").contains("traffic:") && active(1));

    // v1 was prepared again only where a promote had dropped it: twice.
    wait_until("the node's log read", || prepared() >= 4);
    assert_eq!(prepared(), 4, "{}", node_a.logs());

    // A node restarted during a split serves the same split from its disk at once.
    expect_success(
        "traffic 50/50",
        &traffic(&url, &["v1=50", "v2=50", "--sticky", "header:x-user"]),
    );
    for node in [&a, &b] {
        wait_until("the split applied", || on_v2(node, 0..100).len() > 25);
    }
    let before = on_v2(&b, 0..300);
    drop(node_b);
    let (restarted, b, _admin_b) = start_node(&url, &dir.path().join("b"));
    wait_until("the restarted node serves", || {
        http_get(&b, HOST, "/").is_ok_and(|r| r.status == 200)
    });
    assert_eq!(on_v2(&b, 0..300), before, "the split survived the restart");
    let logs = restarted.logs();
    assert!(
        !logs.contains("could not restore") && logs.contains("serving from the disk cache"),
        "{logs}"
    );
}
