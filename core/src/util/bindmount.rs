//! Read-only bind mounts: how a read-only share is enforced by the host kernel rather than by
//! the guest's mount options (a guest root can remount its side read-write; it cannot change ours).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::{Ctx, Error, Result};

/// `/proc/self/mounts` escapes space, tab, newline and backslash as octal.
fn mounts_escape(p: &Path) -> String {
    let mut s = String::new();
    for c in p.to_string_lossy().chars() {
        match c {
            ' ' => s.push_str("\\040"),
            '\t' => s.push_str("\\011"),
            '\n' => s.push_str("\\012"),
            '\\' => s.push_str("\\134"),
            c => s.push(c),
        }
    }
    s
}

/// Whether something is mounted at `target`, and read-only if so.
pub fn mounted(target: &Path) -> Option<bool> {
    let want = mounts_escape(target);
    let text = std::fs::read_to_string("/proc/self/mounts").ok()?;
    text.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        let (_, at, _, opts) = (f.next()?, f.next()?, f.next()?, f.next()?);
        (at == want).then(|| opts.split(',').any(|o| o == "ro"))
    })
}

fn cstr(ctx: &Ctx, p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        Error::invalid_arg(
            format!("{ctx}: path {}", p.display()),
            "contains a NUL byte",
        )
    })
}

/// Make `target` a read-only view of `source` (idempotent).
pub fn ensure_readonly(ctx: &Ctx, source: &Path, target: &Path) -> Result<()> {
    if mounted(target) == Some(true) {
        return Ok(());
    }
    std::fs::create_dir_all(target).map_err(|e| Error::io(ctx.clone(), target, e))?;
    let (src, dst) = (cstr(ctx, source)?, cstr(ctx, target)?);
    let fail = |what: &str| {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPERM) {
            Error::PolicyDenied {
                ctx: ctx.clone(),
                reason: format!(
                    "a read-only share is enforced with a read-only bind mount, which needs root (CAP_SYS_ADMIN) on the host: {what}: {e}"
                ),
            }
        } else {
            Error::io(
                ctx.clone(),
                target,
                std::io::Error::new(e.kind(), format!("{what}: {e}")),
            )
        }
    };
    if mounted(target).is_none() {
        // SAFETY: valid NUL-terminated paths; null fstype/data are allowed for MS_BIND.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(fail("bind mount"));
        }
    }
    // SAFETY: as above; a bind remount changes only this mount's flags.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            dst.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    if r != 0 {
        let e = fail("read-only remount");
        // SAFETY: undo our own bind mount.
        unsafe { libc::umount2(dst.as_ptr(), libc::MNT_DETACH) };
        return Err(e);
    }
    Ok(())
}

/// Undo [`ensure_readonly`] and remove the mount point (no error if it is not mounted).
pub fn release(target: &Path) {
    if mounted(target).is_some() {
        if let Ok(c) = CString::new(target.as_os_str().as_bytes()) {
            // SAFETY: valid path; lazy unmount so a running virtiofsd does not block it.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    let _ = std::fs::remove_dir(target);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_like_the_kernel() {
        assert_eq!(mounts_escape(Path::new("/a b\\c")), "/a\\040b\\134c");
        assert_eq!(mounted(Path::new("/nonexistent/anyvm")), None);
    }
}
