//! The one lock the shared fan-out state uses: a `parking_lot` mutex taken by spinning.
//!
//! Its holders are shard executors (one thread per core): a lock that parks would stall a
//! whole core's connections, and every critical section guarded this way is a few hash
//! or deque operations. `crossbeam_utils::Backoff` ends in `yield_now`, so a preempted
//! holder gets its core back.

use crossbeam_utils::Backoff;
use parking_lot::{Mutex, MutexGuard};

/// Takes `m` by spinning: test, try, back off; never parks the thread.
pub fn spin_lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    let backoff = Backoff::new();
    loop {
        // Read first so waiters spin on a shared cache line instead of bouncing it.
        if !m.is_locked() {
            if let Some(guard) = m.try_lock() {
                return guard;
            }
        }
        backoff.snooze();
    }
}
