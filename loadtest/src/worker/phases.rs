//! The worker's reactions to scenario phases: a reconnect storm (`Drop`), slow readers
//! catching up (`Resume`), and the periodic trickle reads of slow subscribers.

use std::time::Instant;

use mio::Token;

use super::conn::State;
use super::Worker;
use crate::ipc::{self, SlowMode};

impl Worker {
    /// Closes every open connection at once and queues them all to reconnect; `recover`
    /// subscribers start timing their recovery from now.
    pub(super) fn drop_all(&mut self) {
        let now = Instant::now();
        self.storm_start = Some(now);
        self.down_at_ms = Some(ipc::unix_ms());
        self.back_at_ms = None;
        self.all_up = false;
        self.sched.reset_rate(self.spec.reconnect_rate, now);
        let now_ns = ipc::unix_nanos();
        self.rec.recover.drop_ns = Some(now_ns);
        self.rec.recover.resubscribed = 0;
        self.rec.recover.last_recovered_ns = None;
        self.rec.recover.last_caught_up_ns = None;
        for conn in &mut self.conns {
            if let Some(t) = conn.recover.as_deref_mut() {
                if conn.state != State::Done {
                    t.dropped_at_ns = Some(now_ns);
                    t.answered = false;
                }
            }
        }
        for i in 0..self.conns.len() {
            if self.conns[i].state == State::Open {
                self.conns[i].shutdown(self.poll.registry(), false, &mut self.rec);
                self.conns[i].state = State::Queued;
                self.conns[i].down_since = Some(now);
                self.open -= 1;
                self.sched.enqueue(i);
            }
        }
    }

    /// Lets slow subscribers read everything that is waiting for them.
    pub(super) fn resume(&mut self, scratch: &mut [u8]) {
        self.slow_paused = false;
        for i in 0..self.conns.len() {
            if self.conns[i].slow && self.conns[i].state == State::Open {
                self.conns[i].set_listening(self.poll.registry(), Token(i), true);
                let res = self.conns[i].read(scratch, &mut self.rec, usize::MAX);
                self.settle(i, res);
            }
        }
    }

    /// One trickle read (a tenth of the per-second budget) for each slow subscriber.
    pub(super) fn trickle(&mut self, scratch: &mut [u8]) {
        let Some(slow) = self
            .spec
            .slow
            .as_ref()
            .filter(|s| s.mode == SlowMode::Trickle)
        else {
            return;
        };
        if !self.slow_paused {
            return;
        }
        let budget = (slow.read_bytes_per_sec / 10).max(1) as usize;
        for i in 0..self.conns.len() {
            if self.conns[i].slow && self.conns[i].state == State::Open {
                let res = self.conns[i].read(scratch, &mut self.rec, budget);
                self.settle(i, res);
            }
        }
    }
}
