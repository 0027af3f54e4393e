//! Position tokens (`Last-Event-ID`, `?since=`): `Position::parse`.
//!
//! Checks, besides never panicking: an accepted token names valid channels, each once,
//! and its rendering parses back to the same position (what a resumed stream sends on).

use ringcast::proto::channel::is_valid_channel;
use ringcast::proto::position::Position;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(token) = std::str::from_utf8(data) else {
            return;
        };
        match Position::parse(token) {
            Err(reason) => assert!(!reason.is_empty()),
            Ok(position) => {
                let entries = position.entries();
                for (i, (channel, since)) in entries.iter().enumerate() {
                    assert!(is_valid_channel(channel.as_bytes()), "{channel:?}");
                    assert!(
                        entries[..i].iter().all(|(c, _)| c != channel),
                        "{channel:?} twice"
                    );
                    assert_eq!(position.get(channel), Some(*since));
                }
                assert_eq!(Position::parse(&position.encode()), Ok(position));
            }
        }
    });
}
