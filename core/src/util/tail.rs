//! The end of a file, for console logs that grow without bound.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The last `limit` bytes of `path`; empty when it does not exist.
pub fn read_tail(path: &Path, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(limit as u64)))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(buf)
}
