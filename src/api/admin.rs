//! Key administration (`/api/v1/admin/apps[/{app}]`, admin key only): list the apps, add or
//! rotate an app's token keys, remove keys or whole apps. Every change rewrites apps.toml
//! atomically (a temporary file with mode 0600, synced, renamed over the old one) and is put in
//! force at once, without a restart; if the result is not a valid configuration the old file
//! is put back and the reply says why. Keys are never returned: only fingerprints
//! (`fp:` + the first 16 hex digits of the key's SHA-256).

use std::io::Write;
use std::path::Path;

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::auth::{Admin, denied, refuse};
use super::state::AppState;
use crate::config::live::ReloadError;
use crate::session::credentials::Denied;

/// A key's fingerprint: `fp:` and the first 16 hex digits of the SHA-256 of its bytes.
pub fn fingerprint(hex_key: &str) -> String {
    let bytes = hex::decode(hex_key.trim()).unwrap_or_else(|_| hex_key.as_bytes().to_vec());
    let d = Sha256::digest(&bytes);
    format!("fp:{}", hex::encode(&d[..8]))
}

fn read_apps(path: &Path) -> Result<toml::Table, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.parse::<toml::Table>()
        .map_err(|e| format!("{} is not valid TOML: {e}", path.display()))
}

fn storage(message: &str) -> Response {
    refuse(StatusCode::INTERNAL_SERVER_ERROR, "storage_error", message)
}

/// What the API says of an app: never a key.
fn summary(name: &str, app: &toml::Value) -> serde_json::Value {
    let strings = |k: &str| -> Vec<String> {
        app.get(k)
            .and_then(toml::Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(toml::Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    serde_json::json!({
        "app": name,
        "mode": app.get("mode").and_then(toml::Value::as_str).unwrap_or("ctr-hmac"),
        "keys": strings("keys").iter().map(|k| fingerprint(k)).collect::<Vec<_>>(),
        "apiKeys": strings("api_keys").len(),
        "allowedOrigins": strings("allowed_origins"),
        "record": app.get("record").and_then(toml::Value::as_bool).unwrap_or(false),
        "singleUse": app.get("single_use").and_then(toml::Value::as_bool).unwrap_or(false),
        "maxLifetimeSecs": app.get("max_lifetime_secs").and_then(toml::Value::as_integer),
    })
}

fn apps_table(doc: &toml::Table) -> Option<&toml::Table> {
    doc.get("apps").and_then(toml::Value::as_table)
}

fn not_managed(e: &ReloadError) -> Response {
    refuse(StatusCode::CONFLICT, "read_only_config", &e.to_string())
}

/// `GET /api/v1/admin/apps`: every app, with key fingerprints.
pub async fn list_apps(State(state): State<AppState>, _: Admin) -> Response {
    let path = match state.apps.apps_file() {
        Ok(p) => p.clone(),
        Err(e) => return not_managed(&e),
    };
    match read_apps(&path) {
        Ok(doc) => {
            let apps: Vec<_> = apps_table(&doc)
                .map(|t| t.iter().map(|(n, a)| summary(n, a)).collect())
                .unwrap_or_default();
            Json(serde_json::json!({ "apps": apps })).into_response()
        }
        Err(e) => storage(&e),
    }
}

/// `GET /api/v1/admin/apps/{app}`.
pub async fn get_app(
    State(state): State<AppState>,
    _: Admin,
    UrlPath(app): UrlPath<String>,
) -> Response {
    let path = match state.apps.apps_file() {
        Ok(p) => p.clone(),
        Err(e) => return not_managed(&e),
    };
    match read_apps(&path) {
        Ok(doc) => match apps_table(&doc).and_then(|t| t.get(&app)) {
            Some(a) => Json(summary(&app, a)).into_response(),
            None => denied(Denied::NotFound),
        },
        Err(e) => storage(&e),
    }
}

/// The body of `PUT /api/v1/admin/apps/{app}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutApp {
    /// The app's token keys in order (the first mints): new keys in hex, kept ones by
    /// fingerprint. Rotation: `[new, fp:old]`, then `[fp:new]` once the CRM has moved.
    keys: Vec<String>,
}

/// `PUT /api/v1/admin/apps/{app}`: sets the app's keys (creating the app if needed).
pub async fn put_app(
    State(state): State<AppState>,
    _: Admin,
    UrlPath(app): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let put: PutApp = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "bad_request",
                &format!(
                    "expected {{\"keys\": [\"<hex key>\" or \"fp:<fingerprint>\", ...]}}: {e}"
                ),
            );
        }
    };
    if put.keys.is_empty() || put.keys.len() > 16 {
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "an app has 1 to 16 keys",
        );
    }
    let name = app.clone();
    change(&state, &app, move |apps| {
        let app = name;
        let old: Vec<String> = apps
            .get(&app)
            .and_then(|a| a.get("keys"))
            .and_then(toml::Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(toml::Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let mut keys = Vec::new();
        for k in &put.keys {
            if k.starts_with("fp:") {
                match old.iter().find(|o| fingerprint(o) == *k) {
                    Some(o) => keys.push(toml::Value::String(o.clone())),
                    None => return Err(format!("{k} is not one of the app's keys")),
                }
            } else {
                keys.push(toml::Value::String(k.trim().to_owned()));
            }
        }
        let entry = apps
            .entry(app.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry.as_table_mut() {
            Some(t) => {
                t.insert("keys".into(), toml::Value::Array(keys));
                Ok(())
            }
            None => Err(format!("apps.{app} is not a table")),
        }
    })
    .await
}

/// `DELETE /api/v1/admin/apps/{app}`: removes the app; its tokens and API keys stop working.
pub async fn delete_app(
    State(state): State<AppState>,
    _: Admin,
    UrlPath(app): UrlPath<String>,
) -> Response {
    let name = app.clone();
    change(&state, &app, move |apps| match apps.remove(&name) {
        Some(_) => Ok(()),
        None => Err(String::new()),
    })
    .await
}

/// Applies `edit` to the `[apps]` table of apps.toml, writes the file atomically and reloads;
/// puts the old file back if the new one is refused. `Err("")` from `edit`: no such app.
async fn change(
    state: &AppState,
    app: &str,
    edit: impl FnOnce(&mut toml::Table) -> Result<(), String> + Send + 'static,
) -> Response {
    let path = match state.apps.apps_file() {
        Ok(p) => p.clone(),
        Err(e) => return not_managed(&e),
    };
    let _one_at_a_time = state.apps.writing.lock().await;
    let old_text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => return storage(&format!("cannot read {}: {e}", path.display())),
    };
    let mut doc = match old_text.parse::<toml::Table>() {
        Ok(d) => d,
        Err(e) => return storage(&format!("{} is not valid TOML: {e}", path.display())),
    };
    let apps = doc
        .entry("apps")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let Some(apps) = apps.as_table_mut() else {
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage_error",
            "[apps] is not a table",
        );
    };
    match edit(apps) {
        Ok(()) => {}
        Err(why) if why.is_empty() => return denied(Denied::NotFound),
        Err(why) => return refuse(StatusCode::BAD_REQUEST, "bad_request", &why),
    }
    let text = match toml::to_string(&doc) {
        Ok(t) => format!(
            "# callgate apps: token keys per CRM app (see the documented sample, conf/apps.toml).\n\
             # Rewritten by the admin API; comments are not kept. Keep this file mode 0600.\n\n{t}"
        ),
        Err(e) => {
            return refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                "storage_error",
                &e.to_string(),
            );
        }
    };
    if let Err(e) = write_atomically(&path, &text) {
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage_error",
            &format!("cannot write {}: {e}", path.display()),
        );
    }
    match state.apps.reload() {
        Ok(done) => {
            tracing::info!(app, apps = done.apps, "apps changed through the admin API");
            // What was written and is now in force, with what should still be fixed.
            let mut current = apps_table(&doc)
                .and_then(|t| t.get(app))
                .map(|a| summary(app, a))
                .unwrap_or_else(|| serde_json::json!({"app": app, "deleted": true}));
            current["warnings"] = done.warnings.into();
            Json(current).into_response()
        }
        Err(e) => {
            let _ = write_atomically(&path, &old_text);
            let _ = state.apps.reload();
            refuse(
                StatusCode::BAD_REQUEST,
                "invalid_config",
                &format!("the change was not applied: {e}"),
            )
        }
    }
}

/// Writes `text` to `path` through a temporary file in the same directory (mode 0600, synced)
/// renamed over it, so readers see the old or the new file, never a part.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".apps.toml.{}",
        crate::rand::hex::<6>().map_err(std::io::Error::other)?
    ));
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    let result = (|| {
        let mut f = o.open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_short_and_stable() {
        let fp = fingerprint("000102030405060708090a0b0c0d0e0f");
        assert!(fp.starts_with("fp:") && fp.len() == 19, "{fp}");
        assert_eq!(fp, fingerprint(" 000102030405060708090a0b0c0d0e0f "));
        assert_ne!(fp, fingerprint("000102030405060708090a0b0c0d0e00"));
    }

    #[test]
    fn atomic_writes_replace_the_whole_file_with_mode_0600() {
        let dir = std::env::temp_dir().join(format!("callgate-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("apps.toml");
        std::fs::write(&path, "old").unwrap();
        write_atomically(&path, "new contents").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new contents");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let leftovers = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(leftovers, 1, "no temporary file left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
