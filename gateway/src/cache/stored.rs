//! How cached values are keyed and read back from Redis.

/// A cache key: SHA-256 of what decides the answer.
pub(super) type Key = [u8; 32];

/// LZ4 after its 4-byte little-endian size, inflated only when that size
/// is at most `max`: the bytes come from Redis, which another process (or
/// whoever can write to it) may have filled, and a trusted prefix is an
/// allocation of up to 4 GiB.
pub(super) fn decompress(bytes: &[u8], max: usize) -> Option<Vec<u8>> {
    let (size, body) = bytes.split_first_chunk::<4>()?;
    let size = usize::try_from(u32::from_le_bytes(*size)).ok()?;
    if size > max {
        return None;
    }
    lz4_flex::decompress(body, size).ok()
}
