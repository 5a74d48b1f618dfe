//! Who calls the HTTP API, from `Authorization: Bearer <credential>`:
//!
//! * an **agent credential**, issued to the page at `connect` (`apiToken`), valid while its
//!   session lives: that agent's own resources only;
//! * an **app API key** (`api_keys` of an app in apps.toml): the agents of that app;
//! * an **admin key** (`admin_keys` in apps.toml): everything.
//!
//! Keys are held as SHA-256 digests and compared in constant time.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A logged-in agent's page (the agent, `1001@sip.example.com`).
    Agent(String),
    /// A CRM backend with its app's API key.
    App(String),
    /// An administrator.
    Admin,
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Denied {
    /// No credential, or one callgate does not know (401).
    #[error(
        "missing or unknown credential: send Authorization: Bearer <agent token, app API key or admin key>"
    )]
    Unauthorized,
    /// A credential for someone else's resource (403).
    #[error("this credential may not see that resource")]
    Forbidden,
    /// The resource does not exist (404).
    #[error("no such resource")]
    NotFound,
}

/// The SHA-256 digest a key is held as.
pub fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// The credentials callgate accepts.
pub struct Credentials {
    agents: Mutex<HashMap<[u8; 32], String>>,
    keys: std::sync::RwLock<Keys>,
}

struct Keys {
    apps: Vec<([u8; 32], String)>,
    admins: Vec<[u8; 32]>,
}

impl Credentials {
    /// App API keys (digest, app) and admin keys (digests) from the configuration.
    pub fn new(
        app_keys: impl IntoIterator<Item = ([u8; 32], String)>,
        admin_keys: impl IntoIterator<Item = [u8; 32]>,
    ) -> Credentials {
        Credentials {
            agents: Mutex::new(HashMap::new()),
            keys: std::sync::RwLock::new(Keys {
                apps: app_keys.into_iter().collect(),
                admins: admin_keys.into_iter().collect(),
            }),
        }
    }

    /// Replaces the app and admin keys (a configuration reload); agent credentials stay.
    pub fn set_keys(
        &self,
        app_keys: impl IntoIterator<Item = ([u8; 32], String)>,
        admin_keys: impl IntoIterator<Item = [u8; 32]>,
    ) {
        let new = Keys {
            apps: app_keys.into_iter().collect(),
            admins: admin_keys.into_iter().collect(),
        };
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = new;
    }

    fn agents(&self) -> MutexGuard<'_, HashMap<[u8; 32], String>> {
        self.agents.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new credential for `agent`'s page (128 random bits).
    pub fn issue(&self, agent: &str) -> String {
        let mut b = [0u8; 16];
        let _ = getrandom::fill(&mut b);
        let token = format!("at-{}", hex::encode(b));
        self.agents().insert(digest(&token), agent.to_owned());
        token
    }

    /// Withdraws an agent credential (its session ended).
    pub fn revoke(&self, token: &str) {
        self.agents().remove(&digest(token));
    }

    /// The caller behind an `Authorization` header value.
    pub fn identify(&self, authorization: Option<&str>) -> Result<Caller, Denied> {
        let token = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= 256)
            .ok_or(Denied::Unauthorized)?;
        let d = digest(token);
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let mut admin = false;
        for k in &keys.admins {
            admin |= bool::from(k.ct_eq(&d));
        }
        if admin {
            return Ok(Caller::Admin);
        }
        let mut app = None;
        for (k, name) in &keys.apps {
            if bool::from(k.ct_eq(&d)) {
                app = Some(name.clone());
            }
        }
        drop(keys);
        if let Some(app) = app {
            return Ok(Caller::App(app));
        }
        self.agents()
            .get(&d)
            .cloned()
            .map(Caller::Agent)
            .ok_or(Denied::Unauthorized)
    }
}

impl Caller {
    /// Whether this caller may see the resources of `agent`, whose app is `app` (`None`: the
    /// agent is unknown). Agents see only themselves (403 for anyone else, known or not), apps
    /// their own agents (404 for unknown ones), admins everyone known.
    pub fn may_see(&self, agent: &str, app: Option<&str>) -> Result<(), Denied> {
        match (self, app) {
            (Caller::Agent(me), _) if me == agent => Ok(()),
            (Caller::Agent(_), _) => Err(Denied::Forbidden),
            (_, None) => Err(Denied::NotFound),
            (Caller::App(mine), Some(app)) if mine != app => Err(Denied::Forbidden),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_credential_is_recognised() {
        let c = Credentials::new(
            [(digest("crm-key-0123456789abcdef0123"), "crm".to_owned())],
            [digest("admin-key-0123456789abcdef01")],
        );
        let agent = c.issue("1001@pbx");
        assert!(agent.starts_with("at-") && agent.len() == 35);
        let bearer = |t: &str| format!("Bearer {t}");
        assert_eq!(
            c.identify(Some(&bearer(&agent))),
            Ok(Caller::Agent("1001@pbx".into()))
        );
        assert_eq!(
            c.identify(Some(&bearer("crm-key-0123456789abcdef0123"))),
            Ok(Caller::App("crm".into()))
        );
        assert_eq!(
            c.identify(Some(&bearer("admin-key-0123456789abcdef01"))),
            Ok(Caller::Admin)
        );
        for bad in [
            None,
            Some("crm-key-0123456789abcdef0123"),
            Some("Bearer "),
            Some("Bearer nope"),
        ] {
            assert_eq!(c.identify(bad), Err(Denied::Unauthorized), "{bad:?}");
        }
        c.revoke(&agent);
        assert_eq!(c.identify(Some(&bearer(&agent))), Err(Denied::Unauthorized));
    }

    #[test]
    fn owner_rule() {
        let me = Caller::Agent("1001@pbx".into());
        assert_eq!(me.may_see("1001@pbx", Some("crm")), Ok(()));
        assert_eq!(me.may_see("1002@pbx", Some("crm")), Err(Denied::Forbidden));
        assert_eq!(me.may_see("1009@pbx", None), Err(Denied::Forbidden));
        let app = Caller::App("crm".into());
        assert_eq!(app.may_see("1002@pbx", Some("crm")), Ok(()));
        assert_eq!(app.may_see("1002@pbx", Some("erp")), Err(Denied::Forbidden));
        assert_eq!(app.may_see("1009@pbx", None), Err(Denied::NotFound));
        assert_eq!(Caller::Admin.may_see("1002@pbx", Some("erp")), Ok(()));
        assert_eq!(
            Caller::Admin.may_see("1009@pbx", None),
            Err(Denied::NotFound)
        );
    }
}
