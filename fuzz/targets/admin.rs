//! Requests on the admin port (`/publish`, `/admin/disconnect`, scrapes), pipelined on
//! one kept-alive connection: the admin HTTP parser.
//!
//! Checks, besides never panicking: a whole request is removed from the buffer, at least
//! its head (the read loop always moves on), with a body within the limit; "need more"
//! and errors leave the buffer as it was; errors are the statuses the server documents.

use ringcast::admin::fuzz_parse_request;

const MAX_BODY: usize = 256;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let mut buf = data.to_vec();
        loop {
            let before = buf.len();
            match fuzz_parse_request(&mut buf, MAX_BODY) {
                Ok(Some(body)) => {
                    assert!(body <= MAX_BODY, "{body}-byte body");
                    assert!(
                        before - buf.len() > body,
                        "took {} bytes",
                        before - buf.len()
                    );
                }
                Ok(None) => {
                    assert_eq!(buf.len(), before);
                    break;
                }
                Err(status) => {
                    assert!([400, 411, 413, 431].contains(&status), "{status}");
                    assert_eq!(buf.len(), before);
                    break;
                }
            }
        }
    });
}
