use super::*;
use jsonwebtoken::{encode, EncodingKey, Header};
use proptest::prelude::*;
use serde_json::json;

const NOW: u64 = 1_700_000_000;
const SECRET: &[u8] = b"correct horse battery staple";

const RSA_KEY: &str = include_str!("testdata/rsa.key.pem");
const RSA_PUB: &str = include_str!("testdata/rsa.pub.pem");
const EC_KEY: &str = include_str!("testdata/p256.key.pem");
const EC_PUB: &str = include_str!("testdata/p256.pub.pem");
const ED_KEY: &str = include_str!("testdata/ed25519.key.pem");
const ED_PUB: &str = include_str!("testdata/ed25519.pub.pem");
const ED_OTHER_PUB: &str = include_str!("testdata/ed25519-other.pub.pem");

fn hs(alg: JwtAlgorithm) -> Verifier {
    Verifier::new(alg, &KeyMaterial::Secret(SECRET.to_vec()), 5, "channels").unwrap()
}

fn pem(alg: JwtAlgorithm, public: &str) -> Verifier {
    Verifier::new(
        alg,
        &KeyMaterial::PublicKeyPem(public.as_bytes().to_vec()),
        5,
        "channels",
    )
    .unwrap()
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    encode(&Header::new(alg), claims, key).unwrap()
}

fn hs256(claims: &Value) -> String {
    sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET), claims)
}

fn alice() -> Value {
    json!({"sub": "alice", "exp": NOW + 60})
}

#[test]
fn valid_tokens_of_every_algorithm_verify() {
    let claims = alice();
    for (alg, jwt) in [
        (JwtAlgorithm::Hs256, Algorithm::HS256),
        (JwtAlgorithm::Hs384, Algorithm::HS384),
        (JwtAlgorithm::Hs512, Algorithm::HS512),
    ] {
        let token = sign(jwt, &EncodingKey::from_secret(SECRET), &claims);
        let got = hs(alg).verify(&token, NOW).unwrap();
        assert_eq!((got.sub.as_str(), got.exp), ("alice", NOW + 60), "{alg:?}");
        assert_eq!(got.channels, None);
    }
    let cases = [
        (
            JwtAlgorithm::Rs256,
            Algorithm::RS256,
            EncodingKey::from_rsa_pem(RSA_KEY.as_bytes()).unwrap(),
            RSA_PUB,
        ),
        (
            JwtAlgorithm::Es256,
            Algorithm::ES256,
            EncodingKey::from_ec_pem(EC_KEY.as_bytes()).unwrap(),
            EC_PUB,
        ),
        (
            JwtAlgorithm::EdDsa,
            Algorithm::EdDSA,
            EncodingKey::from_ed_pem(ED_KEY.as_bytes()).unwrap(),
            ED_PUB,
        ),
    ];
    for (alg, jwt, key, public) in cases {
        let token = sign(jwt, &key, &claims);
        assert_eq!(pem(alg, public).verify(&token, NOW).unwrap().sub, "alice");
    }
}

#[test]
fn time_claims_use_the_callers_clock_and_the_leeway() {
    let v = hs(JwtAlgorithm::Hs256);
    let token = hs256(&json!({"sub": "a", "exp": NOW}));
    // Leeway 5 s: valid until exp + 5.
    assert!(v.verify(&token, NOW + 4).is_ok());
    assert_eq!(
        v.verify(&token, NOW + 5),
        Err(AuthError::Expired {
            exp: NOW,
            now: NOW + 5
        })
    );
    let early = hs256(&json!({"sub": "a", "exp": NOW + 600, "nbf": NOW + 60}));
    assert!(matches!(
        v.verify(&early, NOW),
        Err(AuthError::NotYetValid { .. })
    ));
    assert!(v.verify(&early, NOW + 55).is_ok());
    let fractional = hs256(&json!({"sub": "a", "exp": (NOW + 60) as f64 + 0.5}));
    assert_eq!(v.verify(&fractional, NOW).unwrap().exp, NOW + 60);
}

#[test]
fn forged_and_foreign_tokens_are_refused() {
    let v = hs(JwtAlgorithm::Hs256);
    let token = hs256(&alice());
    // Forged: the payload changed after signing.
    let mut parts: Vec<&str> = token.split('.').collect();
    let bob = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"sub": "bob", "exp": NOW + 60}).to_string());
    parts[1] = &bob;
    assert_eq!(
        v.verify(&parts.join("."), NOW),
        Err(AuthError::BadSignature)
    );
    // Another secret.
    let other = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(b"another secret"),
        &alice(),
    );
    assert_eq!(v.verify(&other, NOW), Err(AuthError::BadSignature));
    // Another Ed25519 key pair.
    let ed = sign(
        Algorithm::EdDSA,
        &EncodingKey::from_ed_pem(ED_KEY.as_bytes()).unwrap(),
        &alice(),
    );
    assert_eq!(
        pem(JwtAlgorithm::EdDsa, ED_OTHER_PUB).verify(&ed, NOW),
        Err(AuthError::BadSignature)
    );
    // Right key, other algorithm: HS384 to an HS256 server, HS256 keyed with the RSA
    // public key to an RS256 server (the classic confusion).
    let hs384 = sign(
        Algorithm::HS384,
        &EncodingKey::from_secret(SECRET),
        &alice(),
    );
    assert!(matches!(
        v.verify(&hs384, NOW),
        Err(AuthError::WrongAlgorithm { .. })
    ));
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(RSA_PUB.as_bytes()),
        &alice(),
    );
    assert!(matches!(
        pem(JwtAlgorithm::Rs256, RSA_PUB).verify(&confused, NOW),
        Err(AuthError::WrongAlgorithm { .. })
    ));
    // alg "none".
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#);
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(alice().to_string());
    let err = v.verify(&format!("{header}.{payload}."), NOW).unwrap_err();
    assert_eq!(err.label(), "malformed", "{err}");
}

#[test]
fn claims_must_have_the_right_shape() {
    let v = hs(JwtAlgorithm::Hs256);
    for claims in [
        json!({"exp": NOW + 60}),
        json!({"sub": "", "exp": NOW + 60}),
        json!({"sub": 7, "exp": NOW + 60}),
        json!({"sub": "a"}),
        json!({"sub": "a", "exp": "tomorrow"}),
        json!({"sub": "a", "exp": NOW + 60, "channels": "news"}),
        json!({"sub": "a", "exp": NOW + 60, "channels": ["bad name"]}),
        json!({"sub": "x".repeat(MAX_SUB_LEN + 1), "exp": NOW + 60}),
    ] {
        let err = v.verify(&hs256(&claims), NOW).unwrap_err();
        assert_eq!(err.label(), "invalid_claims", "{claims}: {err}");
    }
    for garbage in ["", "abc", "a.b.c", "..", &"x".repeat(MAX_TOKEN_LEN + 1)] {
        assert_eq!(v.verify(garbage, NOW).unwrap_err().label(), "malformed");
    }
}

#[test]
fn the_channels_claim_name_is_configurable() {
    let v = Verifier::new(
        JwtAlgorithm::Hs256,
        &KeyMaterial::Secret(SECRET.to_vec()),
        0,
        "rc_channels",
    )
    .unwrap();
    let token = hs256(&json!({"sub": "a", "exp": NOW + 9, "rc_channels": ["news:*", "room:1"]}));
    let got = v.verify(&token, NOW).unwrap().channels.unwrap();
    let names: Vec<&str> = got.iter().map(Pattern::as_str).collect();
    assert_eq!(names, ["news:*", "room:1"]);
    // The default name is then an ordinary, ignored claim.
    let other = hs256(&json!({"sub": "a", "exp": NOW + 9, "channels": 5}));
    assert_eq!(v.verify(&other, NOW).unwrap().channels, None);
}

#[test]
fn keys_must_fit_the_algorithm() {
    let secret = KeyMaterial::Secret(SECRET.to_vec());
    let public = KeyMaterial::PublicKeyPem(RSA_PUB.as_bytes().to_vec());
    assert!(Verifier::new(JwtAlgorithm::Rs256, &secret, 0, "c").is_err());
    assert!(Verifier::new(JwtAlgorithm::Hs256, &public, 0, "c").is_err());
    assert!(Verifier::new(JwtAlgorithm::Hs256, &KeyMaterial::Secret(vec![]), 0, "c").is_err());
    let garbage = KeyMaterial::PublicKeyPem(b"-----BEGIN PUBLIC KEY-----\nno\n".to_vec());
    for alg in [
        JwtAlgorithm::Rs256,
        JwtAlgorithm::Es256,
        JwtAlgorithm::EdDsa,
    ] {
        assert!(Verifier::new(alg, &garbage, 0, "c").is_err(), "{alg:?}");
    }
    assert_eq!(JwtAlgorithm::parse("eddsa"), Some(JwtAlgorithm::EdDsa));
    assert_eq!(JwtAlgorithm::parse("none"), None);
}

use base64::Engine as _;

proptest! {
    #[test]
    fn arbitrary_token_strings_never_panic(token in "\\PC{0,300}") {
        let _ = hs(JwtAlgorithm::Hs256).verify(&token, NOW);
        let _ = pem(JwtAlgorithm::Rs256, RSA_PUB).verify(&token, NOW);
        let _ = pem(JwtAlgorithm::EdDsa, ED_PUB).verify(&token, NOW);
    }

    #[test]
    fn arbitrary_three_part_tokens_never_panic(
        header in "[A-Za-z0-9_-]{0,60}",
        payload in "[A-Za-z0-9_-]{0,120}",
        sig in "[A-Za-z0-9_-]{0,90}",
    ) {
        let token = format!("{header}.{payload}.{sig}");
        let _ = hs(JwtAlgorithm::Hs256).verify(&token, NOW);
        let _ = pem(JwtAlgorithm::Es256, EC_PUB).verify(&token, NOW);
    }

    #[test]
    fn arbitrary_signed_claims_never_panic(claims in "\\PC{0,200}", now in any::<u64>()) {
        // Signed with the right key, so the claims parser is what gets exercised.
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&claims);
        let signing_input = format!("{header}.{payload}");
        let sig = jsonwebtoken::crypto::sign(signing_input.as_bytes(), &EncodingKey::from_secret(SECRET), Algorithm::HS256).unwrap();
        let _ = hs(JwtAlgorithm::Hs256).verify(&format!("{signing_input}.{sig}"), now);
    }
}
