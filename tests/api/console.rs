//! The web console's static files: served from the binary with the right types and caching.

use reqwest::{header, redirect, StatusCode};

use crate::backend::{backend_test, TestDb};
use crate::helpers::TestApp;

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(redirect::Policy::none())
        .timeout(crate::helpers::WAIT)
        .build()
        .unwrap()
}

#[backend_test]
async fn console_index_and_assets(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let client = no_redirects();

    // Without the slash the page's relative URLs would resolve against `/`.
    let res = client.get(app.url("/console")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(res.headers()[header::LOCATION], "/console/");

    let res = client.get(app.url("/console/")).send().await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let h = res.headers().clone();
    assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
    assert_eq!(h[header::CACHE_CONTROL], "no-cache");
    assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    let csp = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let html = res.text().await.unwrap();

    // Every file the page and its modules name is embedded, with its content type.
    let app_js = app.get("/console/app.js").await.text().await.unwrap();
    let mut wanted: Vec<String> = Vec::new();
    for text in [&html, &app_js] {
        for part in text.split("\"/console/").skip(1) {
            wanted.push(part.split('"').next().unwrap().to_owned());
        }
    }
    assert!(wanted.len() >= 6, "{wanted:?}");
    for file in wanted {
        let res = app.get(&format!("/console/{file}")).await;
        assert_eq!(res.status(), StatusCode::OK, "{file}");
        let ct = res.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .to_owned();
        let expected = match file.rsplit('.').next().unwrap() {
            "js" => "text/javascript; charset=utf-8",
            "css" => "text/css; charset=utf-8",
            "svg" => "image/svg+xml",
            other => panic!("unexpected asset type {other}"),
        };
        assert_eq!(ct, expected, "{file}");
    }

    // The console runs the very client published in clients/js.
    let served = app.get("/console/tailcast.js").await.bytes().await.unwrap();
    let on_disk = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/js/tailcast.js"
    ))
    .unwrap();
    assert_eq!(served.as_ref(), on_disk.as_slice());
}

#[backend_test]
async fn console_revalidates_by_etag(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let first = app.get("/console/style.css").await;
    let etag = first.headers()[header::ETAG].clone();
    assert!(etag.to_str().unwrap().starts_with('"'));
    let body = first.bytes().await.unwrap();
    assert!(!body.is_empty());

    let res = app
        .client
        .get(app.url("/console/style.css"))
        .header(header::IF_NONE_MATCH, etag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(res.headers()[header::ETAG], etag);
    assert!(res.bytes().await.unwrap().is_empty());

    // Another file's validator does not match this one.
    let other = app.get("/console/app.js").await.headers()[header::ETAG].clone();
    assert_ne!(other, etag);
    let res = app
        .client
        .get(app.url("/console/style.css"))
        .header(header::IF_NONE_MATCH, other)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
}

#[backend_test]
async fn console_unknown_file_is_a_problem(db: TestDb) {
    let app = TestApp::spawn(db).await;
    for path in [
        "/console/nope.js",
        "/console/..%2Fsrc%2Fmain.rs",
        "/console/index.html.bak",
    ] {
        let res = app.get(path).await;
        assert_eq!(res.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["code"], "not_found");
    }
}
