//! The NATS runtime both NATS threads run on (the cluster bridge, [`crate::cluster::thread`],
//! and the JetStream inbox, [`crate::inbox::jetstream`]): the client connection with
//! `[cluster]`'s credentials and options, the OS thread with its current-thread tokio
//! runtime, and the per-channel worker's job loop. Each thread has a client of its own,
//! so a slow inbox never holds back channel traffic.

use crate::cluster::ClusterSettings;
use async_nats::{Client, Event};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// A channel's worker task ends after this long without a job.
const WORKER_IDLE: Duration = Duration::from_secs(30);
/// JetStream request timeout (publish acks, direct gets).
pub(crate) const JS_TIMEOUT: Duration = Duration::from_secs(2);

/// Spawns OS thread `name` running the future `make` builds on a current-thread tokio
/// runtime (a `LocalSet`, so the future may hold `Rc`s). If the runtime cannot be built,
/// `on_error` is logged and the thread ends.
///
/// # Errors
/// The thread cannot be spawned.
pub(crate) fn spawn_runtime_thread<F, Fut>(
    name: &str,
    on_error: &'static str,
    make: F,
) -> std::io::Result<()>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "{on_error}");
                    return;
                }
            };
            tokio::task::LocalSet::new().block_on(&runtime, make());
        })
        .map(|_| ())
}

/// The next job of channel `channel`'s worker task (one per channel keeps its jobs in
/// order); `None` once it was idle for [`WORKER_IDLE`] and took itself out of `workers`
/// (checked and removed with no await between: no job queued meanwhile is lost).
pub(crate) async fn next_job<T>(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<T>,
    workers: &RefCell<HashMap<Arc<str>, tokio::sync::mpsc::UnboundedSender<T>>>,
    channel: &Arc<str>,
) -> Option<T> {
    loop {
        if let Ok(job) = rx.try_recv() {
            return Some(job);
        }
        match tokio::time::timeout(WORKER_IDLE, rx.recv()).await {
            Ok(Some(job)) => return Some(job),
            _ if rx.is_empty() => {
                workers.borrow_mut().remove(channel);
                return None;
            }
            _ => {}
        }
    }
}

/// A NATS client called `name` with `[cluster]`'s options, the JetStream context over
/// it (requests time out after [`JS_TIMEOUT`]) and its connection events. The client
/// reconnects for ever, also on the first connect.
///
/// # Errors
/// The credentials file cannot be read, or `nats_url` is not an address (said with
/// `what` first).
pub(crate) async fn connect(
    s: &ClusterSettings,
    name: &str,
    what: &str,
) -> Result<
    (
        Client,
        async_nats::jetstream::Context,
        tokio::sync::mpsc::UnboundedReceiver<Event>,
    ),
    String,
> {
    let (event_tx, events) = tokio::sync::mpsc::unbounded_channel();
    let options = connect_options(s, name)
        .await
        .map_err(|e| format!("{what}: cannot read the NATS credentials: {e}"))?
        .event_callback(move |event| {
            let tx = event_tx.clone();
            async move {
                let _ = tx.send(event);
            }
        });
    let urls: Vec<String> = s
        .nats_url
        .split(',')
        .map(|u| u.trim().to_string())
        .collect();
    let client = options
        .connect(urls)
        .await
        .map_err(|e| format!("{what}: bad NATS address: {e}"))?;
    let mut js = async_nats::jetstream::new(client.clone());
    js.set_timeout(JS_TIMEOUT);
    Ok((client, js, events))
}

/// Connect options from `[cluster]` (URLs, credentials, TLS, reconnect policy) for a
/// client called `name`.
async fn connect_options(
    s: &ClusterSettings,
    name: &str,
) -> std::io::Result<async_nats::ConnectOptions> {
    let mut o = match &s.creds_file {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path).await?,
        None => async_nats::ConnectOptions::new(),
    };
    if let Some((user, password)) = &s.user_password {
        o = o.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &s.token {
        o = o.token(token.clone());
    }
    if let Some(ca) = &s.tls_ca_file {
        o = o.add_root_certificates(ca.clone()).require_tls(true);
    }
    Ok(o.name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((100 * attempts as u64).min(2000))
        }))
}
