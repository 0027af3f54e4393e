//! The effective configuration as the startup log states it: every key as named in the
//! configuration file (`listen = 0.0.0.0:8080`), after flags, environment and file are
//! merged over the defaults, in the order `ringcast config defaults` prints them.
//!
//! Secrets are never written: a set `ingest_key`, `jwt_secret`, `[cluster] nats_password`
//! or `nats_token` shows as `<redacted>`, and so does the user-info part of a NATS URL.
//! Key files are named by their path only. A key whose feature is off (the inbox's keys
//! with `inbox = false`, the token keys without a JWT key) shows as `unused`.

use crate::config::{Cidr, LogFormat, Settings};
use crate::proto::proxy::Versions;
use std::fmt::Display;
use std::path::Path;
use std::time::Duration;

/// What a secret that is set shows as.
pub const REDACTED: &str = "<redacted>";

/// What a key shows as when its feature is off, so it has no effect.
pub const UNUSED: &str = "unused";

/// Every key with its effective value, in the order of `ringcast config defaults`, then
/// the `[channel_defaults]`, `[namespaces]` and `[cluster]` tables.
pub fn entries(s: &Settings) -> Vec<(&'static str, String)> {
    let inbox = s.inbox.as_ref();
    let verifier = s.live.auth.verifier.as_deref();
    let jwt = |value: &dyn Fn(&crate::auth::token::Verifier) -> String| {
        verifier.map_or_else(|| UNUSED.to_string(), value)
    };
    let mut out: Vec<(&'static str, String)> = vec![
        ("listen", s.listen.to_string()),
        ("udp_ingest", address_or_off(s.udp_ingest)),
        ("tcp_ingest", address_or_off(s.tcp_ingest)),
        ("admin", s.admin.to_string()),
        ("ingest_allow", cidrs(&s.live.ingest_allow)),
        ("ingest_key", secret(s.live.ingest_key.is_some())),
        ("ingest_auth_timeout", secs(s.ingest_auth_timeout)),
        (
            "max_tcp_ingest_connections",
            s.live.max_tcp_ingest_connections.to_string(),
        ),
        ("admin_request_timeout", secs(s.admin_request_timeout)),
        (
            "max_admin_connections",
            s.live.max_admin_connections.to_string(),
        ),
        (
            "log_format",
            match s.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
            .to_string(),
        ),
        ("shards", s.shards.to_string()),
        ("max_connections", s.live.max_connections.to_string()),
        ("listen_backlog", s.listen_backlog.to_string()),
        (
            "tls_listen",
            optional(s.live.tls.as_ref().map(|t| t.listen)),
        ),
        (
            "tls_cert_file",
            optional(s.live.tls.as_ref().map(|t| t.cert_file.display())),
        ),
        (
            "tls_key_file",
            optional(s.live.tls.as_ref().map(|t| t.key_file.display())),
        ),
        ("max_message_size", s.max_message_size.to_string()),
        ("max_backlog_bytes", s.live.max_backlog_bytes.to_string()),
        ("max_backlog_frames", s.live.max_backlog_frames.to_string()),
        (
            "slow_consumer_drop_limit",
            s.live.slow_consumer_drop_limit.to_string(),
        ),
        ("slow_consumer_timeout", secs(s.live.slow_consumer_timeout)),
        (
            "max_subscriptions_per_connection",
            s.max_subscriptions_per_connection.to_string(),
        ),
        ("max_channels", s.max_channels.to_string()),
        (
            "max_inbound_per_sec",
            s.live.max_inbound_per_sec.to_string(),
        ),
        ("ping_interval", secs(s.ping_interval)),
        ("pong_timeout", secs(s.pong_timeout)),
        ("handshake_timeout", secs(s.handshake_timeout)),
        (
            "max_handshakes_per_shard",
            s.live.max_handshakes_per_shard.to_string(),
        ),
        (
            "handshake_fair_share",
            s.live.handshake_fair_share.to_string(),
        ),
        ("allowed_origins", list(s.live.origins.entries())),
        (
            "allow_missing_origin",
            s.live.origins.allows_missing().to_string(),
        ),
        (
            "max_connections_per_ip",
            s.per_ip.max_connections.to_string(),
        ),
        (
            "max_new_connections_per_ip_per_sec",
            s.per_ip.max_new_per_sec.to_string(),
        ),
        ("max_handshakes_per_ip", s.per_ip.max_handshakes.to_string()),
        ("ipv6_prefix_len", s.per_ip.ipv6_prefix_len.to_string()),
        (
            "proxy_protocol",
            match s.proxy_protocol {
                None => "off",
                Some(Versions::V1) => "v1",
                Some(Versions::V2) => "v2",
                Some(Versions::Any) => "any",
            }
            .to_string(),
        ),
        ("trusted_proxies", cidrs(&s.trusted_proxies)),
        ("accept_rate_per_shard", s.accept_rate_per_shard.to_string()),
        ("drain_window", secs(s.drain_window)),
        ("drain_grace", secs(s.drain_grace)),
        ("ring_capacity", s.ring_capacity.to_string()),
        (
            "channel_idle_timeout",
            s.channel_idle_timeout.map_or_else(|| "0".to_string(), secs),
        ),
        ("history_size", s.history_size.to_string()),
        ("history_ttl", secs(s.history_ttl)),
        ("history_max_bytes", s.history_max_bytes.to_string()),
        ("max_recovery_messages", s.max_recovery_messages.to_string()),
        ("inbox", inbox.is_some().to_string()),
        ("data_dir", s.data_dir.display().to_string()),
        ("inbox_path", used(inbox.map(|i| i.path.display()))),
        ("inbox_retention", used(inbox.map(|i| secs(i.retention)))),
        ("inbox_max_batch", used(inbox.map(|i| i.max_batch))),
        ("inbox_queue", used(inbox.map(|i| i.queue))),
        ("presence_max_members", s.presence_max_members.to_string()),
        ("io_memory", s.io_memory.to_string()),
        (
            "transparent_huge_pages",
            s.transparent_huge_pages.to_string(),
        ),
        (
            "jwt_secret",
            secret(verifier.is_some_and(|v| v.algorithm().is_hmac())),
        ),
        (
            "jwt_public_key_file",
            optional(s.live.auth.public_key_file.as_deref().map(Path::display)),
        ),
        ("jwt_algorithm", jwt(&|v| v.algorithm().name().to_string())),
        ("jwt_leeway", jwt(&|v| v.leeway().to_string())),
        ("jwt_cookie", optional(s.live.auth.cookie.as_ref())),
        (
            "jwt_channels_claim",
            jwt(&|v| v.channels_claim().to_string()),
        ),
        ("allow_anonymous", s.live.auth.allow_anonymous.to_string()),
        (
            "subscribe_user_channel",
            s.live.auth.subscribe_user_channel.to_string(),
        ),
    ];
    let rules = s.namespaces.default_rules();
    out.push((
        "channel_defaults",
        format!(
            "{{anonymous = {}, allow_publish = {}, presence = {}, join_leave = {}, history_size = {}, history_ttl = {}}}",
            rules.anonymous,
            rules.allow_publish,
            rules.presence,
            rules.join_leave,
            rules.history_size,
            rules.history_ttl.map_or_else(|| "0".to_string(), secs),
        ),
    ));
    out.push(("namespaces", list(s.namespaces.names())));
    match &s.cluster {
        None => out.push(("cluster.nats_url", "none".to_string())),
        Some(c) => out.extend([
            ("cluster.nats_url", redact_url_user_info(&c.nats_url)),
            (
                "cluster.nats_creds_file",
                optional(c.creds_file.as_deref().map(Path::display)),
            ),
            (
                "cluster.nats_user",
                optional(c.user_password.as_ref().map(|(u, _)| u)),
            ),
            ("cluster.nats_password", secret(c.user_password.is_some())),
            ("cluster.nats_token", secret(c.token.is_some())),
            (
                "cluster.nats_tls_ca_file",
                optional(c.tls_ca_file.as_deref().map(Path::display)),
            ),
            ("cluster.stream_name", c.stream_name.clone()),
            ("cluster.stream_replicas", c.stream_replicas.to_string()),
            ("cluster.subject_prefix", c.subject_prefix.clone()),
            (
                "cluster.presence_window_ms",
                c.presence_window.as_millis().to_string(),
            ),
            ("cluster.interest_linger", secs(c.interest_linger)),
            ("cluster.publish_queue", c.publish_queue.to_string()),
        ]),
    }
    out
}

/// The entries on one line: `listen = 0.0.0.0:8080, udp_ingest = 127.0.0.1:9000, ...`.
pub fn effective_settings(settings: &Settings) -> String {
    entries(settings)
        .iter()
        .map(|(key, value)| format!("{key} = {value}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn secs(d: Duration) -> String {
    d.as_secs().to_string()
}

fn secret(set: bool) -> String {
    if set { REDACTED } else { "none" }.to_string()
}

fn optional(value: Option<impl Display>) -> String {
    value.map_or_else(|| "none".to_string(), |v| v.to_string())
}

fn used(value: Option<impl Display>) -> String {
    value.map_or_else(|| UNUSED.to_string(), |v| v.to_string())
}

fn address_or_off(addr: Option<std::net::SocketAddr>) -> String {
    addr.map_or_else(|| "off".to_string(), |a| a.to_string())
}

fn list<T: Display>(items: impl IntoIterator<Item = T>) -> String {
    let items: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    format!("[{}]", items.join(", "))
}

fn cidrs(cidrs: &[Cidr]) -> String {
    list(cidrs)
}

/// Each comma-separated URL with any `user:password@` (or `token@`) replaced, so NATS
/// credentials written into `nats_url` stay out of the log.
fn redact_url_user_info(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let url = url.trim();
            let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                None => url.to_string(),
                Some(at) => {
                    let prefix = if scheme.is_empty() {
                        String::new()
                    } else {
                        format!("{scheme}://")
                    };
                    format!("{prefix}{REDACTED}{}", &rest[at..])
                }
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{resolve, ConfigLayer};
    use clap::{CommandFactory, Parser};

    /// Flags that are not configuration keys.
    const NOT_KEYS: &[&str] = &["config", "help", "version"];

    fn settings(args: &[&str], file: &str) -> Settings {
        let mut argv = vec!["ringcast"];
        argv.extend_from_slice(args);
        let cli = ConfigLayer::try_parse_from(argv).expect("flags parse");
        let file = crate::config::parse_layer(file).expect("file parses");
        resolve(cli, file).expect("settings resolve")
    }

    #[test]
    fn every_key_is_listed_in_the_order_of_config_defaults() {
        let keys: Vec<String> = ConfigLayer::command()
            .get_arguments()
            .filter_map(|a| a.get_long())
            .filter(|long| !NOT_KEYS.contains(long))
            .map(|long| long.replace('-', "_"))
            .collect();
        for s in [
            settings(&[], ""),
            settings(
                &["--inbox", "true", "--jwt-secret", &"s".repeat(32)],
                "[cluster]\nnats_url = \"nats://127.0.0.1:4222\"\n",
            ),
        ] {
            let listed: Vec<&str> = entries(&s).iter().map(|(k, _)| *k).collect();
            let top_level: Vec<&str> = listed
                .iter()
                .copied()
                .filter(|k| {
                    !k.starts_with("cluster.") && !["channel_defaults", "namespaces"].contains(k)
                })
                .collect();
            assert_eq!(top_level, keys);
            assert!(listed.contains(&"channel_defaults") && listed.contains(&"namespaces"));
            assert!(listed.contains(&"cluster.nats_url"));
        }
    }

    #[test]
    fn values_read_as_the_file_writes_them() {
        let s = settings(
            &[
                "--max-connections",
                "4321",
                "--udp-ingest",
                "off",
                "--ingest-allow",
                "10.0.0.0/8,192.168.1.7",
                "--allowed-origins",
                "https://app.example.com,https://*.example.com",
                "--proxy-protocol",
                "v2",
                "--trusted-proxies",
                "10.1.0.0/16",
            ],
            "[namespaces.room]\n[namespaces.news]\nhistory_size = 5\n",
        );
        let line = effective_settings(&s);
        for expected in [
            "listen = 0.0.0.0:8080, udp_ingest = off, tcp_ingest = 127.0.0.1:9001, ",
            ", max_connections = 4321, ",
            ", ingest_allow = [10.0.0.0/8, 192.168.1.7/32], ",
            ", ingest_key = none, ",
            ", allowed_origins = [https://app.example.com, https://*.example.com], ",
            ", proxy_protocol = v2, trusted_proxies = [10.1.0.0/16], ",
            ", ping_interval = 25, ",
            ", inbox = false, data_dir = ringcast-data, inbox_path = unused, ",
            ", jwt_secret = none, jwt_public_key_file = none, jwt_algorithm = unused, ",
            ", namespaces = [news, room], cluster.nats_url = none",
        ] {
            assert!(line.contains(expected), "{expected:?} not in {line}");
        }
        assert!(
            !line.contains("Settings") && !line.contains("Some("),
            "{line}"
        );
    }

    #[test]
    fn secrets_are_redacted() {
        let ingest_key = "ingest-key-0123456789";
        let jwt_secret = "jwt-secret-0123456789-0123456789-abc";
        let s = settings(
            &["--ingest-key", ingest_key, "--jwt-secret", jwt_secret],
            "[cluster]\nnats_url = \"nats://alice:url-pass@n1:4222,nats://url-token@n2:4222\"\n\
             nats_user = \"alice\"\nnats_password = \"nats-pass\"\n",
        );
        let line = effective_settings(&s);
        for secret in [ingest_key, jwt_secret, "url-pass", "url-token", "nats-pass"] {
            assert!(!line.contains(secret), "{secret} leaked: {line}");
        }
        for expected in [
            "ingest_key = <redacted>",
            "jwt_secret = <redacted>",
            "jwt_algorithm = HS256",
            "cluster.nats_url = nats://<redacted>@n1:4222,nats://<redacted>@n2:4222",
            "cluster.nats_user = alice, cluster.nats_password = <redacted>",
        ] {
            assert!(line.contains(expected), "{expected:?} not in {line}");
        }

        let s = settings(
            &[],
            "[cluster]\nnats_url = \"nats://n1:4222\"\nnats_token = \"nats-token\"\n",
        );
        let line = effective_settings(&s);
        assert!(!line.contains("nats-token"), "{line}");
        assert!(line.contains("cluster.nats_token = <redacted>"), "{line}");
    }
}
