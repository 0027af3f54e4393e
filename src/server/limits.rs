//! Process limits set once at start: the soft RLIMIT_NOFILE raised to the hard one, and
//! transparent huge pages off for the heap unless `transparent_huge_pages` is on.

use crate::config::Settings;

/// Applies the process limits; a limit that cannot be changed is logged, not fatal.
pub(super) fn apply(settings: &Settings) {
    raise_fd_limit(settings);
    if !settings.transparent_huge_pages {
        // Before any large allocation, so no heap page was already made huge.
        if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
            tracing::warn!(error = %e, "could not disable transparent huge pages");
        }
    }
}

/// Raises the soft fd limit to the hard limit and says what the hard limit allows.
fn raise_fd_limit(settings: &Settings) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let usable = hard.saturating_sub(64 + 8 * settings.shards as u64);
    if (settings.live.max_connections as u64) > usable {
        tracing::warn!(
            rlimit_nofile = hard,
            max_connections = settings.live.max_connections,
            "RLIMIT_NOFILE allows only about {usable} connections; raise LimitNOFILE (kernel-tuning/) or lower max_connections"
        );
    }
}
