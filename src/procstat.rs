//! The standard `process_*` metrics (the names every Prometheus client library exports):
//! CPU seconds, resident and virtual memory, start time and the descriptor limit.
//!
//! [`parse_stat`] reads `/proc/self/stat` text (sans-io); [`render`] reads the file and
//! the limit once per scrape. `process_open_fds` is left out on purpose: counting
//! `/proc/self/fd` walks one entry per descriptor, a million of them on a full node, on
//! shard 0's thread; `ringcast_connections` (one descriptor each) stands in for it.

use std::fmt::Write as _;

/// What a scrape needs from `/proc/self/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stat {
    /// User-mode CPU time, in clock ticks.
    pub utime_ticks: u64,
    /// Kernel-mode CPU time, in clock ticks.
    pub stime_ticks: u64,
    /// Virtual memory size in bytes.
    pub vsize_bytes: u64,
    /// Resident set size in pages.
    pub rss_pages: u64,
}

/// Parses the contents of `/proc/<pid>/stat`; `None` when it is not in that format.
///
/// The command name (field 2) is in parentheses and may itself hold spaces and `)`, so
/// fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // Fields from 3 (state) on: utime is field 14, stime 15, vsize 23, rss 24.
    let fields: Vec<&str> = rest.split_ascii_whitespace().take(22).collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime_ticks: field(14)?,
        stime_ticks: field(15)?,
        vsize_bytes: field(23)?,
        // rss is signed in the kernel's format; a negative value never happens in practice.
        rss_pages: fields.get(24 - 3)?.parse::<i64>().ok()?.max(0) as u64,
    })
}

/// Appends the `process_*` families for this process; `started_unix` is the start time.
pub fn render(out: &mut String, started_unix: f64) {
    let _ = writeln!(
        out,
        "# HELP process_start_time_seconds Start time of the process since the Unix epoch, in seconds.\n\
         # TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {started_unix}"
    );
    if let Ok((soft, _)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ = writeln!(
            out,
            "# HELP process_max_fds Maximum number of open file descriptors (RLIMIT_NOFILE, soft).\n\
             # TYPE process_max_fds gauge\nprocess_max_fds {soft}"
        );
    }
    let Some(stat) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .as_deref()
        .and_then(parse_stat)
    else {
        return;
    };
    // SAFETY: sysconf only reads a configuration value; it has no memory effects.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    let page = if page > 0 { page as u64 } else { 4096 };
    let cpu = (stat.utime_ticks + stat.stime_ticks) as f64 / ticks;
    let _ = writeln!(
        out,
        "# HELP process_cpu_seconds_total Total user and system CPU time spent, in seconds.\n\
         # TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {cpu}\n\
         # HELP process_resident_memory_bytes Resident memory size, in bytes.\n\
         # TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}\n\
         # HELP process_virtual_memory_bytes Virtual memory size, in bytes.\n\
         # TYPE process_virtual_memory_bytes gauge\nprocess_virtual_memory_bytes {}",
        stat.rss_pages.saturating_mul(page),
        stat.vsize_bytes
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SAMPLE: &str = "4242 (ringcast) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
        150 75 0 0 20 0 5 0 987654 123456789 2500 18446744073709551615 1 1 0 0 0 0 0 \
        4096 0 0 0 0 17 1 0 0 0 0 0";

    #[test]
    fn reads_cpu_and_memory_fields() {
        let stat = parse_stat(SAMPLE).expect("a valid stat line");
        assert_eq!(
            stat,
            Stat {
                utime_ticks: 150,
                stime_ticks: 75,
                vsize_bytes: 123_456_789,
                rss_pages: 2500,
            }
        );
    }

    #[test]
    fn a_command_name_with_spaces_and_parens_is_skipped_whole() {
        let line = SAMPLE.replace("(ringcast)", "(a) b (c))");
        assert_eq!(parse_stat(&line), parse_stat(SAMPLE));
    }

    #[test]
    fn truncated_or_foreign_text_is_none() {
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_stat("4242 (ringcast) S 1 2 3"), None);
        assert_eq!(parse_stat("no parenthesis at all"), None);
    }

    #[test]
    fn renders_the_standard_families_from_this_process() {
        let mut out = String::new();
        render(&mut out, 1.5);
        for family in [
            "process_start_time_seconds 1.5",
            "process_max_fds ",
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_virtual_memory_bytes ",
        ] {
            assert!(out.contains(family), "{family} missing from:\n{out}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".*") {
            let _ = parse_stat(&text);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_stat(&String::from_utf8_lossy(&bytes));
        }
    }
}
