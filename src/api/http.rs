//! The HTTP server: the softphone page at `/`, the SDK at `/callgate.js`, `/healthz`, `/readyz`,
//! `/metrics`, and the
//! browser WebSocket API at `/ws`.

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};

pub use super::state::AppState;

/// The HTTP routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(phone_page))
        .route("/callgate.js", get(sdk))
        .route("/callgate.d.ts", get(sdk_types))
        .route(
            "/favicon.ico",
            get(|| async { axum::http::StatusCode::NO_CONTENT }),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/ws", get(super::ws::handler))
        .route(
            "/api/v1/agents/{agent}/events",
            get(super::crm::agent_events),
        )
        .route("/api/v1/agents/{agent}/stats", get(super::crm::agent_stats))
        .route(
            "/api/v1/agents/{agent}/states",
            get(super::crm::agent_states),
        )
        .route(
            "/api/v1/agents/{agent}/state",
            axum::routing::put(super::control::put_agent_state),
        )
        .route(
            "/api/v1/agents/{agent}/calls",
            post(super::control::click_to_call),
        )
        .route(
            "/api/v1/calls/{callId}/hangup",
            post(super::control::hangup),
        )
        .route("/api/v1/calls/{callId}/hold", post(super::control::hold))
        .route(
            "/api/v1/calls/{callId}/unhold",
            post(super::control::unhold),
        )
        .route("/api/v1/calls/{callId}/dtmf", post(super::control::dtmf))
        .route(
            "/api/v1/calls/{callId}/transfer",
            post(super::control::transfer),
        )
        .route("/api/v1/demo", get(super::demo::info))
        .route("/api/v1/demo/token", post(super::demo::token))
        .route("/api/v1/calls", get(super::crm::list_calls))
        .route(
            "/api/v1/calls/{callId}",
            get(super::crm::get_call).patch(super::crm::patch_call),
        )
        .route(
            "/api/v1/calls/{callId}/recording",
            get(super::crm::get_recording),
        )
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/admin/apps", get(super::admin::list_apps))
        .route(
            "/api/v1/admin/apps/{app}",
            get(super::admin::get_app)
                .put(super::admin::put_app)
                .delete(super::admin::delete_app),
        )
        .with_state(state)
}

/// Liveness: the process is up and serving HTTP.
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: 200 while callgate takes new logins and calls, 503 once it is draining for
/// shutdown (load balancers then send new pages elsewhere).
async fn readyz(State(state): State<AppState>) -> (axum::http::StatusCode, &'static str) {
    if state.metrics.is_draining() {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else {
        (axum::http::StatusCode::OK, "ready\n")
    }
}

/// Prometheus metrics (text format 0.0.4).
async fn metrics(
    State(state): State<AppState>,
) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    let sip = state.sip.snapshot().await;
    let insecure = state
        .apps
        .get()
        .keyring
        .apps()
        .filter(|(_, keys)| keys.mode() == crate::token::Mode::Ctr)
        .count();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(
            &sip,
            &crate::metrics::Gauges {
                sse_subscribers: state.hub.subscribers(),
                insecure_apps: insecure,
                history_write_failures: state.cdr.write_failures(),
                tasks: tokio::runtime::Handle::current()
                    .metrics()
                    .num_alive_tasks(),
            },
        ),
    )
}

/// The OpenAPI description of the HTTP API (docs/openapi.json, compiled in).
async fn openapi() -> (
    [(axum::http::header::HeaderName, &'static str); 1],
    &'static str,
) {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        include_str!("../../docs/openapi.json"),
    )
}

/// The softphone page (web/phone.html, compiled in).
async fn phone_page() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("../../web/phone.html"))
}

/// TypeScript declarations of the SDK (web/callgate.d.ts, compiled in).
async fn sdk_types() -> (
    [(axum::http::header::HeaderName, &'static str); 1],
    &'static str,
) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/typescript; charset=utf-8",
        )],
        include_str!("../../web/callgate.d.ts"),
    )
}

/// The JavaScript SDK (web/callgate.js, compiled in).
async fn sdk() -> (
    [(axum::http::header::HeaderName, &'static str); 1],
    &'static str,
) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/javascript; charset=utf-8",
        )],
        include_str!("../../web/callgate.js"),
    )
}
