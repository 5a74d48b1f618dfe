//! What the SIP user agent's holders get: [`RegistrationHandle`]s (status through a `watch`
//! channel, incoming calls through a queue) and [`CallHandle`]s / [`CallControl`]s (commands in,
//! [`CallEvent`]s out), and the [`Command`]s they send to the endpoint's task.
//!
//! Every queue here is unbounded by construction, not by count: commands come from the owners
//! of live handles (one page session each, bounded by its own request rate and size limits), a
//! call's events are at most a few per SIP message the endpoint accepted (its datagram rate),
//! and a registration's incoming queue holds at most the calls the UA admits (`MAX_CALLS`).

use std::fmt;
use std::net::SocketAddr;

use sha2::{Digest, Sha256};

use tokio::sync::{mpsc, oneshot, watch};

use super::call::BadDestination;
use super::call::{CallEvent, Party};
use super::registration::Status;
use super::sdp::AudioSdp;
use crate::account::SipAccount;

/// Why a registration or call could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// The registrar / proxy host did not resolve.
    #[error("cannot resolve SIP server {host}: {why}")]
    Resolve {
        /// host:port looked up.
        host: String,
        /// Resolver error.
        why: String,
    },
    /// Too many registrations.
    #[error("registration limit reached ({0})")]
    TooMany(usize),
    /// The endpoint task is gone (shutting down).
    #[error("SIP endpoint is shutting down")]
    Closed,
    /// The dialled destination is not usable.
    #[error("{0}")]
    BadDestination(#[from] BadDestination),
    /// The registration this call needs is gone.
    #[error("not registered")]
    NotRegistered,
    /// Too many calls.
    #[error("call limit reached ({0})")]
    TooManyCalls(usize),
    /// The operating system's random generator failed: no identifiers for a new call.
    #[error("{0}")]
    Random(#[from] crate::rand::GetRandomFailed),
}

/// Which registration a holder shares. Two logins share one only when the app, the address of
/// record, the digest user, the route and the password all match: a token that names a live
/// agent's address with another password, or from another app, gets a registration of its own
/// (which the registrar refuses if the password is wrong) and never the agent's calls.
///
/// The password is held as a digest keyed by a per-process secret, never as text; `Debug` shows the
/// app and address of record only.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct RegKey {
    app: String,
    aor: String,
    auth_name: String,
    route: String,
    password: [u8; 16],
}

impl RegKey {
    /// The key of `account` logging in for `app`; `secret` keys the password digest.
    pub(crate) fn new(app: &str, account: &SipAccount, secret: &[u8; 32]) -> RegKey {
        // A secret prefix is enough here: the digest is only ever compared for equality.
        let digest = Sha256::new()
            .chain_update(secret)
            .chain_update(account.auth_name.as_bytes())
            .chain_update([0])
            .chain_update(account.password.expose_secret().as_bytes())
            .finalize();
        let mut password = [0u8; 16];
        password.copy_from_slice(digest.get(..16).unwrap_or(&[0; 16]));
        RegKey {
            app: app.to_owned(),
            aor: account.aor(),
            auth_name: account.auth_name.clone(),
            route: format!(
                "{}|{}",
                account
                    .outbound_proxy
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                account.port
            ),
            password,
        }
    }

    /// The address of record (`login@domain`), for logs.
    pub(crate) fn aor(&self) -> &str {
        &self.aor
    }
}

impl fmt::Debug for RegKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegKey")
            .field("app", &self.app)
            .field("aor", &self.aor)
            .finish_non_exhaustive()
    }
}

pub(crate) enum Command {
    Acquire {
        /// The app whose token the account came from: registrations are never shared across
        /// apps.
        app: String,
        account: Box<SipAccount>,
        target: SocketAddr,
        via_host: String,
        fixed: bool,
        reply: oneshot::Sender<Result<Acquired, EndpointError>>,
    },
    Release {
        key: RegKey,
    },
    Dial {
        key: RegKey,
        to: String,
        sdp: String,
        headers: Vec<(String, String)>,
        reply: oneshot::Sender<Result<CallHandle, EndpointError>>,
    },
    Call {
        id: u64,
        action: CallAction,
    },
    Shutdown {
        done: oneshot::Sender<()>,
    },
    Snapshot {
        reply: oneshot::Sender<crate::metrics::SipSnapshot>,
    },
}

pub(crate) struct Acquired {
    pub(crate) key: RegKey,
    pub(crate) status: watch::Receiver<Status>,
    pub(crate) incoming: mpsc::UnboundedReceiver<IncomingCall>,
}

#[derive(Debug)]
pub(crate) enum CallAction {
    Answer(String),
    Reject(u16, String),
    Hangup,
    /// Hang up an established call whose media stopped.
    MediaTimeout,
    Hold(bool),
    Dtmf(String),
    Transfer(String),
    /// Attended transfer: replace call `.0` (the consultation) at this call's far end.
    CompleteTransfer(u64),
    /// The far end's REFER: follow it (call the target in its place) or decline it.
    FollowRefer(bool),
}

/// One holder's share of a registration; dropping it releases the share.
pub struct RegistrationHandle {
    pub(crate) key: RegKey,
    pub(crate) status: watch::Receiver<Status>,
    pub(crate) incoming: mpsc::UnboundedReceiver<IncomingCall>,
    pub(crate) cmds: mpsc::UnboundedSender<Command>,
}

impl RegistrationHandle {
    /// The current status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// Waits for the next status change; `None` when the endpoint is gone.
    pub async fn changed(&mut self) -> Option<Status> {
        self.status.changed().await.ok()?;
        Some(self.status.borrow_and_update().clone())
    }

    /// Waits until `pred` holds for the status (checked now and at every change).
    pub async fn wait_for(&mut self, mut pred: impl FnMut(&Status) -> bool) -> Option<Status> {
        loop {
            {
                let s = self.status.borrow_and_update();
                if pred(&s) {
                    return Some(s.clone());
                }
            }
            self.status.changed().await.ok()?;
        }
    }

    /// The next incoming call for this registration (already ringing at the caller).
    pub async fn next_incoming(&mut self) -> Option<IncomingCall> {
        self.incoming.recv().await
    }

    /// Whichever comes first: a status change or an incoming call. `None` when the endpoint is
    /// gone.
    pub async fn next(&mut self) -> Option<RegistrationEvent> {
        tokio::select! {
            changed = self.status.changed() => {
                changed.ok()?;
                Some(RegistrationEvent::Status(self.status.borrow_and_update().clone()))
            }
            incoming = self.incoming.recv() => incoming.map(|i| RegistrationEvent::Incoming(Box::new(i))),
        }
    }
}

impl Drop for RegistrationHandle {
    fn drop(&mut self) {
        let _ = self.cmds.send(Command::Release {
            key: self.key.clone(),
        });
    }
}

/// What a registration reports to its holder.
pub enum RegistrationEvent {
    /// The registration's status changed.
    Status(Status),
    /// A call for the agent.
    Incoming(Box<IncomingCall>),
}

/// An incoming call offered to the agent.
pub struct IncomingCall {
    /// Control of the call.
    pub call: CallHandle,
    /// The caller as From says.
    pub from: Party,
    /// The caller as the network asserts (P-Asserted-Identity).
    pub asserted: Option<Party>,
    /// The caller's SDP offer.
    pub offer: Option<AudioSdp>,
    /// The INVITE's headers, in order.
    pub headers: Vec<(String, String)>,
}

/// Control of one call; dropping it hangs the call up.
pub struct CallHandle {
    /// Hang up on drop (false once [`split`](Self::split) handed that duty to a `CallControl`).
    pub(crate) armed: bool,
    pub(crate) id: u64,
    pub(crate) call_id: String,
    pub(crate) sip_call_id: String,
    pub(crate) events: mpsc::UnboundedReceiver<CallEvent>,
    pub(crate) cmds: mpsc::UnboundedSender<Command>,
}

impl CallHandle {
    /// The SIP Call-ID.
    pub fn sip_call_id(&self) -> &str {
        &self.sip_call_id
    }

    /// callgate's own id for the call (`c-` and 16 hex digits): unique, stable, not derived from
    /// anything a peer sent; used by the API, call history and recordings.
    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    /// The next event; `None` once the call is over and all events were read.
    pub async fn next_event(&mut self) -> Option<CallEvent> {
        self.events.recv().await
    }

    fn act(&self, action: CallAction) {
        let _ = self.cmds.send(Command::Call {
            id: self.id,
            action,
        });
    }

    /// Answers an incoming call with our SDP.
    pub fn answer(&self, sdp: String) {
        self.act(CallAction::Answer(sdp));
    }

    /// Rejects an incoming call with `code` (486, 603, ...).
    pub fn reject(&self, code: u16, reason: &str) {
        self.act(CallAction::Reject(code, reason.to_owned()));
    }

    /// Hangs up (CANCEL, BYE or decline, whatever the state needs).
    pub fn hangup(&self) {
        self.act(CallAction::Hangup);
    }

    /// Puts the far end on hold (re-INVITE, our SDP `sendonly`); see [`CallEvent::Hold`].
    pub fn hold(&self) {
        self.act(CallAction::Hold(true));
    }

    /// Resumes after [`hold`](Self::hold).
    pub fn unhold(&self) {
        self.act(CallAction::Hold(false));
    }

    /// Blind transfer: asks the far end to call `to` (extension, number or SIP URI); progress
    /// comes as [`CallEvent::Transfer`].
    pub fn transfer(&self, to: &str) {
        self.act(CallAction::Transfer(to.to_owned()));
    }

    /// Attended transfer: asks this call's far end to take over `consult` (a call to the
    /// transfer target, usually made while this one was held). On success both legs end.
    pub fn complete_transfer(&self, consult: &CallHandle) {
        self.act(CallAction::CompleteTransfer(consult.id));
    }

    /// Sends DTMF digits by SIP INFO (`application/dtmf-relay`), in order.
    pub fn dtmf_info(&self, digits: &str) {
        self.act(CallAction::Dtmf(digits.to_owned()));
    }
}

impl Drop for CallHandle {
    fn drop(&mut self) {
        if self.armed {
            self.act(CallAction::Hangup);
        }
    }
}

/// The command half of a [`CallHandle`] (clone-free, hangs up on drop), for owners that read
/// events in another task.
pub struct CallControl {
    id: u64,
    call_id: String,
    cmds: mpsc::UnboundedSender<Command>,
}

impl CallHandle {
    /// Splits into commands and events.
    pub fn split(mut self) -> (CallControl, mpsc::UnboundedReceiver<CallEvent>) {
        let (_, dead) = mpsc::unbounded_channel();
        let events = std::mem::replace(&mut self.events, dead);
        let control = CallControl {
            id: self.id,
            call_id: std::mem::take(&mut self.call_id),
            cmds: self.cmds.clone(),
        };
        // The control now owns the hang-up duty.
        self.armed = false;
        (control, events)
    }
}

impl CallControl {
    fn act(&self, action: CallAction) {
        let _ = self.cmds.send(Command::Call {
            id: self.id,
            action,
        });
    }

    /// callgate's id for the call.
    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    /// See [`CallHandle::hangup`].
    pub fn hangup(&self) {
        self.act(CallAction::Hangup);
    }

    /// See [`CallHandle::answer`].
    pub fn answer(&self, sdp: String) {
        self.act(CallAction::Answer(sdp));
    }

    /// See [`CallHandle::reject`].
    pub fn reject(&self, code: u16, reason: &str) {
        self.act(CallAction::Reject(code, reason.to_owned()));
    }

    /// A second, non-owning handle for the call's media side: it can send DTMF by INFO and hang
    /// up on a media timeout, but dropping it does not end the call.
    pub fn commander(&self) -> CallCommander {
        CallCommander {
            id: self.id,
            cmds: self.cmds.clone(),
        }
    }

    /// See [`CallHandle::hold`].
    pub fn hold(&self) {
        self.act(CallAction::Hold(true));
    }

    /// See [`CallHandle::unhold`].
    pub fn unhold(&self) {
        self.act(CallAction::Hold(false));
    }

    /// See [`CallHandle::dtmf_info`].
    pub fn dtmf_info(&self, digits: &str) {
        self.act(CallAction::Dtmf(digits.to_owned()));
    }

    /// See [`CallHandle::transfer`].
    pub fn transfer(&self, to: &str) {
        self.act(CallAction::Transfer(to.to_owned()));
    }

    /// See [`CallHandle::complete_transfer`].
    pub fn complete_transfer(&self, consult: &CallControl) {
        self.act(CallAction::CompleteTransfer(consult.id));
    }

    /// The endpoint's id of the call (to name it as another call's consultation).
    pub(crate) fn endpoint_id(&self) -> u64 {
        self.id
    }

    /// [`complete_transfer`](Self::complete_transfer) with the consultation's
    /// [`endpoint_id`](Self::endpoint_id).
    pub(crate) fn complete_transfer_to(&self, consult: u64) {
        self.act(CallAction::CompleteTransfer(consult));
    }
}

/// What the media side of a call may ask of it (see [`CallControl::commander`]).
#[derive(Clone)]
pub struct CallCommander {
    id: u64,
    cmds: mpsc::UnboundedSender<Command>,
}

impl CallCommander {
    fn act(&self, action: CallAction) {
        let _ = self.cmds.send(Command::Call {
            id: self.id,
            action,
        });
    }

    /// See [`CallHandle::dtmf_info`].
    pub fn dtmf_info(&self, digits: &str) {
        self.act(CallAction::Dtmf(digits.to_owned()));
    }

    /// Hangs up an established call because its media stopped (it ends with
    /// [`EndReason::MediaTimeout`](crate::sip::call::EndReason::MediaTimeout)).
    pub fn hangup_media_timeout(&self) {
        self.act(CallAction::MediaTimeout);
    }

    /// Answers the far end's REFER ([`CallEvent::Referred`]). Followed: callgate calls the
    /// target with the same media, reports [`CallEvent::ReferProgress`], and when the target
    /// answers the call carries on with it ([`CallEvent::Replaced`]: same call id, same
    /// control). Declined: 603, and the call goes on.
    pub fn follow_refer(&self, accept: bool) {
        self.act(CallAction::FollowRefer(accept));
    }
}

impl Drop for CallControl {
    fn drop(&mut self) {
        self.act(CallAction::Hangup);
    }
}
