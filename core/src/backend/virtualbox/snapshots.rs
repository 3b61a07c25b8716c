//! Snapshots and linked clones.

use crate::error::{Ctx, Result};
use crate::name::VmName;
use crate::types::{CloneLink, SnapshotInfo, VmSpec, VmState};

use super::*;

pub(super) async fn snapshot_take(
    be: &VirtualBoxBackend,
    vm: &VmName,
    name: &str,
    description: &str,
) -> Result<()> {
    let ctx = Ctx::vm(format!("snapshot take {name}"), vm);
    let mut a = os(&[
        "snapshot",
        vm.as_str(),
        "take",
        name,
        "--description",
        description,
    ]);
    if be.state(vm).await? == VmState::Running {
        a.push("--live".into());
    }
    be.vbox_with(&ctx, a, None, Some(be.opts.long_timeout))
        .await
        .map(|_| ())
}

pub(super) async fn snapshot_restore(
    be: &VirtualBoxBackend,
    vm: &VmName,
    name: &str,
) -> Result<()> {
    let ctx = Ctx::vm(format!("snapshot restore {name}"), vm);
    be.vbox_with(
        &ctx,
        os(&["snapshot", vm.as_str(), "restore", name]),
        None,
        Some(be.opts.long_timeout),
    )
    .await
    .map(|_| ())
}

pub(super) async fn snapshot_delete(be: &VirtualBoxBackend, vm: &VmName, name: &str) -> Result<()> {
    let ctx = Ctx::vm(format!("snapshot delete {name}"), vm);
    be.vbox_with(
        &ctx,
        os(&["snapshot", vm.as_str(), "delete", name]),
        None,
        Some(be.opts.long_timeout),
    )
    .await
    .map(|_| ())
}

pub(super) async fn snapshot_list(
    be: &VirtualBoxBackend,
    vm: &VmName,
) -> Result<Vec<SnapshotInfo>> {
    // showvminfo carries the same SnapshotName keys as 'snapshot list', and answers a VM
    // without snapshots with success instead of exit 1.
    let ctx = Ctx::vm("snapshot list", vm);
    Ok(snapshot_infos(&be.info(&ctx, vm).await?))
}

pub(super) async fn clone_linked(
    be: &VirtualBoxBackend,
    base: &VmName,
    snapshot: Option<String>,
    clone: &VmSpec,
) -> Result<()> {
    let ctx = Ctx::vm(format!("clone to {}", clone.name), base);
    let snap = match snapshot {
        Some(s) => s,
        None => {
            // VirtualBox links clones to a snapshot; make one of the current state.
            let s = format!("anyvm-clone-{}", clone.name);
            be.snapshot_take(base, &s, "base of a linked clone made by anyvm")
                .await?;
            s
        }
    };
    let a = os(&[
        "clonevm",
        base.as_str(),
        "--snapshot",
        &snap,
        "--options",
        "link",
        "--name",
        clone.name.as_str(),
        "--register",
    ]);
    be.vbox_with(&ctx, a, None, Some(be.opts.long_timeout))
        .await?;
    let rest: Result<()> = async {
        // A snapshot taken while running (or saved) holds memory, and VirtualBox makes its
        // clones saved: a linked clone boots, so that state goes (a warm clone keeps it).
        if be.state(&clone.name).await? == VmState::Saved {
            be.vbox(&ctx, os(&["discardstate", clone.name.as_str()]))
                .await?;
        }
        // The clone inherited the base's forwards (same host ports): replace them.
        let a = be.modify_replacing_forwards(&ctx, clone).await?;
        be.vbox(&ctx, a).await?;
        let mut spec = clone.clone();
        // Its disks are differencing images VirtualBox made: deleted with the clone.
        spec.disks.iter_mut().for_each(|d| d.owned = true);
        be.store_spec(&ctx, &spec).await
    }
    .await;
    if let Err(e) = rest {
        let _ = be
            .vbox(&ctx, os(&["unregistervm", clone.name.as_str(), "--delete"]))
            .await;
        return Err(e);
    }
    Ok(())
}

pub(super) async fn clone_links(be: &VirtualBoxBackend) -> Result<Vec<CloneLink>> {
    let ctx = Ctx::new("clone graph");
    let names = be.vm_names(&ctx).await?;
    let media = be.media(&ctx).await?;
    Ok(media::clone_links(&media, &names))
}
