//! What this binary is: its version, the commit it was built from and when (set by
//! `build.rs`; the commit is "unknown" when built outside a git checkout).

/// The crate's version, e.g. `0.1.0`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The short commit hash, or `unknown`.
pub const COMMIT: &str = env!("TAILCAST_COMMIT");
/// The build day, `YYYY-MM-DD` (UTC).
pub const BUILD_DATE: &str = env!("TAILCAST_BUILD_DATE");
/// What `tailcast --version` prints after the name.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TAILCAST_COMMIT"),
    ", built ",
    env!("TAILCAST_BUILD_DATE"),
    ")"
);
