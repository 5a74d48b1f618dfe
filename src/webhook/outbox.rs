//! The sans-IO delivery queue of one app's webhook: which event goes out next, when a failed
//! one is tried again, and when one is given up. It never touches a socket or a clock: the
//! shell passes `now` (Unix ms) in and carries out what it is told.
//!
//! Call order: [`Outbox::handle_event`] for each new event and [`Outbox::handle_result`] for
//! each finished attempt; then [`Outbox::poll_output`] until `None`, and sleep until
//! [`Outbox::poll_timeout`] or the next input.
//!
//! Rules:
//! - **One agent's events in order**: an event goes out only once every earlier event of the
//!   same agent is delivered or given up, so a receiver sees `ringing` before `established`.
//!   Different agents' events go out side by side, up to `concurrency` at a time.
//! - **One back-off for the app**: any failed attempt means the receiver is down or refusing,
//!   so the whole queue waits (1 s, doubling to 5 min, or the receiver's `Retry-After`), then
//!   sends one attempt alone; its success brings back full concurrency. A receiver that is
//!   down for an hour gets one probe every 5 minutes, not one per agent.
//! - **Given up**: an event older than `max_age`, or one the receiver refused (4xx other than
//!   408 and 429) `max_refusals` times. An event that finds the queue at `max_queue` is not
//!   queued. Each is counted and logged by the shell.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// First pause after a failure; it doubles with each further failure in a row.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// Longest pause between attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// How the queue behaves (apps.toml `[apps.NAME.webhook]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Attempts in flight at once.
    pub concurrency: usize,
    /// An event not delivered by then is given up.
    pub max_age: Duration,
    /// Events waiting at most.
    pub max_queue: usize,
    /// Refusals (4xx) of one event before it is given up.
    pub max_refusals: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            concurrency: 4,
            max_age: Duration::from_secs(24 * 3600),
            max_queue: 20_000,
            max_refusals: 5,
        }
    }
}

/// One event to deliver, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its place in the queue (the database row's key): lower goes first.
    pub seq: i64,
    /// The agent it is about.
    pub agent: Arc<str>,
    /// When it was queued (Unix ms).
    pub created_at: i64,
    /// The JSON body POSTed.
    pub body: Arc<str>,
}

/// Why an attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No answer: connection refused or reset, TLS failed, timeout, a 5xx, 408 or 429. Tried
    /// again until `max_age`.
    Unavailable {
        /// The receiver's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// The receiver refused this event (a 4xx other than 408 and 429).
    Refused,
}

/// Why an event left the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver answered 2xx.
    Delivered,
    /// Older than `max_age`.
    Expired,
    /// Refused `max_refusals` times.
    Refused,
}

impl Outcome {
    /// As a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Expired => "expired",
            Outcome::Refused => "refused",
        }
    }
}

/// What the shell does next.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Output {
    /// POST `body`; report with [`Outbox::handle_result`]`(seq, ..)`.
    Send {
        /// The entry.
        seq: i64,
        /// Its body.
        body: Arc<str>,
        /// 1 for the first attempt.
        attempt: u32,
    },
    /// The entry is done with: delete it from the store.
    Forget {
        /// The entry.
        seq: i64,
        /// Why.
        outcome: Outcome,
        /// Attempts made.
        attempts: u32,
    },
}

/// The queue was full: the event was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

#[derive(Debug)]
struct Waiting {
    entry: Entry,
    attempts: u32,
    refusals: u32,
    in_flight: bool,
}

/// One app's queue.
#[derive(Debug)]
pub struct Outbox {
    policy: Policy,
    waiting: BTreeMap<i64, Waiting>,
    in_flight: usize,
    /// Failed attempts in a row (the back-off's exponent).
    failures: u32,
    /// No attempt starts before this (Unix ms).
    paused_until: i64,
    forget: VecDeque<Output>,
}

impl Outbox {
    /// An empty queue.
    pub fn new(policy: Policy) -> Outbox {
        Outbox {
            policy: Policy {
                concurrency: policy.concurrency.max(1),
                ..policy
            },
            waiting: BTreeMap::new(),
            in_flight: 0,
            failures: 0,
            paused_until: i64::MIN,
            forget: VecDeque::new(),
        }
    }

    /// Events waiting (in flight included).
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// When the oldest waiting event was queued (Unix ms).
    pub fn oldest(&self) -> Option<i64> {
        self.waiting.values().map(|w| w.entry.created_at).min()
    }

    /// A new event (or one loaded from the store at start-up).
    pub fn handle_event(&mut self, entry: Entry) -> Result<(), Full> {
        if self.waiting.len() >= self.policy.max_queue {
            return Err(Full);
        }
        self.waiting.insert(
            entry.seq,
            Waiting {
                entry,
                attempts: 0,
                refusals: 0,
                in_flight: false,
            },
        );
        Ok(())
    }

    /// The attempt at `seq` finished at `now`.
    pub fn handle_result(&mut self, now: i64, seq: i64, result: Result<(), Failure>) {
        let Some(w) = self.waiting.get_mut(&seq) else {
            return;
        };
        if !w.in_flight {
            return;
        }
        w.in_flight = false;
        self.in_flight = self.in_flight.saturating_sub(1);
        let attempts = w.attempts;
        match result {
            Ok(()) => {
                self.waiting.remove(&seq);
                self.failures = 0;
                self.forget.push_back(Output::Forget {
                    seq,
                    outcome: Outcome::Delivered,
                    attempts,
                });
            }
            Err(failure) => {
                let retry_after = match failure {
                    Failure::Unavailable { retry_after } => retry_after,
                    Failure::Refused => {
                        w.refusals += 1;
                        if w.refusals >= self.policy.max_refusals {
                            self.waiting.remove(&seq);
                            self.forget.push_back(Output::Forget {
                                seq,
                                outcome: Outcome::Refused,
                                attempts,
                            });
                        }
                        None
                    }
                };
                self.failures = self.failures.saturating_add(1);
                let pause = retry_after
                    .unwrap_or_else(|| backoff(self.failures))
                    .min(BACKOFF_MAX);
                let until = now.saturating_add(i64::try_from(pause.as_millis()).unwrap_or(0));
                self.paused_until = self.paused_until.max(until);
            }
        }
    }

    /// The next thing to do at `now`.
    pub fn poll_output(&mut self, now: i64) -> Option<Output> {
        if let Some(out) = self.forget.pop_front() {
            return Some(out);
        }
        self.expire(now);
        if let Some(out) = self.forget.pop_front() {
            return Some(out);
        }
        if now < self.paused_until {
            return None;
        }
        self.paused_until = i64::MIN;
        // After a failure, one attempt alone until one succeeds.
        let room = if self.failures > 0 {
            1
        } else {
            self.policy.concurrency
        };
        if self.in_flight >= room {
            return None;
        }
        // The first waiting event of an agent with nothing earlier still waiting.
        let mut busy: HashSet<&str> = HashSet::new();
        let mut pick = None;
        for (seq, w) in &self.waiting {
            if busy.insert(&w.entry.agent) && !w.in_flight {
                pick = Some(*seq);
                break;
            }
        }
        let w = self.waiting.get_mut(&pick?)?;
        w.in_flight = true;
        w.attempts += 1;
        self.in_flight += 1;
        Some(Output::Send {
            seq: w.entry.seq,
            body: w.entry.body.clone(),
            attempt: w.attempts,
        })
    }

    /// When to call [`poll_output`](Self::poll_output) again with no new input (Unix ms).
    pub fn poll_timeout(&self) -> Option<i64> {
        if self.waiting.is_empty() {
            return None;
        }
        // In flight, an event is not given up: its result comes as an input.
        let expiry = self
            .waiting
            .values()
            .filter(|w| !w.in_flight)
            .map(|w| w.entry.created_at)
            .min()
            .map(|t| t.saturating_add(self.max_age_ms()).saturating_add(1));
        let resume = (self.paused_until > i64::MIN).then_some(self.paused_until);
        match (expiry, resume) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn max_age_ms(&self) -> i64 {
        i64::try_from(self.policy.max_age.as_millis()).unwrap_or(i64::MAX)
    }

    /// Gives up events older than `max_age` that are not in flight.
    fn expire(&mut self, now: i64) {
        let limit = now.saturating_sub(self.max_age_ms());
        let old: Vec<i64> = self
            .waiting
            .iter()
            .filter(|(_, w)| !w.in_flight && w.entry.created_at < limit)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in old {
            if let Some(w) = self.waiting.remove(&seq) {
                self.forget.push_back(Output::Forget {
                    seq,
                    outcome: Outcome::Expired,
                    attempts: w.attempts,
                });
            }
        }
    }
}

/// The pause after `failures` failed attempts in a row.
fn backoff(failures: u32) -> Duration {
    BACKOFF_FIRST
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
        .min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: i64, agent: &str, at: i64) -> Entry {
        Entry {
            seq,
            agent: agent.into(),
            created_at: at,
            body: format!("{{\"n\":{seq}}}").into(),
        }
    }

    fn sends(o: &mut Outbox, now: i64) -> Vec<i64> {
        let mut out = Vec::new();
        for _ in 0..100 {
            match o.poll_output(now) {
                Some(Output::Send { seq, .. }) => out.push(seq),
                Some(other) => panic!("unexpected {other:?}"),
                None => return out,
            }
        }
        panic!("no end of outputs")
    }

    fn policy(concurrency: usize) -> Policy {
        Policy {
            concurrency,
            ..Policy::default()
        }
    }

    #[test]
    fn one_agents_events_go_in_order_and_agents_go_side_by_side() {
        let mut o = Outbox::new(policy(4));
        for (seq, agent) in [(1, "a"), (2, "a"), (3, "b"), (4, "a"), (5, "c")] {
            o.handle_event(entry(seq, agent, 0)).unwrap();
        }
        assert_eq!(sends(&mut o, 0), vec![1, 3, 5]);
        o.handle_result(10, 3, Ok(()));
        assert_eq!(
            o.poll_output(10),
            Some(Output::Forget {
                seq: 3,
                outcome: Outcome::Delivered,
                attempts: 1
            })
        );
        assert_eq!(sends(&mut o, 10), Vec::<i64>::new(), "a's 2 waits for 1");
        o.handle_result(20, 1, Ok(()));
        let _ = o.poll_output(20);
        assert_eq!(sends(&mut o, 20), vec![2]);
        o.handle_result(30, 2, Ok(()));
        let _ = o.poll_output(30);
        assert_eq!(sends(&mut o, 30), vec![4]);
    }

    #[test]
    fn concurrency_bounds_attempts_in_flight() {
        let mut o = Outbox::new(policy(2));
        for seq in 1..=5 {
            o.handle_event(entry(seq, &format!("agent{seq}"), 0))
                .unwrap();
        }
        assert_eq!(sends(&mut o, 0), vec![1, 2]);
        o.handle_result(5, 1, Ok(()));
        let _ = o.poll_output(5);
        assert_eq!(sends(&mut o, 5), vec![3]);
    }

    #[test]
    fn a_failure_pauses_the_app_then_one_probe_goes_alone() {
        let mut o = Outbox::new(policy(4));
        for seq in 1..=3 {
            o.handle_event(entry(seq, &format!("agent{seq}"), 0))
                .unwrap();
        }
        assert_eq!(sends(&mut o, 0), vec![1, 2, 3]);
        let down = Err(Failure::Unavailable { retry_after: None });
        o.handle_result(100, 1, down);
        o.handle_result(100, 2, down);
        o.handle_result(100, 3, down);
        // Three failures in a row: 1 s, 2 s, 4 s; the pause is the longest.
        assert_eq!(o.poll_timeout(), Some(4_100));
        assert_eq!(sends(&mut o, 4_099), Vec::<i64>::new());
        assert_eq!(sends(&mut o, 4_100), vec![1], "one probe");
        o.handle_result(4_200, 1, down);
        assert_eq!(o.poll_timeout(), Some(4_200 + 8_000));
        assert_eq!(sends(&mut o, 12_200), vec![1]);
        o.handle_result(12_300, 1, Ok(()));
        let _ = o.poll_output(12_300);
        assert_eq!(
            sends(&mut o, 12_300),
            vec![2, 3],
            "back to full concurrency"
        );
        assert_eq!(o.len(), 2);
    }

    #[test]
    fn the_pause_is_capped_and_follows_retry_after() {
        let mut o = Outbox::new(policy(1));
        o.handle_event(entry(1, "a", 0)).unwrap();
        let mut now = 0;
        for _ in 0..20 {
            assert_eq!(sends(&mut o, now), vec![1]);
            o.handle_result(now, 1, Err(Failure::Unavailable { retry_after: None }));
            now = o.poll_timeout().unwrap();
        }
        assert!(now <= 20 * 300_000, "pauses capped at 5 min: {now}");
        let at = now;
        assert_eq!(sends(&mut o, at), vec![1]);
        o.handle_result(
            at,
            1,
            Err(Failure::Unavailable {
                retry_after: Some(Duration::from_secs(7)),
            }),
        );
        assert_eq!(o.poll_timeout(), Some(at + 7_000));
        assert_eq!(sends(&mut o, at + 7_000), vec![1]);
        o.handle_result(
            at + 7_000,
            1,
            Err(Failure::Unavailable {
                retry_after: Some(Duration::from_secs(86_400)),
            }),
        );
        assert_eq!(o.poll_timeout(), Some(at + 7_000 + 300_000));
    }

    #[test]
    fn an_event_refused_max_refusals_times_is_given_up_and_the_next_goes() {
        let mut o = Outbox::new(Policy {
            max_refusals: 2,
            ..policy(1)
        });
        o.handle_event(entry(1, "a", 0)).unwrap();
        o.handle_event(entry(2, "a", 0)).unwrap();
        assert_eq!(sends(&mut o, 0), vec![1]);
        o.handle_result(0, 1, Err(Failure::Refused));
        assert_eq!(sends(&mut o, 1_000), vec![1]);
        o.handle_result(1_000, 1, Err(Failure::Refused));
        assert_eq!(
            o.poll_output(1_000),
            Some(Output::Forget {
                seq: 1,
                outcome: Outcome::Refused,
                attempts: 2
            })
        );
        assert_eq!(sends(&mut o, 3_000), vec![2]);
    }

    #[test]
    fn old_events_are_given_up_but_not_while_in_flight() {
        let mut o = Outbox::new(Policy {
            max_age: Duration::from_secs(60),
            ..policy(1)
        });
        o.handle_event(entry(1, "a", 0)).unwrap();
        o.handle_event(entry(2, "b", 30_000)).unwrap();
        assert_eq!(sends(&mut o, 0), vec![1]);
        assert_eq!(o.poll_output(70_000), None, "1 is in flight, 2 is young");
        o.handle_result(70_000, 1, Err(Failure::Unavailable { retry_after: None }));
        assert_eq!(
            o.poll_output(70_000),
            Some(Output::Forget {
                seq: 1,
                outcome: Outcome::Expired,
                attempts: 1
            })
        );
        assert_eq!(
            o.poll_timeout(),
            Some(71_000),
            "the pause ends before 2 expires"
        );
        assert_eq!(
            o.poll_output(71_000),
            Some(Output::Send {
                seq: 2,
                body: "{\"n\":2}".into(),
                attempt: 1
            })
        );
        o.handle_result(71_000, 2, Err(Failure::Unavailable { retry_after: None }));
        assert_eq!(
            o.poll_output(73_000),
            Some(Output::Send {
                seq: 2,
                body: "{\"n\":2}".into(),
                attempt: 2
            })
        );
        assert_eq!(
            o.poll_timeout(),
            None,
            "nothing to wake for while 2 is in flight"
        );
        o.handle_result(73_000, 2, Err(Failure::Unavailable { retry_after: None }));
        assert_eq!(o.poll_timeout(), Some(77_000));
        assert_eq!(
            o.poll_output(77_000),
            Some(Output::Send {
                seq: 2,
                body: "{\"n\":2}".into(),
                attempt: 3
            })
        );
        o.handle_result(89_000, 2, Err(Failure::Unavailable { retry_after: None }));
        assert_eq!(
            o.poll_timeout(),
            Some(90_001),
            "2 expires after 90 s, before the pause ends"
        );
        assert_eq!(
            o.poll_output(90_001),
            Some(Output::Forget {
                seq: 2,
                outcome: Outcome::Expired,
                attempts: 3
            })
        );
        assert!(o.is_empty());
        assert_eq!(o.poll_timeout(), None);
    }

    #[test]
    fn a_full_queue_takes_nothing_more() {
        let mut o = Outbox::new(Policy {
            max_queue: 2,
            ..policy(1)
        });
        o.handle_event(entry(1, "a", 0)).unwrap();
        o.handle_event(entry(2, "a", 0)).unwrap();
        assert_eq!(o.handle_event(entry(3, "a", 0)), Err(Full));
        assert_eq!(o.len(), 2);
    }

    #[test]
    fn a_late_or_repeated_result_changes_nothing() {
        let mut o = Outbox::new(policy(1));
        o.handle_event(entry(1, "a", 0)).unwrap();
        o.handle_result(0, 1, Ok(()));
        o.handle_result(0, 9, Ok(()));
        assert_eq!(
            sends(&mut o, 0),
            vec![1],
            "a result before its send is ignored"
        );
        o.handle_result(5, 1, Ok(()));
        o.handle_result(6, 1, Err(Failure::Refused));
        let _ = o.poll_output(6);
        assert!(o.is_empty());
        assert_eq!(o.poll_output(6), None);
    }
}
