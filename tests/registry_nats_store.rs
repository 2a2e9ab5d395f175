//! [`NatsStore`] against a real `nats-server -js`: compare-and-set versions under
//! concurrent writers on two connections, the watch catch-up, a second connection seeing
//! the same state, modules refused when their object is damaged or gone, and minted tokens
//! shared (and revoked) across registries.

use std::time::Duration;

use atoll_control::NatsStore;
use atoll_control::nats::MODULES_BUCKET;
use atoll_core::{Manifest, StoreError, WatchEvent};
use atoll_testkit::NatsServer;

fn manifest(name: &str, routes: &[&str]) -> Manifest {
    let routes: Vec<String> = routes.iter().map(|r| format!("{r:?}")).collect();
    Manifest::parse(&format!(
        "name = {name:?}\nwasm = \"m.wasm\"\nroutes = [{}]",
        routes.join(", ")
    ))
    .unwrap()
}

fn sha(bytes: &[u8]) -> String {
    atoll_core::digest::sha256_hex(bytes)
}

#[tokio::test]
async fn concurrent_writers_on_two_connections_get_every_version_once() {
    let nats = NatsServer::start();
    let (one, two) = tokio::join!(NatsStore::connect(&nats.url), NatsStore::connect(&nats.url));
    let (one, two) = (one.unwrap(), two.unwrap());
    let pushes = (0..40u32).map(|i| {
        let store = if i % 2 == 0 { one.clone() } else { two.clone() };
        tokio::spawn(async move {
            store
                .push(manifest("f", &["f.com"]), format!("module {i}").into_bytes())
                .await
                .unwrap()
                .version
        })
    });
    let mut numbers = Vec::new();
    for push in pushes {
        numbers.push(push.await.unwrap());
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=40).collect::<Vec<u64>>());
    let record = two.get("f").await.unwrap().unwrap();
    let stored: Vec<u64> = record.versions.iter().map(|v| v.version).collect();
    assert_eq!(stored, (1..=40).collect::<Vec<u64>>());
    assert_eq!(record.active, 40);
    // Every version's module is there and is what was pushed under that sha256.
    for version in &record.versions {
        let bytes = one.read_blob(&version.sha256).await.unwrap();
        assert_eq!(sha(&bytes), version.sha256);
    }
}

#[tokio::test]
async fn watch_catch_up_rollback_and_routes_across_connections() {
    let nats = NatsServer::start();
    let one = NatsStore::connect(&nats.url).await.unwrap();
    assert_eq!(one.events_since(0).await.unwrap(), (vec![], 0));
    let mut changes = one.subscribe();

    one.push(manifest("a", &["a.com"]), b"a1".to_vec()).await.unwrap();
    one.push(manifest("b", &["b.com"]), b"b1".to_vec()).await.unwrap();
    one.push(manifest("a", &["a.com"]), b"a2".to_vec()).await.unwrap();
    // The KV watch wakes watch streams for writes through this connection too.
    tokio::time::timeout(Duration::from_secs(30), changes.wait_for(|rev| *rev >= 3))
        .await
        .expect("the KV watch reported the writes")
        .unwrap();

    // A second connection (another registry, or this one restarted) sees the same.
    let two = NatsStore::connect(&nats.url).await.unwrap();
    let (events, revision) = two.events_since(0).await.unwrap();
    assert_eq!(revision, 3);
    let summary: Vec<(u64, String, u64)> = events
        .iter()
        .map(|e| match e {
            WatchEvent::Put { revision, deployment } => {
                (*revision, deployment.name.clone(), deployment.version)
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(summary, [(2, "b".into(), 1), (3, "a".into(), 2)]);
    assert_eq!(two.events_since(2).await.unwrap().0.len(), 1);
    assert_eq!(two.events_since(3).await.unwrap(), (vec![], 3));
    let names: Vec<String> = two.list().await.unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(names, ["a", "b"]);

    // Route conflicts see functions written through the other connection.
    let err = two
        .push(manifest("c", &["a.com"]), b"c".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert!(two.get("c").await.unwrap().is_none());

    let rolled = two.rollback("a", None).await.unwrap();
    assert_eq!((rolled.active, rolled.mod_revision), (1, 4));
    assert_eq!(one.get("a").await.unwrap().unwrap().active, 1);
    assert!(matches!(
        two.rollback("a", None).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        two.rollback("nope", None).await,
        Err(StoreError::NotFound(_))
    ));
    // The next push takes the number after the highest.
    let v = one.push(manifest("a", &["a.com"]), b"a3".to_vec()).await.unwrap();
    assert_eq!(v.version, 3);
}

#[tokio::test]
async fn a_damaged_or_missing_module_is_refused() {
    let nats = NatsServer::start();
    let store = NatsStore::connect(&nats.url).await.unwrap();
    let version = store
        .push(manifest("f", &["f.com"]), b"the real module".to_vec())
        .await
        .unwrap();
    assert_eq!(
        store.read_blob(&version.sha256).await.unwrap(),
        b"the real module"
    );

    // Someone with access to NATS replaces the object's content.
    let client = async_nats::connect(&nats.url).await.unwrap();
    let objects = async_nats::jetstream::new(client)
        .get_object_store(MODULES_BUCKET)
        .await
        .unwrap();
    let mut tampered: &[u8] = b"something else entirely";
    objects.put(version.sha256.as_str(), &mut tampered).await.unwrap();
    let err = store.read_blob(&version.sha256).await.unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("corrupt"), "{message}");
    assert!(message.contains(&sha(b"something else entirely")), "{message}");

    objects.delete(version.sha256.as_str()).await.unwrap();
    assert!(matches!(
        store.read_blob(&version.sha256).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.read_blob("../etc/passwd").await,
        Err(StoreError::Invalid(_))
    ));
    // Pushing the module again restores the object.
    store
        .push(manifest("f", &["f.com"]), b"the real module".to_vec())
        .await
        .unwrap();
    assert_eq!(
        store.read_blob(&version.sha256).await.unwrap(),
        b"the real module"
    );
}

#[tokio::test]
async fn a_heartbeat_through_one_connection_is_a_member_on_every_other() {
    use atoll_core::membership::{Health, NodeAnnouncement};
    let nats = NatsServer::start();
    let (one, two) = tokio::join!(NatsStore::connect(&nats.url), NatsStore::connect(&nats.url));
    let (one, two) = (one.unwrap(), two.unwrap());
    let announcement = NodeAnnouncement {
        name: "edge-1".into(),
        region: "eu".into(),
        http: Some("127.0.0.11:8080".parse().unwrap()),
        https: None,
        in_flight: 2,
        free_capacity: 5,
        draining: false,
        sync_lag: 0,
        quarantined: 0,
    };
    one.announce(&announcement).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let seen = loop {
        if let Some(member) = two
            .members()
            .into_iter()
            .find(|m| m.announcement.name == "edge-1")
        {
            break member;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the other connection never saw the heartbeat"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(seen.announcement, announcement);
    assert_eq!(seen.health, Health::Healthy);
    // Draining is carried, and a node that stops announcing is reported gone after the TTL.
    one.announce(&NodeAnnouncement {
        draining: true,
        ..announcement.clone()
    })
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut saw_draining = false;
    loop {
        let health = two
            .members()
            .into_iter()
            .find(|m| m.announcement.name == "edge-1")
            .map(|m| m.health);
        saw_draining |= health == Some(Health::Draining);
        if saw_draining && health == Some(Health::Gone) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "last health {health:?}, draining seen: {saw_draining}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A bad name is refused before it reaches NATS.
    let refused = one
        .announce(&NodeAnnouncement {
            name: "a.b".into(),
            ..announcement
        })
        .await;
    assert!(matches!(refused, Err(StoreError::Invalid(_))), "{refused:?}");
}

#[tokio::test]
async fn tokens_minted_through_one_registry_work_and_are_revoked_on_another() {
    use atoll_core::auth::{Caller, Grant, Scope};
    use atoll_registry::{Backend, Registry, RegistryOptions};
    let nats = NatsServer::start();
    let check: std::sync::Arc<dyn atoll_core::ModuleCheck> = std::sync::Arc::new(
        atoll_isolate::PushCheck::new(atoll_isolate::Engine::new().unwrap()),
    );
    let registry = |store: NatsStore| {
        Registry::with_backend(
            Backend::Nats(store),
            std::sync::Arc::clone(&check),
            "root".into(),
            RegistryOptions::default(),
        )
    };
    let (one, two) = tokio::join!(NatsStore::connect(&nats.url), NatsStore::connect(&nats.url));
    let (one, two) = (registry(one.unwrap()), registry(two.unwrap()));

    let created = one
        .mint(Grant {
            scope: Scope::Deploy,
            functions: vec!["shop-*".into()],
            domains: vec!["*.shop.localhost".parse().unwrap()],
            node: None,
            description: "shop".into(),
        })
        .await
        .unwrap();
    match two.authenticate(&created.token).await.unwrap() {
        Some(Caller::Token(credential)) => {
            assert_eq!(credential.id, created.info.id);
            assert_eq!(credential.grant, created.info.grant);
        }
        other => panic!("expected the minted token, got {other:?}"),
    }
    assert!(matches!(
        two.authenticate("root").await.unwrap(),
        Some(Caller::Root)
    ));
    // The same id with another secret.
    let last = if created.token.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &created.token[..created.token.len() - 1]);
    assert!(two.authenticate(&forged).await.unwrap().is_none());
    let listed = two.tokens().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0], created.info);
    // The bucket holds the hash, never the token.
    let stored = two.store().credential(&created.info.id).await.unwrap().unwrap();
    assert_eq!(stored.token_sha256, sha(created.token.as_bytes()));
    assert!(!serde_json::to_string(&stored).unwrap().contains(&created.token));

    one.revoke(&created.info.id).await.unwrap();
    assert!(two.authenticate(&created.token).await.unwrap().is_none());
    assert!(two.tokens().await.unwrap().is_empty());
    let e = two.revoke(&created.info.id).await.unwrap_err();
    assert_eq!(e.status(), 404, "{e}");
}
