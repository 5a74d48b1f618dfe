//! The HTTP API for CRM backends (`/api/v1/...`), behind [`auth`](super::auth): per-agent
//! events as Server-Sent Events, the call history, and per-agent statistics. Errors are JSON,
//! `{"error": {"code", "message"}}`.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};

use super::auth::{Auth, denied, refuse};
use super::state::AppState;
use crate::session::credentials::{Caller, Denied};
use crate::session::hub::{Item, SubscribeError};

/// `GET /api/v1/agents/{agent}/events`: the agent's events as they happen, after the
/// `Last-Event-ID` the subscriber saw last (a `gap` event first if some are lost). An app or
/// admin key may subscribe before the agent logs in.
pub async fn agent_events(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(agent): Path<String>,
    headers: HeaderMap,
) -> Response {
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if agent.is_empty() || agent.len() > 256 || agent.chars().any(char::is_control) {
        return denied(Denied::NotFound);
    }
    // Which app's channel, and whether it may be opened before the agent logs in.
    let (app, create) = match &who {
        Caller::Agent { app, agent: me } if me == &agent => (app.clone(), false),
        Caller::Agent { .. } => return denied(Denied::Forbidden),
        Caller::App(mine) => {
            let apps = state.hub.apps_of(&agent);
            if !apps.is_empty() && !apps.contains(mine) {
                // Live in another app only: not this key's agent.
                return denied(Denied::Forbidden);
            }
            (mine.clone(), true)
        }
        Caller::Admin => match state.hub.apps_of(&agent).into_iter().next() {
            Some(app) => (app, false),
            None => return denied(Denied::NotFound),
        },
    };
    let sub = match state.hub.subscribe(&app, &agent, last_id, create) {
        Ok(Some(s)) => s,
        Ok(None) => return denied(Denied::NotFound),
        Err(e) => {
            let code = match e {
                SubscribeError::TooManyChannels => "too_many_channels",
                SubscribeError::TooManySubscribers => "too_many_subscribers",
            };
            return refuse(StatusCode::TOO_MANY_REQUESTS, code, &e.to_string());
        }
    };
    let stream = futures_util::stream::unfold(sub, |mut sub| async move {
        let ev = match sub.next().await? {
            Item::Event(id, json) => Event::default().id(id.to_string()).data(&*json),
            Item::Gap { after, resumes_at } => Event::default().data(
                serde_json::json!({"type": "gap", "after": after, "resumesAt": resumes_at})
                    .to_string(),
            ),
        };
        Some((Ok::<_, Infallible>(ev), sub))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// A query string's parameters (percent-decoded, `+` as space); only `allowed` names, each at
/// most once, 1 KiB in all.
fn query(
    uri: &Uri,
    allowed: &[&str],
) -> Result<std::collections::HashMap<String, String>, Box<Response>> {
    let bad = |m: &str| Box::new(refuse(StatusCode::BAD_REQUEST, "bad_request", m));
    let raw = uri.query().unwrap_or_default();
    if raw.len() > 1024 {
        return Err(bad("query string over 1 KiB"));
    }
    let mut out = std::collections::HashMap::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = decode(v).ok_or_else(|| bad("bad percent-encoding in the query string"))?;
        if !allowed.contains(&k) {
            return Err(bad(&format!(
                "unknown parameter {k:?}; known: {}",
                allowed.join(", ")
            )));
        }
        if out.insert(k.to_owned(), v).is_some() {
            return Err(bad(&format!("parameter {k:?} given twice")));
        }
    }
    Ok(out)
}

fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        match c {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A `from` / `to` bound: RFC 3339 (`2026-11-23T09:00:00Z`) or Unix seconds; Unix ms out.
fn instant(
    q: &std::collections::HashMap<String, String>,
    name: &str,
) -> Result<Option<i64>, Box<Response>> {
    let Some(v) = q.get(name) else {
        return Ok(None);
    };
    if let Ok(secs) = v.parse::<i64>() {
        return Ok(Some(secs.saturating_mul(1000)));
    }
    time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
        .map(|t| Some(i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)))
        .map_err(|_| {
            Box::new(refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("{name} must be RFC 3339 (2026-11-23T09:00:00Z) or Unix seconds"),
            ))
        })
}

/// The `from` and `to` bounds of a query.
fn period(
    q: &std::collections::HashMap<String, String>,
) -> Result<(Option<i64>, Option<i64>), Box<Response>> {
    Ok((instant(q, "from")?, instant(q, "to")?))
}

/// A query's `limit`: 1 to [`crate::cdr::MAX_PAGE`], `default` if absent.
fn page_limit(
    q: &std::collections::HashMap<String, String>,
    default: u32,
) -> Result<u32, Box<Response>> {
    match q.get("limit").map(|l| l.parse::<u32>()) {
        None => Ok(default),
        Some(Ok(l)) if (1..=crate::cdr::MAX_PAGE).contains(&l) => Ok(l),
        Some(_) => Err(Box::new(refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("limit must be 1 to {}", crate::cdr::MAX_PAGE),
        ))),
    }
}

fn storage_failed(e: &crate::cdr::CdrError) -> Response {
    tracing::error!("call history: {e}");
    refuse(
        StatusCode::INTERNAL_SERVER_ERROR,
        "storage_error",
        "the call history is unavailable; see callgate's log",
    )
}

/// Whose records of `agent` `who` reads: `Some(app)` for one app's (an agent its own, an app
/// key its app's), `None` for every app's (an admin). An address known only in other apps is
/// 403 for an app key; one known nowhere is 404.
async fn scope(
    state: &AppState,
    who: &Caller,
    agent: &str,
) -> Result<Option<String>, Box<Response>> {
    if let Caller::Agent { app, agent: me } = who {
        return if me == agent {
            Ok(Some(app.clone()))
        } else {
            Err(Box::new(denied(Denied::Forbidden)))
        };
    }
    let mut apps = state.hub.apps_of(agent);
    apps.extend(
        state
            .cdr
            .apps_of(agent)
            .await
            .map_err(|e| Box::new(storage_failed(&e)))?,
    );
    match who {
        Caller::App(mine) if apps.contains(mine) => Ok(Some(mine.clone())),
        Caller::App(_) if !apps.is_empty() => Err(Box::new(denied(Denied::Forbidden))),
        Caller::Admin if !apps.is_empty() => Ok(None),
        _ => Err(Box::new(denied(Denied::NotFound))),
    }
}

/// `GET /api/v1/calls?agent=&from=&to=&limit=&cursor=`: call history, newest first. Agents get
/// their own calls, app keys their app's, admins all.
pub async fn list_calls(State(state): State<AppState>, Auth(who): Auth, uri: Uri) -> Response {
    let q = match query(&uri, &["agent", "from", "to", "limit", "cursor"]) {
        Ok(q) => q,
        Err(r) => return *r,
    };
    let (from, to) = match period(&q) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let limit = match page_limit(&q, 50) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let mut filter = crate::cdr::Filter {
        app: None,
        agent: q.get("agent").cloned(),
        from,
        to,
    };
    match &who {
        Caller::Agent { app, agent: me } => {
            if filter.agent.as_ref().is_some_and(|a| a != me) {
                return denied(Denied::Forbidden);
            }
            filter.agent = Some(me.clone());
            filter.app = Some(app.clone());
        }
        Caller::App(app) => filter.app = Some(app.clone()),
        Caller::Admin => {}
    }
    if let (Some(agent), false) = (&filter.agent, matches!(who, Caller::Agent { .. })) {
        if let Err(r) = scope(&state, &who, agent).await {
            return *r;
        }
    }
    match state
        .cdr
        .list(filter, limit, q.get("cursor").map(String::as_str))
        .await
    {
        Ok(Some(page)) => Json(page).into_response(),
        Ok(None) => refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "cursor is not one this API gave",
        ),
        Err(e) => storage_failed(&e),
    }
}

/// Call `call_id` of the history, if `who` may see it (404 / 403 otherwise).
async fn owned_call(
    state: &AppState,
    who: &Caller,
    call_id: &str,
) -> Result<crate::cdr::CallRecord, Box<Response>> {
    let call = match state.cdr.get(call_id).await {
        Ok(Some(c)) => c,
        Ok(None) => return Err(Box::new(denied(Denied::NotFound))),
        Err(e) => return Err(Box::new(storage_failed(&e))),
    };
    who.may_see(&call.agent, Some(&call.app))
        .map_err(|d| Box::new(denied(d)))?;
    Ok(call)
}

/// `GET /api/v1/calls/{callId}`: one call of the history.
pub async fn get_call(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(call_id): Path<String>,
) -> Response {
    match owned_call(&state, &who, &call_id).await {
        Ok(call) => Json(call).into_response(),
        Err(r) => *r,
    }
}

/// `GET /api/v1/agents/{agent}/states?from=&to=&limit=&cursor=`: the agent-state log, one
/// entry per stretch of time in one state, oldest first (those overlapping the period).
pub async fn agent_states(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(agent): Path<String>,
    uri: Uri,
) -> Response {
    let q = match query(&uri, &["from", "to", "limit", "cursor"]) {
        Ok(q) => q,
        Err(r) => return *r,
    };
    let (from, to) = match period(&q) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let limit = match page_limit(&q, 100) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let app = match scope(&state, &who, &agent).await {
        Ok(a) => a,
        Err(r) => return *r,
    };
    let cursor = q.get("cursor").map(String::as_str);
    match state
        .cdr
        .state_log((app.as_deref(), &agent), (from, to), limit, cursor)
        .await
    {
        Ok(Some(page)) => {
            let mut body = serde_json::to_value(&page).unwrap_or_default();
            if let Some(o) = body.as_object_mut() {
                o.insert("agent".into(), agent.into());
            }
            Json(body).into_response()
        }
        Ok(None) => refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "cursor is not one this API gave",
        ),
        Err(e) => storage_failed(&e),
    }
}

/// Most bytes of a `PATCH /api/v1/calls/{callId}` body.
const MAX_DISPOSITION_BODY: usize = 16 * 1024;

/// `PATCH /api/v1/calls/{callId}` `{"code", "notes", "fields"}`: the CRM records its
/// disposition of a call (a JSON Merge Patch of what is there: `null` removes), under the
/// owner rule of `GET`. The answer is the call as `GET` gives it.
pub async fn patch_call(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(call_id): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if body.len() > MAX_DISPOSITION_BODY {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            &format!(
                "the body is {} bytes; at most {MAX_DISPOSITION_BODY}",
                body.len()
            ),
        );
    }
    if let Err(r) = owned_call(&state, &who, &call_id).await {
        return *r;
    }
    let patch: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!("not JSON: {e}"),
            );
        }
    };
    if let Err(why) = crate::cdr::disposition::check(&patch) {
        return refuse(StatusCode::BAD_REQUEST, "bad_request", &why);
    }
    match state
        .cdr
        .dispose(&call_id, &patch.to_string(), crate::cdr::unix_ms())
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            return refuse(
                StatusCode::CONFLICT,
                "too_many_fields",
                &format!(
                    "the call would keep more than {} fields; remove some (null) first",
                    crate::cdr::disposition::MAX_FIELDS
                ),
            );
        }
        Err(e) => return storage_failed(&e),
    }
    match state.cdr.get(&call_id).await {
        Ok(Some(call)) => Json(call).into_response(),
        Ok(None) => denied(Denied::NotFound),
        Err(e) => storage_failed(&e),
    }
}

/// `GET /api/v1/agents/{agent}/stats?from=&to=`: calls in and out, answered, missed and talk
/// time of the calls the agent started in the period.
pub async fn agent_stats(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(agent): Path<String>,
    uri: Uri,
) -> Response {
    let q = match query(&uri, &["from", "to"]) {
        Ok(q) => q,
        Err(r) => return *r,
    };
    let (from, to) = match period(&q) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let app = match scope(&state, &who, &agent).await {
        Ok(a) => a,
        Err(r) => return *r,
    };
    match state.cdr.stats(app.as_deref(), &agent, from, to).await {
        Ok(stats) => {
            let mut body = serde_json::to_value(&stats).unwrap_or_default();
            if let Some(o) = body.as_object_mut() {
                o.insert("agent".into(), agent.into());
                o.insert("from".into(), from.into());
                o.insert("to".into(), to.into());
            }
            Json(body).into_response()
        }
        Err(e) => storage_failed(&e),
    }
}

/// A single `Range: bytes=` request against a `len`-byte file: `Ok(None)` for no (usable)
/// range (serve it all), `Err(())` when unsatisfiable (416). End exclusive.
fn byte_range(header: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None); // several ranges: the whole file is a valid answer
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| ())?;
            (len.saturating_sub(n), len)
        }
        (s, "") => (s.parse().map_err(|_| ())?, len),
        (s, e) => {
            let e: u64 = e.parse().map_err(|_| ())?;
            (s.parse().map_err(|_| ())?, e.saturating_add(1).min(len))
        }
    };
    if start >= end || start >= len {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// `GET /api/v1/calls/{callId}/recording`: the call's recording, a stereo 8 kHz WAV (agent
/// left, far end right), streamed; `Range: bytes=` is answered with 206.
pub async fn get_recording(
    State(state): State<AppState>,
    Auth(who): Auth,
    Path(call_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let call = match owned_call(&state, &who, &call_id).await {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let name = call
        .recording
        .as_deref()
        .and_then(|n| crate::media::recorder::file_name(&call.call_id).filter(|f| f == n));
    let Some(name) = name else {
        return refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            "this call was not recorded",
        );
    };
    let path = state.recordings_dir.join(name);
    let opened = tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&path)?;
        let len = f.metadata()?.len();
        Ok::<_, std::io::Error>((f, len))
    })
    .await;
    let Ok(Ok((file, len))) = opened else {
        return refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            "the recording is gone (storage.recordings_retention_days)",
        );
    };
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match byte_range(range, len) {
        Ok(None) => (StatusCode::OK, 0, len),
        Ok(Some((s, e))) => (StatusCode::PARTIAL_CONTENT, s, e),
        Err(()) => {
            let mut r = refuse(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "bad_range",
                "the range is outside the recording",
            );
            if let Ok(v) = header::HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let body = file_stream(file, start, end);
    recording_response(body, status, (start, end, len))
}

/// The bytes [`start`, `end`) of `file`, read in 64 KiB blocks off the runtime's threads.
fn file_stream(
    file: std::fs::File,
    start: u64,
    end: u64,
) -> impl futures_util::Stream<Item = Result<axum::body::Bytes, std::io::Error>> {
    futures_util::stream::unfold((Some(file), start), move |(file, pos)| async move {
        let file = file?;
        if pos >= end {
            return None;
        }
        let want = usize::try_from((end - pos).min(64 * 1024)).unwrap_or(64 * 1024);
        let read = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Seek, SeekFrom};
            let mut file = file;
            let mut buf = vec![0u8; want];
            file.seek(SeekFrom::Start(pos))?;
            let n = file.read(&mut buf)?;
            buf.truncate(n);
            Ok::<_, std::io::Error>((file, buf))
        })
        .await;
        match read {
            Ok(Ok((file, buf))) if !buf.is_empty() => {
                let n = buf.len() as u64;
                Some((Ok(axum::body::Bytes::from(buf)), (Some(file), pos + n)))
            }
            Ok(Err(e)) => Some((Err(e), (None, end))),
            _ => None,
        }
    })
}

/// The recording's response: WAV, ranges accepted, the part's length and range.
fn recording_response(
    body: impl futures_util::Stream<Item = Result<axum::body::Bytes, std::io::Error>> + Send + 'static,
    status: StatusCode,
    (start, end, len): (u64, u64, u64),
) -> Response {
    let mut r = Response::new(axum::body::Body::from_stream(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("audio/wav"),
    );
    h.insert(
        header::ACCEPT_RANGES,
        header::HeaderValue::from_static("bytes"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&(end - start).to_string()) {
        h.insert(header::CONTENT_LENGTH, v);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = header::HeaderValue::from_str(&format!("bytes {start}-{}/{len}", end - 1)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges() {
        assert_eq!(byte_range(None, 100), Ok(None));
        assert_eq!(byte_range(Some("bytes=0-43"), 100), Ok(Some((0, 44))));
        assert_eq!(byte_range(Some("bytes=90-"), 100), Ok(Some((90, 100))));
        assert_eq!(byte_range(Some("bytes=-10"), 100), Ok(Some((90, 100))));
        assert_eq!(byte_range(Some("bytes=50-1000"), 100), Ok(Some((50, 100))));
        assert_eq!(byte_range(Some("bytes=0-1,5-6"), 100), Ok(None));
        for bad in ["bytes=100-", "bytes=5-2", "bytes=x-1", "bytes=-"] {
            assert_eq!(byte_range(Some(bad), 100), Err(()), "{bad}");
        }
    }
}
