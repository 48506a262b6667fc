//! The dashboard's routes: the embedded page, and the JSON API behind the admin
//! credential.
//!
//! | path | credential | answer |
//! | --- | --- | --- |
//! | `/`, `/index.html`, `/dashboard.css`, `/dashboard.js` | none | the embedded page |
//! | `/healthz` | none | `ok` |
//! | `/api/broadcasts[?include_stopped=1]` | admin | `{"now_unix_ms", "broadcasts": [...]}` |
//! | `/api/broadcasts/{id}/audience[?from_ms=&to_ms=&step_s=]` | admin | `{"broadcast_id", "step_s", "points": [...]}` |
//!
//! Only `GET` (and `HEAD`) are served (405 otherwise). API errors are JSON
//! `{"error": message}` with 400, 401, 403, 404 or 503; a 401 carries
//! `WWW-Authenticate: Bearer`. Every answer says `nosniff`, `no-referrer` and forbids
//! framing; the page's Content-Security-Policy allows only its own script, style and
//! API (`'self'`), so nothing outside this listener is ever loaded.

use std::net::SocketAddr;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Response, StatusCode, http};
use starling_proto::v1::GetAudienceRequest;

use super::{Source, SourceError, json};
use crate::auth::Authenticator;

/// The page.
pub const INDEX_HTML: &str = include_str!("assets/index.html");
/// Its style sheet.
pub const DASHBOARD_CSS: &str = include_str!("assets/dashboard.css");
/// Its script: polling, the client-side series, the SVG charts.
pub const DASHBOARD_JS: &str = include_str!("assets/dashboard.js");

/// The page's Content-Security-Policy: its own files and API only.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// A response body.
pub type Body = Full<Bytes>;

/// Answers one request (its body is never read).
pub async fn handle<S: Source>(
    parts: &http::request::Parts,
    auth: &Authenticator,
    source: &S,
    remote: SocketAddr,
) -> Response<Body> {
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return with_headers(
            Response::builder()
                .status(StatusCode::METHOD_NOT_ALLOWED)
                .header("allow", "GET, HEAD"),
            "text/plain; charset=utf-8",
            Bytes::from_static(b"method not allowed\n"),
        );
    }
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or("");
    match path {
        "/" | "/index.html" => with_headers(
            Response::builder().header("content-security-policy", CSP),
            "text/html; charset=utf-8",
            Bytes::from_static(INDEX_HTML.as_bytes()),
        ),
        "/dashboard.css" => with_headers(
            Response::builder(),
            "text/css; charset=utf-8",
            Bytes::from_static(DASHBOARD_CSS.as_bytes()),
        ),
        "/dashboard.js" => with_headers(
            Response::builder(),
            "text/javascript; charset=utf-8",
            Bytes::from_static(DASHBOARD_JS.as_bytes()),
        ),
        "/healthz" => with_headers(
            Response::builder(),
            "text/plain; charset=utf-8",
            Bytes::from_static(b"ok\n"),
        ),
        p if p == "/api" || p.starts_with("/api/") => {
            let authorization = parts
                .headers
                .get(http::header::AUTHORIZATION)
                .map(http::HeaderValue::as_bytes);
            match auth.check_admin(authorization) {
                Ok(who) => {
                    tracing::debug!(admin = ?who, path = p, "dashboard request authenticated");
                }
                Err(status) => {
                    tracing::info!(
                        code = ?status.code(),
                        reason = status.message(),
                        %remote,
                        "dashboard request refused"
                    );
                    let code = if status.code() == tonic::Code::PermissionDenied {
                        StatusCode::FORBIDDEN
                    } else {
                        StatusCode::UNAUTHORIZED
                    };
                    return api_error(code, status.message());
                }
            }
            api(p, query, source).await
        }
        _ => with_headers(
            Response::builder().status(StatusCode::NOT_FOUND),
            "text/plain; charset=utf-8",
            Bytes::from_static(b"not found\n"),
        ),
    }
}

/// The authenticated API.
async fn api<S: Source>(path: &str, query: &str, source: &S) -> Response<Body> {
    let rest = path.strip_prefix("/api/broadcasts").unwrap_or("/");
    if rest.is_empty() {
        let include_stopped = match flag(query, "include_stopped") {
            Ok(v) => v,
            Err(e) => return api_error(StatusCode::BAD_REQUEST, &e),
        };
        return match source.broadcasts(include_stopped).await {
            Ok(list) => api_json(&json::broadcasts(
                &list,
                starling_proto::time::unix_ms_i64(),
            )),
            Err(e) => source_error(&e),
        };
    }
    if let Some(id) = rest
        .strip_prefix('/')
        .and_then(|r| r.strip_suffix("/audience"))
        .filter(|id| !id.is_empty() && !id.contains('/'))
    {
        let request = match audience_request(id, query) {
            Ok(r) => r,
            Err(e) => return api_error(StatusCode::BAD_REQUEST, &e),
        };
        let step_s = if request.step_s == 0 {
            60
        } else {
            request.step_s
        };
        return match source.audience(request).await {
            Ok(points) => api_json(&json::audience(id, step_s, &points)),
            Err(e) => source_error(&e),
        };
    }
    api_error(StatusCode::NOT_FOUND, "no such API path")
}

/// The `GetAudience` request of `/api/broadcasts/{id}/audience?from_ms=&to_ms=&step_s=`
/// (each parameter optional, 0 when absent: as in the gRPC call).
fn audience_request(id: &str, query: &str) -> Result<GetAudienceRequest, String> {
    let mut request = GetAudienceRequest {
        broadcast_id: id.to_string(),
        ..GetAudienceRequest::default()
    };
    for (k, v) in pairs(query) {
        let bad = || format!("{k}={v:?} is not a whole number");
        match k {
            "from_ms" => request.from_unix_ms = v.parse().map_err(|_| bad())?,
            "to_ms" => request.to_unix_ms = v.parse().map_err(|_| bad())?,
            "step_s" => request.step_s = v.parse().map_err(|_| bad())?,
            _ => return Err(format!("unknown parameter {k:?}")),
        }
    }
    Ok(request)
}

/// `name=1|true|0|false` in `query` (absent: false); any other parameter is refused.
fn flag(query: &str, name: &str) -> Result<bool, String> {
    let mut on = false;
    for (k, v) in pairs(query) {
        if k != name {
            return Err(format!("unknown parameter {k:?}"));
        }
        on = match v {
            "" | "1" | "true" => true,
            "0" | "false" => false,
            _ => return Err(format!("{k}={v:?} is not 1, true, 0 or false")),
        };
    }
    Ok(on)
}

/// `k=v` pairs of a query string (no percent-decoding: every value here is a number or
/// a flag).
fn pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

fn source_error(e: &SourceError) -> Response<Body> {
    let code = match e {
        SourceError::InvalidArgument(_) => StatusCode::BAD_REQUEST,
        SourceError::NotFound(_) => StatusCode::NOT_FOUND,
        SourceError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    if code == StatusCode::SERVICE_UNAVAILABLE {
        tracing::warn!(error = %e, "dashboard API could not answer");
    }
    api_error(code, &e.to_string())
}

fn api_error(code: StatusCode, message: &str) -> Response<Body> {
    let mut b = Response::builder().status(code);
    if code == StatusCode::UNAUTHORIZED {
        b = b.header("www-authenticate", "Bearer realm=\"starling-admin\"");
    }
    let body = serde_json::json!({ "error": message }).to_string();
    with_headers(
        b.header("cache-control", "no-store"),
        "application/json",
        Bytes::from(body),
    )
}

fn api_json(v: &serde_json::Value) -> Response<Body> {
    with_headers(
        Response::builder().header("cache-control", "no-store"),
        "application/json",
        Bytes::from(v.to_string()),
    )
}

/// Adds the headers every answer carries and the body.
fn with_headers(b: http::response::Builder, content_type: &str, body: Bytes) -> Response<Body> {
    b.header("content-type", content_type)
        .header("x-content-type-options", "nosniff")
        .header("referrer-policy", "no-referrer")
        .header("x-frame-options", "DENY")
        .body(Full::new(body))
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "dashboard response could not be built");
            let mut r = Response::new(Full::new(Bytes::from_static(b"internal error\n")));
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::auth::AuthConfig;
    use starling_proto::v1::{AudiencePoint, Broadcast, BroadcastState};

    const KEY: &str = "dashboard-unit-test-admin-key-0123456789";

    struct Fake;

    impl Source for Fake {
        async fn broadcasts(&self, include_stopped: bool) -> Result<Vec<Broadcast>, SourceError> {
            let mut v = vec![Broadcast {
                id: "b1".into(),
                name: "<script>x</script>".into(),
                state: BroadcastState::Live as i32,
                peers: 30,
                peer_share: 0.75,
                ..Broadcast::default()
            }];
            if include_stopped {
                v.push(Broadcast {
                    id: "b0".into(),
                    state: BroadcastState::Stopped as i32,
                    ..Broadcast::default()
                });
            }
            Ok(v)
        }

        async fn audience(
            &self,
            request: GetAudienceRequest,
        ) -> Result<Vec<AudiencePoint>, SourceError> {
            match request.broadcast_id.as_str() {
                "b1" if request.step_s.is_multiple_of(60) => Ok(vec![AudiencePoint {
                    start_unix_ms: request.from_unix_ms,
                    concurrent_viewers: 29.5,
                    startup_p50_ms: 900,
                    ..AudiencePoint::default()
                }]),
                "b1" => Err(SourceError::InvalidArgument("step".into())),
                _ => Err(SourceError::NotFound("no such broadcast".into())),
            }
        }
    }

    fn auth() -> Authenticator {
        Authenticator::new(&AuthConfig {
            admin_key: Some(KEY.into()),
            ..AuthConfig::default()
        })
        .unwrap()
    }

    async fn get(method: Method, uri: &str, bearer: Option<&str>) -> (StatusCode, String, String) {
        let mut b = hyper::Request::builder().method(method).uri(uri);
        if let Some(t) = bearer {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let (parts, ()) = b.body(()).unwrap().into_parts();
        let r = handle(&parts, &auth(), &Fake, ([127, 0, 0, 1], 1).into()).await;
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let status = r.status();
        let body = http_body_util::BodyExt::collect(r.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, ct, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn page_is_public_and_data_needs_the_admin_key() {
        let (s, ct, body) = get(Method::GET, "/", None).await;
        assert_eq!(s, StatusCode::OK);
        assert!(ct.starts_with("text/html"));
        assert!(body.contains("dashboard.js"));
        let (s, ct, _) = get(Method::GET, "/dashboard.js", None).await;
        assert_eq!(s, StatusCode::OK);
        assert!(ct.starts_with("text/javascript"));

        for key in [None, Some("wrong-key-wrong-key-wrong-key-wrong")] {
            let (s, ct, body) = get(Method::GET, "/api/broadcasts", key).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
            assert_eq!(ct, "application/json");
            assert!(!body.contains("b1"), "{body}");
        }
        let (s, _, body) = get(Method::GET, "/api/broadcasts/b1/audience", None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
        let (s, _, body) = get(Method::GET, "/api/broadcasts", Some(KEY)).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["broadcasts"][0]["id"], "b1");
        assert_eq!(v["broadcasts"][0]["state"], "live");
        assert_eq!(v["broadcasts"][0]["peers"], 30);
        assert_eq!(v["broadcasts"].as_array().unwrap().len(), 1);
        let (_, _, body) = get(Method::GET, "/api/broadcasts?include_stopped=1", Some(KEY)).await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["broadcasts"].as_array().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn audience_parameters_and_errors() {
        let (s, _, body) = get(
            Method::GET,
            "/api/broadcasts/b1/audience?from_ms=60000&to_ms=120000&step_s=60",
            Some(KEY),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["points"][0]["start_unix_ms"], 60000);
        assert_eq!(v["points"][0]["startup_p50_ms"], 900);
        assert_eq!(v["step_s"], 60);
        for (uri, want) in [
            (
                "/api/broadcasts/b1/audience?step_s=7",
                StatusCode::BAD_REQUEST,
            ),
            (
                "/api/broadcasts/b1/audience?from_ms=x",
                StatusCode::BAD_REQUEST,
            ),
            (
                "/api/broadcasts/b1/audience?color=red",
                StatusCode::BAD_REQUEST,
            ),
            (
                "/api/broadcasts?include_stopped=maybe",
                StatusCode::BAD_REQUEST,
            ),
            ("/api/broadcasts/zz/audience", StatusCode::NOT_FOUND),
            ("/api/broadcasts/b1/x/audience", StatusCode::NOT_FOUND),
            ("/api/nothing", StatusCode::NOT_FOUND),
        ] {
            let (s, ct, body) = get(Method::GET, uri, Some(KEY)).await;
            assert_eq!(s, want, "{uri}: {body}");
            assert_eq!(ct, "application/json", "{uri}");
            assert!(body.contains("\"error\""), "{uri}: {body}");
        }
        let (s, _, _) = get(Method::POST, "/api/broadcasts", Some(KEY)).await;
        assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
        let (s, _, _) = get(Method::GET, "/etc/passwd", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for asset in [INDEX_HTML, DASHBOARD_CSS, DASHBOARD_JS] {
            // The SVG namespace is a name, not a resource.
            let asset = asset.replace("http://www.w3.org/2000/svg", "");
            for needle in ["http://", "https://", "//cdn", "@import", "url("] {
                assert!(!asset.contains(needle), "an asset mentions {needle}");
            }
        }
        // Data is written as text, never parsed as HTML.
        assert!(!DASHBOARD_JS.contains("innerHTML"));
        assert!(!DASHBOARD_JS.contains("eval("));
    }
}
