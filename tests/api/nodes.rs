//! Helpers for tests with several nodes on one database, and for database outages: a handle
//! of its own per node, a TCP proxy in front of PostgreSQL that can be cut, and condition
//! waits. Terminating sessions and proxying the database's socket are PostgreSQL's.

use std::net::SocketAddr;

use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::backend::TestDb;
use crate::helpers::TestApp;

/// Starts a node with the given id on its own handle on the test database (see
/// [`TestDb::node`]).
pub async fn spawn_node(db: &TestDb, node: &str) -> TestApp {
    spawn_node_with(db, node, |_| {}).await
}

pub async fn spawn_node_with(
    db: &TestDb,
    node: &str,
    tweak: impl FnOnce(&mut tailcast::Config),
) -> TestApp {
    let own = db.node(node).await;
    let node = node.to_owned();
    TestApp::spawn_with(own, move |c| {
        c.node_id = Some(node);
        tweak(c);
    })
    .await
}

/// Terminates the backends whose application_name matches `pattern` (SQL `like`); returns
/// how many.
pub async fn terminate_backends(admin: &PgPool, pattern: &str) -> i64 {
    sqlx::query_scalar(
        "select count(*) from (select pg_terminate_backend(pid) from pg_stat_activity
         where datname = current_database() and application_name like $1
           and pid <> pg_backend_pid()) t",
    )
    .bind(pattern)
    .fetch_one(admin)
    .await
    .expect("terminate backends")
}

/// A TCP proxy to PostgreSQL that can be cut (every connection dropped, new ones closed at
/// once, as when the database host goes away) and restored.
pub struct Proxy {
    pub addr: SocketAddr,
    up: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let (up, _) = watch::channel(true);
        let state = up.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if !*state.borrow() {
                    drop(client);
                    continue;
                }
                let mut down = state.subscribe();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut client, mut server) = (client, server);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Proxy { addr, up, task }
    }

    /// Options for the test database through this proxy.
    pub fn options(&self, pool: &PgPool, name: &str) -> PgConnectOptions {
        (*pool.connect_options())
            .clone()
            .host("127.0.0.1")
            .port(self.addr.port())
            .application_name(name)
    }

    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// The address PostgreSQL listens on for the test database.
pub fn postgres_addr(pool: &PgPool) -> SocketAddr {
    let opts = pool.connect_options();
    let host = match opts.get_host() {
        "localhost" => "127.0.0.1",
        h => h,
    };
    format!("{host}:{}", opts.get_port())
        .parse()
        .expect("PostgreSQL host is an IP address")
}
