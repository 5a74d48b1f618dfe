//! The state every HTTP handler gets: the session layer's context.

use std::sync::Arc;

use crate::session::context::Context;

/// A cheap handle on the shared [`Context`] (derefs to it).
#[derive(Clone)]
pub struct AppState(pub Arc<Context>);

impl std::ops::Deref for AppState {
    type Target = Context;
    fn deref(&self) -> &Context {
        &self.0
    }
}
