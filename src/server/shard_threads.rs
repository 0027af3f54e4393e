//! The shard threads: one glommio executor per shard, pinned to one CPU of the process's
//! affinity mask, wired to every other shard (wake-ups, admin requests), started, and
//! waited for until each reports that it serves.

use super::shared::Shared;
use super::StartError;
use crate::inbox::ShardQueues;
use crate::shard::control::{ShardRequest, CONTROL_QUEUE};
use crate::shard::{ShardError, ShardSetup, ShardSockets};
use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use glommio::{LocalExecutorBuilder, Placement};
use std::sync::mpsc;

/// Starts one thread per shard and blocks until every shard serves; returns where each
/// shard's number arrives when its drain finished.
///
/// # Errors
/// The first shard's [`ShardError`] (executor, thread or setup), also when a shard
/// thread ended before it reported.
pub(super) fn start(
    shared: &Shared,
    inbox_queues: Vec<ShardQueues>,
    sockets: Vec<ShardSockets>,
) -> Result<mpsc::Receiver<usize>, StartError> {
    let settings = &shared.settings;
    let n = settings.shards;
    let mut inbox_queues = inbox_queues.into_iter();
    // Wake channels are single-producer: one per (producer shard, consumer shard) pair.
    let mut senders: Vec<Vec<SharedSender<()>>> = (0..n).map(|_| Vec::new()).collect();
    let mut receivers: Vec<Vec<SharedReceiver<()>>> = (0..n).map(|_| Vec::new()).collect();
    for producer in senders.iter_mut() {
        for consumer in receivers.iter_mut() {
            let (tx, rx) = shared_channel::new_bounded(1);
            producer.push(tx);
            consumer.push(rx);
        }
    }

    // Admin requests: shard 0 (which serves the admin port) to every shard.
    let (mut control_senders, control_receivers): (Vec<_>, Vec<_>) = (0..n)
        .map(|_| shared_channel::new_bounded::<ShardRequest>(CONTROL_QUEUE))
        .unzip();
    let mut control_receivers = control_receivers.into_iter();

    let cpus = allowed_cpus();
    if n > cpus.len() {
        tracing::warn!(
            shards = n,
            cpus = cpus.len(),
            "more shards than CPUs: shards will share cores"
        );
    }
    let (done_tx, done_rx) = mpsc::channel();
    let (started_tx, started_rx) = mpsc::channel();
    for (id, ((sockets, wake_senders), wake_receivers)) in
        sockets.into_iter().zip(senders).zip(receivers).enumerate()
    {
        let cpu = cpus[id % cpus.len()];
        let setup = ShardSetup {
            id,
            settings: settings.clone(),
            publisher: shared.publisher.clone(),
            registry: shared.registry.clone(),
            presence: shared.presence.clone(),
            slots: shared.slots.clone(),
            ingest_slots: shared.ingest_slots.clone(),
            per_ip: shared.per_ip.clone(),
            lifecycle: shared.lifecycle.clone(),
            cluster: shared.cluster.clone(),
            metrics: shared.metrics,
            sockets,
            wake_senders,
            wake_receivers,
            control_receiver: control_receivers.next().ok_or_else(|| ShardError::Setup {
                shard: id,
                message: "no control queue (bug)".into(),
            })?,
            control_senders: if id == 0 {
                std::mem::take(&mut control_senders)
            } else {
                Vec::new()
            },
            inbox: shared.inbox.clone().zip(inbox_queues.next()),
            started: started_tx.clone(),
            done: done_tx.clone(),
        };
        let started = started_tx.clone();
        let builder = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("ringcast-{id}"))
            .io_memory(settings.io_memory);
        std::thread::Builder::new()
            .name(format!("ringcast-{id}"))
            .spawn(move || match builder.make() {
                Err(e) => {
                    let _ = started.send(Err(ShardError::Executor {
                        shard: id,
                        cpu,
                        message: explain_executor_error(&e),
                    }));
                }
                Ok(executor) => {
                    drop(started);
                    executor.run(crate::shard::serve(setup));
                }
            })
            .map_err(|e| ShardError::Executor {
                shard: id,
                cpu,
                message: format!("spawning thread: {e}"),
            })?;
    }
    // Only the shards hold senders now: if every one of them is gone before all reported,
    // a shard died during setup.
    drop(started_tx);
    for ready in 0..n {
        match started_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(ShardError::Setup {
                    shard: ready,
                    message: format!(
                        "only {ready} of {n} shards reported serving before their threads ended"
                    ),
                }
                .into())
            }
        }
    }
    Ok(done_rx)
}

/// The executor's error with what to change on the host.
fn explain_executor_error(e: &glommio::GlommioError<()>) -> String {
    let text = e.to_string();
    let os = match e {
        glommio::GlommioError::IoError(io) => io.raw_os_error(),
        _ => None,
    };
    let hint = match os {
        Some(libc::ENOMEM) => "io_uring setup ran out of locked memory: raise RLIMIT_MEMLOCK (systemd LimitMEMLOCK=, see kernel-tuning/ringcast.service) or lower io_memory",
        Some(libc::EPERM) => "io_uring is not permitted: check the kernel.io_uring_disabled sysctl, seccomp profile or container runtime",
        Some(libc::EMFILE) | Some(libc::ENFILE) => "out of file descriptors: raise LimitNOFILE",
        Some(libc::ENOSYS) => "this kernel has no io_uring (Linux 5.8 or newer is required)",
        _ => "see kernel-tuning/README.md for the limits ringcast needs",
    };
    format!("{text}: {hint}")
}

/// CPUs this process may run on, in order.
fn allowed_cpus() -> Vec<usize> {
    let all = std::thread::available_parallelism().map_or(1, usize::from);
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => {
            let cpus: Vec<usize> = (0..nix::sched::CpuSet::count())
                .filter(|&c| set.is_set(c).unwrap_or(false))
                .collect();
            if cpus.is_empty() {
                (0..all).collect()
            } else {
                cpus
            }
        }
        Err(_) => (0..all).collect(),
    }
}
