// Types for ringcast.js, the browser client for ringcast (docs/clients.md).

export type Transport = 'websocket' | 'sse' | 'poll';
export type State = 'connecting' | 'connected' | 'disconnected' | 'closed';

export interface RingcastOptions {
  /** WebSocket URL, e.g. `wss://edge.example.com/ws`. */
  url?: string;
  /** SSE endpoint; default: `url` with http(s) and `/sse` instead of `/ws`. */
  sseUrl?: string;
  /** Long-poll endpoint; default: `url` with http(s) and `/poll` instead of `/ws`. */
  pollUrl?: string;
  /** A JWT, sent as `?token=` (every transport). */
  token?: string;
  /** Returns a fresh JWT: called before connecting without a valid token and 30 s
   * (or 10% of the token's lifetime, but at least 2 s) before its `exp`. */
  getToken?: () => string | Promise<string>;
  /** Backoff base in ms. Default 1000. */
  minDelay?: number;
  /** Backoff cap in ms. Default 30000. */
  maxDelay?: number;
  /** Transports to try, in order of preference. Default ['websocket', 'sse', 'poll']. */
  transports?: Transport[];
  /** Consecutive failures (none opened) before the next transport is tried; three times
   * as many for WebSocket once it has worked in this client. Default 3. */
  fallbackAfter?: number;
  /** While on a fallback transport, try WebSocket again after this many ms. Default 300000. */
  retryWebSocketAfter?: number;
  /** A WebSocket handshake or SSE/poll response head slower than this fails. Default 10000. */
  connectTimeout?: number;
  /** Long-poll hold time in seconds (1-60). Default 25. */
  pollTimeout?: number;
  /** An SSE stream silent for this long (no event, no heartbeat) is reopened. Default 75000. */
  idleTimeout?: number;
  /** Send cookies with SSE/poll requests to another origin (the `jwt_cookie` setup). Default false. */
  withCredentials?: boolean;
}

export interface Message {
  channel: string;
  offset: number;
  data: unknown;
}

export interface Subscribed {
  channel: string;
  /** The server's position: live messages continue after it (replayed/inbox ones may come first). */
  offset: number;
  /** The channel's history (a decimal string; compare as a string). */
  epoch: string;
  /** On a resubscribe with `since`: whether every missed message follows. Absent on a first subscribe. */
  recovered?: boolean;
  /** Why not recovered: 'epoch_changed' | 'too_old' | 'too_many' | 'ahead'. */
  reason?: string;
  /** On inbox (`user:`) channels: unacked messages that follow, and how many were left out. */
  inbox?: { unacked: number; more: number };
}

export interface Gap {
  channel: string;
  /** First lost offset (inclusive). */
  from: number;
  /** Last lost offset (inclusive). */
  to: number;
}

export interface PresenceEvent {
  type: 'join' | 'leave';
  channel: string;
  member: { user: string } | { conn: string };
}

export interface StateEvent {
  state: State;
  transport: Transport | null;
  /** On 'connecting': how many failed attempts came before. */
  attempt?: number;
  /** On 'disconnected': the WebSocket close code (or the SSE/poll close event's), if any. */
  code?: number;
  reason?: string;
  /** On 'disconnected': HTTP status of a refused SSE/poll request. */
  status?: number;
  /** On 'disconnected': ms until the next attempt. */
  delay?: number;
  /** On 'disconnected': the transport the next attempt uses. */
  next?: Transport;
}

export declare class RingcastError extends Error {
  /** Reply code or HTTP status; 0 for a closed connection or a failed getToken. */
  code: number;
  /** The channel of a refused subscribe. */
  channel?: string;
  /** The server's reply, for error replies. */
  reply?: Record<string, unknown>;
  /** ms from a 503's Retry-After. */
  retryAfter?: number | null;
}

export interface EventMap {
  message: Message;
  subscribed: Subscribed;
  gap: Gap;
  presence: PresenceEvent;
  error: RingcastError;
  state: StateEvent;
}

export declare class Ringcast {
  constructor(options: RingcastOptions);
  readonly state: State;
  readonly transport: Transport | null;
  connect(): this;
  close(): void;
  subscribe(channel: string): this;
  unsubscribe(channel: string): this;
  /** WebSocket only; resolves with the offset the message got. */
  publish(channel: string, data: unknown): Promise<{ channel: string; offset: number }>;
  /** Inbox channels, WebSocket only: removes messages up to `offset` from the user's inbox. */
  ack(channel: string, offset: number): Promise<{ channel: string; offset: number; removed: number }>;
  /** The last delivered position of a subscribed channel, or null. */
  position(channel: string): { offset: number | null; epoch: string | null } | null;
  on<K extends keyof EventMap>(event: K, fn: (event: EventMap[K]) => void): this;
  off<K extends keyof EventMap>(event: K, fn: (event: EventMap[K]) => void): this;
}

/** The `exp` claim (Unix seconds) of a JWT, or null. */
export declare function tokenExpiry(token: string): number | null;

export default Ringcast;
