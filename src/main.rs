//! The `tailcast` binary: read the configuration, set up logging, bind, serve.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tailcast::{startup, App, Config};

fn main() -> ExitCode {
    let config = Config::parse();
    let logs = startup::init_logging(config.log_format == "json");
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(config)));
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            // Not `eprintln!`, which panics when stderr is closed.
            let _ = writeln!(std::io::stderr(), "Error: {e:#}");
            ExitCode::FAILURE
        }
    };
    logs.flush(Duration::from_secs(1));
    code
}

async fn run(config: Config) -> anyhow::Result<()> {
    tracing::info!(
        version = tailcast::build::LONG_VERSION,
        ?config,
        "starting tailcast"
    );
    // Before connecting to the database: a refused configuration should fail fast.
    tailcast::auth::check_credentials(&config)?;
    let listener = startup::bind(&config.listen).await?;
    let addr = listener.local_addr()?;
    tailcast::auth::check_listen(&config, addr)?;
    let app = App::connect(config).await?;
    // Handlers installed before "listening" is logged: a SIGTERM sent as soon as it is seen
    // must stop the server gracefully, not kill it with the default action.
    let shutdown = shutdown_signal();
    tracing::info!(addr = %addr, "listening");
    tracing::info!("web console: http://{addr}/console/");
    app.serve(listener, shutdown).await
}

/// Installs the SIGTERM handler now; the future resolves on SIGINT or SIGTERM.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
    }
}
