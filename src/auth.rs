//! Who is calling, and what they may do. Every handler takes a `Principal` and checks the
//! grant its action needs against the stream it touches, before touching anything.
//!
//! Grants (README "Auth and limits"): `read` (subscribe, replay, snapshot), `answer` (answer input
//! requests, send stop), `write` (append, close, create input requests; implies `answer`),
//! `admin` (list all streams, delete, stats; implies everything).
//!
//! Credentials are HS256 JWTs signed with `--jwt-secret` and the static `--admin-token`. With
//! neither configured everyone is an anonymous caller with every grant, which is why
//! [`check_listen`] refuses a non-loopback address in that mode.
//!
//! A token is taken from `Authorization: Bearer …` or, for `EventSource` and browser
//! WebSockets (which cannot set headers), from `?token=`. It is never logged and never echoed
//! in an error.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Uri};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::app::AppState;
use crate::config::Config;
use crate::error::Error;
use crate::log::StreamName;
use crate::net::PeerAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    Read,
    Answer,
    Write,
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Grant::Read => "read",
            Grant::Answer => "answer",
            Grant::Write => "write",
        })
    }
}

/// A stream name (`run:42`) or a prefix pattern (`run:*`; `*` alone matches every stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    pub fn parse(raw: &str) -> Pattern {
        match raw.strip_suffix('*') {
            Some(prefix) => Pattern::Prefix(prefix.to_owned()),
            None => Pattern::Exact(raw.to_owned()),
        }
    }

    pub fn matches(&self, stream: &str) -> bool {
        match self {
            Pattern::Exact(name) => name == stream,
            Pattern::Prefix(prefix) => stream.starts_with(prefix.as_str()),
        }
    }
}

/// The per-stream grants a token carries.
#[derive(Debug, Default)]
pub struct Grants {
    pub read: Vec<Pattern>,
    pub answer: Vec<Pattern>,
    pub write: Vec<Pattern>,
    pub admin: bool,
}

impl Grants {
    fn allows(&self, grant: Grant, stream: &str) -> bool {
        let any = |ps: &[Pattern]| ps.iter().any(|p| p.matches(stream));
        self.admin
            || match grant {
                Grant::Read => any(&self.read),
                Grant::Answer => any(&self.answer) || any(&self.write),
                Grant::Write => any(&self.write),
            }
    }
}

#[derive(Debug, Clone)]
enum Access {
    /// Anonymous (no credentials configured) or the admin token.
    All,
    Scoped(Arc<Grants>),
}

/// The caller's identity and grants.
#[derive(Clone)]
pub struct Principal {
    /// `None` when no credentials are configured: everyone may do everything.
    subject: Option<String>,
    access: Access,
    /// The token's `exp`, in seconds since the epoch.
    exp: Option<u64>,
    /// Where this caller's publishes are counted, if publishing is rate-limited.
    publish: Option<(Arc<PublishRate>, Arc<str>)>,
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Principal")
            .field("subject", &self.subject)
            .field("access", &self.access)
            .field("exp", &self.exp)
            .finish_non_exhaustive()
    }
}

impl Principal {
    /// The caller when the server runs without credentials.
    pub fn anonymous() -> Self {
        Principal {
            subject: None,
            access: Access::All,
            exp: None,
            publish: None,
        }
    }

    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    /// When this caller's token stops being valid; `None` for a token that never expires.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.exp.map(|s| UNIX_EPOCH + Duration::from_secs(s))
    }

    /// The instant a long-lived connection (SSE, WebSocket) must lose this caller's access.
    pub fn expiry_deadline(&self) -> Option<tokio::time::Instant> {
        let at = self.expires_at()?;
        let left = at.duration_since(SystemTime::now()).unwrap_or_default();
        Some(tokio::time::Instant::now() + left)
    }

    /// Resolves when the token expires; never, for one without `exp`.
    pub async fn expired(&self) {
        match self.expiry_deadline() {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }

    fn check_fresh(&self) -> Result<(), Error> {
        match self.expires_at() {
            Some(at) if SystemTime::now() >= at => {
                Err(Error::Unauthorized("the token has expired".into()))
            }
            _ => Ok(()),
        }
    }

    /// `Ok` if this caller holds `grant` on `stream`, else 403 `forbidden` (401 `unauthorized`
    /// once the token has expired, which matters on long-lived WebSockets).
    ///
    /// A `Write` check is a publish (append, close, input request): it also takes one unit
    /// from the caller's publish-rate bucket, 429 `rate_limited` with `Retry-After` when empty.
    pub fn check(&self, grant: Grant, stream: &StreamName) -> Result<(), Error> {
        self.check_fresh()?;
        if let Access::Scoped(grants) = &self.access {
            if !grants.allows(grant, stream.as_str()) {
                return Err(Error::Forbidden(format!(
                    "this token does not grant {grant} on stream {:?}",
                    stream.as_str()
                )));
            }
        }
        if grant == Grant::Write {
            if let Some((rate, key)) = &self.publish {
                rate.take(key)?;
            }
        }
        Ok(())
    }

    /// `Ok` if this caller is an admin, else 403 `forbidden`.
    pub fn check_admin(&self) -> Result<(), Error> {
        self.check_fresh()?;
        match &self.access {
            Access::All => Ok(()),
            Access::Scoped(g) if g.admin => Ok(()),
            Access::Scoped(_) => Err(Error::Forbidden("this action needs an admin token".into())),
        }
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, Error> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<PeerAddr>>()
            .map(|c| c.0 .0);
        app.auth.authenticate(&parts.headers, &parts.uri, peer)
    }
}

/// The JWT claims tailcast reads; any others (`iat`, `aud`, …) are ignored.
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    /// Required; optional here only so that a token without it gets "no exp claim" from the
    /// validation rather than a generic "malformed claims".
    exp: Option<u64>,
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    answer: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
    #[serde(default)]
    admin: bool,
}

/// Turns request credentials into a [`Principal`]. Built once from the configuration.
pub struct Authenticator {
    jwt: Option<(DecodingKey, Validation)>,
    admin_token: Option<String>,
    publish: Option<Arc<PublishRate>>,
}

impl Authenticator {
    pub fn from_config(config: &Config) -> anyhow::Result<Authenticator> {
        check_credentials(config)?;
        let jwt = match config.jwt_secret.as_deref() {
            None => None,
            Some("") => anyhow::bail!("--jwt-secret / TAILCAST_JWT_SECRET is set but empty"),
            Some(secret) => {
                if secret.len() < 32 {
                    tracing::warn!(
                        "the JWT secret is shorter than 32 bytes; HS256 wants at least 256 bits"
                    );
                }
                let mut v = Validation::new(Algorithm::HS256);
                // Access ends exactly at `exp`, as the README promises for long-lived connections.
                v.leeway = 0;
                v.validate_aud = false;
                v.validate_nbf = true;
                v.set_required_spec_claims(&["exp"]);
                Some((DecodingKey::from_secret(secret.as_bytes()), v))
            }
        };
        let admin_token = match config.admin_token.as_deref() {
            None => None,
            Some("") => anyhow::bail!("--admin-token / TAILCAST_ADMIN_TOKEN is set but empty"),
            Some(t) => Some(t.to_owned()),
        };
        let publish = (config.publish_rate > 0.0).then(|| {
            Arc::new(PublishRate::new(
                config.publish_rate,
                config.publish_burst.max(1) as f64,
            ))
        });
        Ok(Authenticator {
            jwt,
            admin_token,
            publish,
        })
    }

    /// True when no credentials are configured and every caller is anonymous.
    pub fn is_anonymous(&self) -> bool {
        self.jwt.is_none() && self.admin_token.is_none()
    }

    /// The caller of a request with these headers and URI, from this peer.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
        peer: Option<SocketAddr>,
    ) -> Result<Principal, Error> {
        if self.is_anonymous() {
            let key = peer.map_or_else(|| "anonymous".to_owned(), |p| format!("ip:{}", p.ip()));
            return Ok(self.with_rate(Principal::anonymous(), key));
        }
        let token = bearer_token(headers, uri)?
            .ok_or_else(|| Error::Unauthorized("a bearer token is required".into()))?;
        if let Some(admin) = &self.admin_token {
            if constant_time_eq(token.as_bytes(), admin.as_bytes()) {
                let who = Principal {
                    subject: Some("admin".into()),
                    ..Principal::anonymous()
                };
                return Ok(self.with_rate(who, "admin".into()));
            }
        }
        let Some((key, validation)) = &self.jwt else {
            return Err(Error::Unauthorized("the token is not valid".into()));
        };
        let claims = jsonwebtoken::decode::<Claims>(&token, key, validation)
            .map_err(|e| Error::Unauthorized(jwt_problem(e.kind()).into()))?
            .claims;
        let grants = Grants {
            read: claims.read.iter().map(|p| Pattern::parse(p)).collect(),
            answer: claims.answer.iter().map(|p| Pattern::parse(p)).collect(),
            write: claims.write.iter().map(|p| Pattern::parse(p)).collect(),
            admin: claims.admin,
        };
        let rate_key = match &claims.sub {
            Some(sub) => format!("sub:{sub}"),
            None => {
                let mut h = DefaultHasher::new();
                token.hash(&mut h);
                format!("token:{:x}", h.finish())
            }
        };
        let who = Principal {
            subject: claims.sub,
            access: Access::Scoped(Arc::new(grants)),
            exp: claims.exp,
            publish: None,
        };
        // A token valid now may still have expired by the time a handler checks it; that is
        // what `check_fresh` is for.
        Ok(self.with_rate(who, rate_key))
    }

    fn with_rate(&self, mut who: Principal, key: String) -> Principal {
        who.publish = self.publish.clone().map(|r| (r, key.into()));
        who
    }
}

/// What went wrong with a JWT, in words safe to show (never the token itself).
fn jwt_problem(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired",
        ErrorKind::InvalidSignature => "the token's signature is not valid",
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            "only HS256 tokens are accepted"
        }
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)",
        ErrorKind::MissingRequiredClaim(_) => "the token has no exp claim",
        ErrorKind::Json(_) => "the token's claims are malformed (grants are arrays of strings)",
        _ => "the token is malformed",
    }
}

/// The token from `Authorization: Bearer …`, else from `?token=`.
fn bearer_token(headers: &HeaderMap, uri: &Uri) -> Result<Option<String>, Error> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().unwrap_or_default();
        let token = v
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Error::Unauthorized("the Authorization header must be `Bearer <token>`".into())
            })?;
        return Ok(Some(token.to_owned()));
    }
    Ok(query_token(uri))
}

fn query_token(uri: &Uri) -> Option<String> {
    #[derive(Deserialize)]
    struct TokenParam {
        token: Option<String>,
    }
    // A query that does not parse is the handler's to reject; here it just holds no token.
    axum::extract::Query::<TokenParam>::try_from_uri(uri)
        .ok()
        .and_then(|q| q.0.token)
        .filter(|t| !t.is_empty())
}

/// Compares without an early exit, so the time taken does not reveal how much of the admin
/// token a guess got right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A token bucket per caller: `rate` publishes per second, bursts up to `burst`.
pub struct PublishRate {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<Arc<str>, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

/// Past this many callers, idle (full) buckets are dropped so the map cannot grow unbounded.
const MAX_IDLE_BUCKETS: usize = 10_000;

impl PublishRate {
    pub fn new(rate: f64, burst: f64) -> Self {
        PublishRate {
            rate,
            burst,
            buckets: Mutex::default(),
        }
    }

    pub fn take(&self, key: &Arc<str>) -> Result<(), Error> {
        let now = std::time::Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() > MAX_IDLE_BUCKETS {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let b = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - b.tokens) / self.rate;
            Err(Error::RateLimited {
                retry_after_s: wait.ceil().max(1.0) as u64,
            })
        }
    }
}

/// Refuses to serve everyone anonymously on an address reachable from other machines.
/// Refuses credentials that are set but empty (a typo in a deployment, not "no auth"), before
/// anything else starts.
pub fn check_credentials(config: &Config) -> anyhow::Result<()> {
    if config.jwt_secret.as_deref() == Some("") {
        anyhow::bail!(
            "--jwt-secret / TAILCAST_JWT_SECRET is set but empty: give it a random secret of at \
             least 32 bytes (e.g. `openssl rand -hex 32`), or unset it"
        );
    }
    if config.admin_token.as_deref() == Some("") {
        anyhow::bail!(
            "--admin-token / TAILCAST_ADMIN_TOKEN is set but empty: give it a long random value, \
             or unset it"
        );
    }
    Ok(())
}

pub fn check_listen(config: &Config, addr: SocketAddr) -> anyhow::Result<()> {
    let anonymous = config.jwt_secret.is_none() && config.admin_token.is_none();
    if anonymous && !addr.ip().is_loopback() && !config.allow_anonymous {
        anyhow::bail!(
            "refusing to listen on {addr} without credentials: anyone who can reach it could \
             read and write every stream. Set --jwt-secret / TAILCAST_JWT_SECRET or \
             --admin-token / TAILCAST_ADMIN_TOKEN, listen on a loopback address, or pass \
             --allow-anonymous / TAILCAST_ALLOW_ANONYMOUS=true to accept this"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_exact_names_and_prefixes() {
        assert!(Pattern::parse("run:42").matches("run:42"));
        assert!(!Pattern::parse("run:42").matches("run:421"));
        assert!(Pattern::parse("run:*").matches("run:421"));
        assert!(!Pattern::parse("run:*").matches("job:1"));
        assert!(Pattern::parse("*").matches("anything"));
    }

    #[test]
    fn write_implies_answer_and_admin_implies_all() {
        let g = Grants {
            write: vec![Pattern::parse("w:*")],
            ..Grants::default()
        };
        assert!(g.allows(Grant::Answer, "w:1"));
        assert!(!g.allows(Grant::Read, "w:1"));
        let admin = Grants {
            admin: true,
            ..Grants::default()
        };
        assert!(admin.allows(Grant::Read, "x") && admin.allows(Grant::Write, "x"));
    }

    #[test]
    fn bucket_refuses_past_the_burst_and_says_when_to_retry() {
        let r = PublishRate::new(0.5, 2.0);
        let k: Arc<str> = "k".into();
        assert!(r.take(&k).is_ok());
        assert!(r.take(&k).is_ok());
        match r.take(&k) {
            Err(Error::RateLimited { retry_after_s }) => assert_eq!(retry_after_s, 2),
            other => panic!("expected rate_limited, got {other:?}"),
        }
        assert!(r.take(&"other".into()).is_ok());
    }

    #[test]
    fn constant_time_eq_compares_whole_values() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
