//! One call of an agent's session, sans-IO: what the page is told, when the bridge starts and
//! where it sends, how the page's DTMF goes, whether the far end's REFER is followed (the app's
//! dial plan decides here), when a call without media is hung up, and the call's history row.
//!
//! Inputs: [`handle_sip`](CallCore::handle_sip) (the dialog's events),
//! [`handle_page`](CallCore::handle_page) (the agent's answer, digits, a new browser leg after a
//! reload), [`handle_bridge`](CallCore::handle_bridge) (digits heard, SIP-side media activity)
//! and [`handle_timeout`](CallCore::handle_timeout). After each, drain
//! [`poll_output`](CallCore::poll_output); wake at [`poll_timeout`](CallCore::poll_timeout).
//! The media legs themselves stay with the shell (`call_task.rs`), which does what the outputs
//! say with them.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::event::{CallState, Direction, Ending, Event, Progress, SipStatus};
use crate::config::DtmfMode;
use crate::dialplan::DialPlan;
use crate::media::bridge::{Flow, Mapping, MediaActivity};
use crate::sip::call::{CallEvent, EndReason};
use crate::sip::sdp::AudioSdp;

/// What a call needs to know of its session and app.
#[derive(Debug, Clone)]
pub struct CallSettings {
    /// How the page's DTMF is sent when the far end negotiated telephone-event.
    pub dtmf_mode: DtmfMode,
    /// Hang up an established, unheld call after this long without SIP-side media.
    pub media_timeout: Option<Duration>,
    /// Follow the far end's REFER to targets this dial plan allows; `None`: decline them.
    pub refer: Option<DialPlan>,
}

/// Who the call is, for its events and history row.
#[derive(Debug, Clone)]
pub struct CallInfo {
    /// callgate's call id.
    pub call_id: String,
    /// The SIP Call-ID.
    pub sip_call_id: String,
    /// The agent's app.
    pub app: String,
    /// The agent.
    pub agent: String,
    /// Who placed it.
    pub direction: Direction,
    /// The other party (as dialled, or the caller).
    pub peer: String,
    /// The call's data fields (apps.toml `call_data`: a dialler's headers), for the history.
    pub data: std::collections::BTreeMap<String, String>,
}

/// What the agent's page does to the call.
#[derive(Debug)]
pub enum PageInput {
    /// The agent answered an incoming call; the shell holds the legs for `browser`.
    Answered {
        /// The browser side negotiated for the answer.
        browser: AudioSdp,
    },
    /// Digits to send.
    Dtmf(String),
    /// A new browser leg (the page came back after a reload); the shell holds it.
    NewLeg {
        /// Its negotiated browser side.
        browser: AudioSdp,
    },
}

/// What the bridge reports.
#[derive(Debug, Clone, Copy)]
pub enum BridgeInput {
    /// The far end sent this RFC 4733 digit.
    Digit(char),
    /// The SIP side's media stopped (since when) or flows again.
    Media(MediaActivity),
}

/// What the shell must do.
#[derive(Debug)]
pub enum Output {
    /// Tell the page (and the CRM).
    Event(Event),
    /// The page's view of the call moved (the calls-by-state gauge).
    State {
        /// The state before (`None`: new).
        from: Option<CallState>,
        /// The state after (`None`: gone).
        to: Option<CallState>,
    },
    /// An outbound call was answered after this long.
    SetupTime(Duration),
    /// Start the bridge with the pending legs toward `remote`.
    StartBridge {
        /// The far end's media address.
        remote: SocketAddr,
        /// Payload types.
        mapping: Mapping,
    },
    /// The pending legs cannot be bridged with the far end's SDP: close them.
    CloseLegs,
    /// The far end's media moved (re-INVITE, a followed transfer).
    Retarget {
        /// Where to send now.
        remote: SocketAddr,
        /// Payload types for the new peer.
        mapping: Mapping,
    },
    /// Hand the page's new leg to the running bridge.
    Rebrowse(Mapping),
    /// Not bridged yet: the new leg takes the pending one's place (the old one closes).
    ReplacePendingLeg,
    /// The new leg cannot be used: close it.
    CloseNewLeg,
    /// Forward or hold the bridge.
    Flow(Flow),
    /// Send a digit in the media (RFC 4733).
    BridgeDtmf(char),
    /// Send digits by SIP INFO.
    SipInfo(String),
    /// Answer the far end's REFER.
    FollowRefer(bool),
    /// Hang up: no media from the far end for `media_timeout`.
    HangupMediaTimeout,
    /// The call ended for this reason (the calls-ended counter).
    Ended(EndReason),
    /// The call began: write its history row now (`in_progress`), so a crash loses nothing.
    Started(Box<crate::cdr::CallRecord>),
    /// It was answered at this Unix millisecond: bring the row up to date.
    Answered(i64),
    /// The call is over: stop the bridge, add its figures to this row and write it.
    Finished(Box<crate::cdr::CallRecord>),
}

/// Where the call's media is.
#[derive(Debug)]
enum Media {
    /// Legs not there yet (an incoming call before the answer).
    Absent,
    /// Legs set up for this browser side, waiting for the far end's SDP.
    Pending(AudioSdp),
    /// The bridge runs between these sides.
    Bridged {
        browser: AudioSdp,
        far: AudioSdp,
        remote: SocketAddr,
    },
    /// Nothing to bridge (negotiation failed, or the call ended).
    Gone,
}

/// The sans-IO core of one call.
#[derive(Debug)]
pub struct CallCore {
    info: CallInfo,
    settings: CallSettings,
    dialled: String,
    placed: Instant,
    started_ms: i64,
    answered: Option<Instant>,
    /// The state the page was last told.
    shown: Option<CallState>,
    established: bool,
    /// The agent holds the far end / the far end holds the agent.
    held: (bool, bool),
    media: Media,
    /// The caller's offer, answered when the agent answers (inbound).
    caller_offer: Option<AudioSdp>,
    /// The far end negotiated telephone-event: DTMF can go in the media.
    rfc4733: bool,
    /// Media silence counts from here (answer, hold changes, a new peer).
    watch_from: Instant,
    /// The SIP side sends nothing since then (the bridge said so).
    silent_since: Option<Instant>,
    timed_out: bool,
    transfer: Option<String>,
    finished: bool,
    out: VecDeque<Output>,
}

impl CallCore {
    /// A new call at `now` (`unix_ms` on the wall clock): outbound with its browser side set
    /// up (`browser`), or inbound ringing with the caller's offer. Its first event (`trying`
    /// or `ringing`) is queued.
    pub fn new(
        now: Instant,
        unix_ms: i64,
        info: CallInfo,
        settings: CallSettings,
        browser: Option<AudioSdp>,
        caller_offer: Option<AudioSdp>,
    ) -> CallCore {
        let first = match info.direction {
            Direction::Outbound => CallState::Trying,
            Direction::Inbound => CallState::Ringing,
        };
        let mut c = CallCore {
            dialled: info.peer.clone(),
            info,
            settings,
            placed: now,
            started_ms: unix_ms,
            answered: None,
            shown: None,
            established: false,
            held: (false, false),
            media: browser.map_or(Media::Absent, Media::Pending),
            caller_offer,
            rfc4733: false,
            watch_from: now,
            silent_since: None,
            timed_out: false,
            transfer: None,
            finished: false,
            out: VecDeque::new(),
        };
        let row = c.row(None, crate::cdr::IN_PROGRESS, None, None);
        c.out.push_back(Output::Started(Box::new(row)));
        c.report(first, None, None);
        c
    }

    /// Unix milliseconds of `t` on the call's clock.
    fn unix_ms(&self, t: Instant) -> i64 {
        self.started_ms.saturating_add(
            i64::try_from(t.saturating_duration_since(self.placed).as_millis()).unwrap_or(i64::MAX),
        )
    }

    /// The call's history row, as of its end at `ended` (`None`: going on).
    fn row(
        &self,
        ended: Option<Instant>,
        reason: &str,
        status: Option<u16>,
        phrase: Option<String>,
    ) -> crate::cdr::CallRecord {
        let answered_at = self.answered.map(|t| self.unix_ms(t));
        let ended_at = ended.map(|t| self.unix_ms(t));
        let (from, to) = match self.info.direction {
            Direction::Outbound => (self.info.agent.clone(), self.dialled.clone()),
            Direction::Inbound => (self.dialled.clone(), self.info.agent.clone()),
        };
        crate::cdr::CallRecord {
            call_id: self.info.call_id.clone(),
            sip_call_id: self.info.sip_call_id.clone(),
            app: self.info.app.clone(),
            agent: self.info.agent.clone(),
            direction: self.info.direction.as_str().to_owned(),
            from,
            to,
            started_at: self.started_ms,
            answered_at,
            ended_at,
            duration_ms: match (answered_at, ended_at) {
                (Some(a), Some(e)) => e.saturating_sub(a),
                _ => 0,
            },
            end_reason: reason.to_owned(),
            sip_status: status,
            sip_reason: phrase,
            transfer: self.transfer.clone(),
            packets_sent: 0,
            packets_received: 0,
            packets_lost: 0,
            jitter_ms: 0.0,
            page_packets_received: 0,
            page_packets_lost: 0,
            page_jitter_ms: 0.0,
            recording: None,
            data: self.info.data.clone(),
            disposition: None,
        }
    }

    /// callgate's id of the call.
    pub fn call_id(&self) -> &str {
        &self.info.call_id
    }

    /// Whether the call is over (its row was handed out).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// What the shell must do next.
    #[must_use]
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due: the media watch of an
    /// established call that nobody holds, while its far end is silent.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let limit = self.settings.media_timeout?;
        if !self.watching() {
            return None;
        }
        Some(self.silent_since?.max(self.watch_from) + limit)
    }

    fn watching(&self) -> bool {
        self.established
            && !self.held.0
            && !self.held.1
            && !self.timed_out
            && !self.finished
            && matches!(self.media, Media::Bridged { .. })
    }

    /// Time passed: a call whose far end sent no media for `media_timeout` is hung up.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(due) = self.poll_timeout() {
            if now >= due {
                tracing::info!(call = %self.info.call_id, "no media from the far end: hanging up");
                self.timed_out = true;
                self.out.push_back(Output::HangupMediaTimeout);
            }
        }
    }

    /// The bridge reported something.
    pub fn handle_bridge(&mut self, now: Instant, input: BridgeInput) {
        match input {
            BridgeInput::Digit(d) => self.event(Event::Dtmf {
                call_id: self.info.call_id.clone(),
                digit: d.to_string(),
            }),
            BridgeInput::Media(MediaActivity::Silent { since }) => {
                self.silent_since = Some(since.min(now));
            }
            BridgeInput::Media(MediaActivity::Flowing) => self.silent_since = None,
        }
    }

    /// The agent's page did something to the call.
    pub fn handle_page(&mut self, now: Instant, input: PageInput) {
        match input {
            PageInput::Dtmf(digits) => {
                if self.rfc4733 && self.settings.dtmf_mode == DtmfMode::Rfc4733 {
                    self.out.extend(digits.chars().map(Output::BridgeDtmf));
                } else {
                    self.out.push_back(Output::SipInfo(digits));
                }
            }
            PageInput::NewLeg { browser } => match &mut self.media {
                Media::Bridged { far, .. } => match Mapping::negotiate(&browser, far) {
                    Ok(mapping) => {
                        tracing::debug!(call = %self.info.call_id, "browser leg replaced");
                        if let Media::Bridged { browser: b, .. } = &mut self.media {
                            *b = browser;
                        }
                        self.out.push_back(Output::Rebrowse(mapping));
                    }
                    Err(e) => {
                        tracing::warn!(call = %self.info.call_id, "cannot bridge the new browser leg: {e}");
                        self.out.push_back(Output::CloseNewLeg);
                    }
                },
                Media::Pending(b) => {
                    *b = browser;
                    self.out.push_back(Output::ReplacePendingLeg);
                }
                Media::Absent | Media::Gone => self.out.push_back(Output::CloseNewLeg),
            },
            PageInput::Answered { browser } => {
                if matches!(self.media, Media::Absent) {
                    self.media = Media::Pending(browser);
                }
                // The caller's offer is the far end's SDP.
                let answer = self.caller_offer.take();
                self.handle_sip(now, CallEvent::Answered { answer });
            }
        }
    }

    /// The dialog reported something.
    pub fn handle_sip(&mut self, now: Instant, ev: CallEvent) {
        if self.finished {
            return;
        }
        tracing::debug!(call = %self.info.call_id, event = ?ev, "call event");
        match &ev {
            CallEvent::EarlyMedia { answer } => self.far_sdp(answer),
            CallEvent::Answered { answer: Some(a) } => self.far_sdp(a),
            CallEvent::RemoteHold { offer: Some(s), .. }
            | CallEvent::Hold {
                answer: Some(s), ..
            } => self.moved(s, false),
            CallEvent::Replaced {
                answer: Some(s), ..
            } => self.moved(s, true),
            _ => {}
        }
        match ev {
            CallEvent::Ringing => self.report(CallState::Ringing, None, None),
            CallEvent::EarlyMedia { .. } => self.report(CallState::Early, None, None),
            CallEvent::Answered { .. } => {
                if self.answered.is_none() {
                    self.answered = Some(now);
                    self.out.push_back(Output::Answered(self.unix_ms(now)));
                }
                self.established = true;
                self.watch_from = now;
                if self.info.direction == Direction::Outbound {
                    self.out.push_back(Output::SetupTime(
                        now.saturating_duration_since(self.placed),
                    ));
                }
                self.report(CallState::Established, None, None);
            }
            CallEvent::Hold { held, .. } => {
                self.held.0 = held;
                self.watch_from = now;
                self.out
                    .push_back(Output::Flow(if held { Flow::Hold } else { Flow::Forward }));
                let s = if held {
                    CallState::Held
                } else {
                    CallState::Established
                };
                self.report(s, None, None);
            }
            CallEvent::RemoteHold { held, .. } => {
                self.held.1 = held;
                self.watch_from = now;
                let s = if held {
                    CallState::HeldByRemote
                } else {
                    CallState::Established
                };
                self.report(s, None, None);
            }
            CallEvent::Referred { target } => self.referred(target),
            CallEvent::ReferProgress { status, phrase } => self.event(Event::Referred {
                call_id: self.info.call_id.clone(),
                state: if status >= 300 {
                    Progress::Failed
                } else {
                    Progress::Progress
                },
                to: None,
                sip: Some(SipStatus {
                    status,
                    reason: phrase,
                }),
            }),
            CallEvent::Replaced { peer, .. } => {
                self.transfer = Some(format!("referred:{}", peer.uri));
                self.info.peer = if peer.user().is_empty() {
                    peer.uri.clone()
                } else {
                    peer.user().to_owned()
                };
                self.event(Event::Referred {
                    call_id: self.info.call_id.clone(),
                    state: Progress::Succeeded,
                    to: Some(peer.uri),
                    sip: None,
                });
                // The new party's call is established and ours to hold: start clean.
                self.held.1 = false;
                if self.held.0 {
                    self.held.0 = false;
                    self.out.push_back(Output::Flow(Flow::Forward));
                }
                self.watch_from = now;
                self.report(CallState::Established, None, None);
            }
            CallEvent::Transfer { state, status } => self.event(Event::Transfer {
                call_id: self.info.call_id.clone(),
                state: state.into(),
                status,
            }),
            CallEvent::Dtmf { digit, .. } => self.event(Event::Dtmf {
                call_id: self.info.call_id.clone(),
                digit: digit.to_string(),
            }),
            CallEvent::Ended {
                reason,
                status,
                phrase,
            } => self.ended(now, reason, status, phrase),
            _ => {}
        }
    }

    /// The dialog's events stopped without an end (the SIP side is gone): the call is over.
    pub fn handle_sip_gone(&mut self, now: Instant) {
        if !self.finished {
            self.finish(now, EndReason::Failed, None, None);
        }
    }

    /// The far end's SDP arrived: the pending legs are bridged to it.
    fn far_sdp(&mut self, far: &AudioSdp) {
        let Media::Pending(browser) = &self.media else {
            return;
        };
        match Mapping::negotiate(browser, far) {
            Ok(mapping) => {
                let remote = SocketAddr::new(far.addr, far.port);
                tracing::debug!(call = %self.info.call_id, %remote, ?mapping, "bridge starts");
                self.rfc4733 = mapping.sip_telephone_event.is_some();
                let browser = browser.clone();
                self.media = Media::Bridged {
                    browser,
                    far: far.clone(),
                    remote,
                };
                self.out.push_back(Output::StartBridge { remote, mapping });
            }
            Err(e) => {
                tracing::warn!(call = %self.info.call_id, "cannot bridge media: {e}");
                self.media = Media::Gone;
                self.out.push_back(Output::CloseLegs);
            }
        }
    }

    /// A new SIP-side peer or address for a running bridge: a re-INVITE that moved the far
    /// end's media, or the party a followed transfer reached (`new_peer`).
    fn moved(&mut self, sdp: &AudioSdp, new_peer: bool) {
        let Media::Bridged {
            browser,
            far,
            remote,
        } = &mut self.media
        else {
            return;
        };
        let to = SocketAddr::new(sdp.addr, sdp.port);
        // An old-style hold (c=0.0.0.0) says "do not send", not where to.
        if (to == *remote && !new_peer) || sdp.addr.is_unspecified() || sdp.port == 0 {
            return;
        }
        match Mapping::negotiate(browser, sdp) {
            Ok(mapping) => {
                tracing::debug!(call = %self.info.call_id, remote = %to, "the far end's media moved");
                self.rfc4733 = mapping.sip_telephone_event.is_some();
                *remote = to;
                *far = sdp.clone();
                self.out.push_back(Output::Retarget {
                    remote: to,
                    mapping,
                });
            }
            Err(e) => {
                tracing::warn!(call = %self.info.call_id, "cannot bridge the new far end's media: {e}")
            }
        }
    }

    /// The far end's REFER: followed when `sip.accept_refer` and the app's dial plan allow
    /// the target.
    fn referred(&mut self, target: String) {
        let verdict = match &self.settings.refer {
            None => Err("transfers by the far end are off (sip.accept_refer)".to_owned()),
            Some(plan) => plan.check_referral(&target).map_err(|e| e.to_string()),
        };
        if let Err(why) = &verdict {
            tracing::info!(call = %self.info.call_id, %target, "declined the far end's transfer: {why}");
        }
        self.out.push_back(Output::FollowRefer(verdict.is_ok()));
        self.event(Event::Referred {
            call_id: self.info.call_id.clone(),
            state: if verdict.is_ok() {
                Progress::Accepted
            } else {
                Progress::Declined
            },
            to: Some(target),
            sip: None,
        });
    }

    fn ended(&mut self, now: Instant, reason: EndReason, status: Option<u16>, phrase: String) {
        if reason == EndReason::Transferred {
            self.transfer = Some("transferred".to_owned());
        }
        self.out.push_back(Output::Ended(reason));
        if reason == EndReason::Missed {
            self.event(Event::Missed {
                call_id: self.info.call_id.clone(),
                from: self.info.peer.clone(),
            });
        }
        let phrase = (!phrase.is_empty()).then_some(phrase);
        let sip = status.map(|status| SipStatus {
            status,
            reason: phrase.clone().unwrap_or_default(),
        });
        self.report(CallState::Ended, sip, Some(reason));
        self.finish(now, reason, status, phrase);
    }

    fn finish(
        &mut self,
        now: Instant,
        reason: EndReason,
        status: Option<u16>,
        phrase: Option<String>,
    ) {
        self.finished = true;
        self.media = Media::Gone;
        self.out.push_back(Output::State {
            from: self.shown.take(),
            to: None,
        });
        self.out.push_back(Output::Flow(Flow::Stop));
        let row = self.row(Some(now), reason.code(), status, phrase);
        self.out.push_back(Output::Finished(Box::new(row)));
    }

    fn event(&mut self, ev: Event) {
        self.out.push_back(Output::Event(ev));
    }

    /// Tells the page the call's state.
    fn report(&mut self, state: CallState, sip: Option<SipStatus>, reason: Option<EndReason>) {
        self.out.push_back(Output::State {
            from: self.shown,
            to: Some(state),
        });
        self.shown = Some(state);
        self.event(Event::Call {
            call_id: self.info.call_id.clone(),
            state,
            direction: self.info.direction,
            peer: self.info.peer.clone(),
            sip,
            end_reason: reason.map(Ending),
        });
    }
}

#[cfg(test)]
mod tests;
