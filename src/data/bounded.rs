//! Reading what a hostile file declares without trusting it: element counts with checked
//! arithmetic, declared sizes checked against the bytes that can exist, and reads that stop at
//! the declared size. Every reader of data and weight files goes through these, so a header
//! cannot make brittle allocate more than a small multiple of the input (or of what deflate can
//! produce from it) nor wrap a product to a small number.

use std::io::Read;

use anyhow::{bail, Result};

/// Deflate's largest expansion: 258 output bytes per 2-bit code, about 1032:1. A compressed
/// entry that declares more than this per compressed byte is corrupt or hostile.
pub const DEFLATE_MAX_RATIO: u64 = 1032;

/// The number of elements of `dims`, or an error when the product (or any partial product,
/// zero dimensions skipped, so that `[0, 2^63, 2^63]` is rejected too) exceeds `i64::MAX`.
pub fn numel(dims: &[u64], what: &str) -> Result<u64> {
    let mut nonzero: u64 = 1;
    for &d in dims {
        nonzero = match nonzero.checked_mul(d.max(1)) {
            Some(p) if p <= i64::MAX as u64 => p,
            _ => bail!("{what}: shape {dims:?} has more elements than can be addressed"),
        };
    }
    Ok(if dims.contains(&0) { 0 } else { nonzero })
}

/// `numel * elem_size` bytes, checked.
pub fn byte_len(dims: &[u64], elem_size: usize, what: &str) -> Result<u64> {
    match numel(dims, what)?.checked_mul(elem_size as u64) {
        Some(b) if b <= i64::MAX as u64 => Ok(b),
        _ => bail!("{what}: shape {dims:?} of {elem_size}-byte elements overflows the byte count"),
    }
}

/// The most bytes a compressed stream of `compressed` bytes can inflate to.
pub fn inflate_cap(compressed: u64) -> u64 {
    compressed
        .saturating_mul(DEFLATE_MAX_RATIO)
        .saturating_add(1024)
}

/// Reads exactly `len` bytes (the declared size), failing cleanly when the stream is shorter,
/// when it continues past `len` (checked by one more read), or when the buffer cannot be
/// allocated (an error instead of an abort).
pub fn read_exact_declared<R: Read>(reader: &mut R, len: u64, what: &str) -> Result<Vec<u8>> {
    let Ok(n) = usize::try_from(len) else {
        bail!("{what}: declared size of {len} bytes does not fit in memory");
    };
    let mut buf = Vec::new();
    if buf.try_reserve_exact(n).is_err() {
        bail!("{what}: cannot allocate the declared {len} bytes");
    }
    let got = reader
        .by_ref()
        .take(len)
        .read_to_end(&mut buf)
        .map_err(|e| anyhow::anyhow!("{what}: read error: {e}"))?;
    if (got as u64) < len {
        bail!("{what}: declares {len} bytes of data but only {got} follow (truncated)");
    }
    ensure_at_end(reader, what)?;
    Ok(buf)
}

/// Fails when `reader` still has data: the input is longer than its header declares.
pub fn ensure_at_end<R: Read>(reader: &mut R, what: &str) -> Result<()> {
    let mut one = [0u8; 1];
    loop {
        match reader.read(&mut one) {
            Ok(0) => return Ok(()),
            Ok(_) => bail!("{what}: more data than the header declares (trailing bytes)"),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => bail!("{what}: read error: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numel_rejects_wrapping_products() {
        assert_eq!(numel(&[2, 3, 4], "x").unwrap(), 24);
        assert_eq!(numel(&[], "x").unwrap(), 1);
        assert_eq!(numel(&[0, 5], "x").unwrap(), 0);
        // 2^32 * 2^32 wraps to 0 in u64.
        let e = numel(&[1 << 32, 1 << 32, 1], "a.npy").unwrap_err();
        assert!(e.to_string().contains("a.npy"), "{e}");
        assert!(numel(&[0, 1 << 40, 1 << 40], "x").is_err());
        assert!(byte_len(&[1 << 61], 8, "x").is_err());
        assert_eq!(byte_len(&[10, 3], 4, "x").unwrap(), 120);
    }

    #[test]
    fn declared_reads_are_exact() {
        let data = [1u8, 2, 3, 4];
        assert_eq!(read_exact_declared(&mut &data[..], 4, "x").unwrap(), data);
        let short = read_exact_declared(&mut &data[..], 5, "x").unwrap_err();
        assert!(short.to_string().contains("truncated"), "{short}");
        let long = read_exact_declared(&mut &data[..], 3, "x").unwrap_err();
        assert!(long.to_string().contains("trailing"), "{long}");
        let huge = read_exact_declared(&mut &data[..], u64::MAX / 2, "x").unwrap_err();
        assert!(huge.to_string().contains("allocate") || huge.to_string().contains("fit"));
    }
}
