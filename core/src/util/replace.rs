//! Files replaced whole: written beside the target, then renamed over it, so a reader sees the
//! old file or the new one, never half of one.

use std::path::Path;

/// Write `data` to `tmp`, then rename it to `path`. On failure (a full disk) the temp file is
/// removed, not left behind.
pub(crate) fn replace_file(path: &Path, tmp: &Path, data: impl AsRef<[u8]>) -> std::io::Result<()> {
    let r = std::fs::write(tmp, data).and_then(|()| std::fs::rename(tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_whole_and_leaves_no_temp_file_on_failure() {
        let d = tempfile::tempdir().unwrap();
        let (p, t) = (d.path().join("f"), d.path().join("f.tmp"));
        std::fs::write(&p, "old").unwrap();
        super::replace_file(&p, &t, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "new");
        assert!(!t.exists());
        // The rename fails (the target is a non-empty directory): the temp file goes.
        let dir = d.path().join("dir");
        std::fs::create_dir_all(dir.join("x")).unwrap();
        assert!(super::replace_file(&dir, &t, "data").is_err());
        assert!(!t.exists());
    }
}
