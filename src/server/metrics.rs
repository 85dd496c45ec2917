//! The labels the HTTP layer puts on [`crate::metrics::Metrics::request_duration`].
//!
//! Invariants:
//! - Every label comes from a fixed set, so a client cannot add series by sending made-up
//!   methods or paths: `method` is one of seven standard methods (matched case-sensitively) or
//!   `other`; `route` is a template of [`super::routes::ROUTES`], `unmatched` for a request no
//!   route matched (a 404), or `other` (services added through [`super::app_with`]).
//! - A raw path never becomes a label: `/v1/takedowns/td_…` is counted under
//!   `/v1/takedowns/{id}`.

/// The `method` label of a request: one of a fixed set, `other` for any other method, so a
/// client sending made-up methods cannot add series.
pub fn method_label(method: &actix_web::http::Method) -> &'static str {
    const KNOWN: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];
    KNOWN
        .into_iter()
        .find(|m| *m == method.as_str())
        .unwrap_or("other")
}

/// The `route` label of a request: its route template when it matched a route of
/// [`super::routes::ROUTES`], `unmatched` when it matched none (a 404), `other` for anything
/// else (services added through [`super::app_with`]).
pub fn route_label(pattern: Option<&str>) -> &'static str {
    match pattern {
        None => "unmatched",
        Some(p) => super::routes::ROUTES
            .iter()
            .find(|(_, template)| *template == p)
            .map_or("other", |&(_, template)| template),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_labels_come_from_fixed_sets() {
        use actix_web::http::Method;
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::OPTIONS), "OPTIONS");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
        assert_eq!(method_label(&Method::from_bytes(b"get").unwrap()), "other");
        assert_eq!(
            route_label(Some("/v1/takedowns/{id}")),
            "/v1/takedowns/{id}"
        );
        assert_eq!(route_label(Some("/panic")), "other");
        assert_eq!(route_label(None), "unmatched");
    }
}
