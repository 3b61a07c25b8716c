//! Lifecycle: listing, defining and removing, power state, console.

use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::{HostPort, VmInfo, VmSpec, VmState};
use std::time::Duration;
use virt::sys;

use super::*;

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
    let xml = domain_xml::domain_xml(
        spec,
        None,
        &be.host_side(&be.console_path(&spec.name), &be.ro_mounts(&spec.name)),
    );
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
    be.dom(&ctx, vm, |d, c| {
        let flags = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_NVRAM;
        d.undefine_flags(flags).map_err(|e| map_err(c, e))
    })
    .await?;
    if let Some(spec) = spec {
        for d in spec.disks.iter().filter(|d| d.owned) {
            if let Err(e) = be.host.remove_file(&ctx, &d.path).await {
                tracing::warn!(vm = %vm, path = %d.path.display(), error = %e, "could not remove clone disk");
            }
        }
        be.release_shares(vm, spec.shares.into_iter().map(|s| s.name));
    }
    let _ = be.host.remove_file(&ctx, &be.console_path(vm)).await;
    // Its frozen bases serve only clones of it; the facade refuses a destroy while those
    // exist, so nothing uses them any more.
    be.remove_frozen(&ctx, vm, None).await;
    Ok(())
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
) -> Result<Vec<String>> {
    if !be.is_local() {
        return Ok(Vec::new()); // read-only shares are only ever mounted for a local libvirt
    }
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
        released.extend(shares.iter().map(|n| dir.join(n).display().to_string()));
        if !dry_run {
            be.release_shares(&vm, shares);
            tracing::info!(vm = %vm, "released share mounts of a VM that is gone");
        }
    }
    Ok(released)
}
