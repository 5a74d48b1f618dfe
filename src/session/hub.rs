//! Per-agent event channels for CRM backends: `GET /api/v1/agents/{agent}/events` streams every
//! call and registration event of one agent as Server-Sent Events.
//!
//! One [`Channel`] per agent of an app, keyed by (app, agent): the same address logging in
//! through two apps has two channels, and a key of one app never sees, opens or blocks the
//! other's. A channel is shared by every subscriber (CRM tabs, backend workers): a
//! subscriber joins the channel's ring buffer, nothing upstream is opened for it. Events carry
//! ids from one counter for the whole process, so a reconnecting subscriber's `Last-Event-ID`
//! either resumes exactly after what it saw or, when that is no longer buffered (or the channel
//! was recreated meanwhile), gets a `gap` event first.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Limits of the event hub (`[events]` in callgate.toml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Agents with an event channel at once.
    pub max_channels: usize,
    /// Subscribers of one channel at once.
    pub max_subscribers: usize,
    /// Events each channel keeps for `Last-Event-ID` replay.
    pub buffer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_channels: 10_000,
            max_subscribers: 8,
            buffer: 256,
        }
    }
}

/// How long a channel with no session and no subscriber is kept (for replay) before it goes.
const LINGER: Duration = Duration::from_secs(300);

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// `max_channels` reached.
    #[error("too many agents have event subscribers (events.max_channels)")]
    TooManyChannels,
    /// `max_subscribers` reached for this agent.
    #[error("this agent's event channel has its maximum of subscribers (events.max_subscribers)")]
    TooManySubscribers,
}

struct Buffer {
    events: VecDeque<(u64, Arc<str>)>,
    /// Highest id dropped from the front (0: none yet).
    evicted: u64,
}

/// One agent's events.
pub struct Channel {
    /// The app whose agent this is.
    app: String,
    /// The agent.
    agent: String,
    /// Ids at or below this were issued before the channel existed.
    born_after: u64,
    buffer: Mutex<Buffer>,
    latest: watch::Sender<u64>,
    capacity: usize,
    sessions: AtomicUsize,
    subscribers: AtomicUsize,
    idle_since: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Channel {
    /// The app the channel belongs to.
    pub fn app(&self) -> &str {
        &self.app
    }

    fn touch_idle(&self) {
        let idle = self.sessions.load(Ordering::Relaxed) == 0
            && self.subscribers.load(Ordering::Relaxed) == 0;
        *lock(&self.idle_since) = idle.then(Instant::now);
    }
}

/// What a subscriber gets next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// An event: its id and JSON.
    Event(u64, Arc<str>),
    /// Events after `after` are no longer available; the stream goes on from `resumes_at`.
    Gap {
        /// The subscriber's `Last-Event-ID`.
        after: u64,
        /// The first id it will get.
        resumes_at: u64,
    },
}

/// A subscriber's place in a channel; counted until dropped.
pub struct Subscription {
    channel: Arc<Channel>,
    latest: watch::Receiver<u64>,
    last: u64,
    gap_checked: bool,
    closing: watch::Receiver<bool>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.channel.subscribers.fetch_sub(1, Ordering::Relaxed);
        self.channel.touch_idle();
    }
}

impl Subscription {
    /// The next item; waits for new events.
    pub async fn next(&mut self) -> Option<Item> {
        loop {
            {
                let buf = lock(&self.channel.buffer);
                if !self.gap_checked {
                    self.gap_checked = true;
                    let first = buf.events.front().map_or(buf.evicted + 1, |(id, _)| *id);
                    let lost = self.last != 0
                        && (self.last < self.channel.born_after || self.last < buf.evicted);
                    if lost {
                        let after = self.last;
                        self.last = first.saturating_sub(1);
                        return Some(Item::Gap {
                            after,
                            resumes_at: first,
                        });
                    }
                }
                if let Some((id, json)) = buf.events.iter().find(|(id, _)| *id > self.last) {
                    self.last = *id;
                    return Some(Item::Event(*id, json.clone()));
                }
            }
            // Shutting down: what was buffered went out; the stream ends so that the server's
            // graceful shutdown does not wait for it.
            if *self.closing.borrow() {
                return None;
            }
            tokio::select! {
                changed = self.latest.changed() => if changed.is_err() {
                    return None;
                },
                _ = self.closing.changed() => {}
            }
        }
    }
}

/// All agents' channels.
pub struct Hub {
    /// (app, agent) -> channel.
    channels: Mutex<HashMap<(String, String), Arc<Channel>>>,
    next_id: AtomicU64,
    limits: Limits,
    closing: watch::Sender<bool>,
    /// The apps' webhooks: each published event goes to its app's too.
    webhooks: HashMap<String, crate::webhook::Sink>,
}

impl Hub {
    /// An empty hub.
    pub fn new(limits: Limits) -> Hub {
        Hub::with_webhooks(limits, HashMap::new())
    }

    /// An empty hub that hands every event to its app's webhook, if it has one.
    pub fn with_webhooks(limits: Limits, webhooks: HashMap<String, crate::webhook::Sink>) -> Hub {
        Hub {
            channels: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            limits,
            closing: watch::channel(false).0,
            webhooks,
        }
    }

    fn create(&self, app: &str, agent: &str) -> Arc<Channel> {
        Arc::new(Channel {
            app: app.to_owned(),
            agent: agent.to_owned(),
            born_after: self.next_id.load(Ordering::Relaxed),
            buffer: Mutex::new(Buffer {
                events: VecDeque::new(),
                evicted: 0,
            }),
            latest: watch::channel(0).0,
            capacity: self.limits.buffer.max(1),
            sessions: AtomicUsize::new(0),
            subscribers: AtomicUsize::new(0),
            idle_since: Mutex::new(None),
        })
    }

    /// Drops channels idle (no session, no subscriber) for longer than [`LINGER`].
    fn sweep(map: &mut HashMap<(String, String), Arc<Channel>>) {
        map.retain(|_, c| !lock(&c.idle_since).is_some_and(|t| t.elapsed() > LINGER));
    }

    /// An agent of `app` logged in: its channel (created if needed).
    pub fn login(&self, agent: &str, app: &str) -> Arc<Channel> {
        let mut map = lock(&self.channels);
        Hub::sweep(&mut map);
        let ch = map
            .entry((app.to_owned(), agent.to_owned()))
            .or_insert_with(|| self.create(app, agent))
            .clone();
        ch.sessions.fetch_add(1, Ordering::Relaxed);
        ch.touch_idle();
        ch
    }

    /// A session of the agent ended (logged out, or not resumed in time).
    pub fn logout(&self, channel: &Channel) {
        let n = channel.sessions.load(Ordering::Relaxed);
        if n > 0 {
            channel.sessions.fetch_sub(1, Ordering::Relaxed);
        }
        channel.touch_idle();
    }

    /// The channel of `app`'s `agent`, if it exists.
    pub fn get(&self, app: &str, agent: &str) -> Option<Arc<Channel>> {
        lock(&self.channels)
            .get(&(app.to_owned(), agent.to_owned()))
            .cloned()
    }

    /// The apps that have a channel for `agent`, those with a logged-in session first.
    pub fn apps_of(&self, agent: &str) -> Vec<String> {
        let map = lock(&self.channels);
        let mut apps: Vec<(bool, String)> = map
            .iter()
            .filter(|((_, a), _)| a == agent)
            .map(|((app, _), c)| (c.sessions.load(Ordering::Relaxed) == 0, app.clone()))
            .collect();
        apps.sort();
        apps.into_iter().map(|(_, app)| app).collect()
    }

    /// Subscribes to `app`'s `agent`'s channel after `last_id` (`Last-Event-ID`, 0 for none).
    /// With `create`, a channel that does not exist yet is opened, so a CRM can listen before
    /// its agent logs in.
    pub fn subscribe(
        &self,
        app: &str,
        agent: &str,
        last_id: u64,
        create: bool,
    ) -> Result<Option<Subscription>, SubscribeError> {
        let mut map = lock(&self.channels);
        Hub::sweep(&mut map);
        let key = (app.to_owned(), agent.to_owned());
        let channel = match (map.get(&key), create) {
            (Some(c), _) => c.clone(),
            (None, false) => return Ok(None),
            (None, true) => {
                if map.len() >= self.limits.max_channels {
                    return Err(SubscribeError::TooManyChannels);
                }
                let c = self.create(app, agent);
                map.insert(key, c.clone());
                c
            }
        };
        if channel.subscribers.load(Ordering::Relaxed) >= self.limits.max_subscribers {
            return Err(SubscribeError::TooManySubscribers);
        }
        channel.subscribers.fetch_add(1, Ordering::Relaxed);
        channel.touch_idle();
        let latest = channel.latest.subscribe();
        // Without a Last-Event-ID: from now on.
        let last_id = if last_id == 0 {
            *latest.borrow()
        } else {
            last_id
        };
        Ok(Some(Subscription {
            channel,
            latest,
            last: last_id,
            gap_checked: false,
            closing: self.closing.subscribe(),
        }))
    }

    /// Shutdown: every subscription ends once it has what was published so far.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Appends an event (its JSON) to `channel` and wakes its subscribers.
    pub fn publish(&self, channel: &Channel, json: Arc<str>) {
        if let Some(hook) = self.webhooks.get(&channel.app) {
            hook.offer(&channel.agent, json.clone());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut buf = lock(&channel.buffer);
            buf.events.push_back((id, json));
            while buf.events.len() > channel.capacity {
                if let Some((old, _)) = buf.events.pop_front() {
                    buf.evicted = old;
                }
            }
        }
        channel.latest.send_replace(id);
    }

    /// Subscribers over all channels (for /metrics).
    pub fn subscribers(&self) -> usize {
        lock(&self.channels)
            .values()
            .map(|c| c.subscribers.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(buffer: usize) -> Limits {
        Limits {
            max_channels: 2,
            max_subscribers: 2,
            buffer,
        }
    }

    async fn next(s: &mut Subscription) -> Item {
        tokio::time::timeout(Duration::from_secs(1), s.next())
            .await
            .unwrap()
            .unwrap()
    }

    #[tokio::test]
    async fn closing_ends_subscriptions_after_what_they_have_not_read() {
        let hub = Hub::new(limits(3));
        let ch = hub.login("1001@pbx", "crm");
        let mut a = hub.subscribe("crm", "1001@pbx", 0, false).unwrap().unwrap();
        let waiting = tokio::spawn(async move {
            let first = a.next().await;
            (first, a.next().await, a.next().await)
        });
        tokio::task::yield_now().await;
        hub.publish(&ch, "one".into());
        hub.publish(&ch, "two".into());
        hub.close();
        let got = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            got,
            (
                Some(Item::Event(1, "one".into())),
                Some(Item::Event(2, "two".into())),
                None
            )
        );
        // A subscription opened after: nothing to wait for.
        let mut late = hub.subscribe("crm", "1001@pbx", 2, false).unwrap().unwrap();
        assert_eq!(late.next().await, None);
    }

    #[tokio::test]
    async fn subscribers_share_one_channel_and_replay_after_their_last_id() {
        let hub = Hub::new(limits(3));
        let ch = hub.login("1001@pbx", "crm");
        let mut a = hub.subscribe("crm", "1001@pbx", 0, false).unwrap().unwrap();
        let mut b = hub.subscribe("crm", "1001@pbx", 0, false).unwrap().unwrap();
        assert!(matches!(
            hub.subscribe("crm", "1001@pbx", 0, false),
            Err(SubscribeError::TooManySubscribers)
        ));
        hub.publish(&ch, "one".into());
        hub.publish(&ch, "two".into());
        assert_eq!(next(&mut a).await, Item::Event(1, "one".into()));
        assert_eq!(next(&mut b).await, Item::Event(1, "one".into()));
        assert_eq!(next(&mut a).await, Item::Event(2, "two".into()));
        drop(a);
        // Reconnecting after id 1: gets 2, then live events.
        let mut again = hub.subscribe("crm", "1001@pbx", 1, false).unwrap().unwrap();
        assert_eq!(next(&mut again).await, Item::Event(2, "two".into()));
        hub.publish(&ch, "three".into());
        assert_eq!(next(&mut again).await, Item::Event(3, "three".into()));
        assert_eq!(hub.subscribers(), 2);
    }

    #[tokio::test]
    async fn a_last_id_older_than_the_buffer_is_a_gap() {
        let hub = Hub::new(limits(2));
        let ch = hub.login("1001@pbx", "crm");
        for e in ["a", "b", "c", "d"] {
            hub.publish(&ch, e.into());
        }
        let mut s = hub.subscribe("crm", "1001@pbx", 1, false).unwrap().unwrap();
        assert_eq!(
            next(&mut s).await,
            Item::Gap {
                after: 1,
                resumes_at: 3
            }
        );
        assert_eq!(next(&mut s).await, Item::Event(3, "c".into()));
        assert_eq!(next(&mut s).await, Item::Event(4, "d".into()));
        // Up to date: no gap.
        let mut s = hub.subscribe("crm", "1001@pbx", 4, false).unwrap().unwrap();
        hub.publish(&ch, "e".into());
        assert_eq!(next(&mut s).await, Item::Event(5, "e".into()));
    }

    #[tokio::test]
    async fn channels_are_per_app_and_limited() {
        let hub = Hub::new(limits(4));
        assert!(
            hub.subscribe("crm", "nobody@pbx", 0, false)
                .unwrap()
                .is_none()
        );
        // A CRM listens before its agent logs in.
        let mut early = hub.subscribe("crm", "1002@pbx", 0, true).unwrap().unwrap();
        let ch = hub.login("1002@pbx", "crm");
        hub.publish(&ch, "x".into());
        assert!(matches!(next(&mut early).await, Item::Event(_, _)));
        // Another app opening a channel for the same address (before or after it logs in there)
        // gets a channel of its own: it neither sees nor disturbs crm's.
        let mut erp_early = hub.subscribe("erp", "1002@pbx", 0, true).unwrap().unwrap();
        let other = hub.login("1002@pbx", "erp");
        assert_eq!((other.app(), ch.app()), ("erp", "crm"));
        hub.publish(&other, "y".into());
        assert_eq!(next(&mut erp_early).await, Item::Event(2, "y".into()));
        hub.publish(&ch, "z".into());
        assert_eq!(next(&mut early).await, Item::Event(3, "z".into()));
        assert_eq!(hub.apps_of("1002@pbx"), ["crm", "erp"]);
        hub.logout(&ch);
        assert_eq!(hub.apps_of("1002@pbx"), ["erp", "crm"], "logged-in first");
        assert!(matches!(
            hub.subscribe("crm", "1004@pbx", 0, true),
            Err(SubscribeError::TooManyChannels)
        ));
    }
}
