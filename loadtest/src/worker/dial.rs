//! Opening a subscriber socket: non-blocking TCP socket, options, source address with
//! IP_BIND_ADDRESS_NO_PORT, and a connect that is left in progress for epoll to finish.
//! Errors become short cause names (`refused`, `addr_not_available`, …) for the counters.

use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// Creates a socket for `target`, bound to `source` if given, and starts connecting.
///
/// # Errors
/// The failure cause (see [`cause_of`]) when any step fails outright.
pub fn start(
    target: SocketAddr,
    source: Option<IpAddr>,
    rcvbuf: Option<usize>,
) -> Result<Socket, String> {
    let socket = Socket::new(
        Domain::for_address(target),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )
    .map_err(|e| cause_of(&e))?;
    socket.set_nodelay(true).map_err(|e| cause_of(&e))?;
    if let Some(size) = rcvbuf {
        socket
            .set_recv_buffer_size(size)
            .map_err(|e| cause_of(&e))?;
    }
    if let Some(ip) = source {
        if ip.is_ipv4() {
            bind_address_no_port(&socket).map_err(|e| cause_of(&e))?;
        }
        socket
            .bind(&SocketAddr::new(ip, 0).into())
            .map_err(|e| cause_of(&e))?;
    }
    match socket.connect(&target.into()) {
        Ok(()) => Ok(socket),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(socket),
        Err(e) => Err(cause_of(&e)),
    }
}

/// Sets IP_BIND_ADDRESS_NO_PORT so `bind` leaves the port to `connect`, which then picks it
/// per destination: many source IPs × the whole port range, instead of one range per box.
fn bind_address_no_port(socket: &Socket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: the fd is a live socket owned by `socket`; the option value is a c_int that
    // outlives the call, and its size is passed alongside.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::addr_of!(on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Short counter key for an I/O error.
pub fn cause_of(err: &std::io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused".into(),
        Some(libc::ETIMEDOUT) => "timeout".into(),
        Some(libc::ECONNRESET) => "reset".into(),
        Some(libc::EPIPE) => "broken_pipe".into(),
        Some(libc::EADDRNOTAVAIL) => "addr_not_available".into(),
        Some(libc::EADDRINUSE) => "addr_in_use".into(),
        Some(libc::EMFILE) => "fd_limit_process".into(),
        Some(libc::ENFILE) => "fd_limit_system".into(),
        Some(libc::ENETUNREACH | libc::EHOSTUNREACH) => "unreachable".into(),
        Some(libc::ENOBUFS | libc::ENOMEM) => "no_memory".into(),
        _ => format!("io_{:?}", err.kind()).to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_short_names() {
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(cause_of(&refused), "refused");
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(cause_of(&emfile), "fd_limit_process");
    }

    #[test]
    fn refused_connect_surfaces_as_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").ok();
        let addr = listener.as_ref().and_then(|l| l.local_addr().ok());
        drop(listener);
        let Some(addr) = addr else { return };
        let source = Some(IpAddr::from([127, 0, 0, 2]));
        let socket = start(addr, source, Some(4096)).map(std::net::TcpStream::from);
        if let Ok(stream) = socket {
            // Non-blocking connect to a closed loopback port fails at once or on first poll.
            std::thread::sleep(std::time::Duration::from_millis(50));
            let err = stream.take_error().ok().flatten();
            assert_eq!(err.map(|e| cause_of(&e)).as_deref(), Some("refused"));
        }
    }
}
