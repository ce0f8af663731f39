//! Keeps `openapi.yaml` true to the server, both ways:
//! - every `.route(path, method(...)...)` in `src/` is a path+method of the spec, and every
//!   path+method of the spec is routed (axum cannot list its routes, so the routes are read
//!   from the source, where the router is built);
//! - every path+method of the spec, requested on a live server, reaches a handler rather than
//!   the router's `not_found` / `method_not_allowed` fallbacks;
//! - the spec's `ErrorCode` enum is exactly the set of codes in `src/error.rs`;
//! - every `$ref` in the spec resolves.
//!
//! Schemathesis (`e2e/run`) checks the shapes of live responses against the same file.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use reqwest::Method;
use serde_json::Value;

use crate::backend::{backend_test, TestDb};
use crate::helpers::TestApp;

const HTTP_METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn spec() -> Value {
    let text = std::fs::read_to_string(root().join("openapi.yaml")).expect("read openapi.yaml");
    serde_norway::from_str(&text).expect("openapi.yaml is valid YAML")
}

/// (METHOD, path) of every operation in the spec.
fn spec_routes(spec: &Value) -> BTreeSet<(String, String)> {
    let paths = spec["paths"].as_object().expect("spec has paths");
    let mut out = BTreeSet::new();
    for (path, item) in paths {
        let item = item.as_object().expect("path item is an object");
        for method in item.keys().filter(|k| HTTP_METHODS.contains(&k.as_str())) {
            out.insert((method.to_uppercase(), path.clone()));
        }
    }
    out
}

/// (METHOD, path) of every `.route(...)` call in the Rust sources under `dir`.
fn source_routes(dir: &Path) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for file in rust_files(dir) {
        let text = std::fs::read_to_string(&file).expect("read source");
        let code = strip_line_comments(&text);
        for unsupported in [
            ".nest(",
            ".nest_service(",
            ".route_service(",
            ".fallback_service(",
        ] {
            assert!(
                !code.contains(unsupported),
                "{}: `{unsupported}` adds routes this test cannot see; teach source_routes() \
                 about it so openapi.yaml stays checked",
                file.display()
            );
        }
        for (method, path) in routes_in(&code) {
            let fresh = out.insert((method.clone(), path.clone()));
            assert!(
                fresh,
                "{method} {path} is routed twice ({})",
                file.display()
            );
        }
    }
    out
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Drops `//` comments (doc comments may show `.route(` in examples) outside string literals.
fn strip_line_comments(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut in_str = false;
        let mut prev = ' ';
        let mut cut = line.len();
        for (i, c) in line.char_indices() {
            match c {
                '"' if prev != '\\' => in_str = !in_str,
                '/' if !in_str && prev == '/' => {
                    cut = i - 1;
                    break;
                }
                _ => {}
            }
            prev = if prev == '\\' && c == '\\' { ' ' } else { c };
        }
        out.push_str(&line[..cut]);
        out.push('\n');
    }
    out
}

/// Parses `.route("path", get(h).post(h2))` calls: the path literal, then the method names
/// called at the top level of the second argument.
fn routes_in(code: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        let open = rest
            .find('"')
            .expect(".route( is followed by a path literal");
        assert!(
            rest[..open].trim().is_empty(),
            ".route( must take a string literal path: {}",
            &rest[..rest.len().min(80)]
        );
        let after_open = &rest[open + 1..];
        let close = after_open.find('"').expect("path literal ends");
        let path = after_open[..close].to_owned();
        let args = &after_open[close + 1..];
        let comma = args.find(',').expect(".route(path, method_router)");
        let router_expr = balanced_until_close(&args[comma + 1..]);
        let methods = top_level_calls(router_expr);
        assert!(!methods.is_empty(), "no method found for route {path}");
        for m in methods {
            assert!(
                HTTP_METHODS.contains(&m.as_str()),
                "route {path}: `{m}(...)` is not a single HTTP method (e.g. `any`); \
                 list methods explicitly so openapi.yaml can describe them"
            );
            out.push((m.to_uppercase(), path.clone()));
        }
        rest = args;
    }
    out
}

/// The text up to the `)` that closes the enclosing call.
fn balanced_until_close(s: &str) -> &str {
    let mut depth = 0i32;
    let mut in_str = false;
    let mut prev = ' ';
    for (i, c) in s.char_indices() {
        match c {
            '"' if prev != '\\' => in_str = !in_str,
            '(' | '[' | '{' if !in_str => depth += 1,
            ')' | ']' | '}' if !in_str => {
                if depth == 0 {
                    return &s[..i];
                }
                depth -= 1;
            }
            _ => {}
        }
        prev = c;
    }
    panic!("unbalanced route expression: {s}");
}

/// Names of the functions and methods called at nesting depth 0: `get(a).post(b)` -> get, post.
fn top_level_calls(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut in_str = false;
    let mut ident = String::new();
    let mut prev = ' ';
    for c in expr.chars() {
        match c {
            '"' if prev != '\\' => in_str = !in_str,
            _ if in_str => {}
            '(' => {
                if depth == 0 && !ident.is_empty() {
                    out.push(std::mem::take(&mut ident));
                }
                depth += 1;
            }
            ')' => depth -= 1,
            c if c.is_alphanumeric() || c == '_' => {
                if depth == 0 {
                    ident.push(c);
                }
            }
            ':' if depth == 0 => ident.clear(), // `routing::get(` -> get
            _ => ident.clear(),
        }
        prev = c;
    }
    out
}

fn diff(a: &BTreeSet<(String, String)>, b: &BTreeSet<(String, String)>) -> Vec<String> {
    a.difference(b).map(|(m, p)| format!("{m} {p}")).collect()
}

#[test]
fn every_routed_path_and_method_is_in_the_spec_and_vice_versa() {
    let spec = spec_routes(&spec());
    let routed = source_routes(&root().join("src"));
    let undocumented = diff(&routed, &spec);
    let unrouted = diff(&spec, &routed);
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "openapi.yaml and the router disagree.\n  routed but not in openapi.yaml: {undocumented:?}\n  \
         in openapi.yaml but not routed: {unrouted:?}"
    );
}

#[test]
fn the_route_parser_reads_chained_and_multiline_method_routers() {
    let code = r#"
        Router::new()
            .route("/a", get(one))
            .route(
                "/b/{x}",
                get(two).delete(|| async { three(")") }),
            )
            .route("/c", routing::post(four).put(five))
    "#;
    let found = routes_in(code);
    let want: Vec<(String, String)> = [
        ("GET", "/a"),
        ("GET", "/b/{x}"),
        ("DELETE", "/b/{x}"),
        ("POST", "/c"),
        ("PUT", "/c"),
    ]
    .iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    assert_eq!(found, want);
}

#[test]
fn error_codes_in_the_spec_are_those_of_error_rs() {
    let text = std::fs::read_to_string(root().join("src/error.rs")).expect("read error.rs");
    let start = text
        .find("pub fn code(&self)")
        .expect("error.rs has fn code");
    let body = &text[start..];
    let body = &body[..body[1..]
        .find("\n    pub fn ")
        .map_or(body.len(), |i| i + 1)];
    let body = &body[..body.find("\n    fn ").unwrap_or(body.len())];
    let in_source: BTreeSet<String> = body
        .split("=> \"")
        .skip(1)
        .map(|s| s[..s.find('"').expect("code literal ends")].to_owned())
        .collect();
    assert!(in_source.len() > 10, "parsed codes: {in_source:?}");
    let in_spec: BTreeSet<String> = spec()["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("ErrorCode enum")
        .iter()
        .map(|v| v.as_str().expect("code is a string").to_owned())
        .collect();
    let missing: Vec<_> = in_source.difference(&in_spec).collect();
    let extra: Vec<_> = in_spec.difference(&in_source).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "ErrorCode in openapi.yaml drifted from src/error.rs.\n  missing from the spec: \
         {missing:?}\n  in the spec only: {extra:?}"
    );
}

#[test]
fn every_ref_in_the_spec_resolves() {
    fn walk(v: &Value, spec: &Value, bad: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    let ok = r.strip_prefix('#').and_then(|p| spec.pointer(p)).is_some();
                    if !ok {
                        bad.push(r.clone());
                    }
                }
                m.values().for_each(|x| walk(x, spec, bad));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, spec, bad)),
            _ => {}
        }
    }
    let spec = spec();
    let mut bad = Vec::new();
    walk(&spec, &spec, &mut bad);
    assert!(bad.is_empty(), "unresolved $refs: {bad:?}");
}

/// Fills path templates with values that pass validation, so the request reaches a handler.
fn concrete(path: &str) -> String {
    path.replace("{stream}", "contract-check")
        .replace("{request_id}", "contract-check-request")
        .replace("{file}", "app.js")
}

#[backend_test]
async fn every_spec_operation_reaches_a_handler(db: TestDb) {
    let app = TestApp::spawn(db).await;
    let mut fell_through = Vec::new();
    for (method, path) in spec_routes(&spec()) {
        let method = Method::from_bytes(method.as_bytes()).expect("method");
        let res = app
            .client
            .request(method.clone(), app.url(&concrete(&path)))
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .expect("request");
        let status = res.status();
        let is_problem = res
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
        // Endless responses (SSE) are judged by their headers alone; so is HEAD, which has no
        // body to read (a method the router does not serve is 405 there).
        if method == Method::HEAD {
            if status == reqwest::StatusCode::METHOD_NOT_ALLOWED {
                fell_through.push(format!("{method} {path} -> {status}"));
            }
        } else if is_problem {
            let body: Value = res.json().await.expect("problem+json body");
            let code = body["code"].as_str().unwrap_or_default();
            if code == "not_found" || code == "method_not_allowed" {
                fell_through.push(format!("{method} {path} -> {status} {code}"));
            }
        }
    }
    assert!(
        fell_through.is_empty(),
        "operations in openapi.yaml that the router does not serve: {fell_through:#?}"
    );
}

/// Found by schemathesis: a NUL in a query parameter reached PostgreSQL (whose text cannot
/// hold NUL) and came back as a 500.
#[backend_test]
async fn a_nul_in_list_parameters_is_a_clear_400(db: TestDb) {
    let app = TestApp::spawn(db).await;
    for query in ["prefix=a%00b", "after_name=%00"] {
        let res = app.get(&format!("/v1/streams?{query}")).await;
        assert_eq!(res.status(), 400, "{query}");
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["code"], "invalid_parameter", "{query}");
    }
}
