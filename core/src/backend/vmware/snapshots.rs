//! Snapshots and linked clones.

use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::{Boot, SnapshotInfo, VmSpec};

use super::*;

pub(super) async fn snapshot_take(
    be: &VmwareBackend,
    vm: &VmName,
    name: &str,
    _description: &str,
) -> Result<()> {
    let ctx = Ctx::vm(format!("snapshot take {name}"), vm);
    let e = be.entry(&ctx, vm)?;
    be.vmrun(
        &ctx,
        "snapshot",
        vec![e.vmx.into(), name.into()],
        Some(be.opts.long_timeout),
    )
    .await
    .map(|_| ())
}

pub(super) async fn snapshot_restore(be: &VmwareBackend, vm: &VmName, name: &str) -> Result<()> {
    let ctx = Ctx::vm(format!("snapshot restore {name}"), vm);
    let e = be.entry(&ctx, vm)?;
    be.vmrun(
        &ctx,
        "revertToSnapshot",
        vec![e.vmx.into(), name.into()],
        Some(be.opts.long_timeout),
    )
    .await
    .map(|_| ())
}

pub(super) async fn snapshot_delete(be: &VmwareBackend, vm: &VmName, name: &str) -> Result<()> {
    let ctx = Ctx::vm(format!("snapshot delete {name}"), vm);
    let e = be.entry(&ctx, vm)?;
    be.vmrun(
        &ctx,
        "deleteSnapshot",
        vec![e.vmx.into(), name.into()],
        Some(be.opts.long_timeout),
    )
    .await
    .map(|_| ())
}

pub(super) async fn snapshot_list(be: &VmwareBackend, vm: &VmName) -> Result<Vec<SnapshotInfo>> {
    let ctx = Ctx::vm("snapshot list", vm);
    let e = be.entry(&ctx, vm)?;
    let out = be
        .vmrun(&ctx, "listSnapshots", vec![e.vmx.into()], None)
        .await?;
    let names = parse::snapshots(&out.stdout_str()).map_err(|m| Error::backend(ctx, "vmrun", m))?;
    Ok(names
        .into_iter()
        .map(|name| SnapshotInfo {
            name,
            created: None,
            state: None,
            current: false,
            parent: None,
        })
        .collect())
}

pub(super) async fn clone_linked(
    be: &VmwareBackend,
    base: &VmName,
    snapshot: Option<String>,
    clone: &VmSpec,
) -> Result<()> {
    let ctx = Ctx::vm(format!("clone to {}", clone.name), base);
    let e = be.entry(&ctx, base)?;
    let snap = match snapshot {
        Some(s) => s,
        None => {
            let s = format!("anyvm-clone-{}", clone.name);
            be.snapshot_take(base, &s, "").await?;
            s
        }
    };
    let dir = be.opts.state_dir.join("vmware").join(clone.name.as_str());
    let vmx = dir.join(format!("{}.vmx", clone.name));
    std::fs::create_dir_all(&dir).map_err(|err| Error::io(ctx.clone(), &dir, err))?;
    let args = vec![
        e.vmx.clone().into(),
        vmx.clone().into(),
        "linked".into(),
        format!("-snapshot={snap}").into(),
        format!("-cloneName={}", clone.name).into(),
    ];
    if let Err(err) = be
        .vmrun(&ctx, "clone", args, Some(be.opts.long_timeout))
        .await
    {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(err);
    }
    // vmrun can leave lock folders behind in the clone that block its first start.
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for p in rd
            .flatten()
            .map(|d| d.path())
            .filter(|p| p.extension().is_some_and(|x| x == "lck"))
        {
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
    let mut spec = clone.clone();
    spec.boot = Boot::Existing { path: vmx.clone() };
    let res = be.write_vmx(&ctx, &vmx, &spec).and_then(|_| {
        be.inventory.update(&ctx, |inv: &mut Inventory| {
            inv.vms.insert(
                clone.name.to_string(),
                Entry {
                    vmx: vmx.clone(),
                    spec: Some(spec.clone()),
                    owned: true,
                    paused: false,
                },
            );
            Ok((true, ()))
        })
    });
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    res
}
