//! The apps callgate serves, as one snapshot replaced whole when the configuration is reloaded
//! (SIGHUP, or the admin API after it rewrote apps.toml): token keys, allowed origins, dial
//! plans, recording switches and the HTTP API keys. Sessions already logged in keep going;
//! the next login, call or API request sees the new snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};

use super::{Config, ConfigError, Source};
use crate::dialplan::DialPlan;
use crate::session::credentials::Credentials;
use crate::token::Keyring;

/// One configuration's apps.
pub struct Apps {
    /// Token keys.
    pub keyring: Keyring,
    /// Per app: the page origins allowed to log in (empty: any).
    pub origins: BTreeMap<String, Vec<String>>,
    /// Per app: its dial plan.
    pub dial_plans: BTreeMap<String, DialPlan>,
    /// Apps whose calls are recorded.
    pub record: BTreeSet<String>,
    /// Per app: its agent states.
    pub states: BTreeMap<String, Arc<super::states::StatePolicy>>,
    /// Per app: the incoming INVITE headers that become call data.
    pub call_data: BTreeMap<String, Arc<super::call_data::CallDataMap>>,
    /// Per app: the X- headers its calls may add.
    pub call_headers: BTreeMap<String, Arc<super::call_data::CallHeaders>>,
}

impl Apps {
    /// The apps of `config`.
    pub fn from_config(config: &Config) -> Apps {
        let apps = &config.apps;
        Apps {
            keyring: config.keyring().clone(),
            origins: apps
                .iter()
                .map(|(n, a)| (n.clone(), a.allowed_origins.clone()))
                .collect(),
            dial_plans: apps
                .iter()
                .map(|(n, a)| (n.clone(), a.dial_plan.clone()))
                .collect(),
            record: apps
                .iter()
                .filter(|(_, a)| a.record)
                .map(|(n, _)| n.clone())
                .collect(),
            states: apps
                .iter()
                .map(|(n, a)| (n.clone(), a.states.clone()))
                .collect(),
            call_data: apps
                .iter()
                .map(|(n, a)| (n.clone(), a.call_data.clone()))
                .collect(),
            call_headers: apps
                .iter()
                .map(|(n, a)| (n.clone(), a.call_headers.clone()))
                .collect(),
        }
    }
}

/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// callgate runs on the configuration compiled into it: there is no file to read or write.
    #[error(
        "callgate runs on its embedded configuration; start it with --config FILE to manage apps at runtime"
    )]
    Embedded,
    /// The files on disk do not make a valid configuration; the running one stays.
    #[error("{0}")]
    Invalid(ConfigError),
}

/// The apps in force, and where they come from.
#[derive(Clone)]
pub struct LiveApps {
    current: Arc<RwLock<Arc<Apps>>>,
    credentials: Arc<Credentials>,
    /// The main configuration file (`None`: embedded).
    config_file: Option<PathBuf>,
    /// The apps file it names.
    apps_file: Option<PathBuf>,
    /// One reload or apps-file rewrite at a time.
    pub(crate) writing: Arc<tokio::sync::Mutex<()>>,
}

impl LiveApps {
    /// The apps of `config`, with the credentials to keep in step.
    pub fn new(config: &Config, credentials: Arc<Credentials>) -> LiveApps {
        LiveApps {
            current: Arc::new(RwLock::new(Arc::new(Apps::from_config(config)))),
            credentials,
            config_file: match &config.source {
                Source::File(p) => Some(p.clone()),
                Source::Embedded => None,
            },
            apps_file: config.apps_file.clone(),
            writing: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The snapshot in force.
    pub fn get(&self) -> Arc<Apps> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The apps file, unless callgate runs on its embedded configuration.
    pub fn apps_file(&self) -> Result<&PathBuf, ReloadError> {
        self.apps_file.as_ref().ok_or(ReloadError::Embedded)
    }

    /// Reads the configuration from disk again and puts its apps and API keys in force.
    /// Returns how many apps there are now and the configuration's warnings (logged too).
    /// Other settings need a restart.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let path = self.config_file.as_ref().ok_or(ReloadError::Embedded)?;
        let config = Config::load(path).map_err(ReloadError::Invalid)?;
        // On every reload, not only at start: an app kept in `ctr` stays in the log.
        for w in config.warnings() {
            tracing::warn!("{w}");
        }
        let apps = Apps::from_config(&config);
        self.credentials.set_keys(
            config
                .apps
                .iter()
                .flat_map(|(name, app)| app.api_keys.iter().map(move |k| (*k, name.clone()))),
            config.admin_keys.iter().copied(),
        );
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(apps);
        Ok(Reloaded {
            apps: config.apps.len(),
            warnings: config.warnings(),
        })
    }
}

/// What a reload put in force.
#[derive(Debug)]
pub struct Reloaded {
    /// How many apps there are.
    pub apps: usize,
    /// What should be fixed in the configuration (an app in `ctr` mode, the demo key...).
    pub warnings: Vec<String>,
}
