//! Where anyvm keeps its state on this host. A leaf module: backends, the client and the
//! command line all start from here.

use std::path::PathBuf;

/// `$ANYVM_STATE_DIR`, else /var/lib/anyvm for root, else `$XDG_STATE_HOME/anyvm` or
/// `~/.local/state/anyvm`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ANYVM_STATE_DIR").filter(|d| !d.is_empty()) {
        return d.into();
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return "/var/lib/anyvm".into();
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("anyvm");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/tmp".into());
    home.join(".local/state/anyvm")
}
