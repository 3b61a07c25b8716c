//! One module per kind of fault.

pub mod agent_frozen;
pub mod disk_full;
pub mod hung;
pub mod libvirtd_restart;
pub mod ports;
pub mod qemu_killed;
pub mod secrets;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The repository's fakes.
pub fn fake(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fakes")
        .join(name)
}

/// Whether `pid` is gone (or a zombie about to be reaped) within `within`.
pub async fn gone_within(pid: i32, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.contains(") Z ") {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
