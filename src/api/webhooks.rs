//! `POST`/`GET /v1/webhooks`, `GET`/`DELETE /v1/webhooks/{id}` (admin): registering the
//! webhooks that `crate::webhooks` delivers. The secret is accepted once and never shown.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;

use super::extract::Body;
use crate::app::AppState;
use crate::auth::Principal;
use crate::error::{Error, Result};
use crate::log::model::{format_time, parse_label, wire_time, MAX_STREAM_NAME, MAX_TYPE_CHARS};
use crate::log::webhooks::{self as store, Webhook, WebhookInfo};

/// Longest webhook URL, in bytes.
const MAX_URL_BYTES: usize = 2048;
/// Shortest and longest secret, in bytes.
const SECRET_BYTES: std::ops::RangeInclusive<usize> = 16..=1024;
/// Most event types one webhook may filter on.
const MAX_TYPES: usize = 100;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/webhooks", get(list).post(create))
        .route("/v1/webhooks/{id}", get(show).delete(remove))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    url: Option<String>,
    prefix: Option<String>,
    #[serde(default)]
    types: Option<Vec<String>>,
    secret: Option<String>,
}

fn invalid(field: &'static str, detail: impl Into<String>) -> Error {
    Error::InvalidField {
        field,
        detail: detail.into(),
    }
}

/// Checks a webhook URL: absolute `http://` or `https://` with a host. An https endpoint's
/// certificate is checked at each delivery against the system's roots and
/// `--webhook-ca-file`, not here: it may be renewed or not be up yet.
fn check_url(raw: &str) -> Result<String> {
    if raw.len() > MAX_URL_BYTES {
        return Err(invalid("url", format!("at most {MAX_URL_BYTES} bytes")));
    }
    let url = reqwest::Url::parse(raw)
        .map_err(|e| invalid("url", format!("not an absolute URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(
            "url",
            format!("scheme {:?}: use https:// or http://", url.scheme()),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("url", "the URL names no host"));
    }
    Ok(url.to_string())
}

async fn create(State(app): State<AppState>, who: Principal, Body(body): Body) -> Result<Response> {
    who.check_admin()?;
    let b: CreateBody = serde_json::from_slice(&body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => Error::InvalidParameter(format!("the webhook: {e}")),
            _ => Error::InvalidJson(format!("the webhook is not valid JSON: {e}")),
        }
    })?;
    let url = check_url(&b.url.ok_or(Error::MissingField("url"))?)?;
    let prefix = b.prefix.ok_or(Error::MissingField("prefix"))?;
    if prefix.len() > MAX_STREAM_NAME || prefix.chars().any(char::is_control) {
        return Err(invalid(
            "prefix",
            format!("at most {MAX_STREAM_NAME} characters without control characters"),
        ));
    }
    let secret = b.secret.ok_or(Error::MissingField("secret"))?;
    if !SECRET_BYTES.contains(&secret.len()) || secret.chars().any(char::is_control) {
        return Err(invalid(
            "secret",
            format!(
                "{}-{} bytes without control characters (random, e.g. 32 bytes hex)",
                SECRET_BYTES.start(),
                SECRET_BYTES.end()
            ),
        ));
    }
    let types = match b.types {
        None => None,
        Some(t) if t.is_empty() || t.len() > MAX_TYPES => {
            return Err(invalid(
                "types",
                format!("1-{MAX_TYPES} event types, or absent for every type"),
            ))
        }
        Some(t) => {
            for ty in &t {
                // Server-written types (`stream.closed`, `input.*`) are what backends most
                // often want: only the shape is checked, not the reservation.
                if ty.chars().count() > MAX_TYPE_CHARS {
                    return Err(invalid(
                        "types",
                        format!("a type is 1-{MAX_TYPE_CHARS} characters"),
                    ));
                }
                parse_label("types", ty).map_err(|e| invalid("types", e.to_string()))?;
            }
            Some(serde_json::to_string(&t).expect("strings serialise"))
        }
    };
    let w = Webhook {
        id: uuid::Uuid::now_v7().to_string(),
        url,
        prefix,
        types,
        secret,
        created_at: wire_time(Utc::now()),
    };
    store::insert(&app.db, &w).await?;
    // New: nothing delivered or pending yet.
    let info = WebhookInfo {
        id: w.id.clone(),
        url: w.url.clone(),
        prefix: w.prefix.clone(),
        types: w.type_list(),
        created_at: format_time(&w.created_at),
        streams: 0,
        pending_events: 0,
        failing_streams: 0,
        last_error: None,
    };
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn list(State(app): State<AppState>, who: Principal) -> Result<Response> {
    who.check_admin()?;
    let mut out = Vec::new();
    for w in store::all(&app.db).await? {
        out.push(store::info(&app.db, &w).await?);
    }
    Ok(Json(json!({ "webhooks": out })).into_response())
}

/// The `{id}` path segment: a webhook id is a UUID; anything else names no webhook.
fn webhook_id(raw: &str) -> Result<String> {
    uuid::Uuid::parse_str(raw)
        .map(|u| u.to_string())
        .map_err(|_| Error::WebhookNotFound(raw.chars().take(64).collect()))
}

async fn show(
    State(app): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Response> {
    who.check_admin()?;
    let id = webhook_id(&id)?;
    let w = store::get(&app.db, &id)
        .await?
        .ok_or_else(|| Error::WebhookNotFound(id.clone()))?;
    Ok(Json(store::info(&app.db, &w).await?).into_response())
}

async fn remove(
    State(app): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> Result<Response> {
    who.check_admin()?;
    let id = webhook_id(&id)?;
    if !store::delete(&app.db, &id).await? {
        return Err(Error::WebhookNotFound(id));
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}
