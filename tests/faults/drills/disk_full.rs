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

/// Fill `at` (a tmpfs) to the last byte, then give `free` bytes back. Returns the fill file.
fn fill_leaving(at: &Path, free: u64) -> std::path::PathBuf {
    let fill = at.join("fill.bin");
    let mut f = std::fs::File::create(&fill).unwrap();
    let block = vec![0u8; 4096];
    while f.write_all(&block).is_ok() {}
    let _ = f.flush();
    let len = f.metadata().unwrap().len();
    f.set_len(len.saturating_sub(free)).unwrap();
    fill
}

/// The clone directory (libvirt's images dir) on a 2 MiB tmpfs, filled to leave nothing, room
/// for the frozen base but not the overlay, and room for both: each clone is whole or fails
/// with an error naming the VM and the cause, leaving no file, domain or lease; once space
/// is freed the next clone works and its destroy leaves the directory empty.
pub async fn clone_dir() -> Tally {
    use anyvm::{Client, ClientOptions, VmName};
    let mut t = Tally::default();
    let dir = tempfile::Builder::new()
        .prefix("anyvm-faults-full-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let state = dir.path().join("state");
    let images = state.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "anyvm-drill"])
        .arg(&images)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        t.trial(
            "mount a 2 MiB tmpfs",
            Err("mount failed (the drill needs root)".into()),
        );
        return t;
    }
    let _m = Mount(images.clone());
    let client = Client::connect_with(
        "libvirt:qemu:///system",
        ClientOptions::default()
            .state_dir(&state)
            .port_range(49500..=49599),
    )
    .await
    .expect("libvirtd");
    let env = crate::common::TestEnv {
        dir: tempfile::tempdir_in("/var/tmp").unwrap(),
        client: client.clone(),
    };
    let base_name = "fk-full-base";
    env.fresh(base_name).await;
    let base = match client.define(env.spec(base_name, "")).await {
        Ok(v) => v,
        Err(e) => {
            t.trial("define the base", Err(e.to_string()));
            return t;
        }
    };
    let files = || -> Vec<String> {
        std::fs::read_dir(&images)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != ".anyvm.lock" && n != "fill.bin")
            .collect()
    };
    let leases = |vm: &str| {
        client
            .ports()
            .leases()
            .unwrap_or_default()
            .iter()
            .filter(|l| l.vm == vm)
            .count()
    };
    for (i, (what, free)) in [
        ("no space", 0u64),
        ("room for the frozen base only", 256 * 1024),
        ("room for both", 640 * 1024),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("fk-full-c{i}");
        env.fresh(&name).await;
        let fill = fill_leaving(&images, free);
        let r = base.clone_linked(&VmName::new(&name).unwrap(), None).await;
        let outcome: Result<String, String> = match r {
            Ok(vm) => {
                let whole = files().len() == 2 && leases(&name) == 1;
                let _ = vm.destroy().await;
                if whole {
                    Ok("whole".into())
                } else {
                    Err(format!("made, but not whole: files {:?}", files()))
                }
            }
            Err(e) => {
                let msg = e.to_string();
                let mut bad = Vec::new();
                if !(msg.contains(&name) && msg.to_lowercase().contains("no space left")) {
                    bad.push(format!("unclear error: {msg}"));
                }
                if !files().is_empty() {
                    bad.push(format!("files left: {:?}", files()));
                    t.leaked += 1;
                }
                if client.vm(&name).await.is_ok() {
                    bad.push("the clone is defined".into());
                    t.leaked += 1;
                }
                if leases(&name) != 0 {
                    bad.push("its port lease is held".into());
                    t.leaked += 1;
                }
                if bad.is_empty() {
                    // The cause is at the end of the message.
                    let n = msg.chars().count();
                    Ok(format!(
                        "refused: …{}",
                        msg.chars().skip(n.saturating_sub(90)).collect::<String>()
                    ))
                } else {
                    Err(bad.join("; "))
                }
            }
        };
        std::fs::remove_file(&fill).unwrap();
        let after: Result<(), String> = async {
            let vm = base
                .clone_linked(&VmName::new(&name).unwrap(), None)
                .await
                .map_err(|e| format!("with space again the clone failed: {e}"))?;
            vm.destroy().await.map_err(|e| e.to_string())?;
            if !files().is_empty() {
                t.leaked += 1;
                return Err(format!("destroyed, files left: {:?}", files()));
            }
            Ok(())
        }
        .await;
        let label = match &outcome {
            Ok(o) => format!("clone dir full ({what}): {o}; then space freed: clone and destroy"),
            Err(_) => format!("clone dir full ({what})"),
        };
        t.trial(&label, outcome.map(|_| ()).and(after));
    }
    let _ = base.destroy().await;
    t
}
