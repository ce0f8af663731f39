//! The auth matrix: every endpoint × {no token, bad signature, expired, wrong grant, right
//! grant}, with the status and code each must give, and proof that a refused call leaked
//! nothing (a forbidden read carries no events, a forbidden write appended nothing).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tailcast::{App, Config};
use tracing_subscriber::filter::{filter_fn, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

use crate::backend::{backend_test, TestDb};
use crate::helpers::{SseClient, TestApp, WAIT};

pub const SECRET: &str = "test-secret-that-is-at-least-32-bytes-long";
pub const ADMIN: &str = "admin-token-for-tests";
/// Appended to every stream; a refused read must never show it.
const MARKER: &str = "marker-only-readers-may-see";

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token with these claims, valid for an hour unless `claims` sets `exp`.
pub fn token_with(secret: &str, claims: Value) -> String {
    let mut c = json!({ "sub": "tester", "exp": now_s() + 3600 });
    c.as_object_mut()
        .unwrap()
        .extend(claims.as_object().unwrap().clone());
    encode(
        &Header::default(),
        &c,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn token(claims: Value) -> String {
    token_with(SECRET, claims)
}

pub async fn spawn_secured(db: TestDb) -> TestApp {
    TestApp::spawn_with(db, |c| {
        c.jwt_secret = Some(SECRET.into());
        c.admin_token = Some(ADMIN.into());
    })
    .await
}

/// A request with an optional bearer token.
pub async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    bearer: Option<&str>,
    body: Option<&Value>,
) -> reqwest::Response {
    let mut req = app.client.request(method, app.url(path));
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_string());
    }
    req.send().await.expect("request")
}

/// Appends one event (type `t`, key `k`) to `stream` with the admin token.
pub async fn admin_append(app: &TestApp, stream: &str, data: Value) {
    let res = call(
        app,
        Method::POST,
        &format!("/v1/streams/{stream}/events"),
        Some(ADMIN),
        Some(&json!({"type":"t","key":"k","data":data})),
    )
    .await;
    assert_eq!(res.status(), StatusCode::CREATED);
}

async fn head(app: &TestApp, stream: &str) -> (i64, bool) {
    let res = call(
        app,
        Method::GET,
        &format!("/v1/streams/{stream}"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    let v: Value = res.json().await.unwrap();
    (v["head"].as_i64().unwrap(), v["closed"].as_bool().unwrap())
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Needs {
    Read,
    Answer,
    Write,
    Admin,
}

struct Endpoint {
    method: Method,
    /// `{s}` is the stream.
    path: &'static str,
    body: Option<Value>,
    needs: Needs,
    ok: StatusCode,
}

fn endpoints() -> Vec<Endpoint> {
    let ep = |method, path, body, needs, ok| Endpoint {
        method,
        path,
        body,
        needs,
        ok,
    };
    vec![
        ep(
            Method::POST,
            "/v1/streams/{s}/events",
            Some(json!({"type":"t","data":1})),
            Needs::Write,
            StatusCode::CREATED,
        ),
        ep(
            Method::POST,
            "/v1/streams/{s}/close",
            Some(json!({"reason":"done"})),
            Needs::Write,
            StatusCode::CREATED,
        ),
        ep(
            Method::POST,
            "/v1/streams/{s}/stop",
            Some(json!({"reason":"enough"})),
            Needs::Answer,
            StatusCode::CREATED,
        ),
        ep(
            Method::POST,
            "/v1/streams/{s}/inputs",
            Some(json!({"request_id":"q1","prompt":"and?"})),
            Needs::Write,
            StatusCode::CREATED,
        ),
        ep(
            Method::POST,
            "/v1/streams/{s}/inputs/q0",
            Some(json!({"data":"yes"})),
            Needs::Answer,
            StatusCode::CREATED,
        ),
        ep(
            Method::GET,
            "/v1/streams/{s}/inputs",
            None,
            Needs::Read,
            StatusCode::OK,
        ),
        ep(
            Method::GET,
            "/v1/streams/{s}/inputs/q0",
            None,
            Needs::Read,
            StatusCode::OK,
        ),
        ep(
            Method::GET,
            "/v1/streams/{s}/events?after=0",
            None,
            Needs::Read,
            StatusCode::OK,
        ),
        ep(
            Method::GET,
            "/v1/streams/{s}",
            None,
            Needs::Read,
            StatusCode::OK,
        ),
        ep(
            Method::GET,
            "/v1/streams/{s}/snapshot",
            None,
            Needs::Read,
            StatusCode::OK,
        ),
        ep(
            Method::GET,
            "/v1/streams/{s}/presence",
            None,
            Needs::Read,
            StatusCode::OK,
        ),
        ep(
            Method::GET,
            "/v1/streams/{s}/sse?after=0",
            None,
            Needs::Read,
            StatusCode::OK,
        ),
        ep(
            Method::GET,
            "/v1/streams/{s}/ui-message-stream",
            None,
            Needs::Read,
            StatusCode::OK,
        ),
        ep(
            Method::GET,
            "/v1/streams?prefix=m:",
            None,
            Needs::Admin,
            StatusCode::OK,
        ),
        ep(Method::GET, "/v1/stats", None, Needs::Admin, StatusCode::OK),
        // The agent's answer to a stop is its own event: `write`, where `control.stop` itself
        // is the server's (reserved) and needs `answer` through `/stop`.
        ep(
            Method::POST,
            "/v1/streams/{s}/events",
            Some(json!({"type":"control.stopped","data":{"stop_seq":1}})),
            Needs::Write,
            StatusCode::CREATED,
        ),
        ep(
            Method::PATCH,
            "/v1/streams/{s}",
            Some(json!({"lease_s":60})),
            Needs::Write,
            StatusCode::OK,
        ),
        ep(
            Method::POST,
            "/v1/streams/{s}/heartbeat",
            None,
            Needs::Write,
            StatusCode::OK,
        ),
        ep(
            Method::POST,
            "/v1/webhooks",
            Some(
                json!({"url":"http://127.0.0.1:9/hook","prefix":"none:","secret":"0123456789abcdef"}),
            ),
            Needs::Admin,
            StatusCode::CREATED,
        ),
        ep(
            Method::GET,
            "/v1/webhooks",
            None,
            Needs::Admin,
            StatusCode::OK,
        ),
        ep(
            Method::DELETE,
            "/v1/streams/{s}",
            None,
            Needs::Admin,
            StatusCode::NO_CONTENT,
        ),
    ]
}

/// A token holding every grant except the one `needs` asks for on `stream`.
fn wrong_grant(needs: Needs, stream: &str) -> String {
    match needs {
        Needs::Read => token(json!({"read":["other:*"], "write":[stream], "answer":[stream]})),
        Needs::Answer => token(json!({"read":[stream], "answer":["other:*"], "write":["other:*"]})),
        Needs::Write => token(json!({"read":[stream], "answer":[stream], "write":["other:*"]})),
        Needs::Admin => token(json!({"read":["*"], "write":["*"], "answer":["*"]})),
    }
}

/// The narrowest token that suffices; reads use a prefix pattern, writes an exact name.
fn right_grant(needs: Needs, stream: &str) -> String {
    match needs {
        Needs::Read => token(json!({"read":["m:*"]})),
        Needs::Answer => token(json!({"answer":[stream]})),
        Needs::Write => token(json!({"write":[stream]})),
        Needs::Admin => token(json!({"admin":true})),
    }
}

async fn expect_problem(res: reqwest::Response, status: StatusCode, code: &str, case: &str) {
    assert_eq!(res.status(), status, "{case}");
    if status == StatusCode::UNAUTHORIZED {
        let challenge = res.headers().get("www-authenticate");
        assert!(challenge.is_some(), "{case}: 401 without WWW-Authenticate");
    }
    let ctype = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert_eq!(ctype, "application/problem+json", "{case}");
    let text = res.text().await.unwrap();
    assert!(!text.contains(MARKER), "{case}: a refused call leaked data");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["code"], code, "{case}: {body}");
    assert!(body.get("events").is_none(), "{case}: {body}");
}

#[backend_test]
async fn every_endpoint_refuses_what_the_token_does_not_grant(db: TestDb) {
    let app = spawn_secured(db).await;
    for (i, ep) in endpoints().iter().enumerate() {
        let stream = format!("m:{i}");
        admin_append(&app, &stream, json!(MARKER)).await;
        let res = call(
            &app,
            Method::POST,
            &format!("/v1/streams/{stream}/inputs"),
            Some(ADMIN),
            Some(&json!({"request_id":"q0","prompt":MARKER})),
        )
        .await;
        assert_eq!(res.status(), StatusCode::CREATED);
        let before = head(&app, &stream).await;
        let path = ep.path.replace("{s}", &stream);
        let bad_signature = token_with(
            "some-other-secret-of-enough-length-000",
            json!({"admin":true,"read":["*"],"write":["*"]}),
        );
        let expired = token(json!({
            "admin": true, "read": ["*"], "write": ["*"], "exp": now_s() - 5
        }));
        let refusals = [
            ("no token", None, StatusCode::UNAUTHORIZED, "unauthorized"),
            (
                "bad signature",
                Some(bad_signature),
                StatusCode::UNAUTHORIZED,
                "unauthorized",
            ),
            (
                "expired",
                Some(expired),
                StatusCode::UNAUTHORIZED,
                "unauthorized",
            ),
            (
                "garbage",
                Some("not.a.jwt".to_owned()),
                StatusCode::UNAUTHORIZED,
                "unauthorized",
            ),
            (
                "wrong grant",
                Some(wrong_grant(ep.needs, &stream)),
                StatusCode::FORBIDDEN,
                "forbidden",
            ),
        ];
        for (case, bearer, status, code) in refusals {
            let case = format!("{} {path}: {case}", ep.method);
            let res = call(
                &app,
                ep.method.clone(),
                &path,
                bearer.as_deref(),
                ep.body.as_ref(),
            )
            .await;
            expect_problem(res, status, code, &case).await;
            assert_eq!(
                head(&app, &stream).await,
                before,
                "{case}: the stream changed"
            );
        }
        let bearer = right_grant(ep.needs, &stream);
        let res = call(
            &app,
            ep.method.clone(),
            &path,
            Some(&bearer),
            ep.body.as_ref(),
        )
        .await;
        let case = format!("{} {path}: right grant", ep.method);
        assert_eq!(res.status(), ep.ok, "{case}");
        if ep.path.ends_with("/sse?after=0") {
            let env = SseClient::new(res).next_envelope().await;
            assert_eq!(env["data"], MARKER);
        } else if ep.path.ends_with("/ui-message-stream") {
            // The stream holds no `ui` event and is open: headers only, the body waits.
            assert_eq!(
                res.headers()["x-vercel-ai-ui-message-stream"],
                "v1",
                "{case}"
            );
        } else if ep.path.ends_with("/presence") {
            // Who follows it (nobody here), never its events.
            let body: Value = res.json().await.unwrap();
            assert_eq!(body["count"], 0, "{case}: {body}");
        } else if ep.needs == Needs::Read && !path.ends_with(&stream) && !path.ends_with("/q0") {
            assert!(res.text().await.unwrap().contains(MARKER), "{case}");
        }
    }
}

#[backend_test]
async fn write_implies_answer_but_not_read_and_admin_token_can_do_everything(db: TestDb) {
    let app = spawn_secured(db).await;
    let writer = token(json!({"write":["run:*"]}));
    let res = call(
        &app,
        Method::POST,
        "/v1/streams/run:1/events",
        Some(&writer),
        Some(&json!({"data":MARKER})),
    )
    .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    // Prefix patterns do not reach past their prefix.
    let res = call(
        &app,
        Method::POST,
        "/v1/streams/runx/events",
        Some(&writer),
        Some(&json!({"data":1})),
    )
    .await;
    expect_problem(res, StatusCode::FORBIDDEN, "forbidden", "runx").await;
    let res = call(
        &app,
        Method::GET,
        "/v1/streams/run:1/events",
        Some(&writer),
        None,
    )
    .await;
    expect_problem(res, StatusCode::FORBIDDEN, "forbidden", "writer reads").await;
    for path in ["/v1/streams/run:1/events", "/v1/streams", "/v1/stats"] {
        let res = call(&app, Method::GET, path, Some(ADMIN), None).await;
        assert_eq!(res.status(), StatusCode::OK, "admin token on {path}");
    }
    // A malformed Authorization header is refused, not ignored in favour of anonymity.
    let res = app
        .client
        .get(app.url("/v1/streams/run:1"))
        .header("authorization", format!("Basic {ADMIN}"))
        .send()
        .await
        .unwrap();
    expect_problem(res, StatusCode::UNAUTHORIZED, "unauthorized", "basic").await;
    // Ops endpoints outside /v1 stay open for probes.
    assert_eq!(app.get("/healthz").await.status(), StatusCode::OK);
}

#[backend_test]
async fn a_query_token_works_for_eventsource_and_is_never_logged(db: TestDb) {
    let logs = LogCapture::start().await;
    let app = spawn_secured(db).await;
    admin_append(&app, "logged:1", json!(MARKER)).await;
    let reader = token(json!({"read":["logged:1"]}));
    let res = app
        .get(&format!("/v1/streams/logged:1/sse?after=0&token={reader}"))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let env = SseClient::new(res).next_envelope().await;
    assert_eq!(env["seq"], 1);
    // A refused token and an unknown route must not be logged either.
    let bad = token_with("x".repeat(40).as_str(), json!({"read":["*"]}));
    let res = app
        .get(&format!("/v1/streams/logged:1/events?token={bad}"))
        .await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let res = app.get(&format!("/nowhere?token={reader}")).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    app.shutdown().await;
    let text = logs.stop();
    assert!(
        text.contains("/v1/streams/logged:1/sse"),
        "the capture saw no request span: {text}"
    );
    assert!(!text.contains(&reader), "a token was logged");
    assert!(!text.contains(&bad), "a refused token was logged");
}

#[backend_test]
async fn an_sse_response_ends_when_its_token_expires(db: TestDb) {
    let app = spawn_secured(db).await;
    admin_append(&app, "exp:1", json!(1)).await;
    // Two to three seconds: long enough to be valid when the request is checked.
    let short = token(json!({"read":["exp:*"], "exp": now_s() + 3}));
    let res = app
        .get(&format!("/v1/streams/exp:1/sse?token={short}"))
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut sse = SseClient::new(res);
    assert_eq!(sse.next_envelope().await["seq"], 1);
    let notice = sse.next().await.expect("a notice before the end");
    assert_eq!(notice.event, "notice");
    let n: Value = serde_json::from_str(&notice.data).unwrap();
    assert_eq!(n["code"], "unauthorized", "{n}");
    assert!(sse.next().await.is_none(), "the response goes on after exp");
    // Reconnecting with the same token is refused; EventSource stops on a 401.
    let res = app
        .get(&format!("/v1/streams/exp:1/sse?token={short}"))
        .await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

#[backend_test]
async fn anonymous_mode_refuses_a_public_address_unless_allowed(db: TestDb) {
    let start = |allow: bool, secret: Option<&str>| {
        let mut config = Config::for_database(db.url());
        config.allow_anonymous = allow;
        config.jwt_secret = secret.map(str::to_owned);
        let db = db.db.clone();
        async move {
            let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
            let app = App::with_db(config, db).await.unwrap();
            let stop = tokio_util::sync::CancellationToken::new();
            let s = stop.clone();
            let serving = tokio::spawn(app.serve(listener, async move { s.cancelled().await }));
            (serving, stop)
        }
    };
    let (serving, _stop) = start(false, None).await;
    let err = tokio::time::timeout(WAIT, serving)
        .await
        .expect("refused at once")
        .unwrap()
        .expect_err("anonymous on 0.0.0.0 must be refused");
    assert!(err.to_string().contains("--allow-anonymous"), "{err}");
    for (allow, secret) in [(true, None), (false, Some(SECRET))] {
        let (serving, stop) = start(allow, secret).await;
        stop.cancel();
        tokio::time::timeout(WAIT, serving)
            .await
            .expect("stopped")
            .unwrap()
            .expect("serves when allowed or secured");
    }
}

#[backend_test]
async fn cors_allows_only_the_configured_origins(db: TestDb) {
    let app = TestApp::spawn_with(db, |c| {
        c.cors_origins = vec!["https://app.example".into()];
    })
    .await;
    let preflight = |origin: &'static str| {
        app.client
            .request(Method::OPTIONS, app.url("/v1/streams/c:1/events"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
    };
    let res = preflight("https://app.example").await.unwrap();
    assert!(res.status().is_success());
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let res = preflight("https://evil.example").await.unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
    let res = app
        .client
        .get(app.url("/v1/streams/c:1/events"))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "https://app.example"
    );
}

/// Collects every log line of the process, at every level, while capturing is on.
///
/// A process-wide subscriber rather than a scoped one: tracing caches per call site whether
/// anyone is interested, and with tests on other threads a scoped subscriber can miss events.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

static CAPTURING: AtomicBool = AtomicBool::new(false);
static CAPTURE: OnceLock<LogCapture> = OnceLock::new();
/// One capturing test at a time: they share the buffer.
static CAPTURE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct Capturing {
    logs: LogCapture,
    _one_at_a_time: tokio::sync::MutexGuard<'static, ()>,
}

impl LogCapture {
    pub async fn start() -> Capturing {
        let guard = CAPTURE_LOCK.lock().await;
        let logs = CAPTURE
            .get_or_init(|| {
                let logs = LogCapture::default();
                let layer = tracing_subscriber::fmt::layer()
                    .with_writer(logs.clone())
                    .with_ansi(false)
                    .with_filter(filter_fn(|_| CAPTURING.load(Ordering::SeqCst)));
                tracing::subscriber::set_global_default(
                    tracing_subscriber::registry()
                        .with(layer)
                        .with(LevelFilter::TRACE),
                )
                .expect("no other global subscriber in the test binary");
                logs
            })
            .clone();
        logs.0.lock().unwrap().clear();
        CAPTURING.store(true, Ordering::SeqCst);
        Capturing {
            logs,
            _one_at_a_time: guard,
        }
    }
}

impl Capturing {
    /// Stops capturing and returns what was logged.
    pub fn stop(self) -> String {
        CAPTURING.store(false, Ordering::SeqCst);
        String::from_utf8_lossy(&self.logs.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogCapture {
    type Writer = LogCapture;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}
