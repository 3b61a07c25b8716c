//! Warm states: a ready VM's memory and disks saved once, and clones brought up from them
//! instead of booting.
//!
//! libvirt's own save/restore cannot do it: a restored domain must keep the saved one's UUID,
//! so two clones of one state could not run side by side. Instead QEMU's migration stream is
//! written to a file (`migrate` to `exec:cat`) and each clone's QEMU starts waiting for it
//! (`-incoming defer`, then `migrate-incoming`): a clone is its own domain (name, UUID, disks,
//! forwards, VM generation ID) with the saved machine's memory and devices. Disks are flattened
//! next to the memory when saved (block devices are flushed and inactive once migration
//! completes), and every clone layers an overlay on them.
//!
//! Layout: `<images_dir>/warm/<template>/<key>/{memory.state,disk-N.qcow2,info.json}`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use virt::domain::Domain;
use virt::sys;

use super::orphans::ImagesLock;
use super::*;
use crate::backend::WarmInfo;
use crate::types::{DiskFormat, VmSpec};
use crate::util::shell::shell_quote;

fn dir_of(be: &LibvirtBackend, template: &VmName, key: &str) -> PathBuf {
    be.opts
        .images_dir
        .join("warm")
        .join(template.as_str())
        .join(key)
}

/// A state is complete once its info.json exists (written last).
pub(super) fn find(be: &LibvirtBackend, template: &VmName, key: &str) -> Option<WarmInfo> {
    let dir = dir_of(be, template, key);
    let text = std::fs::read_to_string(dir.join("info.json")).ok()?;
    serde_json::from_str(&text).ok()
}

/// Why warm clones of `spec` cannot work here, if they cannot.
pub(super) fn unsupported_reason(be: &LibvirtBackend, spec: &VmSpec) -> Option<String> {
    if !be.is_local() {
        return Some("warm states are kept on a local libvirt host only".into());
    }
    if !spec.shares.is_empty() {
        return Some("QEMU cannot migrate a VM with virtiofs shares (vhost-user-fs)".into());
    }
    if !matches!(
        spec.boot,
        crate::types::Boot::Kernel { .. } | crate::types::Boot::Disk
    ) {
        return Some("only VMs booted from a kernel or a disk".into());
    }
    None
}

/// One QMP command through libvirt.
async fn qmp(
    be: &LibvirtBackend,
    ctx: &Ctx,
    vm: &VmName,
    cmd: serde_json::Value,
) -> Result<serde_json::Value> {
    let text = cmd.to_string();
    let reply = be
        .dom(ctx, vm, move |d, c| {
            d.qemu_monitor_command(&text, 0).map_err(|e| map_err(c, e))
        })
        .await?;
    let v: serde_json::Value = serde_json::from_str(&reply).map_err(|e| {
        Error::backend(
            ctx.clone(),
            "qemu",
            format!("bad QMP reply ({e}): {reply:.200}"),
        )
    })?;
    if let Some(err) = v.get("error") {
        return Err(Error::backend(
            ctx.clone(),
            "qemu",
            err.get("desc")
                .and_then(|d| d.as_str())
                .unwrap_or("QMP error")
                .to_string(),
        ));
    }
    Ok(v.get("return").cloned().unwrap_or_default())
}

/// Poll `query-migrate` until the stream is complete.
async fn migration_done(
    be: &LibvirtBackend,
    ctx: &Ctx,
    vm: &VmName,
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    let mut delay = Duration::from_millis(5);
    loop {
        let r = qmp(be, ctx, vm, serde_json::json!({"execute": "query-migrate"})).await?;
        match r.get("status").and_then(|s| s.as_str()).unwrap_or("") {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(Error::backend(
                    ctx.clone(),
                    "qemu",
                    format!(
                        "migration stream {}: {}",
                        r["status"].as_str().unwrap_or("failed"),
                        r.get("error-desc")
                            .and_then(|d| d.as_str())
                            .unwrap_or("no reason given")
                    ),
                ))
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                ctx: ctx.clone(),
                after: Some(within),
                what: "QEMU to write or read the memory state".into(),
            });
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}

/// Save running `vm` as the warm state `key` of `template`; `vm` is left paused, its memory
/// and devices written out (destroy it afterwards).
pub(super) async fn save(
    be: &LibvirtBackend,
    vm: &VmName,
    template: &VmName,
    key: &str,
    spec: &VmSpec,
) -> Result<WarmInfo> {
    let ctx = Ctx::vm(format!("save the warm state of {template}"), vm);
    let dir = dir_of(be, template, key);
    // What a killed preparation left (the caller holds the preparation lock).
    if dir.exists() && !dir.join("info.json").exists() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(ctx.clone(), &dir, e))?;
    let started = Instant::now();
    tracing::debug!(vm = %vm, phase = "warm-save", "warm");
    be.dom(&ctx, vm, |d, c| {
        d.suspend().map(|_| ()).map_err(|e| map_err(c, e))
    })
    .await?;
    let mem_tmp = dir.join("memory.state.tmp");
    // QEMU hands `exec:` to /bin/sh: the path is quoted.
    let uri = format!("exec:cat > {}", shell_quote(&mem_tmp.display().to_string()));
    qmp(
        be,
        &ctx,
        vm,
        serde_json::json!({"execute": "migrate", "arguments": {"uri": uri}}),
    )
    .await?;
    migration_done(be, &ctx, vm, be.opts.qemu_img_timeout).await?;
    let mem = dir.join("memory.state");
    std::fs::rename(&mem_tmp, &mem).map_err(|e| Error::io(ctx.clone(), &mem, e))?;
    // The boot the saved memory went through: each clone's console log starts with it.
    let _ = std::fs::copy(be.console_path(vm), dir.join("console.log"));
    let mut disks = Vec::new();
    for (i, d) in spec.disks.iter().enumerate() {
        let out = dir.join(format!("disk-{i}.qcow2"));
        let tmp = out.with_extension("tmp");
        let args = vec![
            "convert".to_string(),
            "-U".into(),
            "-f".into(),
            d.format.qemu_name().into(),
            "-O".into(),
            "qcow2".into(),
            d.path.display().to_string(),
            tmp.display().to_string(),
        ];
        if let Err(e) = be.qemu_img(&ctx, args).await {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &out).map_err(|e| Error::io(ctx.clone(), &out, e))?;
        disks.push(out);
    }
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let info = WarmInfo {
        template: template.to_string(),
        key: key.to_string(),
        dir: dir.clone(),
        memory_bytes: size(&mem),
        disk_bytes: disks.iter().map(|p| size(p)).sum(),
        saved_in: Some(started.elapsed()),
    };
    let json = serde_json::to_string_pretty(&info).expect("info serializes");
    let info_path = dir.join("info.json");
    std::fs::write(&info_path, json).map_err(|e| Error::io(ctx, &info_path, e))?;
    Ok(info)
}

/// Define `clone` on overlays of the warm state `key` of `template` and bring it up from the
/// saved memory: running when this returns. On failure nothing of the clone is left.
pub(super) async fn start(
    be: &LibvirtBackend,
    template: &VmName,
    key: &str,
    clone: &VmSpec,
) -> Result<()> {
    let name = &clone.name;
    let ctx = Ctx::vm(format!("warm start from {template}"), name);
    let dir = dir_of(be, template, key);
    let mem = dir.join("memory.state");
    if !mem.exists() {
        return Err(Error::NotFound {
            ctx,
            what: format!("warm state {}", dir.display()),
        });
    }
    let _lock = ImagesLock::shared(&ctx, &be.opts.images_dir, true, be.opts.call_timeout).await?;
    let mut spec = clone.clone();
    let mut made: Vec<PathBuf> = Vec::new();
    let r: Result<()> = async {
        for (i, d) in spec.disks.iter_mut().enumerate() {
            let base = dir.join(format!("disk-{i}.qcow2"));
            let overlay = be.opts.images_dir.join(format!("{name}-{i}.qcow2"));
            if overlay.exists() {
                return Err(Error::InvalidState {
                    ctx: ctx.clone(),
                    state: format!("{} exists", overlay.display()),
                    hint: Some(
                        "remove the stale clone disk (anyvm gc) or pick another name".into(),
                    ),
                });
            }
            made.push(overlay.clone());
            be.create_overlay(&ctx, &base, &overlay).await?;
            d.path = overlay;
            d.format = DiskFormat::Qcow2;
            d.owned = true;
        }
        let log = be.console_path(name);
        if let Some(d) = log.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let _ = std::fs::copy(dir.join("console.log"), &log);
        lifecycle::define_incoming(be, &spec, true).await
    }
    .await;
    if let Err(e) = r {
        for p in made {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    let restored: Result<()> = async {
        tracing::debug!(vm = %name, phase = "restore", "warm");
        be.dom(&ctx, name, |d, c| {
            d.create_with_flags(sys::VIR_DOMAIN_START_PAUSED)
                .map(|_| ())
                .map_err(|e| map_err(c, e))
        })
        .await?;
        let uri = format!("exec:cat {}", shell_quote(&mem.display().to_string()));
        qmp(
            be,
            &ctx,
            name,
            serde_json::json!({"execute": "migrate-incoming", "arguments": {"uri": uri}}),
        )
        .await?;
        migration_done(be, &ctx, name, be.opts.qemu_img_timeout).await?;
        // Its next start is a boot: the persistent definition waits for no stream.
        lifecycle::define_incoming(be, &spec, false).await?;
        tracing::debug!(vm = %name, phase = "resume", "warm");
        be.dom(&ctx, name, |d, c| {
            d.resume().map(|_| ()).map_err(|e| map_err(c, e))
        })
        .await
    }
    .await;
    if restored.is_ok() {
        refresh_identity(be, name).await;
    }
    if let Err(e) = restored {
        let _ = be
            .dom(&ctx, name, |d: &Domain, _| {
                let _ = d.destroy();
                Ok(())
            })
            .await;
        let _ = lifecycle::undefine(be, name).await;
        return Err(e);
    }
    Ok(())
}

/// A clone restored from shared memory must not share its template's randomness or clock: host
/// entropy goes into the guest's pool (old kernels without vmgenid rely on it; newer ones
/// reseed on the new generation ID too) and the clock is set to the host's. Best effort: a
/// guest without an agent keeps what it has, and says so in the log.
async fn refresh_identity(be: &LibvirtBackend, vm: &VmName) {
    let ctx = Ctx::vm("refresh a warm clone's identity", vm);
    let t = Duration::from_secs(5);
    // libvirt connects to the new QEMU's agent channel a moment after the resume.
    let until = Instant::now() + Duration::from_secs(10);
    while be.agent(&ctx, vm, agent::ping(), t).await.is_err() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut seed = [0u8; 64];
    let entropy = async {
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(|e| Error::io(ctx.clone(), Path::new("/dev/urandom"), e))?;
        let h = be
            .agent(&ctx, vm, agent::file_open("/dev/urandom", "w"), t)
            .await?;
        let h = h.as_i64().unwrap_or(-1);
        let w = be.agent(&ctx, vm, agent::file_write(h, &seed), t).await;
        let _ = be.agent(&ctx, vm, agent::file_close(h), t).await;
        w.map(|_| ())
    };
    if let Err(e) = entropy.await {
        tracing::warn!(vm = %vm, error = %e, "could not feed the warm clone's entropy pool");
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i64;
    let set =
        serde_json::json!({"execute": "guest-set-time", "arguments": {"time": now}}).to_string();
    if let Err(e) = be.agent(&ctx, vm, set, t).await {
        // qemu-ga sets the time, then fails if the guest has no /sbin/hwclock to sync the RTC.
        if !e.to_string().contains("hwclock") {
            tracing::warn!(vm = %vm, error = %e, "could not set the warm clone's clock");
        }
    }
}

/// Remove the warm states of `template` other than `keep` that no domain's disk backs onto.
pub(super) async fn discard(be: &LibvirtBackend, template: &VmName, keep: Option<&str>) {
    let root = be.opts.images_dir.join("warm").join(template.as_str());
    let Ok(entries) = std::fs::read_dir(&root) else {
        return;
    };
    let overlays: Vec<PathBuf> = std::fs::read_dir(&be.opts.images_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "qcow2"))
        .collect();
    let backing: std::collections::BTreeSet<PathBuf> = overlays
        .iter()
        .filter_map(|p| super::orphans::qcow2_backing(p))
        .collect();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if Some(name.as_str()) == keep {
            continue;
        }
        let used = backing.iter().any(|b| b.starts_with(e.path()));
        if !used {
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!(path = %e.path().display(), error = %err, "could not remove a warm state");
            }
        }
    }
    let _ = std::fs::remove_dir(&root); // only when empty
}
