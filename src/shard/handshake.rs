//! The upgrade: a short-lived glommio task per accepted stream reads the HTTP request,
//! answers `101` (or an HTTP error) and hands the socket to the connection table
//! ([`crate::shard::conn`]), after which no task exists for the connection.

use crate::proto::upgrade::{accept_response, http_response, parse_upgrade};
use crate::shard::conn::adopt;
use crate::shard::state::Shard;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;

/// Upgrades an accepted TCP connection and adopts it into the shard.
pub async fn upgrade(shard: Rc<Shard>, mut stream: TcpStream) {
    let Some((channels, leftover)) = handshake(&shard, &mut stream).await else {
        return;
    };
    // The glommio stream would keep an io_uring poll armed and its own state alive; the
    // table keeps only a plain descriptor.
    // SAFETY: the descriptor is open for the duration of this borrow (the stream owns it
    // and is dropped only after the duplicate exists).
    let borrowed = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let Ok(fd) = borrowed.try_clone_to_owned() else {
        return;
    };
    drop(stream);
    adopt(&shard, fd, &channels, leftover);
    shard.settle();
}

/// Reads and answers the upgrade request. Returns the channels and any bytes the client
/// sent after the request head, or `None` when the connection got an HTTP error.
async fn handshake(shard: &Shard, stream: &mut TcpStream) -> Option<(Vec<String>, Vec<u8>)> {
    let _ = stream.set_read_timeout(Some(shard.settings.handshake_timeout));
    let mut head = Vec::with_capacity(512);
    let mut chunk = vec![0u8; 2048];
    let upgrade = loop {
        let n = stream.read(&mut chunk).await.ok().filter(|&n| n > 0)?;
        head.extend_from_slice(&chunk[..n]);
        match parse_upgrade(&head, shard.settings.max_subscriptions_per_connection) {
            Ok(Some(upgrade)) => break upgrade,
            Ok(None) => continue,
            Err(reject) => {
                shard.metrics.handshake_rejected.fetch_add(1, Relaxed);
                let _ = stream.write_all(&reject.response()).await;
                return None;
            }
        }
    };
    let open = shard.metrics.connections.load(Relaxed) as usize;
    if open >= shard.max_conns || shard.draining.get() {
        shard.metrics.refused_full.fetch_add(1, Relaxed);
        let body = if shard.draining.get() {
            "server is draining\n"
        } else {
            "server is at its connection limit\n"
        };
        let _ = stream
            .write_all(&http_response(503, "Retry-After: 5\r\n", body))
            .await;
        return None;
    }
    stream
        .write_all(&accept_response(&upgrade.key))
        .await
        .ok()?;
    let _ = stream.set_nodelay(true);
    let leftover = head.split_off(upgrade.head_len);
    Some((upgrade.channels, leftover))
}
