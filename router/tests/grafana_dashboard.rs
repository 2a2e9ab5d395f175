//! `deploy/grafana/atoll-dashboard.json` stays true to the metrics the node exports: it is
//! valid JSON with panels, and every metric its queries name is one the code registers
//! (a renamed metric would otherwise leave an empty panel nobody notices).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Every `atoll_…` name in `text` (letters, digits and `_` after the prefix).
fn metric_names(text: &str) -> BTreeSet<String> {
    text.match_indices("atoll_")
        .filter(|(at, _)| !text[..*at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_'))
        .map(|(at, _)| {
            text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect::<String>()
        })
        .collect()
}

/// The metric names the code registers: `"atoll_…"` literals in the crates' sources.
fn registered() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut dirs: Vec<PathBuf> = ["router", "ingress", "isolate", "core", "control"]
        .iter()
        .map(|krate| workspace().join(krate).join("src"))
        .collect();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                let source = std::fs::read_to_string(&path).unwrap();
                for literal in source.split('"').skip(1).step_by(2) {
                    if literal.starts_with("atoll_")
                        && literal.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    {
                        names.insert(literal.to_string());
                    }
                }
            }
        }
    }
    names
}

#[test]
fn every_query_of_the_dashboard_names_a_metric_the_node_exports() {
    let text = std::fs::read_to_string(workspace().join("deploy/grafana/atoll-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let known = registered();
    assert!(known.contains("atoll_requests_total"), "{known:?}");
    let mut queried = BTreeSet::new();
    for panel in panels {
        let targets = panel["targets"].as_array().expect("each panel has queries");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("a PromQL expression");
            for name in metric_names(expr) {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(&name)
                    .to_string();
                assert!(
                    known.contains(&base),
                    "panel {} queries {name}, which no crate registers",
                    panel["title"]
                );
                queried.insert(base);
            }
        }
    }
    // The gray release shows: requests and latency by version.
    assert!(text.contains("by (function, version)") && text.contains("by (le, function, version)"));
    assert!(queried.len() >= 8, "{queried:?}");
}
