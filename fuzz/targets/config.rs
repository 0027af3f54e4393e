//! The configuration file: TOML text through `parse_layer` (what `--config`, SIGHUP
//! reloads and `ringcast config check` read) and `resolve` (merge and validation).
//!
//! Checks, besides never panicking: the key-naming parser and plain TOML deserialization
//! agree on what is a valid file. File paths in the text (TLS, JWT keys) are pointed at a
//! path that does not exist, so a run reads no file of the machine (a named FIFO or
//! `/dev/zero` would hang it).

use ringcast::config::{parse_layer, resolve, ConfigLayer};
use std::path::PathBuf;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(text) = std::str::from_utf8(data) else {
            return;
        };
        let layer = parse_layer(text);
        let plain = toml::from_str::<ConfigLayer>(text);
        assert_eq!(layer.is_ok(), plain.is_ok(), "{layer:?} vs {plain:?}");
        let _ = text.parse::<toml::Table>();
        let Ok(mut file) = layer else {
            return;
        };
        let nowhere = || PathBuf::from("/nonexistent/ringcast-fuzz");
        for path in [
            &mut file.tls_cert_file,
            &mut file.tls_key_file,
            &mut file.jwt_public_key_file,
        ] {
            if path.is_some() {
                *path = Some(nowhere());
            }
        }
        let _ = resolve(ConfigLayer::default(), file);
    });
}
