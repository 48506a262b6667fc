//! Unit tests of the parent module.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use jsonwebtoken::{EncodingKey, Header, encode};
use proptest::prelude::*;
use ring::signature::KeyPair as _;
use serde_json::json;

/// Fixed 2048-bit RSA test key pair (generated with openssl for these tests only).
const RSA_PRIVATE_PEM: &str = r"-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCimTsFDG1OBEUl
pLV3O7FvC2CQtUdYTk01zS7KFICMYMS39KRm27wjyzzLtnsI1loRyQ2YOZ7TUccM
BgMukRRQrTE7y5janBtQ6d9uiIRyv//0sokbI+a2rdRpuOnP8nrqnLvCZD7q5Au/
y0NOa3TWrRuJMYWckeh1Dz38NOjfsTA1VpKKdzx/biZAoTNjyWZ1720RJXpHio0Q
8h3NKD+sn34SvliKMFrL3AIaIw3kJ09oyDSSgPblMZ1NJUgYGkXmExXk4c3pgMbd
lAFohChtrRFKFiJVuB7h6YtVhF/67pjq1Unnt3+RWD+YiL3jqaZpY+/N9hqDh/q5
XcckRSUnAgMBAAECggEAOZfYAW5I6zj0+yPvyPeCXkhj4G3tgvhdPeDbIWYIsHB4
TYZgkzRi3DTZaHjO9K7kQWd7Ir/KI6TUQcyBZQWrcfYeucTgdBKWVF86ro65h2G9
ukFg8hWR24QP+JCwdOE5K4/vq6fRZ2b2SG2pfgXu4Tl4xuwdHPvLoGcROBvPnqe1
VfPVrGYB9TaGiiKd6oQOkaxtUI2FGGrwPUup5DVVfrVRfZ9XGMRPnR8s8GJAMuda
njlgh8xLyLvjmaFpwzKB+OelfI1z6Ifr1oV244OezebdHWA0z24LgH+OTMg84R6V
ipP1m7eEREWbWRmZSFHSyFYM+wzW5vlMpb0uU6ozmQKBgQDlnUyaQsOHtPK81aNO
EaARfa2c0e//oImkRfMwaUIBEXJh93j+OIUi5ovnOKC6E4GIfoEp1YNdUPY26XrK
RzvAv3AdrrqISShw1dzXRAJLrB/TiDW585Lb88Ram8Ge5oPM1oLAQAkOZNq1QB0j
Q9ffAwLooWf1q1B4k4VqyGxEOQKBgQC1SHxx/ojGicZsAfyACxG/WXVgFKdGrYJ+
LpueFVPUBPncNH50Jq1K/djf2NVbVwj1Kn5170OT3bzZZprVMg/le2cLVP56xrrp
b/ociitdnmdG5Z7a2QH0slm4H96D/cm5mZ5ewmgT48RnysxqSJ6O1GcAciC2hDEY
H6Nkap50XwKBgQDVTiWlgLRIU47UYdsNYU5EMW6hKl48KRT06I6cwIuyllSeMdnS
wQrdezMon/CgLBK/jFXNWS5p+BZiuM97LmWSD8XFrVZX2S6ac/JugB1p0wLV7cmL
b31Um8YjLmLWjOqP1g8tLc+78XFDw8XNxu65nACNv7PmAzoEaXcd1gbN8QKBgQCY
p2B70b41iYE4JHgPDsM0Ic3QSbQOtT+EqBTNCuKbUFFjGCVAA+27j4VYAkyv7NuT
L+RrxT5fvsIvQ9KwIsb2FHNSPJFKrBxrRKsV61fXLvOC5Qte+IxIFQOuI9AJz+VV
0EFnREfGL++NA14dReeXGM9ftbtMVobM7J93iLzD+wKBgFTuSMut1JxUfW8BKbD/
LixyVodjQIogKaJMI0DSSmVloezw9qCpf4Eggaa9L/8dcZ+I7KRmpJQsCZvgt/NV
VqEpXaUZuzX69lTUpB/h9nGMg4vbKB/F9QfmEtLNycBxm2I1CwP2HJemM9JpAPrp
BlggDmEKxjFHwNjIV1s5UMHR
-----END PRIVATE KEY-----
";
const RSA_PUBLIC_PEM: &str = r"-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAopk7BQxtTgRFJaS1dzux
bwtgkLVHWE5NNc0uyhSAjGDEt/SkZtu8I8s8y7Z7CNZaEckNmDme01HHDAYDLpEU
UK0xO8uY2pwbUOnfboiEcr//9LKJGyPmtq3Uabjpz/J66py7wmQ+6uQLv8tDTmt0
1q0biTGFnJHodQ89/DTo37EwNVaSinc8f24mQKEzY8lmde9tESV6R4qNEPIdzSg/
rJ9+Er5YijBay9wCGiMN5CdPaMg0koD25TGdTSVIGBpF5hMV5OHN6YDG3ZQBaIQo
ba0RShYiVbge4emLVYRf+u6Y6tVJ57d/kVg/mIi946mmaWPvzfYag4f6uV3HJEUl
JwIDAQAB
-----END PUBLIC KEY-----
";
/// Fixed Ed25519 test key pair in OpenSSL's PEM formats.
const ED_PRIVATE_PEM: &str = r"-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEICl/n6To2Ym7X/M/7XDCOP6iNy+MkyOPELdbZjVffOeq
-----END PRIVATE KEY-----
";
const ED_PUBLIC_PEM: &str = r"-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEApDsEZQ6LOeWJGJahPFJHM1c2Urp0PiQeYlE+0t/Foko=
-----END PUBLIC KEY-----
";

const NOW: u64 = 1_700_000_000;

fn viewer_claims() -> Value {
    json!({"sub": "viewer-1", "broadcast": "b-1", "exp": NOW + 600, "iat": NOW})
}

fn ed_key() -> (EncodingKey, CredentialKey) {
    let pkcs8 =
        ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    (
        EncodingKey::from_ed_der(pkcs8.as_ref()),
        CredentialKey::ed25519_raw(kp.public_key().as_ref()).unwrap(),
    )
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    encode(&Header::new(alg), claims, key).unwrap()
}

fn viewer_verifier(key: CredentialKey) -> CredentialVerifier {
    let mut v = CredentialVerifier::new(30);
    v.add_viewer_key(key).unwrap();
    v
}

#[test]
fn eddsa_pem_viewer_accepted() {
    let enc = EncodingKey::from_ed_pem(ED_PRIVATE_PEM.as_bytes()).unwrap();
    let v = viewer_verifier(CredentialKey::ed25519_pem(ED_PUBLIC_PEM.as_bytes()).unwrap());
    let jwt = sign(Algorithm::EdDSA, &enc, &viewer_claims());
    let c = v.verify_viewer(&jwt, "b-1", NOW).unwrap();
    assert_eq!(c.subject, "viewer-1");
    assert_eq!(c.broadcast, BroadcastGrant::One("b-1".into()));
    assert_eq!(c.expires_at, NOW + 600);
    assert_eq!(c.issued_at, Some(NOW));
    assert_eq!(c.algorithm, Algorithm::EdDSA);
}

#[test]
fn rs256_pem_viewer_accepted() {
    let enc = EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).unwrap();
    let v = viewer_verifier(
        CredentialKey::rsa_pem(Algorithm::RS256, RSA_PUBLIC_PEM.as_bytes()).unwrap(),
    );
    let jwt = sign(Algorithm::RS256, &enc, &viewer_claims());
    assert_eq!(
        v.verify_viewer(&jwt, "b-1", NOW).unwrap().subject,
        "viewer-1"
    );
    // PS256 with the same key pair.
    let v = viewer_verifier(
        CredentialKey::rsa_pem(Algorithm::PS256, RSA_PUBLIC_PEM.as_bytes()).unwrap(),
    );
    let jwt = sign(Algorithm::PS256, &enc, &viewer_claims());
    assert!(v.verify_viewer(&jwt, "b-1", NOW).is_ok());
}

#[test]
fn wildcard_broadcast_and_float_dates_accepted() {
    let (enc, key) = ed_key();
    let v = viewer_verifier(key);
    let jwt = sign(
        Algorithm::EdDSA,
        &enc,
        &json!({"sub": "s", "broadcast": "*", "exp": (NOW + 10) as f64 + 0.5, "nbf": NOW - 5}),
    );
    let c = v.verify_viewer(&jwt, "anything", NOW).unwrap();
    assert_eq!(c.broadcast, BroadcastGrant::Any);
    assert_eq!(c.expires_at, NOW + 10);
    assert_eq!(c.not_before, Some(NOW - 5));
}

#[test]
fn expired_rejected_with_leeway() {
    let (enc, key) = ed_key();
    let v = viewer_verifier(key);
    let jwt = sign(
        Algorithm::EdDSA,
        &enc,
        &json!({"sub": "s", "broadcast": "b-1", "exp": NOW}),
    );
    assert!(v.verify_viewer(&jwt, "b-1", NOW + 29).is_ok());
    let e = v.verify_viewer(&jwt, "b-1", NOW + 30).unwrap_err();
    assert_eq!(
        e,
        CredentialError::Expired {
            exp: NOW,
            now: NOW + 30,
            leeway: 30
        }
    );
    assert_eq!(e.status(), AuthStatus::Unauthenticated);
}

#[test]
fn not_yet_valid_rejected() {
    let (enc, key) = ed_key();
    let v = viewer_verifier(key);
    let jwt = sign(
        Algorithm::EdDSA,
        &enc,
        &json!({"sub": "s", "broadcast": "b-1", "exp": NOW + 600, "nbf": NOW + 100}),
    );
    assert!(matches!(
        v.verify_viewer(&jwt, "b-1", NOW),
        Err(CredentialError::NotYetValid { not_before, .. }) if not_before == NOW + 100
    ));
    assert!(v.verify_viewer(&jwt, "b-1", NOW + 70).is_ok());
    // An iat far in the future is refused the same way.
    let jwt = sign(
        Algorithm::EdDSA,
        &enc,
        &json!({"sub": "s", "broadcast": "b-1", "exp": NOW + 600, "iat": NOW + 500}),
    );
    assert!(matches!(
        v.verify_viewer(&jwt, "b-1", NOW),
        Err(CredentialError::NotYetValid { .. })
    ));
}

#[test]
fn wrong_broadcast_rejected() {
    let (enc, key) = ed_key();
    let v = viewer_verifier(key);
    let jwt = sign(Algorithm::EdDSA, &enc, &viewer_claims());
    let e = v.verify_viewer(&jwt, "b-2", NOW).unwrap_err();
    assert_eq!(e, CredentialError::WrongBroadcast);
    assert_eq!(e.status(), AuthStatus::PermissionDenied);
}

#[test]
fn bad_signature_rejected() {
    // Signed by another Ed25519 key.
    let (enc, _) = ed_key();
    let (_, key) = ed_key();
    let v = viewer_verifier(key);
    let jwt = sign(Algorithm::EdDSA, &enc, &viewer_claims());
    assert_eq!(
        v.verify_viewer(&jwt, "b-1", NOW),
        Err(CredentialError::BadSignature)
    );
    // RS256 token whose payload was edited after signing (broadcast → "*").
    let enc = EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).unwrap();
    let v = viewer_verifier(
        CredentialKey::rsa_pem(Algorithm::RS256, RSA_PUBLIC_PEM.as_bytes()).unwrap(),
    );
    let jwt = sign(Algorithm::RS256, &enc, &viewer_claims());
    let mut parts: Vec<String> = jwt.split('.').map(str::to_owned).collect();
    let mut c = viewer_claims();
    c["broadcast"] = json!("*");
    parts[1] = URL_SAFE_NO_PAD.encode(c.to_string());
    let forged = parts.join(".");
    let e = v.verify_viewer(&forged, "b-9", NOW).unwrap_err();
    assert_eq!(e, CredentialError::BadSignature);
    assert!(!e.to_string().contains(&jwt[..20]));
}

#[test]
fn unsupported_algorithm_rejected() {
    let (enc, key) = ed_key();
    let v = viewer_verifier(key);
    // alg "none" with an empty signature.
    let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let p = URL_SAFE_NO_PAD.encode(viewer_claims().to_string());
    let e = v
        .verify_viewer(&format!("{h}.{p}."), "b-1", NOW)
        .unwrap_err();
    assert_eq!(
        e,
        CredentialError::UnsupportedAlgorithm {
            alg: "none".into(),
            accepted: "EdDSA".into()
        }
    );
    // HS256 signed with the (public) key bytes: algorithm confusion attempt.
    let hs = EncodingKey::from_secret(ED_PUBLIC_PEM.as_bytes());
    let jwt = sign(Algorithm::HS256, &hs, &viewer_claims());
    assert!(matches!(
        v.verify_viewer(&jwt, "b-1", NOW),
        Err(CredentialError::UnsupportedAlgorithm { .. })
    ));
    // RS256 when only EdDSA is configured.
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).unwrap();
    let jwt = sign(Algorithm::RS256, &rsa, &viewer_claims());
    let e = v.verify_viewer(&jwt, "b-1", NOW).unwrap_err();
    assert!(e.to_string().contains("RS256") && e.to_string().contains("EdDSA"));
    let _ = enc;
}

#[test]
fn malformed_rejected() {
    let (enc, key) = ed_key();
    let v = viewer_verifier(key);
    for bad in [
        "abc",
        "a.b",
        "a.b.c.d",
        "!!!.e30.x",
        "e30.e30.x",
        "bm90anNvbg.e30.x",
    ] {
        assert!(
            matches!(
                v.verify_viewer(bad, "b-1", NOW),
                Err(CredentialError::Malformed(_))
            ),
            "{bad}"
        );
    }
    assert_eq!(
        v.verify_viewer("", "b-1", NOW),
        Err(CredentialError::Missing)
    );
    assert_eq!(
        v.verify_viewer(&"a".repeat(MAX_JWT_LEN + 1), "b-1", NOW),
        Err(CredentialError::TooLarge)
    );
    // Authentic but with a non-object payload.
    let jwt = sign(Algorithm::EdDSA, &enc, &json!([1, 2]));
    assert!(matches!(
        v.verify_viewer(&jwt, "b-1", NOW),
        Err(CredentialError::Malformed(_))
    ));
}

#[test]
fn missing_and_invalid_claims_rejected() {
    let (enc, key) = ed_key();
    let v = viewer_verifier(key);
    let cases = [
        (
            json!({"broadcast": "b-1", "exp": NOW + 60}),
            CredentialError::MissingClaim("sub"),
        ),
        (
            json!({"sub": "s", "exp": NOW + 60}),
            CredentialError::MissingClaim("broadcast"),
        ),
        (
            json!({"sub": "s", "broadcast": "b-1"}),
            CredentialError::MissingClaim("exp"),
        ),
    ];
    for (claims, want) in cases {
        let jwt = sign(Algorithm::EdDSA, &enc, &claims);
        assert_eq!(v.verify_viewer(&jwt, "b-1", NOW), Err(want));
    }
    for claims in [
        json!({"sub": "s", "broadcast": "b-1", "exp": "tomorrow"}),
        json!({"sub": "s", "broadcast": "b-1", "exp": -1}),
        json!({"sub": 5, "broadcast": "b-1", "exp": NOW + 60}),
        json!({"sub": "s", "broadcast": ["b-1"], "exp": NOW + 60}),
        json!({"sub": "s", "broadcast": "", "exp": NOW + 60}),
    ] {
        let jwt = sign(Algorithm::EdDSA, &enc, &claims);
        assert!(
            matches!(
                v.verify_viewer(&jwt, "b-1", NOW),
                Err(CredentialError::InvalidClaim { .. })
            ),
            "{claims}"
        );
    }
}

#[test]
fn kid_selects_key_and_rotation_works() {
    let (enc_a, key_a) = ed_key();
    let (enc_b, key_b) = ed_key();
    let mut v = CredentialVerifier::new(0);
    v.add_viewer_key(key_a.with_kid("a")).unwrap();
    v.add_viewer_key(key_b.with_kid("b")).unwrap();
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some("b".into());
    let jwt_b = encode(&h, &viewer_claims(), &enc_b).unwrap();
    assert!(v.verify_viewer(&jwt_b, "b-1", NOW).is_ok());
    // No kid: every key of the algorithm is tried.
    let jwt_a = sign(Algorithm::EdDSA, &enc_a, &viewer_claims());
    assert!(v.verify_viewer(&jwt_a, "b-1", NOW).is_ok());
    h.kid = Some("zzz".into());
    let jwt = encode(&h, &viewer_claims(), &enc_a).unwrap();
    assert_eq!(
        v.verify_viewer(&jwt, "b-1", NOW),
        Err(CredentialError::UnknownKey)
    );
    assert_eq!(v.remove_kid("b"), 1);
    assert_eq!(
        v.verify_viewer(&jwt_b, "b-1", NOW),
        Err(CredentialError::UnknownKey)
    );
    // Without its kid, key b's token is tried against key a and fails.
    let jwt_b_nokid = sign(Algorithm::EdDSA, &enc_b, &viewer_claims());
    assert_eq!(
        v.verify_viewer(&jwt_b_nokid, "b-1", NOW),
        Err(CredentialError::BadSignature)
    );
}

#[test]
fn admin_requires_role_and_admin_key() {
    let (enc, key) = ed_key();
    let mut v = CredentialVerifier::new(0);
    v.add_viewer_key(key.clone()).unwrap();
    let admin = json!({"sub": "ops", "role": "admin", "exp": NOW + 60});
    let jwt = sign(Algorithm::EdDSA, &enc, &admin);
    // Not configured as an admin key yet.
    assert_eq!(
        v.verify_admin(&jwt, NOW),
        Err(CredentialError::NoKeyConfigured)
    );
    v.add_admin_key(key).unwrap();
    assert_eq!(v.verify_admin(&jwt, NOW).unwrap().subject, "ops");
    // A viewer token from the same key is not an admin token.
    let viewer = sign(Algorithm::EdDSA, &enc, &viewer_claims());
    let e = v.verify_admin(&viewer, NOW).unwrap_err();
    assert_eq!(e, CredentialError::NotAdmin);
    assert_eq!(e.status(), AuthStatus::PermissionDenied);
    let jwt = sign(
        Algorithm::EdDSA,
        &enc,
        &json!({"sub": "ops", "role": "Admin", "exp": NOW + 60}),
    );
    assert_eq!(v.verify_admin(&jwt, NOW), Err(CredentialError::NotAdmin));
    // Expired admin token.
    assert!(matches!(
        v.verify_admin(&sign(Algorithm::EdDSA, &enc, &admin), NOW + 60),
        Err(CredentialError::Expired { .. })
    ));
}

#[test]
fn static_hmac_admin_key() {
    let secret = b"0123456789abcdef0123456789abcdef-dev-only";
    let mut v = CredentialVerifier::new(0);
    assert_eq!(
        CredentialKey::static_hmac_secret(b"short").unwrap_err(),
        KeyConfigError::WeakSecret
    );
    v.add_admin_key(CredentialKey::static_hmac_secret(secret).unwrap())
        .unwrap();
    let enc = EncodingKey::from_secret(secret);
    let jwt = sign(
        Algorithm::HS256,
        &enc,
        &json!({"sub": "ops", "role": "admin", "exp": NOW + 60}),
    );
    assert!(v.verify_admin(&jwt, NOW).is_ok());
    let wrong = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef-guessed!");
    let jwt = sign(
        Algorithm::HS256,
        &wrong,
        &json!({"sub": "ops", "role": "admin", "exp": NOW + 60}),
    );
    let e = v.verify_admin(&jwt, NOW).unwrap_err();
    assert_eq!(e, CredentialError::BadSignature);
    assert!(!e.to_string().contains("0123456789"));
}

#[test]
fn bad_key_config_rejected() {
    assert!(
        CredentialKey::ed25519_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
            .is_err()
    );
    assert!(CredentialKey::ed25519_pem(RSA_PUBLIC_PEM.as_bytes()).is_err());
    assert!(CredentialKey::rsa_pem(Algorithm::RS256, ED_PUBLIC_PEM.as_bytes()).is_err());
    assert_eq!(
        CredentialKey::rsa_pem(Algorithm::EdDSA, RSA_PUBLIC_PEM.as_bytes()).unwrap_err(),
        KeyConfigError::AlgorithmMismatch(Algorithm::EdDSA)
    );
    assert!(CredentialKey::ed25519_raw(&[0u8; 31]).is_err());
    let dbg = format!(
        "{:?}",
        CredentialKey::ed25519_pem(ED_PUBLIC_PEM.as_bytes()).unwrap()
    );
    assert!(!dbg.contains("MCow"));
}

/// `cargo test --release -- --ignored --nocapture jwt_verify_cost`
#[test]
#[ignore]
fn jwt_verify_cost() {
    let ed = EncodingKey::from_ed_pem(ED_PRIVATE_PEM.as_bytes()).unwrap();
    let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).unwrap();
    let ve = viewer_verifier(CredentialKey::ed25519_pem(ED_PUBLIC_PEM.as_bytes()).unwrap());
    let vr = viewer_verifier(
        CredentialKey::rsa_pem(Algorithm::RS256, RSA_PUBLIC_PEM.as_bytes()).unwrap(),
    );
    for (name, v, jwt) in [
        ("EdDSA", &ve, sign(Algorithm::EdDSA, &ed, &viewer_claims())),
        ("RS256", &vr, sign(Algorithm::RS256, &rsa, &viewer_claims())),
    ] {
        let n = 5_000u32;
        let t = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(v.verify_viewer(&jwt, "b-1", NOW).unwrap());
        }
        println!(
            "{name} viewer JWT verify: {} ns",
            t.elapsed().as_nanos() / u128::from(n)
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn never_panics_on_arbitrary_input(s in "\\PC{0,300}", dots in proptest::collection::vec("[A-Za-z0-9_-]{0,80}", 0..5)) {
        let (_, key) = ed_key();
        let mut v = viewer_verifier(key);
        v.add_admin_key(CredentialKey::rsa_pem(Algorithm::RS256, RSA_PUBLIC_PEM.as_bytes()).unwrap()).unwrap();
        prop_assert!(v.verify_viewer(&s, "b-1", NOW).is_err());
        prop_assert!(v.verify_admin(&s, NOW).is_err());
        let joined = dots.join(".");
        prop_assert!(v.verify_viewer(&joined, "b-1", NOW).is_err());
    }

    #[test]
    fn arbitrary_header_and_claims(alg in prop_oneof![Just("EdDSA".to_owned()), Just("RS256".to_owned()), Just("none".to_owned()), Just("HS256".to_owned()), "[A-Z0-9]{0,6}"], kid in proptest::option::of("[a-z]{0,4}"), claims in "\\PC{0,120}", sig in "[A-Za-z0-9_-]{0,400}") {
        let (_, key) = ed_key();
        let mut v = viewer_verifier(key);
        v.add_viewer_key(CredentialKey::rsa_pem(Algorithm::RS256, RSA_PUBLIC_PEM.as_bytes()).unwrap()).unwrap();
        let h = json!({"alg": alg, "kid": kid});
        let jwt = format!("{}.{}.{}", URL_SAFE_NO_PAD.encode(h.to_string()), URL_SAFE_NO_PAD.encode(claims), sig);
        prop_assert!(v.verify_viewer(&jwt, "b-1", NOW).is_err());
    }

    #[test]
    fn bit_flips_in_valid_jwt_rejected(pos in any::<prop::sample::Index>(), repl in any::<u8>()) {
        let (enc, key) = ed_key();
        let v = viewer_verifier(key);
        let jwt = sign(Algorithm::EdDSA, &enc, &viewer_claims());
        let mut b = jwt.clone().into_bytes();
        let i = pos.index(b.len());
        let c = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."[usize::from(repl) % 65];
        prop_assume!(b[i] != c);
        b[i] = c;
        let s = String::from_utf8(b).unwrap();
        // A changed final base64 character may only alter padding bits of the
        // signature: then the token is still the same token.
        let same = URL_SAFE_NO_PAD.decode(s.rsplit('.').next().unwrap_or("")).ok()
            == URL_SAFE_NO_PAD.decode(jwt.rsplit('.').next().unwrap_or("")).ok()
            && s.rsplit_once('.').map(|x| x.0) == jwt.rsplit_once('.').map(|x| x.0);
        prop_assume!(!same);
        prop_assert!(v.verify_viewer(&s, "b-1", NOW).is_err());
    }
}
