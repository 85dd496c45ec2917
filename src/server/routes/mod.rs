//! The route table: one list that both registers the handlers and is checked against
//! `api/openapi.yaml` by the contract test.

use actix_web::{web, HttpRequest, HttpResponse};

use super::error::ApiError;

pub mod audit;
pub mod completions;
pub mod misc;
pub mod takedowns;

/// Declares every route once: `ROUTES` (method, path template) and `register`.
macro_rules! routes {
    ($($method:ident $path:literal => $handler:path),* $(,)?) => {
        /// Every registered route as (method, path template).
        pub const ROUTES: &[(&str, &str)] = &[$((stringify!($method), $path)),*];

        /// Registers every route; other methods on a known path answer 405.
        pub fn register(cfg: &mut web::ServiceConfig) {
            let mut paths: Vec<&'static str> = Vec::new();
            $(if !paths.contains(&$path) { paths.push($path); })*
            for path in paths {
                let mut resource = web::resource(path);
                $(if $path == path {
                    resource = resource.route(routes!(@method $method).to($handler));
                })*
                cfg.service(resource.default_service(web::to(method_not_allowed)));
            }
        }
    };
    (@method GET) => { web::get() };
    (@method POST) => { web::post() };
    (@method DELETE) => { web::delete() };
}

routes! {
    POST "/v1/completions" => completions::create,
    GET "/v1/models" => misc::models,
    POST "/v1/tokenize" => misc::tokenize,
    POST "/v1/detokenize" => misc::detokenize,
    POST "/v1/audit" => audit::audit,
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

async fn method_not_allowed(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed(format!(
        "{} is not allowed on {}",
        req.method(),
        req.path()
    )))
}

/// The answer for paths no route matches.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound {
        message: format!("no route {} {}", req.method(), req.path()),
        param: None,
        code: "unknown_route",
    })
}
