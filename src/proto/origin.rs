//! Which browser origins may connect: the `Origin` check of the WebSocket upgrade, `/sse`
//! and `/poll`, and the CORS headers the HTTP endpoints answer with.
//!
//! [`OriginPolicy`] is built once from `allowed_origins` and `allow_missing_origin`. An
//! entry is `"*"` (any origin), an exact origin (`https://app.example.com`, compared
//! without regard to ASCII case, as scheme and host are case-insensitive) or a pattern
//! with one leading wildcard label (`https://*.example.com`, which matches
//! `https://a.example.com` and `https://a.b.example.com`, not `https://example.com`).
//! A request without `Origin` (a non-browser client) is allowed when
//! `allow_missing_origin` is true.

/// One entry of `allowed_origins`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    /// `"*"`.
    Any,
    /// An exact origin, lower-cased.
    Exact(String),
    /// `<scheme>://*<suffix>`: the scheme with `://`, and the suffix from the dot on,
    /// both lower-cased (a port, if any, is part of the suffix).
    Wildcard { scheme: String, suffix: String },
}

/// The origins allowed to use the WebSocket port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPolicy {
    rules: Vec<Rule>,
    allow_missing: bool,
}

impl Default for OriginPolicy {
    /// `allowed_origins = ["*"]`, `allow_missing_origin = true`.
    fn default() -> Self {
        OriginPolicy {
            rules: vec![Rule::Any],
            allow_missing: true,
        }
    }
}

impl OriginPolicy {
    /// Parses the `allowed_origins` entries.
    ///
    /// # Errors
    /// A message naming the entry that is neither `*`, an origin
    /// (`scheme://host[:port]`, no path) nor `scheme://*.domain[:port]`.
    pub fn new(entries: &[String], allow_missing: bool) -> Result<Self, String> {
        let rules = entries
            .iter()
            .map(|e| parse_rule(e))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(OriginPolicy {
            rules,
            allow_missing,
        })
    }

    /// True when a request with this `Origin` header value (`None`: no header) may
    /// connect.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        match origin {
            None => self.allow_missing,
            Some(origin) => self.rules.iter().any(|rule| rule.matches(origin.trim())),
        }
    }

    /// The `allowed_origins` entries as matched (lower-cased).
    pub fn entries(&self) -> Vec<String> {
        self.rules
            .iter()
            .map(|rule| match rule {
                Rule::Any => "*".to_string(),
                Rule::Exact(origin) => origin.clone(),
                Rule::Wildcard { scheme, suffix } => format!("{scheme}*{suffix}"),
            })
            .collect()
    }

    /// `allow_missing_origin`: whether a request without an `Origin` header may connect.
    pub fn allows_missing(&self) -> bool {
        self.allow_missing
    }

    /// True when `allowed_origins` has `"*"`: then no answer may let a page read it with
    /// the visitor's cookies.
    pub fn allows_any(&self) -> bool {
        self.rules.contains(&Rule::Any)
    }

    /// The CORS headers of an answer on `/sse` or `/poll` to an allowed `origin`, each
    /// line ending in CRLF; empty without an origin. `Access-Control-Allow-Credentials`
    /// only for an origin an entry names (exactly or by pattern): echoed for `"*"`, it
    /// would let any site read a logged-in visitor's channels with their cookie.
    pub fn cors_headers(&self, origin: Option<&str>) -> String {
        let Some(origin) = origin.map(str::trim) else {
            return String::new();
        };
        let named = self
            .rules
            .iter()
            .any(|rule| *rule != Rule::Any && rule.matches(origin));
        format!(
            "Access-Control-Allow-Origin: {origin}\r\n{}\
             Access-Control-Expose-Headers: Retry-After\r\nVary: Origin\r\n",
            if named {
                "Access-Control-Allow-Credentials: true\r\n"
            } else {
                ""
            }
        )
    }

    /// The complete `204` answer to a CORS preflight (`OPTIONS /sse`, `OPTIONS /poll`)
    /// from an allowed `origin`.
    pub fn preflight_response(&self, origin: Option<&str>) -> Vec<u8> {
        format!(
            "HTTP/1.1 204 No Content\r\n{}Access-Control-Allow-Methods: GET\r\n\
             Access-Control-Allow-Headers: Authorization, Last-Event-ID\r\n\
             Access-Control-Max-Age: 600\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.cors_headers(origin)
        )
        .into_bytes()
    }

    /// The body of the 403 for a refused request.
    pub fn refusal(origin: Option<&str>) -> String {
        match origin {
            Some(origin) => format!("forbidden: origin {} is not allowed", origin.trim()),
            None => "forbidden: requests without an Origin header are not allowed".to_string(),
        }
    }
}

impl Rule {
    /// True when `origin` (trimmed) is one this entry allows.
    fn matches(&self, origin: &str) -> bool {
        match self {
            Rule::Any => true,
            Rule::Exact(exact) => origin.eq_ignore_ascii_case(exact),
            Rule::Wildcard { scheme, suffix } => {
                let lower = origin.to_ascii_lowercase();
                lower
                    .strip_prefix(scheme.as_str())
                    .and_then(|rest| rest.strip_suffix(suffix.as_str()))
                    .is_some_and(|label| {
                        !label.is_empty()
                            && label
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
                            && !label.starts_with('.')
                            && !label.ends_with('.')
                    })
            }
        }
    }
}

fn parse_rule(entry: &str) -> Result<Rule, String> {
    let bad = |why: &str| {
        format!(
            "{entry:?} {why} (expected \"*\", \"https://app.example.com\" or \"https://*.example.com\")"
        )
    };
    let entry = entry.trim();
    if entry == "*" {
        return Ok(Rule::Any);
    }
    let lower = entry.to_ascii_lowercase();
    let Some((scheme, host)) = lower.split_once("://") else {
        return Err(bad("has no scheme://"));
    };
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+')
    {
        return Err(bad("has an invalid scheme"));
    }
    if host.is_empty() || host.contains('/') || host.contains('?') || host.contains('#') {
        return Err(bad("is not an origin (scheme://host[:port], no path)"));
    }
    match host.strip_prefix('*') {
        None if host.contains('*') => Err(bad("may only have * as its first label")),
        None => Ok(Rule::Exact(lower.clone())),
        Some(suffix) if suffix.starts_with('.') && suffix.len() > 1 && !suffix.contains('*') => {
            Ok(Rule::Wildcard {
                scheme: format!("{scheme}://"),
                suffix: suffix.to_string(),
            })
        }
        Some(_) => Err(bad("may only have * as its first label")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(entries: &[&str], missing: bool) -> OriginPolicy {
        let entries: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
        OriginPolicy::new(&entries, missing).unwrap()
    }

    #[test]
    fn the_default_allows_everyone() {
        let p = OriginPolicy::default();
        assert!(p.allows(None));
        assert!(p.allows(Some("https://evil.example")));
        assert!(p.allows(Some("null")));
    }

    #[test]
    fn exact_origins_match_case_insensitively_and_nothing_else() {
        let p = policy(&["https://app.example.com"], false);
        assert!(p.allows(Some("https://app.example.com")));
        assert!(p.allows(Some("HTTPS://App.Example.com")));
        assert!(!p.allows(Some("http://app.example.com")));
        assert!(!p.allows(Some("https://app.example.com:8443")));
        assert!(!p.allows(Some("https://app.example.com.evil.net")));
        assert!(!p.allows(Some("null")));
        assert!(!p.allows(None));
    }

    #[test]
    fn wildcards_match_subdomains_only() {
        let p = policy(&["https://*.example.com"], true);
        assert!(p.allows(Some("https://a.example.com")));
        assert!(p.allows(Some("https://a.b.example.com")));
        assert!(!p.allows(Some("https://example.com")));
        assert!(!p.allows(Some("https://.example.com")));
        assert!(!p.allows(Some("https://evilexample.com")));
        assert!(!p.allows(Some("http://a.example.com")));
        assert!(!p.allows(Some("https://a.example.com:444")));
        assert!(!p.allows(Some("https://a/b.example.com")));
        assert!(p.allows(None));
        let ported = policy(&["http://*.local.test:3000"], true);
        assert!(ported.allows(Some("http://x.local.test:3000")));
        assert!(!ported.allows(Some("http://x.local.test")));
    }

    #[test]
    fn bad_entries_are_refused_with_the_entry() {
        for bad in [
            "example.com",
            "https://",
            "https://a.example.com/path",
            "https://a.*.com",
            "https://*example.com",
            "https://*.",
            "://x",
        ] {
            let err = OriginPolicy::new(&[bad.to_string()], true).unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn answers_carry_the_cors_headers() {
        let named = policy(&["https://*.example.com"], true);
        let pre =
            String::from_utf8(named.preflight_response(Some("https://a.example.com"))).unwrap();
        assert!(pre.starts_with("HTTP/1.1 204 No Content\r\n"));
        for h in [
            "Access-Control-Allow-Origin: https://a.example.com\r\n",
            "Access-Control-Allow-Credentials: true\r\n",
            "Vary: Origin\r\n",
            "Access-Control-Allow-Methods: GET\r\n",
            "Access-Control-Allow-Headers: Authorization, Last-Event-ID\r\n",
            "Access-Control-Max-Age: 600\r\n",
        ] {
            assert!(pre.contains(h), "{h}");
        }
        assert_eq!(named.cors_headers(None), "");
        assert_eq!(
            OriginPolicy::refusal(Some("https://x.io")),
            "forbidden: origin https://x.io is not allowed"
        );
    }

    /// Regression: with `allowed_origins = ["*"]`, `/sse` and `/poll` echoed any origin
    /// with `Access-Control-Allow-Credentials: true`, so any site could read a logged-in
    /// visitor's `user:` channel through their cookie.
    #[test]
    fn a_wildcard_never_grants_credentials() {
        let any = OriginPolicy::default();
        let headers = any.cors_headers(Some("https://evil.example"));
        assert!(headers.contains("Access-Control-Allow-Origin: https://evil.example\r\n"));
        assert!(!headers.contains("Credentials"), "{headers}");
        let pre = String::from_utf8(any.preflight_response(Some("https://evil.example"))).unwrap();
        assert!(!pre.contains("Credentials"), "{pre}");
        let mixed = policy(&["*", "https://app.example.com"], true);
        assert!(mixed
            .cors_headers(Some("https://app.example.com"))
            .contains("Access-Control-Allow-Credentials: true\r\n"));
        assert!(!mixed
            .cors_headers(Some("https://evil.example"))
            .contains("Credentials"));
    }

    proptest! {
        #[test]
        fn arbitrary_origins_and_entries_never_panic(entry in ".{0,40}", origin in ".{0,40}") {
            if let Ok(p) = OriginPolicy::new(&[entry], false) {
                let _ = p.allows(Some(&origin));
            }
            let _ = policy(&["https://*.example.com", "https://x.y"], false).allows(Some(&origin));
        }
    }
}
