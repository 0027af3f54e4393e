//! The PROXY protocol header (HAProxy's, versions 1 and 2), sans-io: what an L4 load
//! balancer (HAProxy `send-proxy` / `send-proxy-v2`, AWS NLB with proxy protocol v2)
//! writes before the client's first byte, naming the client's address.
//!
//! [`parse`] looks at the bytes read so far and says: more bytes are needed, or here is
//! the header and how many bytes it took (the rest, usually the HTTP request that came in
//! the same segment, belongs to the next parser), or why it is not a valid header.
//!
//! - Version 1: one text line `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\r\n` or
//!   `PROXY UNKNOWN ...\r\n`, at most [`V1_MAX_LEN`] bytes.
//! - Version 2: a 12-byte signature, a version/command byte (`0x20` LOCAL, `0x21` PROXY),
//!   a family/protocol byte, a big-endian length and that many bytes: the addresses, then
//!   TLVs, which are skipped. The length is bounded by [`V2_MAX_PAYLOAD`].
//!
//! `PROXY UNKNOWN`, the v2 LOCAL command (a balancer's own health check) and v2 families
//! other than TCP over IPv4/IPv6 carry no client address: [`ProxyHeader::Local`], and the
//! caller keeps the peer's address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The version 2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The longest version 1 line, CRLF included (the specification's bound).
pub const V1_MAX_LEN: usize = 107;

/// The longest version 2 payload (addresses and TLVs) accepted. The specification allows
/// 65535; balancers send 12 or 36 bytes of addresses plus a few TLVs (AWS's VPC endpoint
/// id, HAProxy's unique id or TLS details), so 4 KiB is generous while keeping what an
/// unauthenticated peer can make a handshake buffer small.
pub const V2_MAX_PAYLOAD: usize = 4096;

/// Which versions a listener accepts (`proxy_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versions {
    /// Text only (`send-proxy`).
    V1,
    /// Binary only (`send-proxy-v2`, AWS NLB).
    V2,
    /// Either, told apart by the first byte.
    Any,
}

impl Versions {
    fn v1(self) -> bool {
        matches!(self, Versions::V1 | Versions::Any)
    }

    fn v2(self) -> bool {
        matches!(self, Versions::V2 | Versions::Any)
    }
}

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// Relayed for the client at `source`; `destination` is the address it connected to.
    Proxied {
        /// The client.
        source: SocketAddr,
        /// The balancer's listening address the client connected to.
        destination: SocketAddr,
    },
    /// No client address (`PROXY UNKNOWN`, v2 LOCAL, or a family without one): the
    /// connection's own peer address stands.
    Local,
}

/// The outcome of [`parse`] on the bytes read so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A valid prefix of a header: read more.
    Incomplete,
    /// A whole header, `consumed` bytes long; what follows is not part of it.
    Complete {
        /// The header.
        header: ProxyHeader,
        /// Bytes it took.
        consumed: usize,
    },
}

/// Why bytes are not an acceptable header (metric label `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[repr(usize)]
pub enum ProxyError {
    /// The bytes do not start with any PROXY header (e.g. a plain HTTP request).
    #[error("no PROXY header")]
    Missing = 0,
    /// A header of a version this listener is not configured for.
    #[error("PROXY header of a version this listener does not accept")]
    Version,
    /// A v1 line or a v2 header that breaks the grammar (bad command, family, address or
    /// port).
    #[error("malformed PROXY header")]
    Malformed,
    /// A v1 line without CRLF within 107 bytes, or a v2 length over the bound.
    #[error("PROXY header too long")]
    TooLong,
    /// The connection ended (or failed) before the header was complete.
    #[error("connection closed inside the PROXY header")]
    Truncated,
}

impl ProxyError {
    /// Every label, indexed by discriminant.
    pub const LABELS: [&'static str; 5] =
        ["missing", "version", "malformed", "too_long", "truncated"];

    /// This error's label.
    pub fn label(self) -> &'static str {
        Self::LABELS[self as usize]
    }
}

/// Parses the header at the start of `buf`, accepting `versions`.
///
/// # Errors
/// A [`ProxyError`] as soon as the bytes cannot become an acceptable header.
pub fn parse(buf: &[u8], versions: Versions) -> Result<Parsed, ProxyError> {
    let v1_prefix = b"PROXY ";
    let is_prefix = |sig: &[u8]| {
        let n = buf.len().min(sig.len());
        buf[..n] == sig[..n]
    };
    if buf.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    if is_prefix(v1_prefix) {
        if !versions.v1() {
            return Err(ProxyError::Version);
        }
        return parse_v1(buf);
    }
    if is_prefix(&V2_SIGNATURE) {
        if !versions.v2() {
            return Err(ProxyError::Version);
        }
        return parse_v2(buf);
    }
    Err(ProxyError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        if buf.len() >= V1_MAX_LEN {
            return Err(ProxyError::TooLong);
        }
        // No line feed may come before the CR either.
        if window.contains(&b'\n') {
            return Err(ProxyError::Malformed);
        }
        return Ok(Parsed::Incomplete);
    };
    if cr + 2 > V1_MAX_LEN {
        return Err(ProxyError::TooLong);
    }
    match buf.get(cr + 1) {
        None => return Ok(Parsed::Incomplete),
        Some(b'\n') => {}
        Some(_) => return Err(ProxyError::Malformed),
    }
    let consumed = cr + 2;
    let line = std::str::from_utf8(&buf[6..cr]).map_err(|_| ProxyError::Malformed)?;
    if line.contains('\n') {
        return Err(ProxyError::Malformed);
    }
    let mut fields = line.split(' ');
    let header = match fields.next() {
        // Whatever follows UNKNOWN is to be ignored.
        Some("UNKNOWN") => ProxyHeader::Local,
        Some(family @ ("TCP4" | "TCP6")) => {
            let rest: Vec<&str> = fields.collect();
            let [src, dst, sport, dport] = rest[..] else {
                return Err(ProxyError::Malformed);
            };
            let ip = |s: &str| -> Result<IpAddr, ProxyError> {
                let ip = if family == "TCP4" {
                    s.parse::<Ipv4Addr>().map(IpAddr::V4)
                } else {
                    s.parse::<Ipv6Addr>().map(IpAddr::V6)
                };
                ip.map_err(|_| ProxyError::Malformed)
            };
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(src)?, port(sport)?),
                destination: SocketAddr::new(ip(dst)?, port(dport)?),
            }
        }
        _ => return Err(ProxyError::Malformed),
    };
    Ok(Parsed::Complete { header, consumed })
}

/// A v1 port: decimal, no sign, no leading zero (except `0` itself), at most 65535.
fn port(s: &str) -> Result<u16, ProxyError> {
    let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return Err(ProxyError::Malformed);
    }
    s.parse().map_err(|_| ProxyError::Malformed)
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if buf.len() < 16 {
        // Check what is there already: a wrong version byte fails early.
        if let Some(&ver_cmd) = buf.get(12) {
            check_ver_cmd(ver_cmd)?;
        }
        if let Some(&fam) = buf.get(13) {
            check_family(fam)?;
        }
        return Ok(Parsed::Incomplete);
    }
    let command = check_ver_cmd(buf[12])?;
    let (family, protocol) = check_family(buf[13])?;
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > V2_MAX_PAYLOAD {
        return Err(ProxyError::TooLong);
    }
    let needed = match (command, family, protocol) {
        (V2Command::Proxy, 1, 1) => 12,
        (V2Command::Proxy, 2, 1) => 36,
        _ => 0,
    };
    if len < needed {
        return Err(ProxyError::Malformed);
    }
    let consumed = 16 + len;
    let Some(payload) = buf.get(16..consumed) else {
        return Ok(Parsed::Incomplete);
    };
    let header = match needed {
        12 => {
            let ip = |i: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    payload[i],
                    payload[i + 1],
                    payload[i + 2],
                    payload[i + 3],
                ))
            };
            let port = |i: usize| u16::from_be_bytes([payload[i], payload[i + 1]]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        36 => {
            let ip = |i: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&payload[i..i + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |i: usize| u16::from_be_bytes([payload[i], payload[i + 1]]);
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        // LOCAL, AF_UNSPEC, AF_UNIX, or a non-TCP protocol: no client address to use.
        _ => ProxyHeader::Local,
    };
    Ok(Parsed::Complete { header, consumed })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum V2Command {
    Local,
    Proxy,
}

fn check_ver_cmd(b: u8) -> Result<V2Command, ProxyError> {
    match b {
        0x20 => Ok(V2Command::Local),
        0x21 => Ok(V2Command::Proxy),
        b if b >> 4 != 2 => Err(ProxyError::Version),
        _ => Err(ProxyError::Malformed),
    }
}

/// (address family, transport protocol) of the v2 family byte; values the specification
/// does not define are rejected.
fn check_family(b: u8) -> Result<(u8, u8), ProxyError> {
    let (family, protocol) = (b >> 4, b & 0x0f);
    if family > 3 || protocol > 2 {
        return Err(ProxyError::Malformed);
    }
    Ok((family, protocol))
}

/// Renders `header` as a version 1 line (`PROXY UNKNOWN` for [`ProxyHeader::Local`]).
/// Source and destination must be of the same family; a mixed pair is rendered as
/// `PROXY UNKNOWN`.
pub fn encode_v1(header: &ProxyHeader) -> Vec<u8> {
    match header {
        ProxyHeader::Proxied {
            source,
            destination,
        } if source.is_ipv4() == destination.is_ipv4() => {
            let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                source.ip(),
                destination.ip(),
                source.port(),
                destination.port()
            )
            .into_bytes()
        }
        _ => b"PROXY UNKNOWN\r\n".to_vec(),
    }
}

/// Renders `header` as a version 2 header followed by `tlvs` (type, value); a LOCAL
/// command with AF_UNSPEC for [`ProxyHeader::Local`] or a mixed-family pair.
pub fn encode_v2(header: &ProxyHeader, tlvs: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    let mut payload = Vec::new();
    let (ver_cmd, fam) = match header {
        ProxyHeader::Proxied {
            source: SocketAddr::V4(s),
            destination: SocketAddr::V4(d),
        } => {
            payload.extend_from_slice(&s.ip().octets());
            payload.extend_from_slice(&d.ip().octets());
            payload.extend_from_slice(&s.port().to_be_bytes());
            payload.extend_from_slice(&d.port().to_be_bytes());
            (0x21, 0x11)
        }
        ProxyHeader::Proxied {
            source: SocketAddr::V6(s),
            destination: SocketAddr::V6(d),
        } => {
            payload.extend_from_slice(&s.ip().octets());
            payload.extend_from_slice(&d.ip().octets());
            payload.extend_from_slice(&s.port().to_be_bytes());
            payload.extend_from_slice(&d.port().to_be_bytes());
            (0x21, 0x21)
        }
        _ => (0x20, 0x00),
    };
    for (kind, value) in tlvs {
        payload.push(*kind);
        let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
        payload.extend_from_slice(&len.to_be_bytes());
        payload.extend_from_slice(&value[..usize::from(len)]);
    }
    out.push(ver_cmd);
    out.push(fam);
    let len = u16::try_from(payload.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&payload[..usize::from(len)]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn complete(buf: &[u8], versions: Versions) -> (ProxyHeader, usize) {
        match parse(buf, versions) {
            Ok(Parsed::Complete { header, consumed }) => (header, consumed),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    #[test]
    fn the_specifications_v1_examples() {
        let (h, n) = complete(
            b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
            Versions::V1,
        );
        assert_eq!(n, 56);
        assert_eq!(
            h,
            ProxyHeader::Proxied {
                source: addr("255.255.255.255:65535"),
                destination: addr("255.255.255.255:65535"),
            }
        );
        let worst = b"PROXY TCP6 ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
        assert_eq!(parse(worst, Versions::V1), Err(ProxyError::Malformed));
        let full = format!(
            "PROXY TCP6 {0} {0} 65535 65535\r\n",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        );
        assert_eq!(full.len(), 104);
        let (h, n) = complete(full.as_bytes(), Versions::Any);
        assert_eq!(n, 104);
        assert!(matches!(h, ProxyHeader::Proxied { source, .. } if source.port() == 65535));
        assert_eq!(
            complete(b"PROXY UNKNOWN\r\n", Versions::V1),
            (ProxyHeader::Local, 15)
        );
        let unknown = format!(
            "PROXY UNKNOWN {0} {0} 65535 65535\r\n",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        );
        assert_eq!(unknown.len(), V1_MAX_LEN);
        assert_eq!(
            complete(unknown.as_bytes(), Versions::V1),
            (ProxyHeader::Local, 107)
        );
        let (h, _) = complete(
            b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
            Versions::V1,
        );
        assert_eq!(
            h,
            ProxyHeader::Proxied {
                source: addr("192.168.0.1:56324"),
                destination: addr("192.168.0.11:443"),
            }
        );
    }

    #[test]
    fn v1_rejections_name_their_reason() {
        let cases: &[(&[u8], ProxyError)] = &[
            (b"GET / HTTP/1.1\r\n", ProxyError::Missing),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", ProxyError::Malformed),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", ProxyError::Malformed),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
                ProxyError::Malformed,
            ),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
                ProxyError::Malformed,
            ),
            (
                b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
                ProxyError::Malformed,
            ),
            (b"PROXY TCP4 ::1 ::1 1 2\r\n", ProxyError::Malformed),
            (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", ProxyError::Malformed),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", ProxyError::Malformed),
            (
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
                ProxyError::Malformed,
            ),
            (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", ProxyError::Malformed),
            (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", ProxyError::Malformed),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse(input, Versions::Any),
                Err(*want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 100]].concat();
        assert_eq!(parse(&long, Versions::V1), Err(ProxyError::TooLong));
        let mut just_over = vec![b'x'; V1_MAX_LEN - 1];
        just_over[..6].copy_from_slice(b"PROXY ");
        just_over.extend_from_slice(b"\r\n");
        assert_eq!(parse(&just_over, Versions::V1), Err(ProxyError::TooLong));
        assert_eq!(
            parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", Versions::V2),
            Err(ProxyError::Version)
        );
    }

    #[test]
    fn prefixes_ask_for_more() {
        for input in [
            &b"P"[..],
            b"PROXY",
            b"PROXY TCP4 1.2.3.4",
            b"PROXY UNKNOWN\r",
            b"\r\n\r\n\0",
        ] {
            assert_eq!(
                parse(input, Versions::Any),
                Ok(Parsed::Incomplete),
                "{input:?}"
            );
        }
        assert_eq!(parse(b"", Versions::V1), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"\r\n\r\n\0", Versions::V1), Err(ProxyError::Version));
    }

    #[test]
    fn v2_ipv4_ipv6_local_and_tlvs() {
        // HAProxy's send-proxy-v2 for 192.0.2.1:51000 -> 198.51.100.7:443.
        let mut v4 = V2_SIGNATURE.to_vec();
        v4.extend_from_slice(&[0x21, 0x11, 0x00, 0x0c, 192, 0, 2, 1, 198, 51, 100, 7]);
        v4.extend_from_slice(&51000u16.to_be_bytes());
        v4.extend_from_slice(&443u16.to_be_bytes());
        v4.extend_from_slice(b"GET /ws HTTP/1.1\r\n");
        let (h, n) = complete(&v4, Versions::V2);
        assert_eq!(n, 28);
        assert_eq!(&v4[n..n + 3], b"GET");
        assert_eq!(
            h,
            ProxyHeader::Proxied {
                source: addr("192.0.2.1:51000"),
                destination: addr("198.51.100.7:443"),
            }
        );
        // AWS NLB: IPv6 plus a PP2_TYPE_AWS TLV (0xEA) with the VPC endpoint id.
        let six = ProxyHeader::Proxied {
            source: addr("[2001:db8::1]:40000"),
            destination: addr("[2001:db8::2]:8080"),
        };
        let bytes = encode_v2(&six, &[(0xea, b"\x01vpce-08d2bf15fac5001c9".to_vec())]);
        assert_eq!(complete(&bytes, Versions::Any), (six, bytes.len()));
        // LOCAL (a health check): no address, whatever the family byte says.
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        assert_eq!(complete(&local, Versions::V2), (ProxyHeader::Local, 16));
        // AF_UNIX and UDP carry no usable client address.
        let mut unix = V2_SIGNATURE.to_vec();
        unix.extend_from_slice(&[0x21, 0x31, 0x00, 0xd8]);
        unix.extend_from_slice(&[0u8; 216]);
        assert_eq!(complete(&unix, Versions::V2), (ProxyHeader::Local, 232));
        let mut udp = V2_SIGNATURE.to_vec();
        udp.extend_from_slice(&[0x21, 0x12, 0x00, 0x0c]);
        udp.extend_from_slice(&[0u8; 12]);
        assert_eq!(complete(&udp, Versions::V2), (ProxyHeader::Local, 28));
    }

    #[test]
    fn v2_rejections_name_their_reason() {
        let with = |head: [u8; 4], body: &[u8]| {
            let mut b = V2_SIGNATURE.to_vec();
            b.extend_from_slice(&head);
            b.extend_from_slice(body);
            b
        };
        let cases = [
            (with([0x11, 0x11, 0, 12], &[0; 12]), ProxyError::Version),
            (with([0x22, 0x11, 0, 12], &[0; 12]), ProxyError::Malformed),
            (with([0x21, 0x41, 0, 12], &[0; 12]), ProxyError::Malformed),
            (with([0x21, 0x13, 0, 12], &[0; 12]), ProxyError::Malformed),
            (with([0x21, 0x11, 0, 8], &[0; 8]), ProxyError::Malformed),
            (with([0x21, 0x21, 0, 12], &[0; 12]), ProxyError::Malformed),
            (with([0x21, 0x11, 0xff, 0xff], &[]), ProxyError::TooLong),
        ];
        for (input, want) in cases {
            assert_eq!(parse(&input, Versions::Any), Err(want), "{input:?}");
        }
        // The version byte is checked before the rest arrives.
        assert_eq!(
            parse(&with([0x31, 0, 0, 0], &[])[..13], Versions::V2),
            Err(ProxyError::Version)
        );
        assert_eq!(
            parse(&with([0x21, 0x11, 0, 12], &[0; 4]), Versions::V2),
            Ok(Parsed::Incomplete)
        );
    }

    #[test]
    fn error_labels_match_discriminants() {
        for e in [
            ProxyError::Missing,
            ProxyError::Version,
            ProxyError::Malformed,
            ProxyError::TooLong,
            ProxyError::Truncated,
        ] {
            assert_eq!(ProxyError::LABELS[e as usize], e.label());
        }
    }

    fn header() -> impl Strategy<Value = ProxyHeader> {
        let v4 = (
            any::<[u8; 4]>(),
            any::<[u8; 4]>(),
            any::<u16>(),
            any::<u16>(),
        )
            .prop_map(|(s, d, sp, dp)| ProxyHeader::Proxied {
                source: SocketAddr::new(IpAddr::from(s), sp),
                destination: SocketAddr::new(IpAddr::from(d), dp),
            });
        let v6 = (
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<u16>(),
            any::<u16>(),
        )
            .prop_map(|(s, d, sp, dp)| ProxyHeader::Proxied {
                source: SocketAddr::new(IpAddr::from(s), sp),
                destination: SocketAddr::new(IpAddr::from(d), dp),
            });
        prop_oneof![v4, v6, Just(ProxyHeader::Local)]
    }

    fn versions() -> impl Strategy<Value = Versions> {
        prop_oneof![Just(Versions::V1), Just(Versions::V2), Just(Versions::Any)]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), v in versions()) {
            let _ = parse(&bytes, v);
        }

        #[test]
        fn arbitrary_bytes_after_a_prefix_never_panic(
            v2 in any::<bool>(),
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut input = if v2 { V2_SIGNATURE.to_vec() } else { b"PROXY ".to_vec() };
            input.extend_from_slice(&bytes);
            if let Ok(Parsed::Complete { consumed, .. }) = parse(&input, Versions::Any) {
                prop_assert!(consumed <= input.len());
            }
        }

        #[test]
        fn encoded_headers_round_trip_and_keep_what_follows(
            h in header(),
            tlvs in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40)), 0..4),
            rest in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let v1 = encode_v1(&h);
            prop_assert!(v1.len() <= V1_MAX_LEN);
            let v2 = encode_v2(&h, &tlvs);
            for (bytes, versions) in [(v1, Versions::V1), (v2, Versions::V2)] {
                let mut input = bytes.clone();
                input.extend_from_slice(&rest);
                let parsed = parse(&input, versions);
                prop_assert_eq!(parsed, Ok(Parsed::Complete { header: h, consumed: bytes.len() }));
                prop_assert_eq!(parse(&input, Versions::Any), parsed);
            }
        }

        #[test]
        fn any_split_gives_the_same_result(
            h in header(),
            v2 in any::<bool>(),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6),
        ) {
            let bytes = if v2 { encode_v2(&h, &[(0x04, vec![1, 2, 3])]) } else { encode_v1(&h) };
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len())).collect();
            cuts.sort_unstable();
            // What a reader sees: the bytes so far, after each chunk.
            let mut seen = Vec::new();
            let mut last = 0;
            for cut in cuts.into_iter().chain([bytes.len()]) {
                seen.extend_from_slice(&bytes[last..cut]);
                last = cut;
                let parsed = parse(&seen, Versions::Any);
                if seen.len() < bytes.len() {
                    prop_assert_eq!(parsed, Ok(Parsed::Incomplete), "after {} of {} bytes", seen.len(), bytes.len());
                } else {
                    prop_assert_eq!(parsed, Ok(Parsed::Complete { header: h, consumed: bytes.len() }));
                }
            }
        }
    }
}
