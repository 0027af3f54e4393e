//! The publisher: numbered, timestamped messages at a fixed rate (or as one burst) over
//! UDP, TCP, HTTP or a WebSocket connection, on its own thread. With several channels
//! message `seq` goes to channel `(seq − 1) mod K`, round-robin.
//!
//! Each payload is `{"seq":N,"ts":<unix nanos>}`, padded with a `"pad"` string to
//! `--size` bytes when asked, so every subscriber can compute latency and spot gaps. Only
//! messages the endpoint accepted count as published (an HTTP answer other than 200, a
//! TCP `ERR` line or a failed send is an error, not a message).

mod sink;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ipc::unix_nanos;
use crate::target::PublishTarget;
use sink::Sink;

/// The publisher could not start or broke down.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The publish endpoint cannot be reached.
    #[error("cannot connect to the publish endpoint {what}{hint}")]
    Connect {
        /// Endpoint description.
        what: String,
        /// The error.
        source: std::io::Error,
        /// Extra advice, e.g. for "connection refused".
        hint: &'static str,
    },
    /// The WebSocket publisher's upgrade was refused.
    #[error("publisher WebSocket handshake with {what} failed: {why}")]
    Handshake {
        /// Endpoint description.
        what: String,
        /// What went wrong.
        why: String,
    },
    /// Sending failed repeatedly.
    #[error("publishing to {what} keeps failing: {why}")]
    Broken {
        /// Endpoint description.
        what: String,
        /// Last error.
        why: String,
    },
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishPlan {
    /// Channel names; messages go round-robin over them (at least one).
    pub channels: Vec<String>,
    /// Messages to publish at most.
    pub messages: u64,
    /// Messages per second; 0 publishes everything as one burst.
    pub rate: f64,
    /// Target payload size in bytes (0: minimal payload).
    pub size: usize,
}

/// Final publisher numbers.
#[derive(Debug, Clone, Default)]
pub struct PublishReport {
    /// Messages accepted (`seq` 1..=sent, minus errors).
    pub sent: u64,
    /// Messages refused or not sent.
    pub errors: u64,
    /// Seconds from first to last send.
    pub secs: f64,
}

/// A running publisher thread.
pub struct Publisher {
    handle: JoinHandle<Result<PublishReport, PublishError>>,
    sent: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Publisher {
    /// Connects to every endpoint of `targets` (so an unreachable one fails here) and
    /// starts publishing; each message goes to every endpoint (one per node of a
    /// `--targets` run) and counts as published when all of them accepted it.
    ///
    /// # Errors
    /// An endpoint is unreachable or refuses the publisher.
    pub fn start(targets: &[PublishTarget], plan: PublishPlan) -> Result<Publisher, PublishError> {
        let errors = Arc::new(AtomicU64::new(0));
        let mut sink = Sinks(
            targets
                .iter()
                .map(|t| Sink::open(t, &plan.channels, errors.clone()))
                .collect::<Result<Vec<_>, _>>()?,
        );
        let k = plan.channels.len().max(1) as u64;
        let sent = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (sent2, errors2, stop2) = (sent.clone(), errors.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let begin = Instant::now();
            let mut failing = 0u32;
            for seq in 1..=plan.messages {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                if plan.rate > 0.0 {
                    let due = begin + Duration::from_secs_f64((seq - 1) as f64 / plan.rate);
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                }
                let channel = ((seq - 1) % k) as usize;
                match sink.send(channel, &payload(seq, unix_nanos(), plan.size)) {
                    Ok(()) => {
                        failing = 0;
                        sent2.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(why) => {
                        errors2.fetch_add(1, Ordering::Relaxed);
                        failing += 1;
                        if failing >= 100 {
                            return Err(PublishError::Broken {
                                what: sink.what(),
                                why,
                            });
                        }
                    }
                }
            }
            sink.finish();
            Ok(PublishReport {
                sent: sent2.load(Ordering::Relaxed),
                errors: errors2.load(Ordering::Relaxed),
                secs: begin.elapsed().as_secs_f64(),
            })
        });
        Ok(Publisher {
            handle,
            sent,
            errors,
            stop,
        })
    }

    /// Messages accepted so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Errors so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Whether the thread has finished its messages.
    pub fn is_done(&self) -> bool {
        self.handle.is_finished()
    }

    /// Asks the thread to stop after the current message.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Waits for the thread.
    ///
    /// # Errors
    /// The publisher broke down (or its thread panicked).
    pub fn join(self) -> Result<PublishReport, PublishError> {
        self.handle.join().unwrap_or_else(|_| {
            Err(PublishError::Broken {
                what: "publisher thread".into(),
                why: "panicked".into(),
            })
        })
    }
}

/// One message to every endpoint, in the order given.
struct Sinks(Vec<Sink>);

impl Sinks {
    fn what(&self) -> String {
        let all = self.0.iter().map(Sink::what).collect::<Vec<_>>();
        all.join(",")
    }

    /// Sends to every endpoint (a failure at one does not skip the others); the first
    /// error, if any.
    fn send(&mut self, channel: usize, payload: &[u8]) -> Result<(), String> {
        let mut first_err = None;
        for sink in &mut self.0 {
            if let Err(why) = sink.send(channel, payload) {
                first_err.get_or_insert(format!("{}: {why}", sink.what()));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn finish(&mut self) {
        self.0.iter_mut().for_each(Sink::finish);
    }
}

/// `{"seq":N,"ts":T}`, padded with `"pad":"xxx…"` to `size` bytes when that is larger.
pub fn payload(seq: u64, ts: u64, size: usize) -> Vec<u8> {
    let base = format!("{{\"seq\":{seq},\"ts\":{ts}");
    const PAD_OVERHEAD: usize = ",\"pad\":\"\"}".len();
    let mut out = base.into_bytes();
    if size > out.len() + PAD_OVERHEAD {
        let pad = size - out.len() - PAD_OVERHEAD;
        out.extend_from_slice(b",\"pad\":\"");
        out.resize(out.len() + pad, b'x');
        out.push(b'"');
    }
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_numbered_and_padded() {
        assert_eq!(payload(3, 42, 0), br#"{"seq":3,"ts":42}"#.to_vec());
        let padded = payload(3, 42, 100);
        assert_eq!(padded.len(), 100);
        let v: serde_json::Value = serde_json::from_slice(&padded).unwrap_or_default();
        assert_eq!(v["seq"], 3);
        assert_eq!(crate::seq::parse_sample(&padded).ts_nanos, Some(42));
    }
}
