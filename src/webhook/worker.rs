//! The shell around one app's [`Outbox`]: takes the hub's events, stores each before its
//! first attempt, runs the attempts, deletes what is done, and keeps the app's [`Stats`].
//! At shutdown it stores what is still arriving and stops; attempts in flight are made again
//! at the next start.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::client::{Client, DeliveryError};
use super::outbox::{Entry, Outbox, Output};
use super::{AllStats, Stats, Target};
use crate::cdr::CdrStore;
use crate::cdr::webhooks::WebhookRow;

/// Events on their way from the hub to an app's worker at most; past it (the worker stalled
/// behind a stalled disk) they are counted as `queue_full` and dropped.
const INBOX: usize = 4096;

/// An event the hub hands over.
#[derive(Debug)]
struct Offer {
    agent: Arc<str>,
    event: Arc<str>,
}

/// The hub's end of an app's webhook (cheap to clone).
#[derive(Clone, Debug)]
pub struct Sink {
    tx: mpsc::Sender<Offer>,
    stats: Arc<Stats>,
    only: Option<Arc<[String]>>,
}

impl Sink {
    /// Hands `event` (the JSON the SSE stream carries) of `agent` to the webhook; never waits.
    pub fn offer(&self, agent: &str, event: Arc<str>) {
        if !super::wanted(self.only.as_deref(), &event) {
            return;
        }
        let offer = Offer {
            agent: agent.into(),
            event,
        };
        if self.tx.try_send(offer).is_err() {
            self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Every app's webhook worker.
pub struct Webhooks {
    sinks: HashMap<String, Sink>,
    stats: AllStats,
    closing: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Webhooks {
    /// Starts a worker for each app in `targets`, with the events `store` still holds.
    pub async fn start(
        targets: &BTreeMap<String, Arc<Target>>,
        store: &CdrStore,
    ) -> Result<Webhooks, String> {
        let (closing, _) = watch::channel(false);
        let mut hooks = Webhooks {
            sinks: HashMap::new(),
            stats: Vec::new(),
            closing,
            tasks: Vec::new(),
        };
        if targets.is_empty() {
            return Ok(hooks);
        }
        let rows = store.webhook_pending().await.map_err(|e| e.to_string())?;
        let next = Arc::new(AtomicI64::new(
            rows.iter().map(|r| r.seq).max().unwrap_or(0) + 1,
        ));
        let mut by_app: HashMap<&str, Vec<&WebhookRow>> = HashMap::new();
        for r in &rows {
            by_app.entry(r.app.as_str()).or_default().push(r);
        }
        for (app, target) in targets {
            let client =
                Client::new(target.clone()).map_err(|e| format!("apps.{app}.webhook: {e}"))?;
            let stats = Arc::new(Stats::default());
            let (tx, rx) = mpsc::channel(INBOX);
            let mut worker = Worker {
                app: app.clone(),
                url: target.display_url(),
                outbox: Outbox::new(target.policy),
                client,
                store: store.clone(),
                stats: stats.clone(),
                next: next.clone(),
                rx,
                closing: hooks.closing.subscribe(),
                flights: JoinSet::new(),
                ids: HashMap::new(),
            };
            let loaded = by_app.remove(app.as_str()).unwrap_or_default();
            if !loaded.is_empty() {
                tracing::info!(app = %app, events = loaded.len(), "webhook events from before the restart are queued");
            }
            for r in loaded {
                worker.load(r);
            }
            hooks.tasks.push(tokio::spawn(worker.run()));
            hooks.sinks.insert(
                app.clone(),
                Sink {
                    tx,
                    stats: stats.clone(),
                    only: target.events.as_ref().map(|e| e.clone().into()),
                },
            );
            hooks.stats.push((app.clone(), stats));
        }
        Ok(hooks)
    }

    /// The hub's sinks, by app.
    pub fn sinks(&self) -> HashMap<String, Sink> {
        self.sinks.clone()
    }

    /// The apps' figures, for `/metrics`.
    pub fn stats(&self) -> AllStats {
        self.stats.clone()
    }

    /// Shutdown: each worker stores what has arrived and stops (waits up to 5 s).
    pub async fn close(self) {
        self.closing.send_replace(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
        }
    }
}

struct Worker {
    app: String,
    url: String,
    outbox: Outbox,
    client: Client,
    store: CdrStore,
    stats: Arc<Stats>,
    /// The next `seq`, shared by every app's worker (the table's key).
    next: Arc<AtomicI64>,
    rx: mpsc::Receiver<Offer>,
    closing: watch::Receiver<bool>,
    flights: JoinSet<Result<(), DeliveryError>>,
    /// The entry each attempt in flight is for.
    ids: HashMap<tokio::task::Id, i64>,
}

impl Worker {
    async fn run(mut self) {
        loop {
            self.drive();
            let wake = self.outbox.poll_timeout();
            tokio::select! {
                _ = self.closing.changed() => break,
                offer = self.rx.recv() => match offer {
                    Some(o) => self.accept(o),
                    None => break,
                },
                Some(done) = self.flights.join_next_with_id(), if !self.flights.is_empty() => {
                    self.finished(done);
                }
                () = sleep_until_ms(wake) => {}
            }
        }
        // What has arrived is stored, to go out at the next start.
        self.rx.close();
        while let Ok(o) = self.rx.try_recv() {
            self.accept(o);
        }
        self.flights.abort_all();
    }

    /// Carries out what the outbox asks for now.
    fn drive(&mut self) {
        let now = crate::cdr::unix_ms();
        while let Some(out) = self.outbox.poll_output(now) {
            match out {
                Output::Send { seq, body, attempt } => {
                    let client = self.client.clone();
                    let id = delivery_id(&body);
                    let handle = self
                        .flights
                        .spawn(async move { client.post(&id, body, now / 1000).await });
                    self.ids.insert(handle.id(), seq);
                    if attempt > 1 {
                        tracing::debug!(app = %self.app, seq, attempt, "webhook retry");
                    }
                }
                Output::Forget {
                    seq,
                    outcome,
                    attempts,
                } => {
                    self.stats.given_up(outcome);
                    if outcome != super::outbox::Outcome::Delivered {
                        tracing::warn!(app = %self.app, url = %self.url, seq, attempts, reason = outcome.as_str(), "webhook event given up");
                    }
                    drop(self.store.webhook_done(seq));
                }
            }
        }
        self.gauges();
    }

    fn gauges(&self) {
        self.stats
            .waiting
            .store(self.outbox.len(), Ordering::Relaxed);
        self.stats
            .oldest
            .store(self.outbox.oldest().unwrap_or(0), Ordering::Relaxed);
    }

    /// A new event from the hub: queued and stored.
    fn accept(&mut self, offer: Offer) {
        let Ok(id) = crate::rand::hex::<16>() else {
            tracing::error!(app = %self.app, "no randomness for a webhook delivery id: event dropped");
            return;
        };
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let at = crate::cdr::unix_ms();
        let body: Arc<str> = super::body(&id, &self.app, &offer.agent, at, &offer.event).into();
        let entry = Entry {
            seq,
            agent: offer.agent.clone(),
            created_at: at,
            body: body.clone(),
        };
        if self.outbox.handle_event(entry).is_err() {
            self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(app = %self.app, "webhook queue full (max_queue): event dropped");
            return;
        }
        drop(self.store.webhook_queued(WebhookRow {
            seq,
            app: self.app.clone(),
            agent: offer.agent.to_string(),
            created_at: at,
            body: body.to_string(),
        }));
        self.gauges();
    }

    /// An event stored by an earlier run.
    fn load(&mut self, row: &WebhookRow) {
        let entry = Entry {
            seq: row.seq,
            agent: row.agent.as_str().into(),
            created_at: row.created_at,
            body: row.body.as_str().into(),
        };
        if self.outbox.handle_event(entry).is_err() {
            self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
            drop(self.store.webhook_done(row.seq));
        }
    }

    fn finished(
        &mut self,
        done: Result<(tokio::task::Id, Result<(), DeliveryError>), tokio::task::JoinError>,
    ) {
        let (task, result) = match done {
            Ok((task, r)) => (task, r),
            Err(e) => (e.id(), Err(DeliveryError::Aborted)),
        };
        let Some(seq) = self.ids.remove(&task) else {
            return;
        };
        let now = crate::cdr::unix_ms();
        if let Err(e) = &result {
            self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(app = %self.app, url = %self.url, seq, "webhook attempt failed: {e}");
        }
        self.outbox
            .handle_result(now, seq, result.map_err(|e| e.failure()));
    }
}

/// The body's `id` (it begins the JSON the worker built).
fn delivery_id(body: &str) -> String {
    body.strip_prefix("{\"id\":\"")
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_owned()
}

async fn sleep_until_ms(at: Option<i64>) {
    match at {
        Some(at) => {
            let wait = at.saturating_sub(crate::cdr::unix_ms()).max(0);
            tokio::time::sleep(std::time::Duration::from_millis(wait.unsigned_abs())).await;
        }
        None => std::future::pending().await,
    }
}
