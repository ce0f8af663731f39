//! Webhooks over TLS: real HTTPS receivers whose certificates (for 127.0.0.1 and localhost)
//! are made at test time by a private CA given to tailcast as `webhook_ca_file`. One trusted
//! receiver gets every event signed and in order; one whose certificate chains to a CA
//! tailcast does not trust gets nothing, and its webhook shows a failing stream whose
//! `last_error` names the certificate, while the node goes on serving.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::backend::{backend_test, TestDb};
use crate::helpers::{wait_until, TestApp};
use crate::webhooks::{check_inbox, receiver, register, Inbox, SECRET};

/// A private certificate authority.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server configuration presenting a certificate for 127.0.0.1 and localhost.
    fn server_config(&self) -> rustls::ServerConfig {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap()
    }
}

/// Accepts TCP connections and completes their TLS handshakes; a failed handshake (the
/// client refusing the certificate) is counted and passed over.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    handshake_failures: Arc<std::sync::atomic::AtomicUsize>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            match self.acceptor.accept(tcp).await {
                Ok(tls) => return (tls, addr),
                Err(_) => {
                    self.handshake_failures
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// An HTTPS receiver with a certificate from `ca`: its URL, its inbox, and how many TLS
/// handshakes failed.
async fn start_https_receiver(
    ca: &Ca,
    host: &str,
) -> (
    String,
    Arc<std::sync::Mutex<Inbox>>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let (app, inbox) = receiver(0, Duration::ZERO);
    let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let handshake_failures = Arc::default();
    let listener = TlsListener {
        tcp,
        acceptor: TlsAcceptor::from(Arc::new(ca.server_config())),
        handshake_failures: Arc::clone(&handshake_failures),
    };
    tokio::spawn(async move { axum::serve(listener, app).await });
    (
        format!("https://{host}:{port}/hook"),
        inbox,
        handshake_failures,
    )
}

#[backend_test]
async fn https_webhooks_deliver_to_a_trusted_ca_and_fail_on_an_untrusted_certificate(db: TestDb) {
    let trusted = Ca::new("tailcast test CA");
    let stranger = Ca::new("a CA tailcast does not trust");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, trusted.pem()).unwrap();
    let app = TestApp::spawn_with(db, |c| {
        c.webhook_poll_ms = 20;
        c.webhook_retry_ms = 20;
        c.webhook_retry_max_ms = 100;
        c.webhook_ca_file = Some(ca_file.clone());
    })
    .await;
    // By IP address and by name: the certificate names both.
    let (by_ip, ip_inbox, _) = start_https_receiver(&trusted, "127.0.0.1").await;
    let (by_name, name_inbox, _) = start_https_receiver(&trusted, "localhost").await;
    let (untrusted, untrusted_inbox, refused) = start_https_receiver(&stranger, "127.0.0.1").await;
    for url in [&by_ip, &by_name] {
        register(
            &app.client,
            &app.base,
            json!({"url": url, "prefix": "tls:", "secret": SECRET}),
        )
        .await;
    }
    let bad = register(
        &app.client,
        &app.base,
        json!({"url": untrusted, "prefix": "tls:", "secret": SECRET}),
    )
    .await;
    assert_eq!(bad["url"], untrusted.as_str());

    let mut expected: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for i in 0..20 {
        for s in ["tls:a", "tls:b"] {
            let res = app.append(s, json!({"data": i})).await;
            expected
                .entry(s.to_owned())
                .or_default()
                .push(res["first_seq"].as_i64().unwrap());
        }
    }
    let total: usize = expected.values().map(Vec::len).sum();
    for inbox in [&ip_inbox, &name_inbox] {
        wait_until("every event delivered over TLS", || async {
            let inbox = inbox.lock().unwrap();
            inbox.received.len() >= total
        })
        .await;
        // Signed, in seq order per stream, none skipped.
        check_inbox(&inbox.lock().unwrap(), &expected);
    }

    // The untrusted receiver: handshakes refused by tailcast, no request ever reached it,
    // and the admin view says why.
    let id = bad["id"].as_str().unwrap().to_owned();
    wait_until("the untrusted webhook reported failing", || async {
        let w = app.get_json(&format!("/v1/webhooks/{id}")).await;
        w["failing_streams"].as_i64().unwrap_or_default() >= 1
            && w["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("certificate"))
    })
    .await;
    let w = app.get_json(&format!("/v1/webhooks/{id}")).await;
    let error = w["last_error"].as_str().unwrap();
    assert!(error.contains("UnknownIssuer"), "{w}");
    assert!(
        refused.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "no TLS handshake reached the untrusted receiver"
    );
    {
        let inbox = untrusted_inbox.lock().unwrap();
        assert_eq!(inbox.requests, 0);
        assert!(inbox.received.is_empty());
    }
    // The node goes on: appends commit and the trusted webhooks deliver them.
    let res = app.append("tls:a", json!({"data": "after"})).await;
    expected
        .get_mut("tls:a")
        .unwrap()
        .push(res["first_seq"].as_i64().unwrap());
    wait_until("the later event delivered", || async {
        ip_inbox.lock().unwrap().received.len() > total
    })
    .await;
    check_inbox(&ip_inbox.lock().unwrap(), &expected);
    assert_eq!(app.get("/healthz").await.status(), reqwest::StatusCode::OK);
}
