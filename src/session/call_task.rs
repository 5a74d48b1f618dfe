//! The tokio shell of one call: feeds the [`CallCore`] the dialog's events, the session's
//! commands, the bridge's digits and the media watch, and does what it outputs with the legs,
//! the bridge, the dialog and the history. One task per call; it owns the call's control
//! (dropping it hangs up) and outlives the session's interest in it until the row is written.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::call::{BridgeInput, CallCore, Output, PageInput};
use super::event::Event;
use crate::media::bridge::{self, BridgeStats, Controls, Steering};
use crate::media::dtmf::DigitQueue;
use crate::media::rtp_leg::RtpLeg;
use crate::media::webrtc::Leg;
use crate::sip::call::CallEvent;
use crate::sip::endpoint::{CallCommander, CallControl};
use crate::sip::sdp::AudioSdp;

/// Most commands queued for one call (the page's request rate bounds them further).
pub(crate) const COMMAND_QUEUE: usize = 32;

/// What the session asks of a call.
pub(crate) enum CallCommand {
    /// Hang up (or cancel).
    Hangup,
    /// Refuse an incoming call with this status and phrase.
    Reject(u16, &'static str),
    /// Answer an incoming call: our SIP answer, and the page's legs.
    Answer {
        sip_answer: String,
        leg: Leg,
        rtp: Box<RtpLeg>,
        browser: AudioSdp,
    },
    /// Hold (true) or resume.
    Hold(bool),
    /// Blind transfer to this target (dial plan applied).
    Transfer(String),
    /// Attended transfer: the far end takes over the call with this endpoint id.
    CompleteTransfer(u64),
    /// Digits from the page.
    Dtmf(String),
    /// The page came back with a new leg.
    NewLeg(Leg, AudioSdp),
}

/// What a call tells its session.
pub(crate) enum CallUpdate {
    /// An event for the page and the CRM.
    Event(Event),
    /// The call is over (its last event was sent before this).
    Finished(String),
}

/// Everything a call task starts with.
pub(crate) struct CallTask {
    pub(crate) core: CallCore,
    pub(crate) control: CallControl,
    pub(crate) sip_events: mpsc::UnboundedReceiver<CallEvent>,
    pub(crate) commands: mpsc::Receiver<CallCommand>,
    pub(crate) updates: mpsc::Sender<CallUpdate>,
    /// The legs set up for an outbound call (inbound: handed over with the answer).
    pub(crate) legs: Option<(Leg, RtpLeg)>,
    pub(crate) store: crate::cdr::CdrStore,
    /// Where to record the call, if its app records.
    pub(crate) record: Option<PathBuf>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// The call's telephone-event digits waiting (the session reserves, the bridge frees).
    pub(crate) digits: DigitQueue,
}

/// The shell's own state beside the core.
struct Shell {
    commander: CallCommander,
    updates: mpsc::Sender<CallUpdate>,
    legs: Option<(Leg, RtpLeg)>,
    new_leg: Option<Leg>,
    steer: Steering,
    ctl: Option<Controls>,
    bridge: Option<JoinHandle<BridgeStats>>,
    store: crate::cdr::CdrStore,
    record: Option<PathBuf>,
    recording: Option<String>,
    metrics: Arc<crate::metrics::Metrics>,
    row: Option<Box<crate::cdr::CallRecord>>,
    digits: DigitQueue,
    call_id: String,
}

impl CallTask {
    /// Runs the call to its end and writes its history row.
    pub(crate) async fn run(self) {
        let CallTask {
            mut core,
            control,
            mut sip_events,
            mut commands,
            updates,
            legs,
            store,
            record,
            metrics,
            digits,
        } = self;
        // The row is completed when the call ends; shutdown waits for it.
        let pending = store.track();
        let (steer, ctl) = bridge::controls(digits.clone());
        let mut shell = Shell {
            commander: control.commander(),
            updates,
            legs,
            new_leg: None,
            steer,
            ctl: Some(ctl),
            bridge: None,
            store,
            record,
            recording: None,
            metrics,
            row: None,
            digits,
            call_id: core.call_id().to_owned(),
        };
        let mut control = Some(control);
        shell.apply_all(&mut core).await;
        while shell.row.is_none() {
            let deadline = core.poll_timeout().map(tokio::time::Instant::from_std);
            tokio::select! {
                ev = sip_events.recv() => match ev {
                    Some(ev) => core.handle_sip(Instant::now(), ev),
                    None => core.handle_sip_gone(Instant::now()),
                },
                cmd = commands.recv(), if control.is_some() => match cmd {
                    Some(cmd) => shell.command(&mut core, control.as_ref(), cmd),
                    // The session let go of the call: dropping the control hangs it up.
                    None => control = None,
                },
                Some(d) = shell.steer.heard.recv() => core.handle_bridge(Instant::now(), BridgeInput::Digit(d)),
                Some(a) = shell.steer.activity.recv() => core.handle_bridge(Instant::now(), BridgeInput::Media(a)),
                () = sleep_until(deadline) => core.handle_timeout(Instant::now()),
            }
            shell.apply_all(&mut core).await;
        }
        drop(control);
        shell.finish(core.call_id(), pending).await;
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Shell {
    fn command(&mut self, core: &mut CallCore, control: Option<&CallControl>, cmd: CallCommand) {
        let Some(control) = control else { return };
        let now = Instant::now();
        match cmd {
            CallCommand::Hangup => control.hangup(),
            CallCommand::Reject(code, phrase) => control.reject(code, phrase),
            CallCommand::Answer {
                sip_answer,
                leg,
                rtp,
                browser,
            } => {
                control.answer(sip_answer);
                self.legs = Some((leg, *rtp));
                core.handle_page(now, PageInput::Answered { browser });
            }
            CallCommand::Hold(true) => control.hold(),
            CallCommand::Hold(false) => control.unhold(),
            CallCommand::Transfer(to) => control.transfer(&to),
            CallCommand::CompleteTransfer(consult) => control.complete_transfer_to(consult),
            CallCommand::Dtmf(digits) => core.handle_page(now, PageInput::Dtmf(digits)),
            CallCommand::NewLeg(leg, browser) => {
                if let Some(old) = self.new_leg.replace(leg) {
                    drop(old);
                }
                core.handle_page(now, PageInput::NewLeg { browser });
            }
        }
    }

    async fn apply_all(&mut self, core: &mut CallCore) {
        while let Some(out) = core.poll_output() {
            self.apply(out).await;
        }
    }

    async fn apply(&mut self, out: Output) {
        match out {
            Output::Event(ev) => {
                let _ = self.updates.send(CallUpdate::Event(ev)).await;
            }
            Output::State { from, to } => self
                .metrics
                .call_state(from.map(|s| s.as_str()), to.map(|s| s.as_str())),
            Output::SetupTime(d) => self.metrics.call_setup(d),
            Output::StartBridge { remote, mapping } => self.start_bridge(remote, mapping),
            Output::CloseLegs => {
                if let Some((leg, _)) = self.legs.take() {
                    leg.close().await;
                }
            }
            Output::Retarget { remote, mapping } => self.steer.retarget(remote, mapping),
            Output::Rebrowse(mapping) => {
                if let Some(leg) = self.new_leg.take() {
                    self.steer.rebrowse(leg, mapping);
                }
            }
            Output::ReplacePendingLeg => {
                if let (Some((pending, _)), Some(new)) = (self.legs.as_mut(), self.new_leg.take()) {
                    let old = std::mem::replace(pending, new);
                    old.close().await;
                }
            }
            Output::CloseNewLeg => {
                if let Some(leg) = self.new_leg.take() {
                    leg.close().await;
                }
            }
            Output::Flow(f) => self.steer.flow(f),
            Output::BridgeDtmf(d) => self.steer.dtmf(d),
            Output::SipInfo(digits) => {
                // SIP INFO does not pause the agent's audio: no room held for these.
                self.digits.release(digits.len());
                self.commander.dtmf_info(&digits);
            }
            Output::FollowRefer(accept) => self.commander.follow_refer(accept),
            Output::HangupMediaTimeout => self.commander.hangup_media_timeout(),
            Output::Ended(reason) => self.metrics.call_ended(reason.code()),
            // Updates of the row as the call goes (queued: the call never waits on the disk).
            Output::Started(row) => drop(self.store.started(*row)),
            Output::Answered(at) => drop(self.store.answered(&self.call_id, at)),
            Output::Finished(row) => self.row = Some(row),
        }
    }

    /// Records (if the app does) and bridges the pending legs toward `remote`.
    fn start_bridge(&mut self, remote: std::net::SocketAddr, mapping: bridge::Mapping) {
        let (Some((leg, mut rtp)), Some(mut ctl)) = (self.legs.take(), self.ctl.take()) else {
            return;
        };
        if let Some(path) = self.record.take() {
            match crate::media::recorder::start(path.clone(), self.store.track()) {
                Ok(tap) => {
                    ctl.tap = Some(tap);
                    self.recording = path.file_name().map(|f| f.to_string_lossy().into_owned());
                    if let Some(name) = &self.recording {
                        drop(self.store.recording(&self.call_id, name));
                    }
                }
                Err(e) => tracing::warn!(file = %path.display(), "cannot record: {e}"),
            }
        }
        rtp.set_remote(remote);
        self.bridge = Some(tokio::spawn(bridge::run(
            leg,
            rtp,
            mapping,
            0x00ca_11ed,
            ctl,
        )));
    }

    /// The call is over: the bridge's figures into the row, the row into the history.
    async fn finish(mut self, call_id: &str, pending: crate::cdr::Pending) {
        let Some(mut row) = self.row.take() else {
            return;
        };
        if let Some(b) = self.bridge.take() {
            if let Ok(stats) = b.await {
                self.metrics
                    .media(stats.to_sip, stats.to_browser, stats.sip_in.lost());
                if let Some(far) = stats.far_end {
                    self.metrics.far_end_lost(far.cumulative_lost);
                }
                row.packets_sent = stats.to_sip;
                row.packets_received = stats.to_browser;
                row.packets_lost = stats.sip_in.lost();
                row.jitter_ms = stats.sip_in.jitter() as f64 / 8.0;
                row.page_packets_received = stats.browser_in.received();
                row.page_packets_lost = stats.browser_in.lost();
                row.page_jitter_ms = stats.browser_in.jitter() as f64 / 8.0;
            }
        } else if let Some((leg, _)) = self.legs.take() {
            leg.close().await;
        }
        if let Some(leg) = self.new_leg.take() {
            leg.close().await;
        }
        row.recording = self.recording.take();
        let _ = self
            .updates
            .send(CallUpdate::Finished(call_id.to_owned()))
            .await;
        if let Err(e) = self.store.finished(*row, Some(pending)).await {
            tracing::warn!(call = %call_id, "call's end not recorded in the history: {e}");
        }
    }
}
