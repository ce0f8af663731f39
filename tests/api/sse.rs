//! Server-Sent Events with a real SSE parser.

use serde_json::json;
use sqlx::PgPool;

use crate::helpers::TestApp;

#[sqlx::test]
async fn catches_up_then_follows_live(pool: PgPool) {
    let app = TestApp::spawn(pool).await;
    app.append("s", json!([{"data":1},{"data":2}])).await;
    let mut sse = app.sse_events("s", "", None).await;
    sse.envelopes_through(1, 2).await;
    app.append("s", json!({"data":3})).await;
    let env = sse.envelopes_through(3, 3).await;
    assert_eq!(env[0]["data"], json!(3));
}
