//! The alerting rules in docs/prometheus/ringcast-rules.yml are what docs/operations.md
//! (*Runbook: observe*) says they are, and they work:
//!
//! - `promtool check rules` accepts the file;
//! - `promtool test rules` passes docs/prometheus/ringcast-rules.test.yml (input series
//!   and the alerts they must and must not raise);
//! - every row of the runbook's alert table has a rule named `Ringcast` + the row's name
//!   in CamelCase with exactly the row's expression, and every rule has a row;
//! - every `ringcast_*` / `process_*` name a rule reads is on a live `/metrics` page (of
//!   a cluster node, so the `ringcast_cluster_*` families are there too).
//!
//! `promtool` comes from Debian's `prometheus` package (scripts/test.sh installs it); a
//! missing `promtool` fails the test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `promtool ARGS` in `dir`; returns its exit success and everything it printed.
fn promtool(dir: &Path, args: &[&str]) -> (bool, String) {
    run_tool(
        Command::new("promtool").args(args).current_dir(dir),
        "prometheus",
    )
}

/// `alert` name → `expr`, read from the rules file (one `expr:` line per rule).
fn rules(text: &str) -> BTreeMap<String, String> {
    let mut rules = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("- alert:") {
            current = Some(name.trim().to_string());
        } else if let Some(expr) = line.strip_prefix("expr:") {
            let name = current
                .take()
                .unwrap_or_else(|| panic!("an expr: outside an alert rule: {line}"));
            let expr = expr.trim();
            assert!(
                !expr.is_empty() && !expr.starts_with('|') && !expr.starts_with('>'),
                "rule {name}: keep its expr on one line (the test compares it with the runbook)"
            );
            assert!(
                rules.insert(name.clone(), expr.to_string()).is_none(),
                "rule {name} twice"
            );
        }
    }
    rules
}

/// Splits a Markdown table row on the `|` that are not escaped as `\|`, unescaping them.
fn cells(row: &str) -> Vec<String> {
    let mut cells = vec![String::new()];
    let mut chars = row.trim().trim_start_matches('|').chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                chars.next();
                cells.last_mut().expect("one cell").push('|');
            }
            '|' => cells.push(String::new()),
            _ => cells.last_mut().expect("one cell").push(c),
        }
    }
    cells.iter().map(|c| c.trim().to_string()).collect()
}

/// "Descriptors nearly used" → "RingcastDescriptorsNearlyUsed".
fn rule_name(row_name: &str) -> String {
    let mut name = String::from("Ringcast");
    for word in row_name.split_whitespace() {
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            name.extend(first.to_uppercase());
            name.push_str(chars.as_str());
        }
    }
    name
}

/// Rule name → the first code span of the Expression cell, for each row of the alert
/// table under `## Runbook: observe`.
fn runbook_alerts(doc: &str) -> BTreeMap<String, String> {
    let section = doc
        .split("\n## Runbook: observe")
        .nth(1)
        .expect("docs/operations.md has a `## Runbook: observe` section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let mut rows = section
        .lines()
        .skip_while(|l| !l.starts_with("| Alert | Expression |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'));
    let mut alerts = BTreeMap::new();
    for row in rows.by_ref() {
        let cells = cells(row);
        assert!(cells.len() >= 4, "alert row with too few cells: {row}");
        let expr = cells[1]
            .split('`')
            .nth(1)
            .unwrap_or_else(|| panic!("no `expression` in the row: {row}"));
        alerts.insert(rule_name(&cells[0]), expr.to_string());
    }
    assert!(
        alerts.len() >= 10,
        "found only {} rows in the runbook's alert table: {alerts:?}",
        alerts.len()
    );
    alerts
}

/// The `ringcast_*` and `process_*` names in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts_word && (expr[i..].starts_with("ringcast_") || expr[i..].starts_with("process_"))
        {
            let end = expr[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(expr.len(), |n| i + n);
            names.insert(expr[i..end].to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promtool_checks_the_rules_file() {
    let dir = repo().join("docs/prometheus");
    let (ok, printed) = promtool(&dir, &["check", "rules", "ringcast-rules.yml"]);
    assert!(ok, "promtool check rules failed:\n{printed}");
    let count =
        rules(&std::fs::read_to_string(dir.join("ringcast-rules.yml")).expect("reading the rules"))
            .len();
    assert!(
        printed.contains(&format!("SUCCESS: {count} rules found")),
        "promtool found another number of rules than the file's {count}:\n{printed}"
    );
}

#[test]
fn promtool_unit_tests_pass() {
    let dir = repo().join("docs/prometheus");
    let (ok, printed) = promtool(&dir, &["test", "rules", "ringcast-rules.test.yml"]);
    assert!(ok, "promtool test rules failed:\n{printed}");
    assert!(printed.contains("SUCCESS"), "{printed}");
}

#[test]
fn every_runbook_alert_is_a_rule_with_the_same_expression() {
    let doc = std::fs::read_to_string(repo().join("docs/operations.md"))
        .expect("reading docs/operations.md");
    let text = std::fs::read_to_string(repo().join("docs/prometheus/ringcast-rules.yml"))
        .expect("reading docs/prometheus/ringcast-rules.yml");
    let rules = rules(&text);
    let table = runbook_alerts(&doc);
    let missing: Vec<_> = table.keys().filter(|k| !rules.contains_key(*k)).collect();
    let extra: Vec<_> = rules.keys().filter(|k| !table.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "runbook rows without a rule: {missing:?}; rules without a row: {extra:?}"
    );
    for (name, expr) in &table {
        assert_eq!(
            &rules[name], expr,
            "{name}: the rule's expr differs from docs/operations.md's"
        );
    }
}

#[test]
fn every_metric_a_rule_reads_is_exported() {
    let _deadline = Deadline::new(
        "every_metric_a_rule_reads_is_exported",
        Duration::from_secs(60),
    );
    let text = std::fs::read_to_string(repo().join("docs/prometheus/ringcast-rules.yml"))
        .expect("reading docs/prometheus/ringcast-rules.yml");
    let wanted: BTreeSet<String> = rules(&text)
        .values()
        .flat_map(|e| metric_names(e))
        .collect();
    assert!(wanted.contains("ringcast_connections"), "{wanted:?}");
    // A cluster node (with a real nats-server), so the `ringcast_cluster_*` families,
    // exported only with `[cluster]` on, are on the page too.
    let nats = crate::common::nats::NatsServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("cluster.toml");
    std::fs::write(
        &config,
        format!("[cluster]\nnats_url = \"{}\"\n", nats.url()),
    )
    .expect("write config");
    let server = Server::start(&["--config", config.to_str().expect("utf-8 path")]);
    let page = match server.admin_get("/metrics") {
        Ok(r) if r.status == 200 => r.text(),
        Ok(r) => panic!("GET /metrics answered {}: {}", r.status, r.text()),
        Err(e) => panic!("GET /metrics failed: {e}\n{}", server.describe()),
    };
    let exported: BTreeSet<&str> = page
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let absent: Vec<_> = wanted
        .iter()
        .filter(|n| !exported.contains(n.as_str()))
        .collect();
    assert!(
        absent.is_empty(),
        "rules read metrics /metrics does not export: {absent:?}"
    );
}
