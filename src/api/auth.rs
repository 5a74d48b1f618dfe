//! Who calls the HTTP API: the [`Auth`] and [`Admin`] extractors over the session layer's
//! [`Credentials`](crate::session::credentials::Credentials), and the JSON refusals every API
//! handler shares.

use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::state::AppState;
use crate::session::credentials::{Caller, Denied};

/// A JSON error response.
pub fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    (status, Json(body)).into_response()
}

/// The response for a refused credential or resource.
pub fn denied(d: Denied) -> Response {
    let (status, code) = match d {
        Denied::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
        Denied::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
        Denied::NotRegistered => (StatusCode::FORBIDDEN, "not_registered"),
        Denied::NotFound => (StatusCode::NOT_FOUND, "not_found"),
    };
    let mut r = refuse(status, code, &d.to_string());
    if d == Denied::Unauthorized {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    r
}

/// The caller of a request.
pub fn caller(state: &AppState, headers: &HeaderMap) -> Result<Caller, Denied> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    state.credentials.identify(auth)
}

/// The authenticated caller of an API request: a handler taking it is only reached with a
/// known credential (401 otherwise).
pub struct Auth(pub Caller);

impl axum::extract::FromRequestParts<AppState> for Auth {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Response> {
        caller(state, &parts.headers).map(Auth).map_err(denied)
    }
}

/// An admin caller: 401 without a credential, 403 with any other one.
pub struct Admin;

impl axum::extract::FromRequestParts<AppState> for Admin {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &AppState,
    ) -> Result<Self, Response> {
        match caller(state, &parts.headers) {
            Ok(Caller::Admin) => Ok(Admin),
            Ok(_) => Err(denied(Denied::Forbidden)),
            Err(d) => Err(denied(d)),
        }
    }
}
