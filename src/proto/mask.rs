//! The RFC 6455 client-to-server XOR mask, applied in place.

/// XORs `buf` with the 4-byte `mask`, starting at mask position `phase` (0..4).
///
/// Works eight bytes at a time: command frames are small, but a 64 KiB text message from
/// a misbehaving client should not cost a byte-at-a-time loop.
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], phase: usize) {
    let mut rotated = [0u8; 4];
    for (i, b) in rotated.iter_mut().enumerate() {
        *b = mask[(phase + i) % 4];
    }
    let word = u64::from_ne_bytes([
        rotated[0], rotated[1], rotated[2], rotated[3], rotated[0], rotated[1], rotated[2],
        rotated[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ word).to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= rotated[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(buf: &mut [u8], mask: [u8; 4], phase: usize) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= mask[(phase + i) % 4];
        }
    }

    proptest! {
        #[test]
        fn matches_bytewise_mask(data in proptest::collection::vec(any::<u8>(), 0..200),
                                 mask in any::<[u8; 4]>(), phase in 0usize..4) {
            let mut fast = data.clone();
            let mut slow = data.clone();
            apply_mask(&mut fast, mask, phase);
            naive(&mut slow, mask, phase);
            prop_assert_eq!(&fast, &slow);
            apply_mask(&mut fast, mask, phase);
            prop_assert_eq!(fast, data);
        }
    }
}
