//! The pure rules of pushes and rollbacks, the same for both stores (embedded and NATS):
//! the record a push makes, the version a rollback activates, the events a watch catches up
//! with, and who owns a route.

use std::time::SystemTime;

use crate::error::StoreError;
use crate::manifest::Manifest;
use crate::model::{FunctionRecord, Version};
use crate::route::RoutePattern;
use crate::watch::WatchEvent;

/// The record after pushing a module with `sha256` and `size` bytes to `current` (`None`:
/// a new function), and the version it adds: the next number after the highest, active.
/// `mod_revision` is left for the store to stamp.
pub fn plan_push(
    current: Option<FunctionRecord>,
    manifest: Manifest,
    sha256: String,
    size: u64,
) -> (FunctionRecord, Version) {
    let mut record = current.unwrap_or_else(|| FunctionRecord {
        name: manifest.name.clone(),
        versions: Vec::new(),
        active: 0,
        mod_revision: 0,
    });
    let version = Version {
        version: record.latest() + 1,
        sha256,
        manifest,
        created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        size,
    };
    record.versions.push(version.clone());
    record.active = version.version;
    (record, version)
}

/// The version a rollback of `record` activates: `to`, or by default the highest version
/// below the active one.
pub fn rollback_target(record: &FunctionRecord, to: Option<u64>) -> Result<&Version, StoreError> {
    let name = &record.name;
    match to {
        Some(v) => record
            .version(v)
            .ok_or_else(|| StoreError::NotFound(format!("function `{name}` has no v{v}"))),
        None => record
            .versions
            .iter()
            .filter(|v| v.version < record.active)
            .max_by_key(|v| v.version)
            .ok_or_else(|| {
                StoreError::Conflict(format!(
                    "function `{name}` has no version before v{} to roll back to",
                    record.active
                ))
            }),
    }
}

/// The `put` events for the records changed after revision `since` and up to `up_to`, in
/// revision order: a watch's catch-up, the same for either store.
pub fn put_events<'a>(
    records: impl IntoIterator<Item = &'a FunctionRecord>,
    since: u64,
    up_to: u64,
) -> Vec<WatchEvent> {
    let mut changed: Vec<&FunctionRecord> = records
        .into_iter()
        .filter(|record| record.mod_revision > since && record.mod_revision <= up_to)
        .collect();
    changed.sort_by_key(|record| record.mod_revision);
    changed
        .into_iter()
        .filter_map(|record| {
            record.deployment().map(|deployment| WatchEvent::Put {
                revision: record.mod_revision,
                deployment,
            })
        })
        .collect()
}

/// Refuses a manifest with a route that overlaps a route of another function's active
/// version: some request would match both.
///
/// This is what ownership means. The owner is the function (by name): a route without a
/// path prefix owns its host (`shop.com`), a wildcard every host below its domain
/// (`*.shop.com`), a prefix its path and everything under it (`api.com/v1`). Nobody else may
/// then claim any part of that (`shop.com/checkout`, `login.shop.com`, `api.com/v1/x`), nor
/// something wider that takes it in (`*.com` while `shop.com` is served). The function
/// itself may keep or change its routes in new versions; a rollback is checked the same
/// way, so it cannot take back a route another function holds now.
pub fn check_routes<'a>(
    functions: impl IntoIterator<Item = &'a FunctionRecord>,
    name: &str,
    manifest: &Manifest,
) -> Result<(), StoreError> {
    let wanted: Vec<RoutePattern> = manifest.route_patterns();
    for other in functions.into_iter().filter(|r| r.name != name) {
        let Some(active) = other.active_version() else {
            continue;
        };
        for theirs in active.manifest.route_patterns() {
            for route in &wanted {
                let Some(overlap) = route.overlap(&theirs) else {
                    continue;
                };
                let owner = &other.name;
                return Err(StoreError::Conflict(if *route == theirs {
                    format!("route \"{route}\" is already served by function `{owner}`")
                } else {
                    format!(
                        "route \"{route}\" is refused: {overlap} belongs to function `{owner}` \
                         (its route \"{theirs}\")"
                    )
                }));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(name: &str, routes: &[&str]) -> Manifest {
        Manifest::for_tests(name, routes)
    }

    #[test]
    fn push_plan_takes_the_next_number_after_the_highest() {
        let (record, v1) = plan_push(None, manifest("f", &["f.com"]), "a".repeat(64), 3);
        assert_eq!((v1.version, record.active, record.versions.len()), (1, 1, 1));
        let (mut record, v2) = plan_push(Some(record), manifest("f", &["f.com"]), "b".repeat(64), 4);
        assert_eq!((v2.version, record.active), (2, 2));
        // After a rollback to v1 the next push is still v3, not a second v2.
        record.active = 1;
        let (record, v3) = plan_push(Some(record), manifest("f", &["f.com"]), "c".repeat(64), 5);
        assert_eq!((v3.version, record.active), (3, 3));
        let numbers: Vec<u64> = record.versions.iter().map(|v| v.version).collect();
        assert_eq!(numbers, [1, 2, 3]);
    }

    #[test]
    fn rollback_target_default_and_explicit() {
        let (record, _) = plan_push(None, manifest("f", &["f.com"]), "a".repeat(64), 1);
        let (record, _) = plan_push(Some(record), manifest("f", &["f.com"]), "b".repeat(64), 1);
        assert_eq!(rollback_target(&record, None).unwrap().version, 1);
        assert_eq!(rollback_target(&record, Some(2)).unwrap().version, 2);
        assert!(matches!(
            rollback_target(&record, Some(7)),
            Err(StoreError::NotFound(_))
        ));
        let mut first = record.clone();
        first.active = 1;
        assert!(matches!(
            rollback_target(&first, None),
            Err(StoreError::Conflict(_))
        ));
    }

    #[test]
    fn routes_of_other_functions_conflict() {
        let (a, _) = plan_push(None, manifest("a", &["x.com"]), "a".repeat(64), 1);
        let err = check_routes([&a], "b", &manifest("b", &["X.com/"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "route \"x.com\" is already served by function `a`"
        );
        check_routes([&a], "a", &manifest("a", &["x.com"])).unwrap();
        check_routes([&a], "b", &manifest("b", &["y.x.com", "*.z.x.com"])).unwrap();
    }

    #[test]
    fn a_function_owns_its_hosts() {
        let (owner, _) = plan_push(
            None,
            manifest("owner", &["shop.localhost", "*.shop.localhost"]),
            "a".repeat(64),
            1,
        );
        let (api, _) = plan_push(None, manifest("api", &["api.localhost/v1"]), "b".repeat(64), 1);
        let refused = [
            (
                "shop.localhost/checkout",
                "route \"shop.localhost/checkout\" is refused: shop.localhost/checkout belongs to \
                 function `owner` (its route \"shop.localhost\")",
            ),
            (
                "login.shop.localhost",
                "route \"login.shop.localhost\" is refused: login.shop.localhost belongs to \
                 function `owner` (its route \"*.shop.localhost\")",
            ),
            (
                "*.x.shop.localhost/a",
                "route \"*.x.shop.localhost/a\" is refused: *.x.shop.localhost/a belongs to \
                 function `owner` (its route \"*.shop.localhost\")",
            ),
            (
                "*.localhost",
                "route \"*.localhost\" is refused: shop.localhost belongs to function `owner` \
                 (its route \"shop.localhost\")",
            ),
            (
                "api.localhost/v1/users",
                "route \"api.localhost/v1/users\" is refused: api.localhost/v1/users belongs to \
                 function `api` (its route \"api.localhost/v1\")",
            ),
            (
                "api.localhost",
                "route \"api.localhost\" is refused: api.localhost/v1 belongs to function `api` \
                 (its route \"api.localhost/v1\")",
            ),
        ];
        for (route, message) in refused {
            let err = check_routes([&owner, &api], "thief", &manifest("thief", &[route])).unwrap_err();
            assert!(matches!(err, StoreError::Conflict(_)), "{route}");
            assert_eq!(err.to_string(), message, "{route}");
        }
        // Next to them, not under them: fine. And the owners keep their own routes.
        check_routes(
            [&owner, &api],
            "other",
            &manifest(
                "other",
                &["other.localhost", "api.localhost/v2", "xshop.localhost"],
            ),
        )
        .unwrap();
        check_routes(
            [&owner, &api],
            "owner",
            &manifest(
                "owner",
                &["shop.localhost", "*.shop.localhost", "shop.localhost/x"],
            ),
        )
        .unwrap();
    }
}
