//! What a credential must say about itself besides its signature ([`JwtPolicy`]): the
//! audience it is for (`aud`), who issued it (`iss`) and how long it may live
//! (`exp - iat`, or `exp - now` without `iat`). Checked for viewer and admin JWTs alike,
//! each kind with its own policy, after the signature and times.

use serde_json::{Map, Value};

use super::{CredentialError, DEFAULT_ADMIN_MAX_LIFETIME_SECS, DEFAULT_VIEWER_MAX_LIFETIME_SECS};

/// What a kind of credential (viewer or admin) must say about itself besides its
/// signature: who it is for (`aud`), who made it (`iss`), and how long it may live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtPolicy {
    /// Required `aud` (a string equal to it, or an array holding it). `None`: not
    /// checked (the control plane's configuration refuses keys without one).
    pub audience: Option<String>,
    /// Required `iss`. `None`: not checked (likewise refused with keys).
    pub issuer: Option<String>,
    /// Longest `exp - iat` (or `exp - now` when there is no `iat`), seconds.
    pub max_lifetime_secs: u64,
}

impl JwtPolicy {
    /// Viewer defaults: no audience or issuer yet, 24 h at most.
    pub fn viewer_default() -> JwtPolicy {
        JwtPolicy {
            audience: None,
            issuer: None,
            max_lifetime_secs: DEFAULT_VIEWER_MAX_LIFETIME_SECS,
        }
    }

    /// Admin defaults: no audience or issuer yet, 1 h at most.
    pub fn admin_default() -> JwtPolicy {
        JwtPolicy {
            max_lifetime_secs: DEFAULT_ADMIN_MAX_LIFETIME_SECS,
            ..JwtPolicy::viewer_default()
        }
    }

    /// A policy with this audience and issuer (and the `max_lifetime_secs` given).
    pub fn new(audience: &str, issuer: &str, max_lifetime_secs: u64) -> JwtPolicy {
        JwtPolicy {
            audience: Some(audience.to_owned()),
            issuer: Some(issuer.to_owned()),
            max_lifetime_secs,
        }
    }
}

/// `aud`, `iss` and the lifetime against `policy` (the signature and times are
/// checked already).
pub(super) fn check_policy(
    claims: &Map<String, Value>,
    policy: &JwtPolicy,
    expires_at: u64,
    issued_at: Option<u64>,
    now: u64,
) -> Result<(), CredentialError> {
    if let Some(want) = &policy.audience {
        let ok = match claims.get("aud") {
            None | Some(Value::Null) => return Err(CredentialError::MissingClaim("aud")),
            Some(Value::String(a)) => a == want,
            Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(want.as_str())),
            Some(_) => {
                return Err(CredentialError::InvalidClaim {
                    claim: "aud",
                    reason: "must be a string or an array of strings",
                });
            }
        };
        if !ok {
            return Err(CredentialError::WrongAudience);
        }
    }
    if let Some(want) = &policy.issuer {
        match claims.get("iss") {
            None | Some(Value::Null) => return Err(CredentialError::MissingClaim("iss")),
            Some(Value::String(i)) if i == want => {}
            Some(Value::String(_)) => return Err(CredentialError::WrongIssuer),
            Some(_) => {
                return Err(CredentialError::InvalidClaim {
                    claim: "iss",
                    reason: "must be a string",
                });
            }
        }
    }
    // From its issue time when it says one (not later than now: checked already),
    // else from now: a credential without `iat` is judged by what it has left.
    let from = issued_at.unwrap_or(now).min(now);
    let lifetime = expires_at.saturating_sub(from);
    if lifetime > policy.max_lifetime_secs {
        return Err(CredentialError::LifetimeTooLong {
            lifetime,
            max: policy.max_lifetime_secs,
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: u64 = 1_700_000_000;

    fn claims(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn check(v: Value, policy: &JwtPolicy) -> Result<(), CredentialError> {
        let c = claims(v);
        let exp = c.get("exp").and_then(Value::as_u64).unwrap();
        let iat = c.get("iat").and_then(Value::as_u64);
        check_policy(&c, policy, exp, iat, NOW)
    }

    #[test]
    fn audience_issuer_and_lifetime_are_enforced() {
        let p = JwtPolicy::new("starling", "backend", 3600);
        let good = json!({"aud": "starling", "iss": "backend", "iat": NOW, "exp": NOW + 600});
        assert_eq!(check(good, &p), Ok(()));
        // `aud` as an array holding ours.
        let list =
            json!({"aud": ["other", "starling"], "iss": "backend", "iat": NOW, "exp": NOW + 600});
        assert_eq!(check(list, &p), Ok(()));
        let cases = [
            (
                json!({"iss": "backend", "exp": NOW + 60}),
                CredentialError::MissingClaim("aud"),
            ),
            (
                json!({"aud": "elsewhere", "iss": "backend", "exp": NOW + 60}),
                CredentialError::WrongAudience,
            ),
            (
                json!({"aud": ["a", "b"], "iss": "backend", "exp": NOW + 60}),
                CredentialError::WrongAudience,
            ),
            (
                json!({"aud": 7, "iss": "backend", "exp": NOW + 60}),
                CredentialError::InvalidClaim {
                    claim: "aud",
                    reason: "must be a string or an array of strings",
                },
            ),
            (
                json!({"aud": "starling", "exp": NOW + 60}),
                CredentialError::MissingClaim("iss"),
            ),
            (
                json!({"aud": "starling", "iss": "mallory", "exp": NOW + 60}),
                CredentialError::WrongIssuer,
            ),
            (
                json!({"aud": "starling", "iss": "backend", "iat": NOW - 10, "exp": NOW + 3600}),
                CredentialError::LifetimeTooLong {
                    lifetime: 3610,
                    max: 3600,
                },
            ),
            // Without `iat`: judged by what is left.
            (
                json!({"aud": "starling", "iss": "backend", "exp": NOW + 3601}),
                CredentialError::LifetimeTooLong {
                    lifetime: 3601,
                    max: 3600,
                },
            ),
        ];
        for (c, want) in cases {
            assert_eq!(check(c.clone(), &p), Err(want), "{c}");
        }
        // Unconfigured audience and issuer are not checked; the lifetime always is.
        let open = JwtPolicy::viewer_default();
        assert_eq!(check(json!({"exp": NOW + 60}), &open), Ok(()));
        assert!(matches!(
            check(json!({"exp": NOW + 2 * 86_400}), &open),
            Err(CredentialError::LifetimeTooLong { .. })
        ));
        assert_eq!(JwtPolicy::admin_default().max_lifetime_secs, 3600);
    }
}
