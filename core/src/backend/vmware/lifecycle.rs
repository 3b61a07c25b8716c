//! Lifecycle: listing, defining and removing, power state, console.

use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::{Boot, VmInfo, VmSpec, VmState};

use super::*;

pub(super) async fn list(be: &VmwareBackend) -> Result<Vec<VmInfo>> {
    let ctx = Ctx::new("list");
    let running = be.running(&ctx).await?;
    let inv: Inventory = be.inventory.read(&ctx)?;
    let mut out: Vec<VmInfo> = inv
        .vms
        .iter()
        .map(|(name, e)| {
            let state = VmwareBackend::state_of(e, &running);
            VmInfo {
                name: name.clone(),
                state,
                managed: Some(e.spec.is_some()),
            }
        })
        .collect();
    // Running VMs anyvm does not know, named by their displayName.
    for r in running.iter().filter(|r| {
        !inv.vms
            .values()
            .any(|e| VmwareBackend::same_file(r, &e.vmx))
    }) {
        let name = std::fs::read_to_string(r)
            .ok()
            .and_then(|t| parse::Vmx::parse(&t).get("displayName"))
            .unwrap_or_else(|| {
                r.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        out.push(VmInfo {
            name,
            state: VmState::Running,
            managed: Some(false),
        });
    }
    Ok(out)
}

pub(super) async fn define(be: &VmwareBackend, spec: &VmSpec) -> Result<()> {
    let ctx = Ctx::vm("define", &spec.name);
    spec.validate()?;
    crate::backend::require_nat_network(&ctx, be.id(), spec)?;
    let Boot::Existing { path } = &spec.boot else {
        return Err(Error::InvalidState {
            ctx,
            state: "no .vmx given".into(),
            hint: Some("vmrun cannot create VMs; define from an existing .vmx (boot = { kind = \"existing\", path = \"/vms/x.vmx\" })".into()),
        });
    };
    if !path.is_file() {
        return Err(Error::NotFound {
            ctx,
            what: format!("VMware machine file {}", path.display()),
        });
    }
    be.write_vmx(&ctx, path, spec)?;
    let name = spec.name.to_string();
    be.inventory.update(&ctx, |inv: &mut Inventory| {
        if inv.vms.contains_key(&name) {
            return Err(Error::InvalidState {
                ctx: ctx.clone(),
                state: "already defined".into(),
                hint: None,
            });
        }
        inv.vms.insert(
            name.clone(),
            Entry {
                vmx: path.clone(),
                spec: Some(spec.clone()),
                owned: false,
                paused: false,
            },
        );
        Ok((true, ()))
    })?;
    for s in &spec.shares {
        if let Err(e) = be.shared_folder_add(&spec.name, s).await {
            let _ = be.undefine(&spec.name).await;
            return Err(e);
        }
    }
    Ok(())
}

pub(super) async fn undefine(be: &VmwareBackend, vm: &VmName) -> Result<()> {
    let ctx = Ctx::vm("undefine", vm);
    let e = be.entry(&ctx, vm)?;
    let forwards = e
        .spec
        .as_ref()
        .map(VmSpec::resolved_forwards)
        .unwrap_or_default();
    if !forwards.is_empty() && be.forward_transport() == ForwardTransport::Hypervisor {
        if let Ok(net) = be.host_network(&ctx).await {
            for f in &forwards {
                let _ = be.delete_forward(&ctx, &net, f).await;
            }
        }
    }
    if e.owned {
        be.vmrun(&ctx, "deleteVM", vec![e.vmx.clone().into()], None)
            .await?;
        if let Some(dir) = e.vmx.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    be.inventory.update(&ctx, |inv: &mut Inventory| {
        Ok((inv.vms.remove(vm.as_str()).is_some(), ()))
    })
}

pub(super) async fn start(be: &VmwareBackend, vm: &VmName) -> Result<()> {
    let ctx = Ctx::vm("start", vm);
    let e = be.entry(&ctx, vm)?;
    be.vmrun(
        &ctx,
        "start",
        vec![e.vmx.clone().into(), "nogui".into()],
        None,
    )
    .await?;
    be.update_entry(&ctx, vm, |e| e.paused = false)?;
    // Forwards are host-wide rules to the guest's current IP: (re)point them now.
    let forwards = e
        .spec
        .as_ref()
        .map(VmSpec::resolved_forwards)
        .unwrap_or_default();
    if !forwards.is_empty() && be.forward_transport() == ForwardTransport::Hypervisor {
        let net = be.host_network(&ctx).await?;
        let ip = be.guest_ip(&ctx, &e.vmx).await?;
        for f in &forwards {
            let _ = be.delete_forward(&ctx, &net, f).await;
            be.set_forward(&ctx, vm, &net, &ip, f).await?;
        }
    }
    Ok(())
}

pub(super) async fn request_shutdown(be: &VmwareBackend, vm: &VmName) -> Result<()> {
    let ctx = Ctx::vm("shutdown", vm);
    let e = be.entry(&ctx, vm)?;
    be.vmrun(&ctx, "stop", vec![e.vmx.into(), "soft".into()], None)
        .await
        .map(|_| ())
}

pub(super) async fn power_off(be: &VmwareBackend, vm: &VmName) -> Result<()> {
    let ctx = Ctx::vm("power off", vm);
    let e = be.entry(&ctx, vm)?;
    match be
        .vmrun(&ctx, "stop", vec![e.vmx.into(), "hard".into()], None)
        .await
    {
        Ok(_) | Err(Error::InvalidState { .. }) => {}
        Err(err) => return Err(err),
    }
    be.update_entry(&ctx, vm, |e| e.paused = false)
}

pub(super) async fn reset(be: &VmwareBackend, vm: &VmName) -> Result<()> {
    let ctx = Ctx::vm("reset", vm);
    let e = be.entry(&ctx, vm)?;
    be.vmrun(&ctx, "reset", vec![e.vmx.into(), "hard".into()], None)
        .await?;
    be.update_entry(&ctx, vm, |e| e.paused = false)
}

pub(super) async fn pause(be: &VmwareBackend, vm: &VmName) -> Result<()> {
    let ctx = Ctx::vm("pause", vm);
    let e = be.entry(&ctx, vm)?;
    be.vmrun(&ctx, "pause", vec![e.vmx.into()], None).await?;
    be.update_entry(&ctx, vm, |e| e.paused = true)
}

pub(super) async fn resume(be: &VmwareBackend, vm: &VmName) -> Result<()> {
    let ctx = Ctx::vm("resume", vm);
    let e = be.entry(&ctx, vm)?;
    be.vmrun(&ctx, "unpause", vec![e.vmx.into()], None).await?;
    be.update_entry(&ctx, vm, |e| e.paused = false)
}

pub(super) async fn save_state(be: &VmwareBackend, vm: &VmName) -> Result<()> {
    let ctx = Ctx::vm("save state", vm);
    let e = be.entry(&ctx, vm)?;
    be.vmrun(
        &ctx,
        "suspend",
        vec![e.vmx.into(), "soft".into()],
        Some(be.opts.long_timeout),
    )
    .await?;
    be.update_entry(&ctx, vm, |e| e.paused = false)
}
