//! Request bodies: read under a byte limit and a time limit, then parsed as JSON with errors
//! that name the field. lethe reads the payload itself (actix's own extractors answer in plain
//! text), so every failure is an [`ApiError`] in OpenAI's shape.
//!
//! Invariants:
//! - A body over the limit is a 413 and is never parsed: at once when `Content-Length` announces
//!   more, else as soon as the bytes read pass it; no more than the limit is ever buffered.
//! - A `Content-Type` other than `application/json` or `…+json` is a 415 before any byte is
//!   read; a body without one is read as JSON.
//! - The whole body must arrive within `--body-read-timeout-seconds`
//!   ([`Limits::body_read_timeout`], found through the app's [`AppState`]): a client that
//!   announces a body and then stalls gets a 408 naming the limit, and its connection is closed
//!   rather than the rest of the body being parsed as the next request.
//! - An empty body, malformed JSON, a wrong type, an unknown field (where the target type
//!   refuses them) or a bad value is a 400: `invalid_json` for syntax, else `invalid_value` with
//!   the JSON path of the offending field (`inner.flag`) in `param` when there is one. A body
//!   that cannot be read is a 400 `invalid_body`.

use actix_web::http::header;
use actix_web::{web, HttpRequest};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::state::{AppState, Limits};

/// Reads the whole body, refusing more than `limit` bytes, within the app's body read timeout.
pub async fn read(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
) -> Result<web::Bytes, ApiError> {
    let timeout = body_read_timeout(req);
    read_within(req, payload, limit, timeout).await
}

/// The app's `--body-read-timeout-seconds` (the default outside an app).
fn body_read_timeout(req: &HttpRequest) -> std::time::Duration {
    req.app_data::<web::Data<AppState>>()
        .map(|s| s.limits.body_read_timeout)
        .unwrap_or_else(|| Limits::default().body_read_timeout)
}

/// [`read`] with an explicit timeout for the whole body.
async fn read_within(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<web::Bytes, ApiError> {
    let too_large = || ApiError::TooLarge {
        message: format!("request body is larger than the limit of {limit} bytes"),
        param: None,
    };
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(too_large());
        }
    }
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or_default().to_ascii_lowercase();
        if !(ct.starts_with("application/json") || ct.contains("+json")) {
            return Err(ApiError::UnsupportedMediaType(format!(
                "content-type {ct:?} is not supported; send application/json"
            )));
        }
    }
    let read_all = async {
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| ApiError::Invalid {
                message: format!("could not read the request body: {e}"),
                param: None,
                code: "invalid_body",
            })?;
            if body.len() + chunk.len() > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    match actix_web::rt::time::timeout(timeout, read_all).await {
        Ok(body) => body,
        Err(_) => Err(timed_out(timeout)),
    }
}

/// Streams the body into a new file at `path`, refusing more than `limit` bytes (413, at once
/// when `Content-Length` announces more) and a body that stalls for longer than the body read
/// timeout between two chunks (408): an upload may take longer than one timeout in all, but
/// never stall for one. The file is fsync'd before this returns `Ok`, and removed on any error.
/// Returns the bytes written.
pub async fn stream_to_file(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: u64,
    path: std::path::PathBuf,
) -> Result<u64, ApiError> {
    use std::io::Write;
    let too_large = || ApiError::TooLarge {
        message: format!("the upload is larger than the limit of {limit} bytes"),
        param: None,
    };
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let timeout = body_read_timeout(req);
    let io = |e: std::io::Error| ApiError::Internal(format!("writing the upload: {e}"));
    let p = path.clone();
    let mut file = web::block(move || std::fs::File::create(&p))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(io)?;
    let mut written = 0u64;
    let mut pending = web::BytesMut::new();
    let result = async move {
        loop {
            let next = actix_web::rt::time::timeout(timeout, payload.next())
                .await
                .map_err(|_| timed_out(timeout))?;
            let chunk = match next {
                None => None,
                Some(Err(e)) => {
                    return Err(ApiError::Invalid {
                        message: format!("could not read the request body: {e}"),
                        param: None,
                        code: "invalid_body",
                    })
                }
                Some(Ok(c)) => Some(c),
            };
            let last = chunk.is_none();
            if let Some(c) = chunk {
                written += c.len() as u64;
                if written > limit {
                    return Err(too_large());
                }
                pending.extend_from_slice(&c);
            }
            if pending.len() >= 1 << 20 || last {
                let bytes = std::mem::take(&mut pending);
                file = web::block(move || {
                    file.write_all(&bytes)?;
                    if last {
                        file.sync_all()?;
                    }
                    Ok::<_, std::io::Error>(file)
                })
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .map_err(io)?;
            }
            if last {
                return Ok(written);
            }
        }
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    result
}

/// The 408 for a body that did not arrive in time.
fn timed_out(timeout: std::time::Duration) -> ApiError {
    ApiError::Timeout(format!(
        "the request body did not arrive within the body read timeout of {} s \
         (--body-read-timeout-seconds)",
        timeout.as_secs_f64()
    ))
}

/// Parses `bytes` as a `T`; a failure names the JSON path of the offending field.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::Invalid {
            message: "the request body is empty; expected a JSON object".into(),
            param: None,
            code: "invalid_json",
        });
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let syntax = inner.is_syntax() || inner.is_eof();
        let param = (!syntax && path != ".").then(|| path.clone());
        let message = match &param {
            Some(p) => format!("{p}: {inner}"),
            None if syntax => format!("malformed JSON: {inner}"),
            None => inner.to_string(),
        };
        ApiError::Invalid {
            message,
            param,
            code: if syntax {
                "invalid_json"
            } else {
                "invalid_value"
            },
        }
    })?;
    Ok(value)
}

/// Reads and parses a JSON body in one go.
pub async fn json<T: DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
) -> Result<T, ApiError> {
    parse(&read(req, payload, limit).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct T {
        n: u32,
        inner: Option<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        flag: bool,
    }

    fn param_of(body: &str) -> (Option<String>, String) {
        match parse::<T>(body.as_bytes()).unwrap_err() {
            ApiError::Invalid { param, message, .. } => (param, message),
            other => panic!("{other:?}"),
        }
    }

    #[actix_web::test]
    async fn a_stalled_body_is_answered_408_naming_the_limit() {
        let (mut tx, payload) = actix_http::h1::Payload::create(false);
        tx.feed_data(web::Bytes::from_static(b"{"));
        let req = actix_web::test::TestRequest::post()
            .insert_header((header::CONTENT_LENGTH, "100"))
            .to_http_request();
        let timeout = std::time::Duration::from_millis(100);
        let mut payload = actix_web::dev::Payload::from(payload);
        let payload = <web::Payload as actix_web::FromRequest>::from_request(&req, &mut payload)
            .await
            .unwrap();
        let e = read_within(&req, payload, 1000, timeout).await.unwrap_err();
        assert_eq!(
            actix_web::ResponseError::status_code(&e).as_u16(),
            408,
            "{e}"
        );
        assert!(e.to_string().contains("--body-read-timeout-seconds"), "{e}");
        drop(tx);
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(param_of(r#"{"n": "x"}"#).0.as_deref(), Some("n"));
        assert_eq!(
            param_of(r#"{"n": 1, "inner": {"flag": 3}}"#).0.as_deref(),
            Some("inner.flag")
        );
        let (_, msg) = param_of(r#"{"n": 1, "bogus": 1}"#);
        assert!(msg.contains("bogus"), "{msg}");
        let (p, msg) = param_of(r#"{"n": 1"#);
        assert_eq!(p, None);
        assert!(msg.starts_with("malformed JSON"), "{msg}");
        let (_, msg) = param_of(r#"{}"#);
        assert!(msg.contains("missing field `n`"), "{msg}");
        let (_, msg) = param_of("   ");
        assert!(msg.contains("empty"), "{msg}");
    }
}
