//! Who calls the HTTP API, from `Authorization: Bearer <credential>`:
//!
//! * an **agent credential**, issued to the page at `connect` (`apiToken`), valid while its
//!   session lives and only once the registrar accepted the agent's SIP credentials: that
//!   agent's own resources in its own app only;
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
    /// A logged-in agent's page: its app and the agent (`1001@sip.example.com`).
    Agent {
        /// The app whose token the agent logged in with.
        app: String,
        /// The agent.
        agent: String,
    },
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
    /// An agent credential whose session the registrar has not (yet) accepted (403): a
    /// token with the wrong SIP password reads nothing.
    #[error(
        "the SIP registrar has not accepted this agent's credentials: the API opens once the page is registered"
    )]
    NotRegistered,
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
    agents: Mutex<HashMap<[u8; 32], AgentCredential>>,
    keys: std::sync::RwLock<Keys>,
}

struct AgentCredential {
    app: String,
    agent: String,
    /// The registrar accepted the session's SIP credentials.
    active: bool,
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

    fn agents(&self) -> MutexGuard<'_, HashMap<[u8; 32], AgentCredential>> {
        self.agents.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new credential for the page of `app`'s `agent` (128 random bits), refused until
    /// [`activate`](Self::activate)d.
    pub fn issue(&self, app: &str, agent: &str) -> Result<String, crate::rand::GetRandomFailed> {
        let token = format!("at-{}", crate::rand::hex::<16>()?);
        self.agents().insert(
            digest(&token),
            AgentCredential {
                app: app.to_owned(),
                agent: agent.to_owned(),
                active: false,
            },
        );
        Ok(token)
    }

    /// The registrar accepted the session's SIP credentials: `token` opens the API.
    pub fn activate(&self, token: &str) {
        if let Some(c) = self.agents().get_mut(&digest(token)) {
            c.active = true;
        }
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
        match self.agents().get(&d) {
            Some(c) if c.active => Ok(Caller::Agent {
                app: c.app.clone(),
                agent: c.agent.clone(),
            }),
            Some(_) => Err(Denied::NotRegistered),
            None => Err(Denied::Unauthorized),
        }
    }
}

impl Caller {
    /// Whether this caller may see a resource of `app`'s `agent` (`app` `None`: the agent is
    /// unknown). Agents see only themselves in their own app (403 for anyone else, known or
    /// not), apps their own agents (404 for unknown ones), admins everyone known.
    pub fn may_see(&self, agent: &str, app: Option<&str>) -> Result<(), Denied> {
        match (self, app) {
            (
                Caller::Agent {
                    app: mine,
                    agent: me,
                },
                Some(app),
            ) if me == agent && mine == app => Ok(()),
            (Caller::Agent { .. }, _) => Err(Denied::Forbidden),
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
        let agent = c.issue("crm", "1001@pbx").unwrap();
        assert!(agent.starts_with("at-") && agent.len() == 35);
        let bearer = |t: &str| format!("Bearer {t}");
        assert_eq!(
            c.identify(Some(&bearer(&agent))),
            Err(Denied::NotRegistered),
            "not before the registrar accepted the agent"
        );
        c.activate(&agent);
        assert_eq!(
            c.identify(Some(&bearer(&agent))),
            Ok(Caller::Agent {
                app: "crm".into(),
                agent: "1001@pbx".into()
            })
        );
        assert_eq!(
            crate::rand::failing(|| c.issue("crm", "1001@pbx")),
            Err(crate::rand::GetRandomFailed),
            "no credential without the OS generator"
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
        let me = Caller::Agent {
            app: "crm".into(),
            agent: "1001@pbx".into(),
        };
        assert_eq!(me.may_see("1001@pbx", Some("crm")), Ok(()));
        assert_eq!(
            me.may_see("1001@pbx", Some("erp")),
            Err(Denied::Forbidden),
            "the same address in another app is someone else"
        );
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
