//! Snapshots and linked clones.

use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::{DiskFormat, SnapshotInfo, VmSpec, VmState};
use std::path::PathBuf;
use virt::domain::Domain;

use super::*;

pub(super) async fn snapshot_take(
    be: &LibvirtBackend,
    vm: &VmName,
    name: &str,
    description: &str,
) -> Result<()> {
    let xml = format!(
        "<domainsnapshot><name>{}</name><description>{}</description></domainsnapshot>",
        crate::util::xml::escape(name),
        crate::util::xml::escape(description)
    );
    be.dom(
        &Ctx::vm(format!("snapshot take {name}"), vm),
        vm,
        move |d, c| {
            d.create_snapshot_xml(&xml, 0)
                .map(|_| ())
                .map_err(|e| map_err(c, e))
        },
    )
    .await
}

pub(super) async fn snapshot_restore(be: &LibvirtBackend, vm: &VmName, name: &str) -> Result<()> {
    let n = name.to_string();
    be.dom(
        &Ctx::vm(format!("snapshot restore {name}"), vm),
        vm,
        move |d, c| {
            let s = Domain::lookup_snapshot_by_name(d, &n, 0).map_err(|e| map_err(c, e))?;
            s.revert(0).map_err(|e| map_err(c, e))
        },
    )
    .await
}

pub(super) async fn snapshot_delete(be: &LibvirtBackend, vm: &VmName, name: &str) -> Result<()> {
    let n = name.to_string();
    let ctx = Ctx::vm(format!("snapshot delete {name}"), vm);
    be.dom(&ctx, vm, move |d, c| {
        let s = Domain::lookup_snapshot_by_name(d, &n, 0).map_err(|e| map_err(c, e))?;
        s.delete(0).map_err(|e| map_err(c, e))
    })
    .await?;
    be.remove_frozen(&ctx, vm, Some(name)).await;
    Ok(())
}

pub(super) async fn snapshot_list(be: &LibvirtBackend, vm: &VmName) -> Result<Vec<SnapshotInfo>> {
    be.dom(&Ctx::vm("snapshot list", vm), vm, |d, c| {
        let mut out = Vec::new();
        for s in d.list_all_snapshots(0).map_err(|e| map_err(c, e))? {
            let xml = s.xml_desc(0).map_err(|e| map_err(c, e))?;
            out.push(SnapshotInfo {
                name: s.name().map_err(|e| map_err(c, e))?,
                created: xml_text(&xml, "creationTime").and_then(|t| t.trim().parse().ok()),
                state: xml_text(&xml, "state"),
                current: s.is_current(0).unwrap_or(false),
                parent: s.parent(0).ok().and_then(|p| p.name().ok()),
            });
        }
        out.sort_by_key(|s| s.created);
        Ok(out)
    })
    .await
}

pub(super) async fn clone_linked(
    be: &LibvirtBackend,
    base: &VmName,
    snapshot: Option<String>,
    clone_spec: &VmSpec,
) -> Result<()> {
    let snapshot = snapshot.as_deref();
    let new = &clone_spec.name;
    let ctx = Ctx::vm(format!("clone to {new}"), base);
    let spec = be.stored_spec(&ctx, base).await?;
    let tag = match snapshot {
        Some(s) => {
            let snaps = be.snapshot_list(base).await?;
            let info = snaps
                .iter()
                .find(|i| i.name == s)
                .ok_or_else(|| Error::NotFound {
                    ctx: ctx.clone(),
                    what: format!("snapshot '{s}'"),
                })?;
            format!("{s}+{}", info.created.unwrap_or(0))
        }
        None => {
            let st = be.state(base).await?;
            if st != VmState::ShutOff {
                return Err(Error::InvalidState {
                    ctx,
                    state: st.to_string(),
                    hint: Some("stop the base VM or name a snapshot to clone from".into()),
                });
            }
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            // No snapshot name: an empty one (snapshot names are VM-name shaped).
            format!("+{}", t.as_nanos())
        }
    };
    be.host.create_dir_all(&ctx, &be.opts.images_dir).await?;
    // Until the domain is defined (or the files are removed again) no domain names them.
    let _lock = super::orphans::ImagesLock::shared(
        &ctx,
        &be.opts.images_dir,
        be.is_local(),
        be.opts.call_timeout,
    )
    .await?;
    let mut clone = clone_spec.clone();
    clone.disks = spec.disks.clone();
    let mut created: Vec<PathBuf> = Vec::new();
    // A stopped VM's frozen copy belongs to this clone alone: it goes if the clone fails.
    let mut frozen_here: Vec<PathBuf> = Vec::new();
    let result: Result<()> = async {
        for (i, disk) in clone.disks.iter_mut().enumerate() {
            // Internal snapshots live in qcow2 files only; the current disks of a stopped
            // VM can be frozen from any format QEMU reads.
            if snapshot.is_some() && disk.format != DiskFormat::Qcow2 {
                return Err(Error::InvalidState {
                    ctx: ctx.clone(),
                    state: format!("disk {} is {}", disk.path.display(), disk.format),
                    hint: Some("clones from a snapshot need qcow2 disks; clone the stopped VM's current disks instead (no snapshot)".into()),
                });
            }
            // Freeze the base disk at the snapshot once; every clone then layers on that file,
            // so the base VM keeps running and changing without touching its clones.
            let frozen = be
                .opts
                .images_dir
                .join(frozen_name(base.as_str(), &tag, i));
            if !be.host.exists(&ctx, &frozen).await? {
                tracing::debug!(vm = %new, phase = "freeze", disk = i, "clone");
                let tmp = frozen.with_extension("tmp");
                let mut args = vec![
                    "convert".to_string(),
                    "-U".into(),
                    "-f".into(),
                    disk.format.qemu_name().into(),
                    "-O".into(),
                    "qcow2".into(),
                ];
                if let Some(s) = snapshot {
                    args.push("-l".into());
                    args.push(format!("snapshot.name={s}"));
                }
                args.push(disk.path.display().to_string());
                args.push(tmp.display().to_string());
                if let Err(e) = be.qemu_img(&ctx, args).await {
                    let _ = be.host.remove_file(&ctx, &tmp).await;
                    return Err(e);
                }
                be.host.rename(&ctx, &tmp, &frozen).await?;
                if snapshot.is_none() {
                    frozen_here.push(frozen.clone());
                }
            }
            let overlay = be.opts.images_dir.join(format!("{new}-{i}.qcow2"));
            if be.host.exists(&ctx, &overlay).await? {
                return Err(Error::InvalidState {
                    ctx: ctx.clone(),
                    state: format!("{} exists", overlay.display()),
                    hint: Some("remove the stale clone disk or pick another name".into()),
                });
            }
            tracing::debug!(vm = %new, phase = "overlay", disk = i, "clone");
            // Ours from here: a create that fails half-way may leave part of it.
            created.push(overlay.clone());
            be.create_overlay(&ctx, &frozen, &overlay).await?;
            disk.path = overlay;
            disk.format = DiskFormat::Qcow2;
            disk.owned = true;
        }
        Ok(())
    }
    .await;
    let result = match result {
        Ok(()) => {
            tracing::debug!(vm = %new, phase = "define", "clone");
            be.define(&clone).await
        }
        Err(e) => Err(e),
    };
    if result.is_err() {
        for p in created.into_iter().chain(frozen_here) {
            let _ = be.host.remove_file(&ctx, &p).await;
        }
    }
    result
}
