//! Lifecycle: listing, defining and removing, power state, console.

use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::{HostPort, VmInfo, VmSpec, VmState};
use std::collections::BTreeSet;
use std::time::Duration;
use virt::sys;

use super::orphans::{self, ImagesLock};
use super::*;
use crate::backend::{HostSweep, Leftover, LeftoverKind};

pub(super) async fn list(be: &LibvirtBackend) -> Result<Vec<VmInfo>> {
    let ctx = Ctx::new("list");
    be.call(&ctx, be.opts.call_timeout, {
        let c = ctx.clone();
        move |conn| {
            let doms = conn.list_all_domains(0).map_err(|e| map_err(&c, e))?;
            let mut out = Vec::new();
            for d in doms {
                let name = d.name().map_err(|e| map_err(&c, e))?;
                let state = map_state(&d, &c).unwrap_or(VmState::Unknown);
                out.push(VmInfo {
                    name,
                    state,
                    managed: Some(read_spec(&d).is_some()),
                });
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        }
    })
    .await
}

pub(super) async fn exists(be: &LibvirtBackend, vm: &VmName) -> Result<bool> {
    match be.dom(&Ctx::vm("lookup", vm), vm, |_, _| Ok(())).await {
        Ok(()) => Ok(true),
        Err(Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

pub(super) async fn define(be: &LibvirtBackend, spec: &VmSpec) -> Result<()> {
    let ctx = Ctx::vm("define", &spec.name);
    spec.validate()?;
    if spec.forwards.iter().any(|f| f.host_port == HostPort::Auto) {
        return Err(Error::invalid_arg(
            "forwards",
            "host ports must be resolved before define (use Client::define)",
        ));
    }
    if let crate::types::Boot::Appliance { path } | crate::types::Boot::Existing { path } =
        &spec.boot
    {
        return Err(Error::InvalidState {
            ctx,
            state: format!("appliance {}", path.display()),
            hint: Some("libvirt does not import OVA/OVF appliances; convert the disk (qemu-img convert) and boot from it".into()),
        });
    }
    be.check_host_paths(&ctx, spec).await?;
    be.host.create_dir_all(&ctx, &be.opts.console_dir).await?;
    define_incoming(be, spec, false).await
}

/// Define (or, for a running warm clone, redefine under its UUID) with QEMU waiting for an
/// incoming memory stream at start, or not.
pub(super) async fn define_incoming(
    be: &LibvirtBackend,
    spec: &VmSpec,
    incoming: bool,
) -> Result<()> {
    let ctx = Ctx::vm("define", &spec.name);
    let uuid = be
        .dom(&ctx, &spec.name, |d, c| {
            d.uuid_string().map_err(|e| map_err(c, e))
        })
        .await
        .ok();
    let log = be.console_path(&spec.name);
    let ro = be.ro_mounts(&spec.name);
    let mut host = be.host_side(&log, &ro);
    host.incoming = incoming;
    let xml = domain_xml::domain_xml(spec, uuid.as_deref(), &host);
    be.call(&ctx, be.opts.call_timeout, {
        let c = ctx.clone();
        move |conn| {
            conn.define_domain_xml(&xml)
                .map(|_| ())
                .map_err(|e| map_err(&c, e))
        }
    })
    .await
}

pub(super) async fn undefine(be: &LibvirtBackend, vm: &VmName) -> Result<()> {
    let ctx = Ctx::vm("undefine", vm);
    let spec = be.spec(vm).await?;
    // Between the undefine and the last removal its files are named by no domain.
    let _lock = ImagesLock::shared(
        &ctx,
        &be.opts.images_dir,
        be.is_local(),
        be.opts.call_timeout,
    )
    .await?;
    be.dom(&ctx, vm, |d, c| {
        let flags = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_NVRAM;
        d.undefine_flags(flags).map_err(|e| map_err(c, e))
    })
    .await?;
    if let Some(spec) = spec {
        let mut backing = Vec::new();
        for d in spec.disks.iter().filter(|d| d.owned) {
            if be.is_local() {
                backing.extend(orphans::qcow2_backing(&d.path));
            }
            if let Err(e) = be.host.remove_file(&ctx, &d.path).await {
                tracing::warn!(vm = %vm, path = %d.path.display(), error = %e, "could not remove clone disk");
            }
        }
        remove_unused_stopped_bases(be, &ctx, &backing).await;
        be.release_shares(vm, spec.shares.into_iter().map(|s| s.name));
    }
    let _ = be.host.remove_file(&ctx, &be.console_path(vm)).await;
    // Its frozen bases serve only clones of it; the facade refuses a destroy while those
    // exist, so nothing uses them any more.
    be.remove_frozen(&ctx, vm, None).await;
    warm::discard(be, vm, None).await;
    Ok(())
}

/// A transient clone's removal. libvirt's destroy sends SIGTERM and checks for QEMU's end in
/// 200 ms polls (QEMU winds down first), then waits for the dead process to be reaped. Here
/// the definition goes first, while the domain runs (it turns transient, its files are
/// removed), then QEMU is killed outright and libvirt drops the domain as soon as the death
/// is reaped. Remote hosts and VMs whose QEMU cannot be told apart by pid and start time take
/// the ordinary way.
pub(super) async fn discard(be: &LibvirtBackend, vm: &VmName) -> Result<()> {
    let state = be.state(vm).await?;
    let qemu = match state {
        VmState::ShutOff | VmState::Saved => None,
        _ => be.qemu_process(vm),
    };
    let Some((pid, ticks)) = qemu else {
        if !matches!(state, VmState::ShutOff | VmState::Saved) {
            power_off(be, vm).await?;
        }
        return undefine(be, vm).await;
    };
    undefine(be, vm).await?;
    if crate::util::process::runs(pid, ticks) {
        // SAFETY: kill(2) with a pid whose start time was just checked against libvirt's.
        let r = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH) {
            // Not ours to kill: libvirt's destroy of the domain, transient now.
            tracing::debug!(vm = %vm, pid, "SIGKILL refused; asking libvirt to destroy it");
            let _ = power_off(be, vm).await;
        }
    }
    // Gone when this returns, as after a destroy: libvirt drops the transient domain once it
    // has reaped the process (at once under a prompt reaper; 'anyvm doctor' tells).
    let deadline = std::time::Instant::now() + be.opts.call_timeout;
    while exists(be, vm).await? {
        if std::time::Instant::now() > deadline {
            return Err(Error::Timeout {
                ctx: Ctx::vm("discard", vm),
                after: Some(be.opts.call_timeout),
                what: "libvirt to drop the killed domain".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// A clone of a stopped VM has a frozen copy of the base's disks of its own (the base may
/// change after): once no overlay backs onto it, it goes with the clone. Frozen bases of a
/// snapshot are shared by every clone from it and stay until the snapshot or base goes.
async fn remove_unused_stopped_bases(be: &LibvirtBackend, ctx: &Ctx, backing: &[PathBuf]) {
    let dir = &be.opts.images_dir;
    let candidates: Vec<&PathBuf> = backing
        .iter()
        .filter(|p| p.parent() == Some(dir.as_path()))
        .filter(|p| {
            p.file_name().and_then(|f| f.to_str()).is_some_and(|f| {
                matches!(orphans::classify(f), orphans::ImageFile::Frozen { snapshot, .. } if snapshot.is_empty())
            })
        })
        .collect();
    if candidates.is_empty() {
        return;
    }
    let files = be.host.list_dir(ctx, dir).await.unwrap_or_default();
    let still: BTreeSet<PathBuf> = files
        .iter()
        .filter(|f| matches!(orphans::classify(f), orphans::ImageFile::Overlay(_)))
        .filter_map(|f| orphans::qcow2_backing(&dir.join(f)))
        .collect();
    for p in candidates.into_iter().filter(|p| !still.contains(*p)) {
        if let Err(e) = be.host.remove_file(ctx, p).await {
            tracing::warn!(path = %p.display(), error = %e, "could not remove a frozen base");
        }
    }
}

pub(super) async fn start(be: &LibvirtBackend, vm: &VmName) -> Result<()> {
    let ctx = Ctx::vm("start", vm);
    if let Ok(spec) = be.stored_spec(&ctx, vm).await {
        be.prepare_shares(&ctx, &spec)?;
    }
    be.dom(&ctx, vm, |d, c| {
        d.create().map(|_| ()).map_err(|e| map_err(c, e))
    })
    .await
}

pub(super) async fn request_shutdown(be: &LibvirtBackend, vm: &VmName) -> Result<()> {
    let ctx = Ctx::vm("shutdown", vm);
    // The agent is the most reliable path for minimal guests (ACPI needs acpid in the guest).
    // qemu-ga never answers a successful guest-shutdown, so libvirt blocks until the agent
    // disconnects, which never happens when the guest ignores the request. Run it on its own
    // thread: an error within a second means "no agent, try ACPI"; silence means "delivered".
    // The thread ends when the guest goes down or the facade powers it off.
    let (tx, rx) = tokio::sync::oneshot::channel();
    let conn = be.current_connection();
    let name = vm.to_string();
    tokio::task::spawn_blocking(move || {
        let r = conn.lookup_domain_by_name(&name).and_then(|d| {
            d.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
                .map(|_| ())
        });
        let _ = tx.send(r);
    });
    match tokio::time::timeout(Duration::from_secs(1), rx).await {
        Ok(Ok(Ok(()))) | Err(_) => return Ok(()),
        Ok(Ok(Err(e))) => {
            tracing::debug!(vm = %vm, error = %e, "agent shutdown failed; trying ACPI")
        }
        Ok(Err(_)) => {}
    }
    be.dom(&ctx, vm, |d, c| {
        d.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            .map(|_| ())
            .map_err(|e| map_err(c, e))
    })
    .await
}

pub(super) async fn power_off(be: &LibvirtBackend, vm: &VmName) -> Result<()> {
    be.dom(&Ctx::vm("power off", vm), vm, |d, c| match d.destroy() {
        Ok(()) => Ok(()),
        Err(_) if !d.is_active().unwrap_or(true) => Ok(()),
        Err(e) => Err(map_err(c, e)),
    })
    .await
}

pub(super) async fn reset(be: &LibvirtBackend, vm: &VmName) -> Result<()> {
    be.dom(&Ctx::vm("reset", vm), vm, |d, c| {
        d.reset().map_err(|e| map_err(c, e))
    })
    .await
}

pub(super) async fn pause(be: &LibvirtBackend, vm: &VmName) -> Result<()> {
    be.dom(&Ctx::vm("pause", vm), vm, |d, c| {
        d.suspend().map_err(|e| map_err(c, e))
    })
    .await
}

pub(super) async fn resume(be: &LibvirtBackend, vm: &VmName) -> Result<()> {
    be.dom(&Ctx::vm("resume", vm), vm, |d, c| {
        d.resume().map_err(|e| map_err(c, e))
    })
    .await
}

pub(super) async fn save_state(be: &LibvirtBackend, vm: &VmName) -> Result<()> {
    be.dom(&Ctx::vm("save state", vm), vm, |d, c| {
        d.managed_save(0).map_err(|e| map_err(c, e))
    })
    .await
}

pub(super) async fn console_tail(
    be: &LibvirtBackend,
    vm: &VmName,
    limit: usize,
) -> Result<Vec<u8>> {
    let ctx = Ctx::vm("read console log", vm);
    be.host.read_tail(&ctx, &be.console_path(vm), limit).await
}

pub(super) async fn release_stale_host_state(
    be: &LibvirtBackend,
    live: &[String],
    dry_run: bool,
) -> Result<HostSweep> {
    if !be.is_local() {
        // Share mounts exist only for a local libvirt; a remote images dir is not swept.
        return Ok(HostSweep::default());
    }
    let mut sweep = HostSweep {
        released: release_stale_mounts(be, live, dry_run).await?,
        skipped: None,
    };
    let ctx = Ctx::new("sweep the images dir");
    let dir = &be.opts.images_dir;
    let Some(_lock) = ImagesLock::exclusive(&ctx, dir, SWEEP_WAIT).await? else {
        sweep.skipped = Some(format!(
            "clones or destroys kept {} busy for {}s; its files were not swept (run gc again)",
            dir.display(),
            SWEEP_WAIT.as_secs()
        ));
        return Ok(sweep);
    };
    // Under the exclusive lock no clone is between writing its files and defining its
    // domain, so a file no domain names is an orphan.
    let (domains, used) = be
        .call(&ctx, be.opts.call_timeout, {
            let c = ctx.clone();
            move |conn| {
                let mut names = BTreeSet::new();
                let mut used = BTreeSet::new();
                for d in conn.list_all_domains(0).map_err(|e| map_err(&c, e))? {
                    names.insert(d.name().map_err(|e| map_err(&c, e))?);
                    let xml = d.xml_desc(0).map_err(|e| map_err(&c, e))?;
                    used.extend(orphans::disk_sources(&xml));
                }
                Ok((names, used))
            }
        })
        .await?;
    let files = be.host.list_dir(&ctx, dir).await?;
    for l in orphans::orphans(dir, &files, &used, &domains) {
        if !dry_run {
            be.host.remove_file(&ctx, Path::new(&l.path)).await?;
            tracing::info!(path = %l.path, kind = %l.kind, "removed an orphaned image");
        }
        sweep.released.push(l);
    }
    Ok(sweep)
}

/// How long gc waits for clones in progress before it leaves the images dir for next time.
const SWEEP_WAIT: Duration = Duration::from_secs(30);

async fn release_stale_mounts(
    be: &LibvirtBackend,
    live: &[String],
    dry_run: bool,
) -> Result<Vec<Leftover>> {
    let ctx = Ctx::new("release stale share mounts");
    let dir = &be.opts.shares_dir;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(ctx, dir, e)),
    };
    let mut released = Vec::new();
    for entry in entries.flatten() {
        let Ok(vm) = VmName::new(entry.file_name().to_string_lossy()) else {
            continue; // not a folder anyvm made
        };
        // A VM defined since `live` was listed keeps its mounts.
        if live.iter().any(|n| n == vm.as_str()) || be.exists(&vm).await? {
            continue;
        }
        let shares: Vec<String> = std::fs::read_dir(entry.path())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let dir = be.ro_mounts(&vm);
        released.extend(shares.iter().map(|n| Leftover {
            kind: LeftoverKind::ShareMount,
            path: dir.join(n).display().to_string(),
        }));
        if !dry_run {
            be.release_shares(&vm, shares);
            tracing::info!(vm = %vm, "released share mounts of a VM that is gone");
        }
    }
    Ok(released)
}
