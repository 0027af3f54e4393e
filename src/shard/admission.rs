//! Admission: who may start an upgrade, and who may become a connection.
//!
//! Two limits, checked at two moments:
//!
//! - [`HandshakeGate`] (per shard, `max_handshakes_per_shard`): an accepted socket starts
//!   its upgrade task only while fewer than the cap are in flight on the shard; beyond it
//!   the socket is answered `503` at once ([`refuse_now`]), without a task. This bounds
//!   what a slowloris or a reconnect storm can hold (a task and ~3 KiB of buffers each)
//!   between accept and `101`. With `handshake_fair_share` (the default) a socket from
//!   an address holding fewer places than the address holding the most takes that
//!   address's oldest place instead ([`crate::admission::fair_share`]): the evicted
//!   upgrade's task hears it through its ticket and answers `503`.
//! - [`ConnectionSlots`] (process-wide, `max_connections`): a slot is reserved after the
//!   request parsed and *before* `101` is written, so a storm spread over every shard
//!   cannot overshoot the limit. It is released exactly once: by the
//!   [`SlotReservation`] if the upgrade fails after reserving, otherwise by the shard when
//!   the adopted connection leaves its table (`Shard::finalize_close`).

use crate::admission::fair_share::{Admission, HandshakeBudget};
use crate::admission::per_ip::{PerIpHold, PerIpRefusal, PerIpTable};
use crate::metrics::{RefuseCause, ShardMetrics};
use crate::proto::proxy::Versions;
use crate::proto::upgrade::http_response;
use crate::shard::follower::LocalEvent;
use crossbeam_utils::CachePadded;
use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Seconds a refused client is asked to wait (`Retry-After`) before trying again.
pub const RETRY_AFTER_SECS: u32 = 5;

/// The process-wide connection limit, shared by every shard.
///
/// One cache-padded counter: it is touched once per upgrade and once per close, never
/// per message, so sharing it across cores costs nothing measurable, and one counter is
/// what makes the limit exact whatever the kernel's SO_REUSEPORT hash does.
#[derive(Debug)]
pub struct ConnectionSlots {
    in_use: CachePadded<AtomicUsize>,
    /// Changed by a reload (SIGHUP); lowering it below `in_use` closes nothing, it only
    /// refuses upgrades until enough connections left.
    limit: AtomicUsize,
}

impl ConnectionSlots {
    /// A limit of `limit` connections, none in use.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(ConnectionSlots {
            in_use: CachePadded::new(AtomicUsize::new(0)),
            limit: AtomicUsize::new(limit),
        })
    }

    /// Takes one slot, or `None` when all `limit` are in use.
    pub fn try_reserve(self: &Arc<Self>) -> Option<SlotReservation> {
        // A compare-exchange loop rather than fetch_add + undo: the counter never reads
        // above the limit, not even for a moment another shard could observe.
        let limit = self.limit.load(Ordering::Relaxed);
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| SlotReservation {
                slots: Some(self.clone()),
            })
    }

    /// Gives back one slot taken by [`ConnectionSlots::try_reserve`] whose reservation was
    /// [adopted](SlotReservation::adopt).
    pub fn release(&self) {
        let released = self
            .in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if released.is_err() {
            // A double release would otherwise wrap to usize::MAX and refuse everyone.
            tracing::error!("connection slot released more often than reserved (bug)");
        }
    }

    /// Slots currently taken.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Acquire)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Changes the limit (a reload); connections already open stay.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }
}

/// One reserved connection slot; given back on drop unless adopted.
#[derive(Debug)]
#[must_use = "dropping a reservation releases the slot"]
pub struct SlotReservation {
    slots: Option<Arc<ConnectionSlots>>,
}

impl SlotReservation {
    /// Hands the slot to the connection table: from now on whoever removes the
    /// connection from the table calls [`ConnectionSlots::release`].
    pub fn adopt(mut self) {
        self.slots = None;
    }
}

impl Drop for SlotReservation {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            slots.release();
        }
    }
}

/// A shard's cap on upgrades in flight (accepted, `101` or error not yet written), shared
/// fairly between source addresses when `handshake_fair_share` is on.
pub struct HandshakeGate {
    /// The places; each carries the event that tells its upgrade it was evicted.
    budget: RefCell<HandshakeBudget<IpAddr, Rc<LocalEvent>>>,
    metrics: &'static ShardMetrics,
}

impl HandshakeGate {
    /// A gate admitting at most `limit` handshakes at once, counted in `metrics`.
    pub fn new(limit: usize, fair_share: bool, metrics: &'static ShardMetrics) -> Rc<Self> {
        Rc::new(HandshakeGate {
            budget: RefCell::new(HandshakeBudget::new(limit, fair_share)),
            metrics,
        })
    }

    /// Admits one handshake from `source` (the per-IP key of the peer; `None` for a
    /// trusted proxy, whose client is not known yet), or `None` at the cap. When the
    /// place was taken from another address's oldest upgrade, that upgrade's
    /// [`HandshakeTicket::eviction`] fires.
    pub fn try_enter(self: &Rc<Self>, source: Option<IpAddr>) -> Option<HandshakeTicket> {
        let evicted = Rc::new(LocalEvent::default());
        let admission = self.budget.borrow_mut().admit(source, evicted.clone());
        let id = match admission {
            Admission::Admitted(id) => {
                self.metrics
                    .handshakes_in_progress
                    .fetch_add(1, Ordering::Relaxed);
                id
            }
            // One place changed hands: the gauge stays.
            Admission::Evicting { id, victim } => {
                victim.notify();
                id
            }
            Admission::Full => return None,
        };
        Some(HandshakeTicket {
            gate: self.clone(),
            id,
            evicted,
            table_fd: None,
            ip_hold: None,
            proxied: None,
        })
    }

    /// Changes the cap (a reload); handshakes already in flight finish.
    pub fn set_limit(&self, limit: usize) {
        self.budget.borrow_mut().set_limit(limit);
    }

    /// Turns the fair share on or off (a reload).
    pub fn set_fair_share(&self, on: bool) {
        self.budget.borrow_mut().set_fair_share(on);
    }

    /// Handshakes in flight on this shard.
    pub fn in_flight(&self) -> usize {
        self.budget.borrow().in_flight()
    }
}

/// One admitted handshake; leaves the gate on drop, however the upgrade ended.
pub struct HandshakeTicket {
    gate: Rc<HandshakeGate>,
    /// Its place in the gate.
    id: u64,
    /// Set when the gate gave its place to another address.
    evicted: Rc<LocalEvent>,
    /// The descriptor the connection table will own, duplicated at accept: taken before
    /// `101` is written, so a process out of descriptors never answers `101` and then
    /// drops the connection for want of one (the accept loop waits for it instead).
    table_fd: Option<OwnedFd>,
    /// The socket's place under the per-address limits (`None`: they are off, or the
    /// peer is a trusted proxy and the client's address is not known yet).
    ip_hold: Option<PerIpHold>,
    /// Set when the peer is a trusted proxy: the PROXY header comes first.
    proxied: Option<ProxiedPeer>,
}

/// A socket from a `trusted_proxies` peer: its PROXY header is read first, and the
/// per-address limits apply to the client address it names, once known.
#[derive(Debug)]
pub struct ProxiedPeer {
    /// The header versions accepted (`proxy_protocol`).
    pub versions: Versions,
    /// The proxy's own address (the client's for `PROXY UNKNOWN` / v2 LOCAL).
    pub peer: SocketAddr,
    /// The per-address table, when a per-IP limit is on.
    pub per_ip: Option<Arc<PerIpTable>>,
}

impl HandshakeTicket {
    /// The event set when the shard gave this upgrade's place to another address
    /// (`handshake_fair_share`): the upgrade should stop and answer 503.
    pub fn eviction(&self) -> Rc<LocalEvent> {
        self.evicted.clone()
    }

    /// Attaches the connection table's descriptor, duplicated at accept.
    pub fn with_table_fd(mut self, fd: OwnedFd) -> HandshakeTicket {
        self.table_fd = Some(fd);
        self
    }

    /// Attaches the socket's place under the per-address limits.
    pub fn with_ip_hold(mut self, hold: PerIpHold) -> HandshakeTicket {
        self.ip_hold = Some(hold);
        self
    }

    /// Marks the socket as coming from a trusted proxy (the PROXY header comes first).
    pub fn with_proxied(mut self, proxied: ProxiedPeer) -> HandshakeTicket {
        self.proxied = Some(proxied);
        self
    }

    /// Takes what [`HandshakeTicket::with_proxied`] attached.
    pub fn take_proxied(&mut self) -> Option<ProxiedPeer> {
        self.proxied.take()
    }

    /// Takes the place attached by [`HandshakeTicket::with_ip_hold`].
    pub fn take_ip_hold(&mut self) -> Option<PerIpHold> {
        self.ip_hold.take()
    }

    /// Takes the descriptor attached by [`HandshakeTicket::with_table_fd`].
    pub fn take_table_fd(&mut self) -> Option<OwnedFd> {
        self.table_fd.take()
    }
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        // An evicted ticket's place already went to its evictor.
        if self.gate.budget.borrow_mut().leave(self.id).is_some() {
            self.gate
                .metrics
                .handshakes_in_progress
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The refusal cause (metric label) for a per-address limit.
pub fn per_ip_cause(refusal: PerIpRefusal) -> RefuseCause {
    match refusal {
        PerIpRefusal::Connections => RefuseCause::PerIp,
        PerIpRefusal::Rate => RefuseCause::PerIpRate,
        PerIpRefusal::Handshakes => RefuseCause::PerIpHandshakes,
    }
}

/// The `503` answer for a refusal, with `Retry-After`.
pub fn refusal_response(cause: RefuseCause) -> Vec<u8> {
    refusal_response_with(cause, "")
}

/// [`refusal_response`] with `headers` (CRLF-terminated lines, e.g. CORS) added.
pub fn refusal_response_with(cause: RefuseCause, headers: &str) -> Vec<u8> {
    let body = match cause {
        RefuseCause::MaxConnections => "server is at its connection limit\n",
        RefuseCause::Draining => "server is draining\n",
        RefuseCause::HandshakesInFlight => "too many upgrades in progress on this core\n",
        RefuseCause::PerIp => "too many connections from your address\n",
        RefuseCause::PerIpRate => "too many new connections from your address\n",
        RefuseCause::PerIpHandshakes | RefuseCause::HandshakeShare => {
            "too many upgrades in progress from your address\n"
        }
    };
    http_response(
        503,
        &format!("Retry-After: {RETRY_AFTER_SECS}\r\n{headers}"),
        body,
    )
}

/// Answers a just-accepted socket `503` without awaiting anything, and counts it.
///
/// Used at the handshake cap, where spawning a task per refused socket would defeat the
/// cap.
pub fn refuse_now(fd: RawFd, cause: RefuseCause, metrics: &ShardMetrics) {
    metrics.refused[cause as usize].fetch_add(1, Ordering::Relaxed);
    answer_now(fd, &refusal_response(cause));
}

/// Writes `answer` to a socket without awaiting anything, then shuts its write side (the
/// caller closes it). A fresh socket's send buffer is empty, so a short answer fits in
/// one non-blocking send; what the client already sent is read and discarded first,
/// because closing a socket with unread input makes the kernel reset the connection,
/// which can destroy the answer before the client reads it.
pub fn answer_now(fd: RawFd, answer: &[u8]) {
    use nix::sys::socket::{recv, send, shutdown, MsgFlags, Shutdown};
    let mut sink = [0u8; 2048];
    for _ in 0..4 {
        match recv(fd, &mut sink, MsgFlags::MSG_DONTWAIT) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    let _ = send(fd, answer, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL);
    let _ = shutdown(fd, Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_never_exceed_the_limit_and_come_back_on_drop() {
        let slots = ConnectionSlots::new(2);
        let a = slots.try_reserve().unwrap();
        let b = slots.try_reserve().unwrap();
        assert!(slots.try_reserve().is_none());
        drop(a);
        assert_eq!(slots.in_use(), 1);
        let c = slots.try_reserve().unwrap();
        c.adopt();
        b.adopt();
        // Adopted slots stay taken until the table releases them.
        assert_eq!(slots.in_use(), 2);
        assert!(slots.try_reserve().is_none());
        slots.release();
        assert_eq!(slots.in_use(), 1);
    }

    #[test]
    fn a_spurious_release_does_not_wrap() {
        let slots = ConnectionSlots::new(1);
        slots.release();
        assert_eq!(slots.in_use(), 0);
        assert!(slots.try_reserve().is_some());
    }

    #[test]
    fn racing_shards_get_exactly_the_limit() {
        let slots = ConnectionSlots::new(1000);
        let granted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let slots = slots.clone();
                    s.spawn(move || {
                        let mut won = 0;
                        for _ in 0..1000 {
                            if let Some(r) = slots.try_reserve() {
                                r.adopt();
                                won += 1;
                            }
                        }
                        won
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(granted, 1000);
        assert_eq!(slots.in_use(), 1000);
    }

    #[test]
    fn the_gate_counts_tickets_in_flight() {
        let metrics: &'static ShardMetrics = Box::leak(Box::default());
        let gate = HandshakeGate::new(2, true, metrics);
        let a = gate.try_enter(None).unwrap();
        let _b = gate.try_enter(None).unwrap();
        assert!(gate.try_enter(None).is_none());
        assert_eq!(metrics.handshakes_in_progress.load(Ordering::Relaxed), 2);
        drop(a);
        assert_eq!(gate.in_flight(), 1);
        assert_eq!(metrics.handshakes_in_progress.load(Ordering::Relaxed), 1);
        assert!(gate.try_enter(None).is_some());
    }

    fn fired(event: &LocalEvent) -> bool {
        futures_lite::future::block_on(futures_lite::future::poll_once(event.wait())).is_some()
    }

    #[test]
    fn a_full_gate_gives_the_oldest_place_of_the_busiest_address_away() {
        let metrics: &'static ShardMetrics = Box::leak(Box::default());
        let gate = HandshakeGate::new(3, true, metrics);
        let slow: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let held: Vec<_> = (0..3)
            .map(|_| gate.try_enter(Some(slow)).unwrap())
            .collect();
        assert!(
            gate.try_enter(Some(slow)).is_none(),
            "its own next is refused"
        );
        let newcomer = gate
            .try_enter(Some(other))
            .expect("another address gets in");
        assert!(fired(&held[0].eviction()), "the oldest is told");
        assert!(!fired(&held[1].eviction()));
        assert_eq!(metrics.handshakes_in_progress.load(Ordering::Relaxed), 3);
        drop(held);
        assert_eq!(
            gate.in_flight(),
            1,
            "the evicted ticket gave nothing back twice"
        );
        assert_eq!(metrics.handshakes_in_progress.load(Ordering::Relaxed), 1);
        drop(newcomer);
        assert_eq!(metrics.handshakes_in_progress.load(Ordering::Relaxed), 0);

        gate.set_fair_share(false);
        let _full: Vec<_> = (0..3)
            .map(|_| gate.try_enter(Some(slow)).unwrap())
            .collect();
        assert!(gate.try_enter(Some(other)).is_none(), "fair share off");
    }

    #[test]
    fn refusals_carry_retry_after() {
        let text = String::from_utf8(refusal_response(RefuseCause::HandshakesInFlight)).unwrap();
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(text.contains("Retry-After: 5\r\n"));
    }
}
