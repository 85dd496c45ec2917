//! The route table: one `routes!` list that both registers the handlers and is [`ROUTES`],
//! which the contract test checks against `api/openapi.yaml`.
//!
//! Invariants:
//! - The routes registered are exactly [`ROUTES`], and the contract test fails unless
//!   `api/openapi.yaml` documents exactly those (method, template) pairs.
//! - Every GET route also answers HEAD (same status and headers, no body).
//! - A known path with another method is a 405 with an `Allow` header (its methods in declaration
//!   order, HEAD after GET); an unknown path is a 404 `unknown_route`; both in OpenAI's error
//!   shape.
//! - Every handler checks its key ([`super::auth`]) before it reads a body, so an unauthenticated
//!   client never has its body read or parsed. `/livez`, `/readyz`, `/metrics` and
//!   `/openapi.yaml` need no key.

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};

use super::error::ApiError;

pub mod audit;
pub mod audits;
pub mod completions;
pub mod misc;
pub mod takedowns;

/// Declares every route once: `ROUTES` (method, path template) and `register`.
macro_rules! routes {
    ($($method:ident $path:literal => $handler:path),* $(,)?) => {
        /// Every registered route as (method, path template). Each GET route also answers HEAD
        /// (same status and headers, no body), which is not listed here.
        pub const ROUTES: &[(&str, &str)] = &[$((stringify!($method), $path)),*];

        /// Registers every route (and HEAD beside each GET); other methods on a known path
        /// answer 405 with an `Allow` header.
        pub fn register(cfg: &mut web::ServiceConfig) {
            let mut paths: Vec<&'static str> = Vec::new();
            $(if !paths.contains(&$path) { paths.push($path); })*
            for path in paths {
                let mut resource = web::resource(path);
                $(if $path == path {
                    resource = resource.route(routes!(@method $method).to($handler));
                    resource = routes!(@head $method, resource, $handler);
                })*
                let allow = allowed_methods(path).join(", ");
                cfg.service(resource.default_service(web::to(move |req: HttpRequest| {
                    method_not_allowed(req, allow.clone())
                })));
            }
        }
    };
    (@method GET) => { web::get() };
    (@method POST) => { web::post() };
    (@method DELETE) => { web::delete() };
    (@head GET, $resource:ident, $handler:path) => { $resource.route(web::head().to($handler)) };
    (@head $other:ident, $resource:ident, $handler:path) => { $resource };
}

routes! {
    POST "/v1/completions" => completions::create,
    GET "/v1/models" => misc::models,
    POST "/v1/tokenize" => misc::tokenize,
    POST "/v1/detokenize" => misc::detokenize,
    POST "/v1/audit" => audit::audit,
    POST "/v1/audits" => audits::create,
    GET "/v1/audits" => audits::list,
    GET "/v1/audits/{id}" => audits::get,
    DELETE "/v1/audits/{id}" => audits::cancel,
    GET "/v1/audits/{id}/results" => audits::results,
    GET "/livez" => misc::livez,
    GET "/readyz" => misc::readyz,
    GET "/metrics" => misc::metrics,
    GET "/openapi.yaml" => misc::openapi,
    POST "/v1/takedowns" => takedowns::create,
    GET "/v1/takedowns" => takedowns::list,
    GET "/v1/takedowns/{id}" => takedowns::get,
    DELETE "/v1/takedowns/{id}" => takedowns::cancel,
    GET "/v1/takedowns/{id}/receipt" => takedowns::receipt,
    GET "/v1/admin/versions" => takedowns::versions,
    POST "/v1/admin/rollback" => takedowns::rollback,
}

/// The methods `template` answers, as the `Allow` header lists them: its routes in declaration
/// order, with HEAD after GET. Empty for an unknown template.
pub fn allowed_methods(template: &str) -> Vec<&'static str> {
    let mut out = Vec::new();
    for (method, path) in ROUTES {
        if *path == template {
            out.push(*method);
            if *method == "GET" {
                out.push("HEAD");
            }
        }
    }
    out
}

/// 405 in OpenAI's shape, with the `Allow` header RFC 9110 requires.
async fn method_not_allowed(req: HttpRequest, allow: String) -> HttpResponse {
    let mut resp = ApiError::MethodNotAllowed(format!(
        "{} is not allowed on {}; allowed: {allow}",
        req.method(),
        req.path()
    ))
    .error_response();
    if let Ok(v) = header::HeaderValue::from_str(&allow) {
        resp.headers_mut().insert(header::ALLOW, v);
    }
    resp
}

/// The percent-decoded (`%6C` is `l`, `+` is a space) `key=value` pairs of a query string,
/// each key one of `known`, and given at most once unless it is in `repeatable`; anything else
/// is a 400 naming the key.
pub(super) fn query_pairs_with(
    q: &str,
    known: &[&str],
    repeatable: &[&str],
) -> Result<Vec<(String, String)>, ApiError> {
    let pairs = web::Query::<Vec<(String, String)>>::from_query(q)
        .map_err(|e| ApiError::Invalid {
            message: format!("malformed query string: {e}"),
            param: None,
            code: "invalid_query",
        })?
        .into_inner();
    for (i, (k, _)) in pairs.iter().enumerate() {
        if !known.contains(&k.as_str()) {
            return Err(ApiError::invalid(
                k.clone(),
                format!(
                    "unknown query parameter {k:?}; this route takes {}",
                    known.join(", ")
                ),
            ));
        }
        if !repeatable.contains(&k.as_str()) && pairs[..i].iter().any(|(p, _)| p == k) {
            return Err(ApiError::invalid(k.clone(), "is given more than once"));
        }
    }
    Ok(pairs)
}

/// The answer for paths no route matches.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound {
        message: format!("no route {} {}", req.method(), req.path()),
        param: None,
        code: "unknown_route",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_lists_each_paths_methods_with_head_beside_get() {
        assert_eq!(allowed_methods("/v1/completions"), ["POST"]);
        assert_eq!(allowed_methods("/livez"), ["GET", "HEAD"]);
        assert_eq!(allowed_methods("/v1/takedowns"), ["POST", "GET", "HEAD"]);
        assert_eq!(
            allowed_methods("/v1/takedowns/{id}"),
            ["GET", "HEAD", "DELETE"]
        );
        assert!(allowed_methods("/nope").is_empty());
    }
}
