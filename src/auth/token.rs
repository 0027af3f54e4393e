//! JWT verification: a token string and the current Unix time in, verified claims or the
//! reason for refusal out. No clock is read here; the caller says what time it is.
//!
//! The signature and algorithm are checked by the `jsonwebtoken` crate against exactly
//! one configured algorithm (so a token cannot pick its own, e.g. HS256 keyed with an
//! RSA public key). `exp` and `nbf` are checked here, with the configured leeway, against
//! the caller's `now`, so tests and the connection machine agree on what time it is.
//!
//! What a token must carry: `sub` (the user id, 1-256 bytes) and `exp` (a token that never
//! expires could only be revoked by rotating the key). Optional: `nbf`, and the channels
//! claim (default name `channels`): an array of [`Pattern`]s the token may subscribe and
//! publish to. Without the claim the token is not restricted by channel (namespace rules
//! still apply).

use crate::auth::glob::{Pattern, PATTERN_RULE};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::fmt;
use thiserror::Error;

/// Longest token accepted, in bytes (an upgrade's whole head is 8 KiB).
pub const MAX_TOKEN_LEN: usize = 8192;

/// Longest `sub` accepted, in bytes.
pub const MAX_SUB_LEN: usize = 256;

/// Most patterns one channels claim may list.
pub const MAX_PATTERNS: usize = 256;

/// A signing algorithm ringcast verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with a shared secret.
    Hs256,
    /// HMAC-SHA384 with a shared secret.
    Hs384,
    /// HMAC-SHA512 with a shared secret.
    Hs512,
    /// RSASSA-PKCS1-v1_5 with SHA-256, RSA public key in PEM.
    Rs256,
    /// ECDSA P-256 with SHA-256, EC public key in PEM.
    Es256,
    /// Ed25519, public key in PEM.
    EdDsa,
}

impl JwtAlgorithm {
    /// The names accepted in configuration, as in a token's `alg` header.
    pub const NAMES: &'static str = "HS256, HS384, HS512, RS256, ES256, EdDSA";

    /// Parses a configured name (as in the `alg` header, case-insensitive).
    pub fn parse(name: &str) -> Option<JwtAlgorithm> {
        Some(match name.to_ascii_uppercase().as_str() {
            "HS256" => JwtAlgorithm::Hs256,
            "HS384" => JwtAlgorithm::Hs384,
            "HS512" => JwtAlgorithm::Hs512,
            "RS256" => JwtAlgorithm::Rs256,
            "ES256" => JwtAlgorithm::Es256,
            "EDDSA" => JwtAlgorithm::EdDsa,
            _ => return None,
        })
    }

    /// The name as configured and as in a token's `alg` header.
    pub fn name(self) -> &'static str {
        match self {
            JwtAlgorithm::Hs256 => "HS256",
            JwtAlgorithm::Hs384 => "HS384",
            JwtAlgorithm::Hs512 => "HS512",
            JwtAlgorithm::Rs256 => "RS256",
            JwtAlgorithm::Es256 => "ES256",
            JwtAlgorithm::EdDsa => "EdDSA",
        }
    }

    /// True for the HMAC algorithms (keyed with a secret, not a public key).
    pub fn is_hmac(self) -> bool {
        matches!(
            self,
            JwtAlgorithm::Hs256 | JwtAlgorithm::Hs384 | JwtAlgorithm::Hs512
        )
    }

    fn jwt(self) -> Algorithm {
        match self {
            JwtAlgorithm::Hs256 => Algorithm::HS256,
            JwtAlgorithm::Hs384 => Algorithm::HS384,
            JwtAlgorithm::Hs512 => Algorithm::HS512,
            JwtAlgorithm::Rs256 => Algorithm::RS256,
            JwtAlgorithm::Es256 => Algorithm::ES256,
            JwtAlgorithm::EdDsa => Algorithm::EdDSA,
        }
    }
}

/// The key tokens are verified with.
#[derive(Clone)]
pub enum KeyMaterial {
    /// An HMAC secret (the raw bytes of `jwt_secret`).
    Secret(Vec<u8>),
    /// A PEM public key (the contents of `jwt_public_key_file`).
    PublicKeyPem(Vec<u8>),
}

/// Why a token was refused (metric label [`AuthError::label`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No token, and anonymous connections are not allowed.
    #[error("a token is required: send ?token=, an Authorization: Bearer header{cookie}")]
    Missing {
        /// ", or the `NAME` cookie" when a cookie is configured, else empty.
        cookie: String,
    },
    /// Not a JWT: wrong shape, bad base64 or JSON, too long.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The signature does not verify with the configured key (forged, or another key).
    #[error("token signature does not verify with the configured key")]
    BadSignature,
    /// The token's `alg` is not the configured algorithm.
    #[error("token is signed with {got}; this server accepts only {want}")]
    WrongAlgorithm {
        /// The token's `alg`.
        got: String,
        /// The configured algorithm.
        want: String,
    },
    /// `exp` (plus leeway) has passed.
    #[error("token expired at {exp} (Unix seconds; now {now})")]
    Expired {
        /// The token's `exp`.
        exp: u64,
        /// The time it was checked at.
        now: u64,
    },
    /// `nbf` (minus leeway) is still in the future.
    #[error("token not valid before {nbf} (Unix seconds; now {now})")]
    NotYetValid {
        /// The token's `nbf`.
        nbf: u64,
        /// The time it was checked at.
        now: u64,
    },
    /// A required claim is missing or a claim has the wrong shape.
    #[error("token claims: {0}")]
    InvalidClaims(String),
}

impl AuthError {
    /// Every label, indexed by [`AuthError::index`].
    pub const LABELS: [&'static str; 7] = [
        "missing",
        "malformed",
        "bad_signature",
        "wrong_algorithm",
        "expired",
        "not_yet_valid",
        "invalid_claims",
    ];

    /// Index of this error's label in [`AuthError::LABELS`].
    pub fn index(&self) -> usize {
        match self {
            AuthError::Missing { .. } => 0,
            AuthError::Malformed(_) => 1,
            AuthError::BadSignature => 2,
            AuthError::WrongAlgorithm { .. } => 3,
            AuthError::Expired { .. } => 4,
            AuthError::NotYetValid { .. } => 5,
            AuthError::InvalidClaims(_) => 6,
        }
    }

    /// Metric label.
    pub fn label(&self) -> &'static str {
        Self::LABELS[self.index()]
    }
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `sub`: the user id.
    pub sub: String,
    /// `exp`, in Unix seconds.
    pub exp: u64,
    /// The channels claim; `None` when absent (no per-channel restriction).
    pub channels: Option<Vec<Pattern>>,
}

/// Verifies tokens with one key and one algorithm.
pub struct Verifier {
    algorithm: JwtAlgorithm,
    key: DecodingKey,
    validation: Validation,
    leeway: u64,
    channels_claim: Box<str>,
}

impl fmt::Debug for Verifier {
    // Never prints the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithm", &self.algorithm)
            .field("leeway", &self.leeway)
            .field("channels_claim", &self.channels_claim)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier for `algorithm` with `key`, allowing `leeway` seconds of clock skew on
    /// `exp`/`nbf` and reading channel grants from the claim named `channels_claim`.
    ///
    /// # Errors
    /// A sentence saying why the key does not fit the algorithm.
    pub fn new(
        algorithm: JwtAlgorithm,
        key: &KeyMaterial,
        leeway: u64,
        channels_claim: &str,
    ) -> Result<Verifier, String> {
        let key = match (algorithm.is_hmac(), key) {
            (true, KeyMaterial::Secret(s)) if s.is_empty() => {
                return Err("the secret is empty".into())
            }
            (true, KeyMaterial::Secret(s)) => DecodingKey::from_secret(s),
            (true, KeyMaterial::PublicKeyPem(_)) => {
                return Err(format!(
                    "{algorithm:?} needs a secret (jwt_secret), not a public key file"
                ))
            }
            (false, KeyMaterial::Secret(_)) => {
                return Err(format!(
                    "{algorithm:?} needs a PEM public key (jwt_public_key_file), not a secret"
                ))
            }
            (false, KeyMaterial::PublicKeyPem(pem)) => {
                let parsed = match algorithm {
                    JwtAlgorithm::Rs256 => DecodingKey::from_rsa_pem(pem),
                    JwtAlgorithm::Es256 => DecodingKey::from_ec_pem(pem),
                    _ => DecodingKey::from_ed_pem(pem),
                };
                parsed.map_err(|e| format!("not a PEM public key for {algorithm:?}: {e}"))?
            }
        };
        let mut validation = Validation::new(algorithm.jwt());
        // Time claims are checked in `verify` against the caller's clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims = HashSet::new();
        Ok(Verifier {
            algorithm,
            key,
            validation,
            leeway,
            channels_claim: channels_claim.into(),
        })
    }

    /// The clock skew allowed on `exp` and `nbf`, in seconds.
    pub fn leeway(&self) -> u64 {
        self.leeway
    }

    /// The one algorithm tokens must be signed with.
    pub fn algorithm(&self) -> JwtAlgorithm {
        self.algorithm
    }

    /// The claim listing a token's channel patterns.
    pub fn channels_claim(&self) -> &str {
        &self.channels_claim
    }

    /// Verifies `token` at Unix time `now`.
    ///
    /// # Errors
    /// The [`AuthError`] saying why the token is refused.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed(format!(
                "longer than {MAX_TOKEN_LEN} bytes"
            )));
        }
        let header = jsonwebtoken::decode_header(token).map_err(map_error)?;
        if header.alg != self.algorithm.jwt() {
            return Err(AuthError::WrongAlgorithm {
                got: format!("{:?}", header.alg),
                want: format!("{:?}", self.algorithm.jwt()),
            });
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(map_error)?;
        let claims = data.claims;
        let sub = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_SUB_LEN => s.clone(),
            _ => {
                return Err(AuthError::InvalidClaims(format!(
                    "sub must be a string of 1-{MAX_SUB_LEN} bytes (the user id)"
                )))
            }
        };
        let exp = match claims.get("exp") {
            Some(v) => numeric_date("exp", v)?,
            None => {
                return Err(AuthError::InvalidClaims(
                    "exp is missing: only tokens that expire are accepted".into(),
                ))
            }
        };
        if now >= exp.saturating_add(self.leeway) {
            return Err(AuthError::Expired { exp, now });
        }
        if let Some(v) = claims.get("nbf") {
            let nbf = numeric_date("nbf", v)?;
            if nbf > now.saturating_add(self.leeway) {
                return Err(AuthError::NotYetValid { nbf, now });
            }
        }
        let channels = match claims.get(&*self.channels_claim) {
            None | Some(Value::Null) => None,
            Some(v) => Some(self.patterns(v)?),
        };
        Ok(Claims { sub, exp, channels })
    }

    fn patterns(&self, value: &Value) -> Result<Vec<Pattern>, AuthError> {
        let claim = &self.channels_claim;
        let Value::Array(items) = value else {
            return Err(AuthError::InvalidClaims(format!(
                "{claim} must be an array of channel patterns"
            )));
        };
        if items.len() > MAX_PATTERNS {
            return Err(AuthError::InvalidClaims(format!(
                "{claim} lists more than {MAX_PATTERNS} patterns"
            )));
        }
        items
            .iter()
            .map(|item| {
                item.as_str().and_then(Pattern::parse).ok_or_else(|| {
                    AuthError::InvalidClaims(format!(
                        "{claim}: {item} is not a channel pattern ({PATTERN_RULE})"
                    ))
                })
            })
            .collect()
    }
}

/// A NumericDate claim as whole Unix seconds (fractions are allowed and dropped).
fn numeric_date(name: &str, v: &Value) -> Result<u64, AuthError> {
    match v.as_u64() {
        Some(n) => Ok(n),
        None => match v.as_f64() {
            Some(f) if (0.0..1e18).contains(&f) => Ok(f as u64),
            _ => Err(AuthError::InvalidClaims(format!(
                "{name} must be a non-negative number of seconds"
            ))),
        },
    }
}

fn map_error(e: jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::InvalidToken => AuthError::Malformed("not three base64url parts".into()),
        ErrorKind::Base64(err) => AuthError::Malformed(format!("bad base64url: {err}")),
        ErrorKind::Json(err) => AuthError::Malformed(format!("bad JSON: {err}")),
        ErrorKind::Utf8(_) => AuthError::Malformed("not UTF-8".into()),
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            AuthError::Malformed("unknown or unusable alg".into())
        }
        other => AuthError::Malformed(format!("{other:?}")),
    }
}

#[cfg(test)]
#[path = "token_tests.rs"]
mod tests;
