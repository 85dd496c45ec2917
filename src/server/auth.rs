//! API keys: an optional inference key and a separate admin key, both sent as
//! `Authorization: Bearer <key>`.
//!
//! Invariants:
//! - Inference routes are open when no API key is set; otherwise they take the API key or the
//!   admin key. Admin routes (audit, takedowns, `/v1/admin/*`) take the admin key only.
//! - Secure by default: with no admin key configured, admin routes answer 403 unless every bound
//!   address is loopback; then they are open, and start-up warns so
//!   ([`Auth::open_admin_warning`]).
//! - A missing or non-Bearer `Authorization` header, or a wrong key, is a 401 with
//!   `WWW-Authenticate: Bearer` in OpenAI's error shape.
//! - Keys are compared in constant time: both sides are hashed with SHA-256 first, so neither
//!   the length nor the position of the first difference shows in the time taken.
//! - Keys are never logged or printed: [`Secret`]'s `Debug` and `Display` are redacted, so the
//!   `Debug` of an [`Auth`] (and of the configuration logged at start-up) shows no key.

use actix_web::http::header;
use actix_web::HttpRequest;
use sha2::{Digest, Sha256};

use super::error::ApiError;

/// A secret string whose formatting is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret itself; only for comparing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Err("a key must not be empty".into());
        }
        Ok(Self(s.to_string()))
    }
}

/// Which keys guard which routes.
#[derive(Debug, Clone)]
pub struct Auth {
    pub api_key: Option<Secret>,
    pub admin_key: Option<Secret>,
    /// Whether every bound address is loopback (admin routes then work without an admin key).
    pub loopback_only: bool,
}

impl Auth {
    /// Inference routes: open when no API key is set; otherwise the API key or the admin key.
    pub fn inference(&self, req: &HttpRequest) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let presented = bearer(req)?;
        if matches(presented, key)
            || self
                .admin_key
                .as_ref()
                .is_some_and(|a| matches(presented, a))
        {
            Ok(())
        } else {
            Err(ApiError::Unauthorized("incorrect API key".into()))
        }
    }

    /// Admin routes: the admin key; with none configured, only on a loopback-only server.
    pub fn admin(&self, req: &HttpRequest) -> Result<(), ApiError> {
        match &self.admin_key {
            Some(key) => {
                if matches(bearer(req)?, key) {
                    Ok(())
                } else {
                    Err(ApiError::Unauthorized("incorrect admin key".into()))
                }
            }
            None if self.loopback_only => Ok(()),
            None => Err(ApiError::Forbidden(
                "admin routes are disabled: set LETHE_ADMIN_KEY (or bind to a loopback address)"
                    .into(),
            )),
        }
    }
}

impl Auth {
    /// The start-up warning for admin routes that need no key: with no admin key and a
    /// loopback-only bind, every local process may call them (in a pod, every container shares
    /// the loopback interface). `None` when an admin key is set or admin routes are refused.
    pub fn open_admin_warning(&self) -> Option<String> {
        (self.admin_key.is_none() && self.loopback_only).then(|| {
            "no admin key is set and the server is bound to loopback only, so the admin routes \
             (POST /v1/audit, /v1/takedowns, /v1/admin/*) accept requests without a key from \
             every process on this host (in a Kubernetes pod, every container shares the \
             loopback interface); set --admin-key (LETHE_ADMIN_KEY) to require a key"
                .to_string()
        })
    }
}

/// The `Authorization: Bearer <key>` value.
fn bearer(req: &HttpRequest) -> Result<&str, ApiError> {
    let missing = || {
        ApiError::Unauthorized(
            "missing API key: send it as the header `Authorization: Bearer <key>`".into(),
        )
    };
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(missing)?
        .to_str()
        .map_err(|_| missing())?;
    let (scheme, key) = value.split_once(' ').ok_or_else(missing)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(missing());
    }
    Ok(key.trim())
}

/// Constant-time equality: both sides are hashed first, so neither the length nor the position
/// of the first difference shows in the time taken.
fn matches(presented: &str, key: &Secret) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(key.expose().as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn auth(api: Option<&str>, admin: Option<&str>, loopback_only: bool) -> Auth {
        Auth {
            api_key: api.map(Secret::new),
            admin_key: admin.map(Secret::new),
            loopback_only,
        }
    }

    fn with_key(key: &str) -> HttpRequest {
        TestRequest::default()
            .insert_header((header::AUTHORIZATION, format!("Bearer {key}")))
            .to_http_request()
    }

    #[test]
    fn secrets_are_redacted() {
        let s = Secret::new("hunter2-very-secret");
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        let a = auth(Some("hunter2-very-secret"), Some("adm1n-secret"), true);
        let dbg = format!("{a:?}");
        assert!(!dbg.contains("hunter2") && !dbg.contains("adm1n"), "{dbg}");
    }

    #[test]
    fn inference_key_is_optional_and_checked() {
        let none = TestRequest::default().to_http_request();
        assert!(auth(None, None, false).inference(&none).is_ok());
        let a = auth(Some("k1"), Some("adm"), false);
        assert!(matches!(a.inference(&none), Err(ApiError::Unauthorized(_))));
        assert!(a.inference(&with_key("k1")).is_ok());
        assert!(a.inference(&with_key("adm")).is_ok());
        assert!(a.inference(&with_key("k2")).is_err());
        assert!(a.inference(&with_key("k1x")).is_err());
    }

    #[test]
    fn admin_routes_are_secure_by_default() {
        let none = TestRequest::default().to_http_request();
        assert!(auth(None, None, true).admin(&none).is_ok());
        assert!(matches!(
            auth(None, None, false).admin(&none),
            Err(ApiError::Forbidden(_))
        ));
        let a = auth(Some("k1"), Some("adm"), true);
        assert!(a.admin(&with_key("adm")).is_ok());
        assert!(matches!(
            a.admin(&with_key("k1")),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(a.admin(&none).is_err());
        let basic = TestRequest::default()
            .insert_header((header::AUTHORIZATION, "Basic adm"))
            .to_http_request();
        assert!(a.admin(&basic).is_err());
    }

    #[test]
    fn open_admin_routes_are_warned_about_at_start_up() {
        let w = auth(None, None, true).open_admin_warning().unwrap();
        for needle in [
            "/v1/takedowns",
            "/v1/admin/",
            "LETHE_ADMIN_KEY",
            "--admin-key",
            "pod",
        ] {
            assert!(w.contains(needle), "{needle} not in {w}");
        }
        // With a key, or bound beyond loopback (admin routes then answer 403), no warning.
        assert_eq!(auth(None, Some("adm"), true).open_admin_warning(), None);
        assert_eq!(auth(Some("k"), None, false).open_admin_warning(), None);
    }
}
