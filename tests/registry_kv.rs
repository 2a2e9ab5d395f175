//! Key-value stores on the registry's embedded store, through `atoll kv` against a real
//! `atoll registry`: values and revisions, compare-and-set, increments from many clients at
//! once, listing, deletes, a deploy token kept to its own stores, and data that survives a
//! restart.

mod support;

use support::*;

fn kv(url: &str, args: &[&str]) -> std::process::Output {
    let mut all = vec!["kv"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--registry", url]);
    atoll(&all)
}

fn kv_ok(url: &str, args: &[&str]) -> String {
    expect_success(&format!("atoll kv {args:?}"), &kv(url, args))
}

#[test]
fn values_revisions_cas_listing_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let (registry, url) = start_registry(&dir.path().join("registry"));

    let first: u64 = kv_ok(&url, &["set", "todo", "items/1", "buy milk"])
        .trim()
        .strip_prefix("revision ")
        .unwrap()
        .parse()
        .unwrap();
    let got = kv(&url, &["get", "todo", "items/1"]);
    assert_eq!(expect_success("get", &got), "buy milk");
    assert!(
        stderr(&got).contains(&format!("revision {first}")),
        "{}",
        stderr(&got)
    );

    // Compare-and-set: the right revision wins, a stale one loses and changes nothing.
    let second = kv_ok(
        &url,
        &[
            "set",
            "todo",
            "items/1",
            "buy oat milk",
            "--if-revision",
            &first.to_string(),
        ],
    );
    assert!(second.starts_with("revision "), "{second}");
    let stale = kv(
        &url,
        &[
            "set",
            "todo",
            "items/1",
            "lost",
            "--if-revision",
            &first.to_string(),
        ],
    );
    assert!(!stale.status.success());
    assert!(stderr(&stale).contains("revision"), "{}", stderr(&stale));
    assert_eq!(kv_ok(&url, &["get", "todo", "items/1"]), "buy oat milk");
    let exists = kv(&url, &["set", "todo", "items/1", "again", "--if-revision", "0"]);
    assert!(!exists.status.success(), "if-revision 0 means: only if absent");

    for key in ["items/2", "items/3", "users/1"] {
        kv_ok(&url, &["set", "todo", key, "x"]);
    }
    assert_eq!(
        kv_ok(&url, &["ls", "todo", "items/"]),
        "items/1\nitems/2\nitems/3\n"
    );
    assert_eq!(kv_ok(&url, &["ls", "other"]), "");
    kv_ok(&url, &["rm", "todo", "items/2"]);
    assert!(!kv(&url, &["rm", "todo", "items/2"]).status.success());
    assert!(!kv(&url, &["get", "todo", "items/2"]).status.success());

    // Bad input is refused with the reason, and stores nothing.
    let long_key = "k".repeat(600);
    let refused = kv(&url, &["set", "todo", &long_key, "x"]);
    assert!(stderr(&refused).contains("at most 512"), "{}", stderr(&refused));
    let refused = kv(&url, &["set", "Not A Store", "k", "x"]);
    assert!(stderr(&refused).contains("store name"), "{}", stderr(&refused));

    // The data is on disk: a restarted registry has it.
    drop(registry);
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    assert_eq!(kv_ok(&url, &["get", "todo", "items/1"]), "buy oat milk");
    assert_eq!(kv_ok(&url, &["ls", "todo"]), "items/1\nitems/3\nusers/1\n");
}

#[test]
fn twenty_concurrent_incrementers_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    let writers: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                for _ in 0..5 {
                    kv_ok(&url, &["incr", "counters", "visits"]);
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    assert_eq!(kv_ok(&url, &["get", "counters", "visits"]), "100");
    assert_eq!(kv_ok(&url, &["incr", "counters", "visits", "-10"]).trim(), "90");
    kv_ok(&url, &["set", "counters", "name", "not a number"]);
    let refused = kv(&url, &["incr", "counters", "name"]);
    assert!(!refused.status.success());
}

#[test]
fn a_deploy_token_reaches_only_its_own_stores() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, url) = start_registry(&dir.path().join("registry"));
    kv_ok(&url, &["set", "bank", "balance", "100"]);
    let created = atoll(&[
        "token",
        "create",
        "--scope",
        "deploy",
        "--functions",
        "shop-*",
        "--domains",
        "shop.localhost",
        "--registry",
        &url,
    ]);
    let token = expect_success("token create", &created).trim().to_string();
    let as_shop = |args: &[&str]| {
        let mut all = vec!["kv"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--registry", &url]);
        atoll_with(&all, |command| {
            command.env("ATOLL_TOKEN", &token);
        })
    };
    expect_success("own store", &as_shop(&["set", "shop-cart", "k", "v"]));
    let refused = as_shop(&["get", "bank", "balance"]);
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("may not use store `bank`"),
        "{}",
        stderr(&refused)
    );
    let refused = as_shop(&["set", "bank", "balance", "1000000"]);
    assert!(!refused.status.success());
    assert_eq!(kv_ok(&url, &["get", "bank", "balance"]), "100");
}
