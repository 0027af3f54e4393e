//! `ringcast config check FILE`, `ringcast config defaults` and the wording of a bad
//! `RINGCAST_*` environment value: the configuration tools around [`crate::config`].
//!
//! The defaults file is generated from the same descriptions as `--help` (each key's
//! help ends with `Default: <value>.`), so it cannot drift from the keys themselves.

use crate::config::{resolve, ConfigLayer};
use clap::CommandFactory;
use std::path::Path;

/// Flags that are not configuration keys.
const NOT_KEYS: &[&str] = &["config", "help", "version"];

/// One key's default as written in its help text: `Some(toml)` for a literal value,
/// `None` when there is none or it depends on other keys (the text says which).
fn literal_default(help: &str) -> (String, Option<String>) {
    let Some((about, default)) = help.rsplit_once("Default: ") else {
        return (help.trim().to_string(), None);
    };
    let default = default.trim().trim_end_matches('.');
    let token = default.split_whitespace().next().unwrap_or("");
    let rest = default[token.len()..].trim();
    let plain = (rest.is_empty() || rest.starts_with('(')) && !token.contains('`');
    let value = match token {
        _ if !plain || token.is_empty() || token == "none" => None,
        "true" | "false" => Some(token.to_string()),
        t if t.parse::<i64>().is_ok() => Some(t.to_string()),
        // An array written as TOML (`["*"]`) stays an array.
        t if t.starts_with('[') && toml::from_str::<toml::Table>(&format!("v = {t}")).is_ok() => {
            Some(t.to_string())
        }
        t => Some(toml::Value::String(t.to_string()).to_string()),
    };
    let about = format!("{} Default: {default}.", about.trim());
    (about, value)
}

/// Every configuration key with its default, as commented TOML: keys with a literal
/// default are set to it, the others are commented out with what their default is.
pub fn defaults_toml() -> String {
    let mut out = String::from(
        "# ringcast configuration: every key with its default (`ringcast config defaults`).\n\
         # Flags (--key-name) and RINGCAST_KEY_NAME environment variables override this file.\n",
    );
    let command = ConfigLayer::command();
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if NOT_KEYS.contains(&long) {
            continue;
        }
        let key = long.replace('-', "_");
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        let (about, value) = literal_default(&help);
        out.push('\n');
        for line in wrap(&about, 86) {
            out.push_str("# ");
            out.push_str(&line);
            out.push('\n');
        }
        match value {
            Some(v) => out.push_str(&format!("{key} = {v}\n")),
            None => out.push_str(&format!("# {key} =\n")),
        }
    }
    out.push_str(
        "\n# Namespace rules (TOML only): [channel_defaults] for channels outside any namespace,\n\
         # [namespaces.NAME] for channels NAME:...; see the README's namespace table.\n\
         # [channel_defaults]\n# [namespaces.news]\n# anonymous = true\n",
    );
    out.push_str(
        "\n# The NATS cluster (TOML only; docs/cluster.md). Without nats_url the node runs alone.\n\
         # One of nats_creds_file, nats_user + nats_password, nats_token; nats_tls_ca_file\n\
         # turns TLS to NATS on.\n\
         # [cluster]\n# nats_url = \"nats://127.0.0.1:4222\"\n# nats_creds_file =\n# nats_user =\n\
         # nats_password =\n# nats_token =\n# nats_tls_ca_file =\n# stream_name = \"RINGCAST\"\n\
         # stream_replicas = 1\n# subject_prefix = \"rc\"\n# interest_linger = 30\n",
    );
    out
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().expect("never empty");
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(word.to_string());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

/// `ringcast config check FILE`: the file alone (no flags or environment), validated as
/// at start. `Ok(())` means it would start; the error names the key and why.
///
/// # Errors
/// The problem, naming the file and key.
pub fn check(path: &Path) -> Result<(), String> {
    let (_, layer) = crate::live::read_file(path).map_err(|e| e.to_string())?;
    resolve(ConfigLayer::default(), layer)
        .map(|_| ())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// When `err` is about a value that came from a `RINGCAST_*` environment variable (not
/// from the command line), the message naming the variable; `None` otherwise.
pub fn explain_env_error(err: &clap::Error, args: &[String]) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        err.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return None;
    }
    let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = arg.split_whitespace().next()?.strip_prefix("--")?;
    let flag = format!("--{long}");
    if args
        .iter()
        .any(|a| *a == flag || a.starts_with(&format!("{flag}=")))
    {
        return None;
    }
    let command = ConfigLayer::command();
    let spec = command
        .get_arguments()
        .find(|a| a.get_long() == Some(long))?;
    let env = spec.get_env()?.to_str()?.to_string();
    let value = std::env::var(&env).ok()?;
    let key = long.replace('-', "_");
    let reason = std::error::Error::source(err)
        .map(|e| e.to_string())
        .unwrap_or_else(|| "not a valid value".into());
    let shown = if spec.is_hide_env_values_set() {
        "(hidden)".to_string()
    } else {
        format!("{value:?}")
    };
    Some(format!(
        "invalid value {shown} in environment variable {env} (key `{key}`): {reason}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_key_documents_its_default() {
        for arg in ConfigLayer::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if NOT_KEYS.contains(&long) {
                continue;
            }
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(help.contains("Default: "), "--{long}: {help}");
        }
    }

    #[test]
    fn the_defaults_file_resolves_to_the_defaults() {
        let text = defaults_toml();
        let layer: ConfigLayer = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let from_file = resolve(ConfigLayer::default(), layer).unwrap();
        let built_in = resolve(ConfigLayer::default(), ConfigLayer::default()).unwrap();
        assert_eq!(format!("{from_file:?}"), format!("{built_in:?}"));
        assert!(text.contains("\nmax_connections = 1000000\n"), "{text}");
        assert!(text.contains("\nlisten = \"0.0.0.0:8080\"\n"), "{text}");
        assert!(text.contains("\n# jwt_secret =\n"), "{text}");
    }

    #[test]
    fn defaults_are_read_from_help_texts() {
        assert_eq!(
            literal_default("Slots. Default: 16384.").1.as_deref(),
            Some("16384")
        );
        assert_eq!(
            literal_default("Bytes. Default: 268435456 (256 MiB).")
                .1
                .as_deref(),
            Some("268435456")
        );
        assert_eq!(literal_default("X. Default: none.").1, None);
        assert_eq!(
            literal_default("Origins. Default: [\"*\"].").1.as_deref(),
            Some("[\"*\"]")
        );
        assert_eq!(
            literal_default("X. Default: HS256 with a secret; required with a key file.").1,
            None
        );
        assert_eq!(
            literal_default("X. Default: `<data_dir>/inbox.redb`.").1,
            None
        );
    }

    fn key_names() -> Vec<String> {
        ConfigLayer::command()
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|l| !NOT_KEYS.contains(l))
            .map(|l| l.replace('-', "_"))
            .collect()
    }

    /// `config defaults` with the line of `key` replaced by `key = value`.
    fn defaults_with(key: &str, value: &str) -> String {
        let mut text: String = defaults_toml()
            .lines()
            .filter(|l| !l.starts_with(&format!("{key} = ")))
            .map(|l| format!("{l}\n"))
            .collect();
        // Before the commented-out table examples, still at the top level.
        text.insert_str(0, &format!("{key} = {value}\n"));
        text
    }

    #[test]
    fn proxy_keys_are_checked() {
        let err = check_text(&defaults_with("proxy_protocol", "\"v3\"")).unwrap_err();
        assert!(err.contains("`proxy_protocol`"), "{err}");
        let err = check_text(&defaults_with("proxy_protocol", "\"v2\"")).unwrap_err();
        assert!(err.contains("`trusted_proxies`"), "{err}");
        let err = check_text(&defaults_with("trusted_proxies", "[\"10.0.0.0/33\"]")).unwrap_err();
        assert!(err.contains("`trusted_proxies`"), "{err}");
        let text = format!(
            "trusted_proxies = [\"10.0.0.0/8\"]\n{}",
            defaults_with("proxy_protocol", "\"any\"")
        );
        check_text(&text).unwrap();
    }

    /// What `config check` does, on text.
    fn check_text(text: &str) -> Result<(), String> {
        let layer = crate::config::parse_layer(text)?;
        resolve(ConfigLayer::default(), layer)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    proptest! {
        /// Any mix of known and unknown keys with values of any type: parsing and
        /// resolving never panic, and a refusal names a key of the input.
        #[test]
        fn arbitrary_config_files_never_panic_and_name_the_key(
            lines in proptest::collection::vec(
                (0usize..60, prop_oneof![
                    any::<i64>().prop_map(|n| n.to_string()),
                    (0u64..70_000).prop_map(|n| n.to_string()),
                    any::<bool>().prop_map(|b| b.to_string()),
                    "[a-z0-9:./ -]{0,20}".prop_map(|s| format!("{s:?}")),
                    Just("[1, 2]".to_string()),
                    "[^\n]{0,12}",
                ]),
                0..6,
            ),
        ) {
            let keys = key_names();
            let mut text = String::new();
            let mut used = Vec::new();
            for (k, value) in &lines {
                let key = keys.get(*k).cloned().unwrap_or_else(|| format!("no_such_key_{k}"));
                if used.contains(&key) {
                    continue;
                }
                text.push_str(&format!("{key} = {value}\n"));
                used.push(key);
            }
            match crate::config::parse_layer(&text) {
                Err(message) => {
                    // A TOML syntax error names the line instead of a key.
                    prop_assert!(
                        used.iter().any(|k| message.contains(k.as_str())) || message.contains("line"),
                        "{message}\n{text}"
                    );
                }
                Ok(layer) => {
                    if let Err(e) = resolve(ConfigLayer::default(), layer) {
                        let message = e.to_string();
                        prop_assert!(
                            used.iter().any(|k| message.contains(&format!("`{k}`"))),
                            "{message}\n{text}"
                        );
                    }
                }
            }
        }

        /// One key set to anything (or an unknown key) among every other key at its
        /// default: `config check` never panics, and a refusal names that key.
        #[test]
        fn one_bad_key_among_defaults_is_the_one_named(
            k in 0usize..80,
            value in prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                (0u64..70_000).prop_map(|n| n.to_string()),
                any::<bool>().prop_map(|b| b.to_string()),
                "[a-z0-9:./ -]{0,20}".prop_map(|s| format!("{s:?}")),
                prop_oneof![Just("off"), Just("v1"), Just("v2"), Just("any"), Just("0.0.0.0:1")]
                    .prop_map(|s| format!("{s:?}")),
                Just("[1, 2]".to_string()),
                Just("[\"10.0.0.0/8\", \"x\"]".to_string()),
                "[^\n]{0,12}",
            ],
        ) {
            let keys = key_names();
            let key = keys.get(k).cloned().unwrap_or_else(|| format!("no_such_key_{k}"));
            let text = defaults_with(&key, &value);
            if let Err(message) = check_text(&text) {
                // A TOML syntax error in the value names its line, which starts with the key.
                prop_assert!(message.contains(key.as_str()), "{message}\n{key} = {value}");
            }
        }
    }
}
