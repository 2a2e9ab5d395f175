//! Functions' key-value stores on a real `nats-server -js`: the rules every backend keeps
//! (revisions, compare-and-set, increment, TTL, listing with a cursor, odd keys), what the
//! NATS server's own limits refuse, and the node-local cache: a node reads its own writes
//! at once, sees another's once the watch event arrives, and never keeps a stale entry.

use std::sync::Arc;
use std::time::{Duration, Instant};

use atoll_control::LazyNatsStore;
use atoll_control::nats_kv::{DEFAULT_CACHE_BYTES, NatsKv};
use atoll_core::kv::{KvBackend, KvError};
use atoll_testkit::NatsServer;

fn stores(nats: &NatsServer, cache: bool) -> NatsKv {
    NatsKv::new(
        Arc::new(LazyNatsStore::new(nats.url.clone())),
        cache.then_some(DEFAULT_CACHE_BYTES),
    )
}

async fn value(kv: &NatsKv, store: &str, key: &str) -> Option<String> {
    kv.get(store, key)
        .await
        .unwrap()
        .map(|entry| String::from_utf8(entry.value).unwrap())
}

#[tokio::test]
async fn revisions_compare_and_set_increment_and_delete_keep_the_rules() {
    let nats = NatsServer::start();
    let kv = stores(&nats, false);
    assert_eq!(kv.get("default", "missing").await.unwrap(), None);

    let first = kv.set("default", "a", b"1".to_vec(), None, None).await.unwrap();
    let second = kv.set("default", "a", b"2".to_vec(), None, None).await.unwrap();
    assert!(second.revision > first.revision);
    let entry = kv.get("default", "a").await.unwrap().unwrap();
    assert_eq!(
        (entry.value.as_slice(), entry.revision),
        (&b"2"[..], second.revision)
    );

    // Compare-and-set: the current revision wins, any other is refused and told the current.
    assert_eq!(
        kv.set("default", "a", b"x".to_vec(), None, Some(first.revision))
            .await,
        Err(KvError::Conflict {
            current: second.revision
        })
    );
    let third = kv
        .set("default", "a", b"3".to_vec(), None, Some(second.revision))
        .await
        .unwrap();
    assert_eq!(value(&kv, "default", "a").await.as_deref(), Some("3"));
    // 0: only if absent.
    assert_eq!(
        kv.set("default", "a", b"y".to_vec(), None, Some(0)).await,
        Err(KvError::Conflict {
            current: third.revision
        })
    );
    kv.set("default", "fresh", b"new".to_vec(), None, Some(0))
        .await
        .unwrap();

    // Delete: true once, then false; a deleted key can be created again with 0.
    assert!(kv.delete("default", "fresh").await.unwrap());
    assert!(!kv.delete("default", "fresh").await.unwrap());
    assert_eq!(kv.get("default", "fresh").await.unwrap(), None);
    assert_eq!(
        kv.set("default", "fresh", b"v".to_vec(), None, Some(7)).await,
        Err(KvError::Conflict { current: 0 })
    );
    kv.set("default", "fresh", b"again".to_vec(), None, Some(0))
        .await
        .unwrap();

    // Increment: decimal, from 0 when absent, refused on a non-number.
    assert_eq!(kv.increment("default", "n", 5).await.unwrap().value, Some(5));
    assert_eq!(kv.increment("default", "n", -7).await.unwrap().value, Some(-2));
    kv.set("default", "word", b"abc".to_vec(), None, None)
        .await
        .unwrap();
    assert_eq!(kv.increment("default", "word", 1).await, Err(KvError::NotANumber));

    // Stores are separate buckets: the same key elsewhere is another value.
    assert_eq!(kv.get("other", "a").await.unwrap(), None);
    // Names and keys are checked before NATS sees them.
    assert!(matches!(kv.get("Bad!", "a").await, Err(KvError::Invalid(_))));
    assert!(matches!(kv.get("default", "").await, Err(KvError::Invalid(_))));
}

#[tokio::test]
async fn keys_of_any_shape_list_in_order_with_a_cursor() {
    let nats = NatsServer::start();
    let kv = stores(&nats, false);
    let keys = [
        "todo/2",
        "todo/1",
        "todo/a.b",
        "todo/ünï code",
        "todo/*>",
        "other",
    ];
    for key in keys {
        kv.set("default", key, key.as_bytes().to_vec(), None, None)
            .await
            .unwrap();
    }
    for key in keys {
        assert_eq!(value(&kv, "default", key).await.as_deref(), Some(key));
    }
    kv.delete("default", "todo/2").await.unwrap();
    let mut listed = Vec::new();
    let mut after = None;
    loop {
        let page = kv.list("default", "todo/", after.as_deref(), 2).await.unwrap();
        assert!(page.keys.len() <= 2);
        listed.extend(page.keys.clone());
        match page.cursor {
            Some(cursor) => after = Some(cursor),
            None => break,
        }
    }
    assert_eq!(listed, ["todo/*>", "todo/1", "todo/a.b", "todo/ünï code"]);
    assert!(kv.list("empty", "", None, 10).await.unwrap().keys.is_empty());
    // Reading, listing or deleting in a store never written creates nothing.
    assert_eq!(kv.get("never", "k").await.unwrap(), None);
    assert!(!kv.delete("never", "k").await.unwrap());
    let client = async_nats::connect(&nats.url).await.unwrap();
    let mut names = async_nats::jetstream::new(client).stream_names();
    let mut streams = Vec::new();
    while let Some(name) = futures_util::StreamExt::next(&mut names).await {
        streams.push(name.unwrap());
    }
    assert!(
        streams.contains(&"KV_atoll_kv_default".to_string()),
        "{streams:?}"
    );
    assert!(
        !streams
            .iter()
            .any(|name| name.ends_with("_never") || name.ends_with("_empty")),
        "{streams:?}"
    );
}

#[tokio::test]
async fn an_expired_key_reads_as_absent_and_the_sweep_removes_it() {
    let nats = NatsServer::start();
    let kv = stores(&nats, true);
    kv.set("default", "short", b"v".to_vec(), Some(1), None)
        .await
        .unwrap();
    kv.set("default", "long", b"v".to_vec(), Some(3600), None)
        .await
        .unwrap();
    assert!(kv.get("default", "short").await.unwrap().is_some());
    // An increment keeps the key's expiry.
    kv.set("default", "count", b"1".to_vec(), Some(1), None)
        .await
        .unwrap();
    kv.increment("default", "count", 1).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while kv.get("default", "short").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "the key never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(kv.get("default", "count").await.unwrap(), None);
    assert_eq!(kv.list("default", "", None, 10).await.unwrap().keys, ["long"]);
    // An expired key is absent for compare-and-set too.
    assert_eq!(
        kv.set("default", "short", b"v".to_vec(), None, Some(1)).await,
        Err(KvError::Conflict { current: 0 })
    );
    let removed = kv.sweep_expired().await.unwrap();
    assert_eq!(removed, 2, "short and count");
    assert_eq!(kv.sweep_expired().await.unwrap(), 0);
    assert!(kv.get("default", "long").await.unwrap().is_some());
    assert!(matches!(
        kv.set("default", "bad", b"v".to_vec(), Some(0), None).await,
        Err(KvError::Invalid(_))
    ));
}

#[tokio::test]
async fn a_value_over_the_servers_max_payload_is_refused_by_name() {
    let nats = NatsServer::start();
    let kv = stores(&nats, false);
    // Debian's nats-server takes 1 MiB per message by default; a 1 MiB value does not fit
    // with its headers.
    let refused = kv
        .set("default", "big", vec![b'x'; 1 << 20], None, None)
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("max_payload"), "{refused}");
    kv.set("default", "big", vec![b'x'; 512 << 10], None, None)
        .await
        .unwrap();
    assert_eq!(
        kv.get("default", "big").await.unwrap().unwrap().value.len(),
        512 << 10
    );
}

#[tokio::test]
async fn twenty_concurrent_writers_lose_no_increment() {
    let nats = NatsServer::start();
    let nodes = [stores(&nats, true), stores(&nats, true)];
    let writers: Vec<_> = (0..20)
        .map(|writer| {
            let kv = nodes[writer % 2].clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    kv.increment("default", "hits", 1).await.unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    assert_eq!(value(&nodes[0], "default", "hits").await.as_deref(), Some("200"));
}

/// Polls until `kv` reads `expected` at `key`; how long it took.
async fn until_read(kv: &NatsKv, key: &str, expected: Option<&str>) -> Duration {
    let start = Instant::now();
    while value(kv, "default", key).await.as_deref() != expected {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never read {expected:?} at {key}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    start.elapsed()
}

#[tokio::test]
async fn cached_nodes_read_their_own_writes_at_once_and_others_after_the_watch() {
    let nats = NatsServer::start();
    let (a, b) = (stores(&nats, true), stores(&nats, true));
    a.set("default", "k", b"1".to_vec(), None, None).await.unwrap();
    // b caches the value (and a miss for "absent"), then a rewrites both.
    until_read(&b, "k", Some("1")).await;
    assert_eq!(value(&b, "default", "absent").await, None);
    // Once b's watch on the bucket runs, reads fill its cache and come from memory.
    let start = Instant::now();
    while b.cache_hits() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the cache never answered"
        );
        assert_eq!(value(&b, "default", "k").await.as_deref(), Some("1"));
        assert_eq!(value(&b, "default", "absent").await, None);
    }
    for round in 2..=20 {
        let text = round.to_string();
        a.set("default", "k", text.clone().into_bytes(), None, None)
            .await
            .unwrap();
        // Read-your-writes on a node: no wait at all.
        assert_eq!(value(&a, "default", "k").await.as_deref(), Some(text.as_str()));
        // The other node: when the watch event arrives.
        let seen = until_read(&b, "k", Some(&text)).await;
        assert!(seen < Duration::from_secs(5), "{seen:?}");
    }
    a.set("default", "absent", b"now".to_vec(), None, None)
        .await
        .unwrap();
    until_read(&b, "absent", Some("now")).await;
    a.delete("default", "absent").await.unwrap();
    until_read(&b, "absent", None).await;
    // b writes, a (which cached the old value) reads it after the watch; b at once.
    b.increment("default", "count", 1).await.unwrap();
    assert_eq!(value(&b, "default", "count").await.as_deref(), Some("1"));
    until_read(&a, "count", Some("1")).await;
    b.increment("default", "count", 1).await.unwrap();
    assert_eq!(value(&b, "default", "count").await.as_deref(), Some("2"));
    until_read(&a, "count", Some("2")).await;
}

#[tokio::test]
async fn a_node_that_loses_nats_serves_no_cached_reads() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start_in(dir.path(), None);
    let port = nats.port;
    let kv = stores(&nats, true);
    kv.set("default", "k", b"v".to_vec(), None, None).await.unwrap();
    let start = Instant::now();
    while kv.cache_hits() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the cache never answered"
        );
        assert!(kv.get("default", "k").await.unwrap().is_some());
    }
    nats.kill();
    // The connection's loss is noticed within a ping or a failed read; from then on reads
    // fail instead of answering from a cache nothing keeps honest.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout(Duration::from_secs(15), kv.get("default", "k")).await {
            Ok(Err(KvError::Unavailable(_))) | Err(_) => break,
            Ok(_) => {
                assert!(Instant::now() < deadline, "still answering from the cache");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // Back on the same port with the same files: the value is read again.
    let _nats = NatsServer::start_in(dir.path(), Some(port));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Ok(Some(entry))) =
            tokio::time::timeout(Duration::from_secs(5), kv.get("default", "k")).await
        {
            assert_eq!(entry.value, b"v");
            break;
        }
        assert!(Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
