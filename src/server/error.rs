//! The HTTP error type: one exhaustive mapping from what went wrong to a status code and
//! OpenAI's error body `{"error": {"message", "type", "param", "code"}}`.
//!
//! Invariants:
//! - Every [`ApiError`] renders as that body, with a stable machine-readable `code` and, for bad
//!   input, the offending field in `param` where there is one.
//! - Client mistakes are 4xx, never 500: 400 for bad input (the library's `InvalidInput` and
//!   tokenizer errors included), 401 with `WWW-Authenticate: Bearer`, 403, 404, 405, 408 (the
//!   connection is then closed), 409 (a failed compare-and-swap, a reused idempotency key, a
//!   takedown that can no longer be cancelled), 413, 415.
//! - Load and availability are 429 with `Retry-After` (a full engine queue) and 503 (an engine
//!   shutting down or stopped, a cancelled operation, a full data disk: nothing was stored).
//! - A 500 (`internal_error`) means a bug in lethe; its message is logged at error level when the
//!   answer is rendered.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::engine::batcher::SubmitError;
use crate::error::Error;

/// Everything a handler can answer besides success.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// 400: the request is malformed or a value is out of range. `param` names the field.
    Invalid {
        message: String,
        param: Option<String>,
        code: &'static str,
    },
    /// 401: a key is required and missing or wrong.
    Unauthorized(String),
    /// 403: the route is disabled in this configuration.
    Forbidden(String),
    /// 404: no such route, model or object.
    NotFound {
        message: String,
        param: Option<String>,
        code: &'static str,
    },
    /// 405: the route exists but not with this method.
    MethodNotAllowed(String),
    /// 409: a compare-and-swap precondition failed.
    Conflict { message: String, code: &'static str },
    /// 413: the body or a count in it is over a configured limit.
    TooLarge {
        message: String,
        param: Option<String>,
    },
    /// 415: the body is not JSON.
    UnsupportedMediaType(String),
    /// 408: the client did not send the request body within the configured time.
    Timeout(String),
    /// 429: the engine queue is full; retry after this many seconds.
    Overloaded { retry_after_seconds: u64 },
    /// 503: the model or engine is not ready (starting, stopping).
    Unavailable(String),
    /// 500: a bug in lethe. The message is logged; clients see it too, without internals.
    Internal(String),
}

#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
}

#[derive(Serialize)]
struct Detail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    /// A 400 naming `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            message: message.into(),
            param: Some(param.into()),
            code: "invalid_value",
        }
    }

    /// OpenAI's `type` string.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Invalid { .. }
            | Self::TooLarge { .. }
            | Self::UnsupportedMediaType(_)
            | Self::Timeout(_) => "invalid_request_error",
            Self::Unauthorized(_) => "authentication_error",
            Self::Forbidden(_) => "permission_error",
            Self::NotFound { .. } | Self::MethodNotAllowed(_) => "not_found_error",
            Self::Conflict { .. } => "conflict_error",
            Self::Overloaded { .. } => "rate_limit_error",
            Self::Unavailable(_) => "service_unavailable_error",
            Self::Internal(_) => "server_error",
        }
    }

    /// The stable machine-readable `code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid { code, .. } | Self::NotFound { code, .. } => code,
            Self::Conflict { code, .. } => code,
            Self::Unauthorized(_) => "invalid_api_key",
            Self::Forbidden(_) => "forbidden",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::TooLarge { .. } => "request_too_large",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::Timeout(_) => "request_timeout",
            Self::Overloaded { .. } => "server_overloaded",
            Self::Unavailable(_) => "not_ready",
            Self::Internal(_) => "internal_error",
        }
    }

    fn message(&self) -> &str {
        match self {
            Self::Invalid { message, .. }
            | Self::NotFound { message, .. }
            | Self::Conflict { message, .. }
            | Self::TooLarge { message, .. } => message,
            Self::Unauthorized(m)
            | Self::Forbidden(m)
            | Self::MethodNotAllowed(m)
            | Self::UnsupportedMediaType(m)
            | Self::Timeout(m)
            | Self::Unavailable(m)
            | Self::Internal(m) => m,
            Self::Overloaded { .. } => "the request queue is full; retry later",
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            Self::Invalid { param, .. }
            | Self::NotFound { param, .. }
            | Self::TooLarge { param, .. } => param.as_deref(),
            _ => None,
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.status_code(),
            self.code(),
            self.message()
        )
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Invalid { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        // An internal error's text (paths, SQL, library messages) stays in the server log; the
        // client gets an incident id to quote that finds it there.
        let incident;
        let message = if let Self::Internal(m) = self {
            let id = format!("{:08x}", rand::random::<u32>());
            tracing::error!(incident = %id, error = %m, "internal error");
            incident = format!("internal error (incident {id}); the details are in the server log");
            incident.as_str()
        } else {
            self.message()
        };
        let mut resp = HttpResponse::build(self.status_code());
        match self {
            Self::Overloaded {
                retry_after_seconds,
            } => {
                resp.insert_header((header::RETRY_AFTER, retry_after_seconds.to_string()));
            }
            Self::Unauthorized(_) => {
                resp.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            // The rest of the body may still be on its way: close rather than parse it as the
            // next request.
            Self::Timeout(_) => {
                resp.force_close();
            }
            _ => {}
        }
        resp.json(Body {
            error: Detail {
                message,
                kind: self.kind(),
                param: self.param(),
                code: Some(self.code()),
            },
        })
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidInput { field, message } => ApiError::Invalid {
                message: format!("invalid {field}: {message}"),
                param: Some(field),
                code: "invalid_value",
            },
            Error::Tokenizer(m) => ApiError::Invalid {
                message: format!("tokenizer: {m}"),
                param: None,
                code: "invalid_value",
            },
            Error::Cancelled => ApiError::Unavailable("the operation was cancelled".into()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// A job the engine refused: 429 with `Retry-After` for a full queue, 503 for a stopped one.
impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Full => ApiError::Overloaded {
                retry_after_seconds: 1,
            },
            SubmitError::ShuttingDown | SubmitError::Stopped => {
                ApiError::Unavailable(e.to_string())
            }
        }
    }
}

/// The HTTP answer for an error of the takedown subsystem.
pub fn api_error(e: crate::takedown::Error) -> ApiError {
    use crate::takedown::Error as E;
    match e {
        E::NotFound(id) => ApiError::NotFound {
            message: format!("no takedown {id:?}"),
            param: None,
            code: "takedown_not_found",
        },
        E::VersionNotFound(id) => ApiError::NotFound {
            message: format!("no version {id:?}"),
            param: Some("to_version".into()),
            code: "version_not_found",
        },
        E::IdempotencyConflict { key, existing_id } => ApiError::Conflict {
            message: format!(
                "Idempotency-Key {key:?} was already used by takedown {existing_id} for a \
                 different request"
            ),
            code: "idempotency_key_reused",
        },
        E::NotCancellable { id, state } => ApiError::Conflict {
            message: format!("takedown {id} is {state} and can no longer be cancelled"),
            code: "not_cancellable",
        },
        E::VersionConflict { expected, actual } => ApiError::Conflict {
            message: format!(
                "the live version is {}, not the expected {}",
                actual.as_deref().unwrap_or("none"),
                expected.as_deref().unwrap_or("none")
            ),
            code: "version_mismatch",
        },
        E::InvalidInput { field, message } => ApiError::invalid(field, message),
        e if e.is_disk_full() => {
            tracing::error!(error = %e, "the data directory's disk is full");
            ApiError::Unavailable(
                "the data directory's disk is full: nothing was stored; retry once the \
                 operator has freed space"
                    .into(),
            )
        }
        E::Model(e) => ApiError::from(e),
        other => ApiError::Internal(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_a_503_that_says_so_not_a_500() {
        use actix_web::ResponseError;
        let full = crate::takedown::Error::Io {
            op: "write",
            path: "/data/lethe.sqlite3".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        let e = api_error(full);
        assert_eq!(e.status_code().as_u16(), 503);
        assert!(e.to_string().contains("disk is full"), "{e}");
        let other = api_error(crate::takedown::Error::Corrupt {
            what: "x".into(),
            message: "y".into(),
        });
        assert_eq!(other.status_code().as_u16(), 500);
    }

    #[test]
    fn every_variant_maps_to_its_status_and_type() {
        let cases = [
            (ApiError::invalid("n", "bad"), 400, "invalid_request_error"),
            (
                ApiError::Unauthorized("k".into()),
                401,
                "authentication_error",
            ),
            (ApiError::Forbidden("f".into()), 403, "permission_error"),
            (
                ApiError::NotFound {
                    message: "m".into(),
                    param: None,
                    code: "not_found",
                },
                404,
                "not_found_error",
            ),
            (
                ApiError::MethodNotAllowed("m".into()),
                405,
                "not_found_error",
            ),
            (
                ApiError::Conflict {
                    message: "c".into(),
                    code: "version_mismatch",
                },
                409,
                "conflict_error",
            ),
            (
                ApiError::TooLarge {
                    message: "t".into(),
                    param: None,
                },
                413,
                "invalid_request_error",
            ),
            (
                ApiError::UnsupportedMediaType("u".into()),
                415,
                "invalid_request_error",
            ),
            (ApiError::Timeout("t".into()), 408, "invalid_request_error"),
            (
                ApiError::Overloaded {
                    retry_after_seconds: 1,
                },
                429,
                "rate_limit_error",
            ),
            (
                ApiError::Unavailable("u".into()),
                503,
                "service_unavailable_error",
            ),
            (ApiError::Internal("bug".into()), 500, "server_error"),
        ];
        for (e, status, kind) in cases {
            assert_eq!(e.status_code().as_u16(), status, "{e:?}");
            assert_eq!(e.kind(), kind, "{e:?}");
        }
    }

    #[test]
    fn library_input_errors_become_400_naming_the_field() {
        let e: ApiError = Error::invalid("prompt[0]", "is empty").into();
        assert_eq!(e.status_code(), StatusCode::BAD_REQUEST);
        assert_eq!(e.param(), Some("prompt[0]"));
        let e: ApiError = Error::Cancelled.into();
        assert_eq!(e.status_code(), StatusCode::SERVICE_UNAVAILABLE);
    }

    /// A 500's body names an incident id, never the internal text it was made from.
    #[test]
    fn internal_errors_answer_an_incident_id_not_their_text() {
        let r =
            ApiError::Internal("SQLITE_IOERR at /var/lib/lethe/secret.db".into()).error_response();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = actix_web::body::to_bytes(r.into_body());
        let body = futures_util::FutureExt::now_or_never(body)
            .expect("a JSON body is ready")
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            !text.contains("secret") && !text.contains("SQLITE"),
            "{text}"
        );
        assert!(text.contains("internal error (incident "), "{text}");
    }

    #[test]
    fn overload_carries_retry_after() {
        let r = ApiError::Overloaded {
            retry_after_seconds: 2,
        }
        .error_response();
        assert_eq!(r.headers().get(header::RETRY_AFTER).unwrap(), "2");
    }
}
