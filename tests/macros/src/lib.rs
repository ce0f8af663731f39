//! `#[backend_test]`: one integration test body, run once per event-log backend.
//!
//! ```ignore
//! #[backend_test]
//! async fn appends_are_gap_free(db: TestDb) { /* … */ }
//! ```
//! keeps the function as written and adds a module of the same name (modules and functions
//! live in different namespaces) holding one test per backend:
//! - `appends_are_gap_free::postgres`: `#[sqlx::test(migrations = false)]`, a fresh PostgreSQL
//!   database per test, handed over as `TestDb::postgres(pool).await`;
//! - `appends_are_gap_free::sqlite`: `#[tokio::test(flavor = "multi_thread")]`, a fresh SQLite
//!   file in a temporary directory per test, from `TestDb::sqlite().await`.
//!
//! So `cargo test sqlite` or `cargo test postgres` picks a backend. `#[backend_test(postgres)]`
//! generates only the `postgres` test, for tests that need PostgreSQL itself (several nodes,
//! LISTEN/NOTIFY, killing backends). `TestDb` is whatever type the argument is declared with,
//! resolved in the test's own module; the migrations are the application's to run (App does
//! at start-up), so each backend starts from an empty database.
//!
//! `#[ignore]` and `#[should_panic]` on the function move to the generated tests; other
//! attributes (doc comments, lint levels) stay on the function.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as Tokens;
use quote::quote;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::{parse_macro_input, FnArg, Ident, ItemFn, Token};

/// The backends a test runs on.
struct Backends {
    postgres: bool,
    sqlite: bool,
}

impl Parse for Backends {
    fn parse(input: ParseStream) -> syn::Result<Self> {
        let names = Punctuated::<Ident, Token![,]>::parse_terminated(input)?;
        if names.is_empty() {
            return Ok(Backends {
                postgres: true,
                sqlite: true,
            });
        }
        let mut b = Backends {
            postgres: false,
            sqlite: false,
        };
        for name in names {
            match name.to_string().as_str() {
                "postgres" => b.postgres = true,
                "sqlite" => b.sqlite = true,
                _ => {
                    return Err(syn::Error::new_spanned(
                        name,
                        "expected `postgres` or `sqlite`",
                    ))
                }
            }
        }
        Ok(b)
    }
}

#[proc_macro_attribute]
pub fn backend_test(args: TokenStream, item: TokenStream) -> TokenStream {
    let backends = parse_macro_input!(args as Backends);
    let func = parse_macro_input!(item as ItemFn);
    expand(backends, func)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}

fn expand(backends: Backends, mut func: ItemFn) -> syn::Result<Tokens> {
    if func.sig.asyncness.is_none() {
        return Err(syn::Error::new_spanned(
            func.sig.fn_token,
            "#[backend_test] takes an `async fn name(db: TestDb)`",
        ));
    }
    let db_type = match func.sig.inputs.iter().collect::<Vec<_>>().as_slice() {
        [FnArg::Typed(arg)] => arg.ty.clone(),
        _ => {
            return Err(syn::Error::new_spanned(
                &func.sig.inputs,
                "#[backend_test] takes exactly one argument, the test database: `db: TestDb`",
            ))
        }
    };
    // Test-harness attributes belong on the tests, not on the shared body.
    let (harness, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut func.attrs)
        .into_iter()
        .partition(|a| a.path().is_ident("ignore") || a.path().is_ident("should_panic"));
    func.attrs = kept;
    let name = &func.sig.ident;
    let ret = &func.sig.output;

    let postgres = backends.postgres.then(|| {
        quote! {
            #[::sqlx::test(migrations = false)]
            #(#harness)*
            async fn postgres(pool: ::sqlx::PgPool) #ret {
                super::#name(<#db_type>::postgres(pool).await).await
            }
        }
    });
    let sqlite = backends.sqlite.then(|| {
        quote! {
            #[::tokio::test(flavor = "multi_thread")]
            #(#harness)*
            async fn sqlite() #ret {
                super::#name(<#db_type>::sqlite().await).await
            }
        }
    });
    Ok(quote! {
        #func

        #[allow(unused_imports)]
        mod #name {
            use super::*;
            #postgres
            #sqlite
        }
    })
}
