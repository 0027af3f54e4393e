//! docs/grafana/ringcast.json imports cleanly and queries only what ringcast exports.
//!
//! The dashboard is parsed as JSON and checked the way Grafana's import reads it: a
//! `DS_PROMETHEUS` datasource input that every panel and target uses, a schema version,
//! panels with unique ids and a complete `gridPos`, and targets with an `expr`. Each
//! expression's metric names (PromQL identifiers that are not functions, keywords, label
//! names or durations) must be sample names on the `/metrics` page of a running server,
//! so a renamed metric breaks this test rather than a dashboard.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use crate::common::*;
use serde_json::Value;

const DASHBOARD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana/ringcast.json");
const DATASOURCE: &str = "${DS_PROMETHEUS}";

/// PromQL words that are not metric names (aggregations may be written `sum by (x) (..)`,
/// so they are not always followed by a parenthesis).
const KEYWORDS: [&str; 24] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
];

/// The metric names an expression selects: identifiers outside label matchers (`{..}`),
/// ranges (`[..]`), strings and `by`/`without` lists, that are not called like functions.
fn metric_names(expr: &str) -> Vec<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let mut skip_group = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    i += 1;
                }
                i += 1;
            }
            '(' if skip_group => {
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                i += 1;
                skip_group = false;
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next] == ' ' {
                    next += 1;
                }
                let called = chars.get(next) == Some(&'(');
                if word == "by" || word == "without" {
                    skip_group = true;
                } else if !called && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                    names.push(word);
                }
            }
            c if c.is_ascii_digit() => {
                // A number (or a duration such as 5m): not a name.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.99, sum by (le) (rate(a_bucket{instance=~"$x"}[5m])))"#
        ),
        ["a_bucket"]
    );
    assert_eq!(
        metric_names("sum without (shard) (b) / clamp_min(sum(c{x=\"by (z)\"}), 1) > bool 2"),
        ["b", "c"]
    );
}

fn uses_input(datasource: &Value) -> bool {
    datasource.get("uid").and_then(Value::as_str) == Some(DATASOURCE)
        && datasource.get("type").and_then(Value::as_str) == Some("prometheus")
}

#[test]
fn grafana_dashboard_matches_metrics() {
    let _deadline = Deadline::new("grafana_dashboard_matches_metrics", Duration::from_secs(60));
    let text =
        std::fs::read_to_string(DASHBOARD).unwrap_or_else(|e| panic!("reading {DASHBOARD}: {e}"));
    let dash: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"));

    let inputs = dash["__inputs"].as_array().expect("__inputs array");
    assert!(
        inputs.iter().any(|i| i["name"] == "DS_PROMETHEUS"
            && i["type"] == "datasource"
            && i["pluginId"] == "prometheus"),
        "no DS_PROMETHEUS datasource input: {inputs:?}"
    );
    let schema = dash["schemaVersion"].as_u64().expect("schemaVersion");
    assert!(
        schema >= 39,
        "schemaVersion {schema} is older than Grafana 11's"
    );
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dash["uid"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dash["id"].is_null(), "an exported dashboard has id null");

    let panels = dash["panels"].as_array().expect("panels array");
    assert!(panels.len() >= 10, "only {} panels", panels.len());
    let mut ids = HashSet::new();
    let mut exprs = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or("?");
        let id = p["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel {title:?}: no id"));
        assert!(ids.insert(id), "panel id {id} used twice ({title:?})");
        let grid = &p["gridPos"];
        for key in ["h", "w", "x", "y"] {
            assert!(
                grid[key].as_u64().is_some(),
                "panel {title:?}: gridPos.{key} missing: {grid}"
            );
        }
        assert!(grid["x"].as_u64().unwrap_or(0) + grid["w"].as_u64().unwrap_or(0) <= 24);
        if p["type"] == "row" {
            continue;
        }
        assert!(
            uses_input(&p["datasource"]),
            "panel {title:?}: datasource {}",
            p["datasource"]
        );
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel {title:?}: no targets"));
        assert!(!targets.is_empty(), "panel {title:?}: no targets");
        for t in targets {
            assert!(
                uses_input(&t["datasource"]),
                "panel {title:?}: target datasource"
            );
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: target without expr"));
            exprs.push((title.to_string(), expr.to_string()));
        }
    }
    for var in dash["templating"]["list"].as_array().expect("templating") {
        assert!(
            uses_input(&var["datasource"]),
            "variable datasource {}",
            var["datasource"]
        );
        // Grafana's `label_values(<series selector>, <label>)`: the selector is PromQL.
        if let Some(q) = var["definition"].as_str() {
            let selector = q
                .strip_prefix("label_values(")
                .and_then(|rest| rest.rsplit_once(','))
                .map_or(q, |(selector, _)| selector);
            exprs.push(("variable".into(), selector.to_string()));
        }
    }

    // Every name the dashboard asks for, against a running server's page.
    let server = Server::start(&["--shards", "2"]);
    let exported: BTreeSet<String> = server
        .metrics()
        .samples
        .iter()
        .map(|s| s.name.clone())
        .collect();
    let mut unknown = Vec::new();
    for (title, expr) in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "panel {title:?}: no metric in {expr}");
        for name in names {
            if !exported.contains(&name) {
                unknown.push(format!("{title}: {name} (in {expr})"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics the server does not export:\n{}\nexported: {exported:?}",
        unknown.join("\n")
    );
}
