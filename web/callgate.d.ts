// TypeScript declarations for callgate's browser SDK (web/callgate.js, served at /callgate.js).
// Protocol and error codes: docs/API.md.

/** A refusal from callgate: `code` is stable (docs/API.md, "Error codes"), `message` for people. */
export class CallgateError extends Error {
  readonly code: string;
}

export type RegistrationState = 'idle' | 'registering' | 'registered' | 'failed' | 'unregistered';

export interface RegistrationEvent {
  type: 'registration';
  state: RegistrationState;
  /** Seconds granted, when registered. */
  expires?: number;
  /** SIP status and reason, when failed. */
  status?: number;
  reason?: string;
}

export type CallState =
  | 'trying' | 'ringing' | 'early' | 'established' | 'held' | 'held_by_remote' | 'ended';

export type EndReason =
  | 'local_hangup' | 'remote_hangup' | 'cancelled' | 'missed' | 'rejected' | 'failed'
  | 'timeout' | 'transferred' | 'media_timeout';

export interface SipStatus { status: number; reason: string; }

export interface CallStateEvent {
  type: 'call';
  callId: string;
  state: CallState;
  direction: 'inbound' | 'outbound';
  peer: string;
  sip?: SipStatus;
  endReason?: EndReason;
}

/** Progress of a transfer this page asked for (`transfer`, `completeTransfer`). */
export interface TransferEvent {
  type: 'transfer';
  callId: string;
  state: 'accepted' | 'progress' | 'succeeded' | 'failed';
  status?: number;
}

/** The far end transfers this call elsewhere (SIP REFER). */
export interface ReferredEvent {
  type: 'referred';
  callId: string;
  state: 'accepted' | 'declined' | 'progress' | 'succeeded' | 'failed';
  to?: string;
  sip?: SipStatus;
}

/** One of the agent states the agent may choose (apps.toml `states`). */
export interface StateInfo {
  id: string;
  label: string;
  productive: boolean;
  mayCallOut: boolean;
  mayReceive: boolean;
}

/** The agent's state: at login, on resume, and at every change. */
export interface AgentStateEvent extends StateInfo {
  type: 'agentState';
  /** Unix milliseconds when it was entered. */
  since: number;
  cause: 'login' | 'requested' | 'api' | 'call_ended' | 'wrap_up' | 'wrap_up_over' | 'missed_calls';
  /** A state asked for during a call, entered when the agent's last call ends. */
  pending?: string;
  /** In wrap-up: when it ends (Unix milliseconds). */
  wrapUpEndsAt?: number;
}

interface Emitter<Events> {
  on<K extends keyof Events>(event: K, handler: (arg: Events[K]) => void): this;
}

export interface CallEvents {
  state: CallStateEvent;
  /** The far end's audio track arrived in `remoteStream` (set it on your <audio> again). */
  media: MediaStream;
  transfer: TransferEvent;
  referred: ReferredEvent;
  /** A digit the far end sent. */
  dtmf: string;
}

export class Call implements Emitter<CallEvents> {
  /** callgate's id for the call (also in call history and recordings). */
  readonly id: string;
  readonly direction: 'inbound' | 'outbound';
  /** The far party (changes when the far end transfers the call). */
  peer: string;
  /** Caller's display name (incoming calls). */
  displayName?: string;
  /** Incoming calls: the app's call data from the INVITE (e.g. `customerId`), for a screen pop. */
  data?: Record<string, string>;
  /** Incoming calls: the caller asked for auto-answer and the app allows it; the SDK answers. */
  autoAnswer?: boolean;
  state: CallState;
  /** The far end's audio, for an <audio> element. */
  readonly remoteStream: MediaStream;
  /** The call's WebRTC connection (null until media is set up). */
  pc: RTCPeerConnection | null;
  on<K extends keyof CallEvents>(event: K, handler: (arg: CallEvents[K]) => void): this;
  answer(): Promise<void>;
  /** 486 Busy Here unless another 4xx-6xx code is given. */
  reject(code?: number): Promise<unknown>;
  hangup(): Promise<unknown>;
  hold(): Promise<unknown>;
  /** Mutes (true) or unmutes this page's microphone for the call (local only). */
  mute(on?: boolean): void;
  readonly muted?: boolean;
  unhold(): Promise<unknown>;
  /** Digits 0-9 * # A-D (at most 64). */
  dtmf(digits: string): Promise<unknown>;
  /** Blind transfer: an extension, number or SIP URI. */
  transfer(to: string): Promise<unknown>;
  /** Holds this call and calls `to` (a consultation); returns the new call. */
  consult(to: string): Promise<Call>;
  /** Attended transfer: this call's far end takes over `consult`'s. */
  completeTransfer(consult: Call): Promise<unknown>;
}

export interface PhoneEvents {
  registration: RegistrationEvent;
  /** The agent's state changed (or was told at login and resume). */
  state: AgentStateEvent;
  /** A call for the agent (with `autoAnswer`, the SDK is answering it already). */
  incoming: Call;
  /** A call the CRM backend placed through this page (click-to-call), once placed. */
  outgoing: Call;
  /** Something the SDK did on its own failed (auto-answer, click-to-call). */
  error: Error & { code?: string };
  /** The caller gave up before the answer. */
  missed: { type: 'missed'; callId: string; from: string };
  /** The connection dropped; the SDK is resuming the session (calls stay up at callgate). */
  reconnecting: undefined;
  reconnected: undefined;
  /** The session is over (logged out, or could not be resumed). */
  close: undefined;
}

export class Callgate implements Emitter<PhoneEvents> {
  /** Logs in with a loginByToken token (`APP:HEX`) minted by the CRM backend. */
  static connect(url: string, token: string): Promise<Callgate>;
  /** Takes this tab's session back after a reload (rejects with `unknown_session` if none). */
  static resume(url: string): Promise<Callgate>;
  /** `1001@sip.example.com` */
  readonly agent: string;
  readonly sessionId: string;
  /** Credential for callgate's HTTP API (this agent's own events), while the session lives. */
  readonly apiToken: string;
  readonly registration: RegistrationEvent | { state: 'idle' };
  /** The states this agent may choose. */
  readonly states: StateInfo[];
  /** The agent's current state (null until callgate has said). */
  readonly state: AgentStateEvent | null;
  /** Asks for state `id` (one of `states`); during a call it is entered when the call ends. */
  setState(id: string): Promise<unknown>;
  /** The session's calls by id. */
  readonly calls: Map<string, Call>;
  on<K extends keyof PhoneEvents>(event: K, handler: (arg: PhoneEvents[K]) => void): this;
  /** Calls an extension, number or SIP URI; `headers`: X- headers among the app's `call_headers`. */
  call(to: string, headers?: Record<string, string>): Promise<Call>;
  /** Logs out: the session and its calls end. */
  close(): Promise<void>;
}
