//! Advisory file locks (flock) taken with a deadline: a blocking lock could not be given up.
//! The kernel drops a killed process's locks, so none outlives its holder.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Ctx, Error, Result};

/// Lock `path` (created, with its folder, when missing), shared or exclusive, trying until
/// `wait` has passed: `None` when it stayed locked by others.
pub(crate) async fn lock_within(
    ctx: &Ctx,
    path: &Path,
    shared: bool,
    wait: Duration,
) -> Result<Option<File>> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|e| Error::io(ctx.clone(), d, e))?;
    }
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(ctx.clone(), path, e))?;
    let deadline = Instant::now() + wait;
    loop {
        let r = if shared {
            f.try_lock_shared()
        } else {
            f.try_lock()
        };
        match r {
            Ok(()) => return Ok(Some(f)),
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(e)) => return Err(Error::io(ctx.clone(), path, e)),
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shared_locks_coexist_and_exclude_an_exclusive_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/x.lock");
        let ctx = Ctx::new("test");
        let short = Duration::from_millis(60);
        let a = lock_within(&ctx, &p, true, short).await.unwrap();
        let b = lock_within(&ctx, &p, true, short).await.unwrap();
        assert!(a.is_some() && b.is_some());
        assert!(lock_within(&ctx, &p, false, short).await.unwrap().is_none());
        drop((a, b));
        assert!(lock_within(&ctx, &p, false, short).await.unwrap().is_some());
    }
}
