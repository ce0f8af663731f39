//! The web console: static files compiled into the binary and served under `/console`.
//!
//! The console is plain ES modules (no build step) that talk to the public API only, so
//! this module just serves bytes. Files are revalidated on every load (`no-cache` plus a
//! strong `ETag` of their content): they change with every release and carry no hashed
//! names, so a cached copy must never outlive the binary that served it.

use std::sync::OnceLock;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

use crate::app::AppState;
use crate::error::Error;

/// One file of the console.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../console/index.html"),
    },
    Asset {
        path: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../console/app.js"),
    },
    Asset {
        path: "render.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../console/render.js"),
    },
    Asset {
        path: "schema-form.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../console/schema-form.js"),
    },
    Asset {
        path: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../console/style.css"),
    },
    // The same client front-end developers use, so the console exercises it.
    Asset {
        path: "tailcast.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../clients/js/tailcast.js"),
    },
    Asset {
        path: "favicon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../../console/favicon.svg"),
    },
];

/// Scripts only from the console itself; connections only back to this server (SSE, REST,
/// WebSocket); no inline script, so event data rendered by mistake as HTML could not run.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'";

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/console",
            get(|| async { Redirect::permanent("/console/") }),
        )
        .route(
            "/console/",
            get(|h: HeaderMap| async move { serve("index.html", &h) }),
        )
        .route(
            "/console/{file}",
            get(
                |axum::extract::Path(file): axum::extract::Path<String>, h: HeaderMap| async move {
                    serve(&file, &h)
                },
            ),
        )
}

fn serve(path: &str, req: &HeaderMap) -> Response {
    let Some((i, asset)) = ASSETS.iter().enumerate().find(|(_, a)| a.path == path) else {
        return Error::NotFound.into_response();
    };
    let etag = &etags()[i];
    let mut headers = HeaderMap::new();
    headers.insert(header::ETAG, etag.clone());
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    let fresh = req
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == etag || t.trim() == "*");
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    (headers, asset.body).into_response()
}

/// Strong validators computed once from the embedded bytes (FNV-1a, 64 bits: enough to tell
/// two builds' files apart; this is no security boundary).
fn etags() -> &'static [HeaderValue] {
    static ETAGS: OnceLock<Vec<HeaderValue>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let h = a.body.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                    (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
                });
                HeaderValue::from_str(&format!("\"{h:016x}\"")).expect("hex is a valid header")
            })
            .collect()
    })
}
