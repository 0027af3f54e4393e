//! A TCP forwarder between a client and the server that a test can shut and open.
//!
//! Open, every accepted connection is relayed to the target, byte for byte, both ways.
//! Shut, new connections are accepted and closed at once (the client sees its handshake
//! fail, as with a server that is down) and counted; relayed connections already up are
//! not touched. It lets a test decide *when* a client may reconnect, without timing.
//! Held, the relayed connections stop passing the target's bytes to their clients (the
//! clients' bytes still reach the target) until released: answers the target sent are
//! delivered late, all at once, in order.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// A forwarder listening on a loopback port (see the module docs).
pub struct TcpGate {
    /// The port clients connect to.
    pub port: u16,
    open: Arc<AtomicBool>,
    refused: Arc<AtomicUsize>,
    relayed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    hold: Arc<AtomicBool>,
}

impl TcpGate {
    /// Listens on a free loopback port, open, relaying to `target`.
    pub fn start(target: SocketAddr) -> TcpGate {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the TCP gate");
        let port = listener.local_addr().expect("gate address").port();
        listener
            .set_nonblocking(true)
            .expect("non-blocking gate listener");
        let gate = TcpGate {
            port,
            open: Arc::new(AtomicBool::new(true)),
            refused: Arc::new(AtomicUsize::new(0)),
            relayed: Arc::new(AtomicUsize::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            hold: Arc::new(AtomicBool::new(false)),
        };
        let (open, refused, relayed, stop, hold) = (
            Arc::clone(&gate.open),
            Arc::clone(&gate.refused),
            Arc::clone(&gate.relayed),
            Arc::clone(&gate.stop),
            Arc::clone(&gate.hold),
        );
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if !open.load(Ordering::SeqCst) {
                            refused.fetch_add(1, Ordering::SeqCst);
                            drop(client);
                            continue;
                        }
                        relayed.fetch_add(1, Ordering::SeqCst);
                        relay(client, target, Arc::clone(&hold));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("TCP gate accept: {e}"),
                }
            }
        });
        gate
    }

    /// New connections are refused (and counted) from now on.
    pub fn shut(&self) {
        self.open.store(false, Ordering::SeqCst);
    }

    /// New connections are relayed again.
    pub fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
    }

    /// The target's bytes wait in the gate from now on (see the module docs).
    pub fn hold(&self) {
        self.hold.store(true, Ordering::SeqCst);
    }

    /// The target's bytes flow to the clients again, the held ones first.
    pub fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
    }

    /// Connections refused while shut.
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }

    /// Connections relayed while open.
    pub fn relayed(&self) -> usize {
        self.relayed.load(Ordering::SeqCst)
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies both ways between `client` and a new connection to `target`; a failed connect
/// closes the client (as a server that is down would).
fn relay(client: TcpStream, target: SocketAddr, hold: Arc<AtomicBool>) {
    let _ = client.set_nonblocking(false);
    let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let never = Arc::new(AtomicBool::new(false));
    thread::spawn(move || pump(client, server, never));
    thread::spawn(move || pump(server2, client2, hold));
}

/// Copies `from` to `to`; while `hold` is set, what was read waits before it is written.
fn pump(mut from: TcpStream, mut to: TcpStream, hold: Arc<AtomicBool>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                while hold.load(Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(5));
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
