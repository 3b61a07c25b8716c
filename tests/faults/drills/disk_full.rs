//! Disk full: the state dir on a small tmpfs filled to the last byte. Allocations fail with a
//! clear error naming the file, the lease store stays valid JSON holding what it held (it is
//! written to a temp file and renamed), and the next call after space is freed works.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use anyvm::ports::PortAllocator;
use anyvm::{ErrorKind, Protocol};

use crate::Tally;

/// Unmounts when dropped.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn leases_json_ok(dir: &Path, want: usize) -> Result<(), String> {
    let p = dir.join("ports.json");
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("ports.json is not valid JSON: {e}"))?;
    let n = v["leases"]
        .as_array()
        .map(|a| a.len())
        .unwrap_or(usize::MAX);
    if n == want {
        Ok(())
    } else {
        Err(format!("ports.json holds {n} leases, expected {want}"))
    }
}

/// The drill.
pub async fn state_dir() -> Tally {
    let mut t = Tally::default();
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path().join("state");
    std::fs::create_dir_all(&at).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "anyvm-drill"])
        .arg(&at)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        t.trial(
            "mount a 256 KiB tmpfs",
            Err("mount failed (the drill needs root)".into()),
        );
        return t;
    }
    let _m = Mount(at.clone());
    let ports = PortAllocator::new(&at, 41500..=41999);
    for i in 0..5 {
        ports
            .allocate(
                "drill",
                &format!("vm{i}"),
                "forward:ssh",
                "127.0.0.1",
                Protocol::Tcp,
            )
            .unwrap();
    }
    // Fill the file system.
    let fill = at.join("fill.bin");
    let mut f = std::fs::File::create(&fill).unwrap();
    let block = vec![0u8; 4096];
    while f.write_all(&block).is_ok() {}
    let _ = f.flush();
    drop(f);
    let mut errors = Vec::new();
    for i in 5..10 {
        match ports.allocate(
            "drill",
            &format!("vm{i}"),
            "forward:ssh",
            "127.0.0.1",
            Protocol::Tcp,
        ) {
            Ok(p) => errors.push(format!("allocated {p} on a full disk")),
            Err(e)
                if e.kind() == ErrorKind::Io
                    && e.to_string().contains(&at.display().to_string()) => {}
            Err(e) => errors.push(format!("unclear error: {e}")),
        }
    }
    t.trial(
        "allocations on a full disk fail with an I/O error naming the file",
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        },
    );
    let kept = leases_json_ok(&at, 5);
    if kept.is_err() {
        t.lost += 1;
    }
    t.trial("the lease store is valid JSON with its 5 leases", kept);
    let stray: Vec<_> = std::fs::read_dir(&at)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "ports.json" && n != "ports.lock" && n != "fill.bin")
        .collect();
    t.leaked += stray.len() as u32;
    t.trial(
        "no half-written temp files",
        if stray.is_empty() {
            Ok(())
        } else {
            Err(format!("left: {stray:?}"))
        },
    );
    std::fs::remove_file(&fill).unwrap();
    let r = ports
        .allocate(
            "drill",
            "vm-after",
            "forward:ssh",
            "127.0.0.1",
            Protocol::Tcp,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
        .and_then(|_| leases_json_ok(&at, 6));
    t.trial("space freed: the next allocation works", r);
    t
}
