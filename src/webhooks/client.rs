//! The HTTP client every delivery of a node shares: timeouts, redirects off, connection reuse,
//! and TLS for `https://` endpoints. An endpoint's certificate must chain to a root of the
//! system's trust store (read once at start-up through rustls-native-certs, so the
//! operator's `update-ca-certificates` applies) or of `--webhook-ca-file`, for endpoints
//! behind a private CA. Built before the database is opened: a CA file that cannot be used
//! stops the start-up with its path, rather than failing every delivery later.

use std::error::Error as _;

use anyhow::Context;

use crate::config::Config;

/// The client for webhook deliveries, as configured.
pub fn build(config: &Config) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .timeout(config.webhook_timeout())
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tailcast/", env!("CARGO_PKG_VERSION")));
    let ca_file = config.webhook_ca_file.as_deref();
    if let Some(path) = ca_file {
        for root in extra_roots(path)? {
            builder = builder.add_root_certificate(root);
        }
    }
    builder.build().map_err(|e| match ca_file {
        // The roots are parsed here: a PEM block that is not an X.509 certificate fails now.
        Some(path) => anyhow::anyhow!(
            "--webhook-ca-file (TAILCAST_WEBHOOK_CA_FILE) {}: not usable as trusted roots: {}",
            path.display(),
            chain(&e)
        ),
        None => anyhow::anyhow!("cannot build the webhook HTTP client: {}", chain(&e)),
    })
}

/// The certificates of a PEM bundle; at least one.
fn extra_roots(path: &std::path::Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let flag = "--webhook-ca-file (TAILCAST_WEBHOOK_CA_FILE)";
    let pem = std::fs::read(path).with_context(|| format!("{flag} {}", path.display()))?;
    let roots = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| anyhow::anyhow!("{flag} {}: {}", path.display(), chain(&e)))?;
    if roots.is_empty() {
        anyhow::bail!(
            "{flag} {}: no PEM certificate in it (expected -----BEGIN CERTIFICATE----- blocks)",
            path.display()
        );
    }
    Ok(roots)
}

/// An error with its causes: reqwest's own message names only the URL, while the reason
/// (refused, timed out, `invalid peer certificate: UnknownIssuer`) is in its sources.
pub fn chain(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        source = s.source();
    }
    out
}
