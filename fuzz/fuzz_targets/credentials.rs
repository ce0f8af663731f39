//! Token extraction and verification: nothing but the configured credentials gets in.
#![no_main]

use axum::http::{HeaderMap, HeaderValue, Uri};
use libfuzzer_sys::fuzz_target;
use tailcast::auth::Authenticator;
use tailcast::Config;

fuzz_target!(|input: (&[u8], &str)| {
    let (authorization, query) = input;
    let mut config = Config::for_database("postgres://unused");
    config.jwt_secret = Some("fuzzing-secret-of-a-sensible-length-000".into());
    config.admin_token = Some("fuzzing-admin-token".into());
    let auth = Authenticator::from_config(&config).unwrap();
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_bytes(authorization) {
        headers.insert("authorization", v);
    }
    let Ok(uri) = format!("/v1/streams?{query}").parse::<Uri>() else {
        return;
    };
    if let Ok(who) = auth.authenticate(&headers, &uri, None) {
        // Only the admin token can pass without a signature the fuzzer cannot forge.
        assert_eq!(who.subject(), Some("admin"));
    }
});
