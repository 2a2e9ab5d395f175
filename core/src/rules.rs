//! The pure rules of pushes and rollbacks, the same for both stores (embedded and NATS):
//! the record a push makes, the version a rollback activates, the events a watch catches up
//! with, and who owns a route.

use std::time::SystemTime;

use crate::error::StoreError;
use crate::manifest::Manifest;
use crate::model::{FunctionRecord, Version};
use crate::route::RoutePattern;
use crate::traffic::{Share, TrafficSplit};
use crate::watch::WatchEvent;

/// The record after pushing a module with `sha256` and `size` bytes to `current` (`None`:
/// a new function), and the version it adds: the next number after the highest. With
/// `takes_traffic` it becomes active and ends any split; without (`atoll push
/// --no-traffic`) it joins the function's split at 0%, prepared on every node and reached
/// only by pinning it, while the active version keeps serving. `mod_revision` is left for
/// the store to stamp.
pub fn plan_push(
    current: Option<FunctionRecord>,
    manifest: Manifest,
    sha256: String,
    size: u64,
    takes_traffic: bool,
) -> Result<(FunctionRecord, Version), StoreError> {
    let mut record = current.unwrap_or_else(|| FunctionRecord {
        name: manifest.name.clone(),
        versions: Vec::new(),
        active: 0,
        mod_revision: 0,
        traffic: None,
        secrets: Default::default(),
    });
    let version = Version {
        version: record.latest() + 1,
        sha256,
        manifest,
        created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        size,
    };
    if takes_traffic {
        record.active = version.version;
        record.traffic = None;
    } else {
        if record.active_version().is_none() {
            return Err(StoreError::Conflict(format!(
                "function `{}` has no version serving yet: its first push takes the traffic \
                 (push without --no-traffic)",
                record.name
            )));
        }
        let active = record.active_version().expect("checked above");
        if !same_routes(&active.manifest, &version.manifest) {
            return Err(StoreError::Conflict(format!(
                "v{} would join the traffic split of `{}` with other routes than v{} ({}): the \
                 versions of a split share the active version's routes (push it with traffic \
                 to change them)",
                version.version,
                record.name,
                active.version,
                active.manifest.routes.join(", ")
            )));
        }
        let (mut shares, sticky) = match record.traffic.take() {
            Some(split) => (split.shares, split.sticky),
            None => (
                vec![Share {
                    version: record.active,
                    percent: 100,
                }],
                None,
            ),
        };
        shares.push(Share {
            version: version.version,
            percent: 0,
        });
        record.traffic = Some(TrafficSplit::new(shares, sticky).map_err(StoreError::Invalid)?);
    }
    record.versions.push(version.clone());
    Ok((record, version))
}

/// `record` with `split` as its traffic: each version must exist, and the one with the
/// largest share becomes active (its routes are the function's). A split that sends
/// everything to one version without a sticky key is that version made active, the split
/// ended (`atoll promote`). The routes are the caller's to check.
pub fn plan_traffic(mut record: FunctionRecord, split: TrafficSplit) -> Result<FunctionRecord, StoreError> {
    for share in &split.shares {
        if record.version(share.version).is_none() {
            return Err(StoreError::NotFound(format!(
                "function `{}` has no v{}",
                record.name, share.version
            )));
        }
    }
    let leading = record.version(split.leading()).expect("checked above");
    if let Some(other) = split
        .shares
        .iter()
        .filter_map(|share| record.version(share.version))
        .find(|version| !same_routes(&version.manifest, &leading.manifest))
    {
        return Err(StoreError::Conflict(format!(
            "v{} and v{} of `{}` have different routes: the versions of a split share one set \
             of routes",
            other.version, leading.version, record.name
        )));
    }
    record.active = leading.version;
    record.traffic = (!split.is_whole()).then_some(split);
    Ok(record)
}

/// Sets (`Some`) or removes (`None`) `record`'s secret `key` (checked by the caller:
/// [`crate::secrets::check`]); whether it was there before. Refused past
/// [`crate::secrets::MAX_SECRETS`].
pub fn apply_secret(
    record: &mut FunctionRecord,
    key: &str,
    sealed: Option<crate::secrets::SealedSecret>,
) -> Result<bool, StoreError> {
    let existed = record.secrets.contains_key(key);
    match sealed {
        Some(sealed) => {
            if !existed && record.secrets.len() >= crate::secrets::MAX_SECRETS {
                return Err(StoreError::Conflict(format!(
                    "function `{}` has {} secrets, the most it may have",
                    record.name,
                    crate::secrets::MAX_SECRETS
                )));
            }
            let mut after = record.secrets.clone();
            after.insert(key.to_string(), sealed);
            // Sealed: hex of the value and its 16-byte tag, so about twice the value.
            let total: usize = after
                .iter()
                .map(|(name, sealed)| name.len() + (sealed.sealed.len() / 2).saturating_sub(16))
                .sum();
            if total > crate::secrets::MAX_SECRETS_TOTAL_BYTES {
                return Err(StoreError::Invalid(format!(
                    "the secrets of `{}` would hold {total} bytes, over the {} byte limit for \
                     them together",
                    record.name,
                    crate::secrets::MAX_SECRETS_TOTAL_BYTES
                )));
            }
            record.secrets = after;
        }
        None => {
            record.secrets.remove(key);
        }
    }
    Ok(existed)
}

/// Whether two versions serve the same routes (each manifest's are canonical).
fn same_routes(a: &Manifest, b: &Manifest) -> bool {
    let sorted = |manifest: &Manifest| {
        let mut routes = manifest.routes.clone();
        routes.sort();
        routes
    };
    sorted(a) == sorted(b)
}

/// The version a rollback of `record` activates: `to`, or by default the highest version
/// below the active one (during a traffic split, the oldest version with a share).
pub fn rollback_target(record: &FunctionRecord, to: Option<u64>) -> Result<&Version, StoreError> {
    let name = &record.name;
    // During a gray release, "back" is where the release started: the oldest version that
    // still has a share (the stable one), not the one before the leading version.
    if to.is_none()
        && let Some(split) = &record.traffic
        && let Some(stable) = split
            .shares
            .iter()
            .filter(|share| share.percent > 0)
            .filter_map(|share| record.version(share.version))
            .min_by_key(|version| version.version)
    {
        return Ok(stable);
    }
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
    fn a_push_without_traffic_joins_the_split_at_zero_and_a_split_moves_the_active_version() {
        let (record, _) = plan_push(None, manifest("f", &["f.com"]), "a".repeat(64), 1, true).unwrap();
        let first = plan_push(None, manifest("f", &["f.com"]), "a".repeat(64), 1, false);
        assert!(
            matches!(first, Err(StoreError::Conflict(_))),
            "a first version takes the traffic"
        );
        let (record, v2) =
            plan_push(Some(record), manifest("f", &["f.com"]), "b".repeat(64), 1, false).unwrap();
        assert_eq!((v2.version, record.active), (2, 1), "v1 keeps serving");
        let split = record.traffic.clone().unwrap();
        assert_eq!(
            split.shares,
            vec![
                Share {
                    version: 2,
                    percent: 0
                },
                Share {
                    version: 1,
                    percent: 100
                }
            ]
        );
        let shares = |pairs: &[(u64, u8)]| {
            TrafficSplit::new(
                pairs
                    .iter()
                    .map(|&(version, percent)| Share { version, percent })
                    .collect(),
                None,
            )
            .unwrap()
        };
        let record = plan_traffic(record, shares(&[(1, 40), (2, 60)])).unwrap();
        assert_eq!(record.active, 2, "the largest share is the active version");
        let missing = plan_traffic(record.clone(), shares(&[(1, 40), (9, 60)]));
        assert!(matches!(missing, Err(StoreError::NotFound(message)) if message.contains("no v9")));
        let promoted = plan_traffic(record.clone(), shares(&[(2, 100)])).unwrap();
        assert_eq!(
            (promoted.active, promoted.traffic),
            (2, None),
            "all to one is no split"
        );
        let elsewhere = plan_push(
            Some(record.clone()),
            manifest("f", &["g.com"]),
            "d".repeat(64),
            1,
            false,
        );
        assert!(
            matches!(&elsewhere, Err(StoreError::Conflict(message)) if message.contains("other routes")),
            "{elsewhere:?}"
        );
        let stable = rollback_target(&record, None).unwrap();
        assert_eq!(
            stable.version, 1,
            "a rollback during a split goes back to the stable version"
        );
        let (pushed, _) =
            plan_push(Some(record), manifest("f", &["f.com"]), "c".repeat(64), 1, true).unwrap();
        assert_eq!(
            (pushed.active, pushed.traffic),
            (3, None),
            "a push with traffic ends the split"
        );
    }

    #[test]
    fn push_plan_takes_the_next_number_after_the_highest() {
        let (record, v1) = plan_push(None, manifest("f", &["f.com"]), "a".repeat(64), 3, true).unwrap();
        assert_eq!((v1.version, record.active, record.versions.len()), (1, 1, 1));
        let (mut record, v2) =
            plan_push(Some(record), manifest("f", &["f.com"]), "b".repeat(64), 4, true).unwrap();
        assert_eq!((v2.version, record.active), (2, 2));
        // After a rollback to v1 the next push is still v3, not a second v2.
        record.active = 1;
        let (record, v3) =
            plan_push(Some(record), manifest("f", &["f.com"]), "c".repeat(64), 5, true).unwrap();
        assert_eq!((v3.version, record.active), (3, 3));
        let numbers: Vec<u64> = record.versions.iter().map(|v| v.version).collect();
        assert_eq!(numbers, [1, 2, 3]);
    }

    #[test]
    fn rollback_target_default_and_explicit() {
        let (record, _) = plan_push(None, manifest("f", &["f.com"]), "a".repeat(64), 1, true).unwrap();
        let (record, _) =
            plan_push(Some(record), manifest("f", &["f.com"]), "b".repeat(64), 1, true).unwrap();
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
        let (a, _) = plan_push(None, manifest("a", &["x.com"]), "a".repeat(64), 1, true).unwrap();
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
            true,
        )
        .unwrap();
        let (api, _) = plan_push(
            None,
            manifest("api", &["api.localhost/v1"]),
            "b".repeat(64),
            1,
            true,
        )
        .unwrap();
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
