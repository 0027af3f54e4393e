//! The PROXY protocol header a balancer sends first (v1 text, v2 binary): `proxy::parse`
//! with each listener setting.
//!
//! Checks, besides never panicking: "need more" only while a header could still fit its
//! bound (so a peer cannot make the handshake buffer grow); a complete header takes at
//! most the bytes given, parses the same without what follows it, and every shorter
//! prefix of it asks for more; a client address re-encodes (v1 and v2) to the same header.

use ringcast::proto::proxy::{
    encode_v1, encode_v2, parse, Parsed, ProxyError, ProxyHeader, Versions, V1_MAX_LEN,
    V2_MAX_PAYLOAD,
};

fn check(data: &[u8], versions: Versions) {
    match parse(data, versions) {
        Err(e) => assert_eq!(ProxyError::LABELS[e as usize], e.label()),
        Ok(Parsed::Incomplete) => assert!(
            data.len() < (16 + V2_MAX_PAYLOAD).max(V1_MAX_LEN),
            "{} bytes still incomplete",
            data.len()
        ),
        Ok(complete @ Parsed::Complete { header, consumed }) => {
            assert!(consumed > 0 && consumed <= data.len());
            assert_eq!(parse(&data[..consumed], versions), Ok(complete));
            // All prefixes of a short header, the ends of a long one (a v2 TLV area).
            let cuts: Vec<usize> = if consumed <= 128 {
                (0..consumed).collect()
            } else {
                (0..32).chain(consumed - 32..consumed).collect()
            };
            for cut in cuts {
                assert_eq!(
                    parse(&data[..cut], versions),
                    Ok(Parsed::Incomplete),
                    "prefix of {cut} bytes"
                );
            }
            if let ProxyHeader::Proxied {
                source,
                destination,
            } = header
            {
                if source.is_ipv4() == destination.is_ipv4() {
                    let v1 = encode_v1(&header);
                    assert_eq!(
                        parse(&v1, Versions::V1),
                        Ok(Parsed::Complete {
                            header,
                            consumed: v1.len()
                        })
                    );
                }
                let v2 = encode_v2(&header, &[(0x04, b"tlv".to_vec())]);
                assert_eq!(
                    parse(&v2, Versions::V2),
                    Ok(Parsed::Complete {
                        header,
                        consumed: v2.len()
                    })
                );
            }
        }
    }
}

fn main() {
    afl::fuzz!(|data: &[u8]| {
        for versions in [Versions::V1, Versions::V2, Versions::Any] {
            check(data, versions);
        }
    });
}
