//! Lifecycle: listing, defining and removing, power state, console.

use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::{Boot, VmInfo, VmSpec, VmState, VmStatus};
use std::path::{Path, PathBuf};

use super::*;

pub(super) async fn list(be: &VirtualBoxBackend) -> Result<Vec<VmInfo>> {
    let ctx = Ctx::new("list");
    be.version().await?;
    let all = parse::list(&be.vbox(&ctx, os(&["list", "vms"])).await?.stdout_str())
        .map_err(|m| Error::backend(ctx.clone(), "VBoxManage", m))?;
    let running = parse::list(
        &be.vbox(&ctx, os(&["list", "runningvms"]))
            .await?
            .stdout_str(),
    )
    .map_err(|m| Error::backend(ctx.clone(), "VBoxManage", m))?;
    Ok(all
        .into_iter()
        // Warm-state holders are anyvm's storage, as libvirt's state files are: not listed.
        .filter(|(name, _)| !super::warm::is_holder(name))
        .map(|(name, uuid)| VmInfo {
            state: if running.iter().any(|(_, u)| *u == uuid) {
                VmState::Running
            } else {
                VmState::ShutOff
            },
            name,
            // Knowing would cost one getextradata per VM.
            managed: None,
        })
        .collect())
}

pub(super) async fn exists(be: &VirtualBoxBackend, vm: &VmName) -> Result<bool> {
    match be.info(&Ctx::vm("lookup", vm), vm).await {
        Ok(_) => Ok(true),
        Err(Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

pub(super) async fn spec(be: &VirtualBoxBackend, vm: &VmName) -> Result<Option<VmSpec>> {
    let ctx = Ctx::vm("read spec", vm);
    let out = be
        .vbox(&ctx, os(&["getextradata", vm.as_str(), SPEC_KEY]))
        .await?;
    match parse::guest_property(&out.stdout_str()) {
        None => Ok(None),
        Some(json) => serde_json::from_str(&json).map(Some).map_err(|e| {
            Error::backend(
                ctx,
                "VBoxManage",
                format!("anyvm spec in extradata is unreadable: {e}"),
            )
        }),
    }
}

pub(super) async fn define(be: &VirtualBoxBackend, spec: &VmSpec) -> Result<()> {
    let ctx = Ctx::vm("define", &spec.name);
    spec.validate()?;
    crate::backend::require_nat_network(&ctx, be.id(), spec)?;
    be.version().await?;
    if let Boot::Kernel { .. } | Boot::Existing { .. } = spec.boot {
        return Err(Error::InvalidState {
            ctx,
            state: "direct kernel boot requested".into(),
            hint: Some(
                "VirtualBox boots from disks or appliances; use a disk image or an OVA".into(),
            ),
        });
    }
    for d in &spec.disks {
        if !ATTACHABLE.contains(&d.format) {
            return Err(Error::InvalidArgument {
                what: format!("disk {}", d.path.display()),
                reason: format!(
                    "VirtualBox cannot attach {} images (it takes vdi, vmdk and vhd); convert it first: qemu-img convert -O vdi {} {}",
                    d.format,
                    d.path.display(),
                    d.path.with_extension("vdi").display()
                ),
            });
        }
        if !d.path.exists() {
            return Err(Error::NotFound {
                ctx,
                what: format!("host file {}", d.path.display()),
            });
        }
    }
    std::fs::create_dir_all(&be.opts.console_dir)
        .map_err(|e| Error::io(ctx.clone(), &be.opts.console_dir, e))?;
    let name = spec.name.as_str();
    match &spec.boot {
        Boot::Appliance { path } => {
            if !path.exists() {
                return Err(Error::NotFound {
                    ctx,
                    what: format!("appliance {}", path.display()),
                });
            }
            let mut a = os(&["import"]);
            a.push(path.as_os_str().to_owned());
            a.extend(os(&["--vsys", "0", "--vmname", name]));
            be.vbox_with(&ctx, a, None, Some(be.opts.long_timeout))
                .await?;
        }
        _ => {
            be.vbox(
                &ctx,
                os(&[
                    "createvm",
                    "--name",
                    name,
                    "--ostype",
                    "Linux_64",
                    "--register",
                ]),
            )
            .await?;
        }
    }
    // From here on a failure unregisters the half-made VM: a failed define changes nothing.
    let rest: Result<()> = async {
        let modify = match spec.boot {
            Boot::Appliance { .. } => be.modify_replacing_forwards(&ctx, spec).await?,
            _ => be.modify_args(spec),
        };
        be.vbox(&ctx, modify).await?;
        if !spec.disks.is_empty() {
            let n = spec.disks.len().max(1).to_string();
            be.vbox(
                &ctx,
                os(&[
                    "storagectl",
                    name,
                    "--name",
                    CONTROLLER,
                    "--add",
                    "sata",
                    "--portcount",
                    &n,
                ]),
            )
            .await?;
            for (i, d) in spec.disks.iter().enumerate() {
                let mut a = os(&[
                    "storageattach",
                    name,
                    "--storagectl",
                    CONTROLLER,
                    "--port",
                    &i.to_string(),
                    "--device",
                    "0",
                    "--type",
                    "hdd",
                    "--medium",
                ]);
                a.push(d.path.as_os_str().to_owned());
                if d.readonly {
                    a.extend(os(&["--mtype", "readonly"]));
                }
                be.vbox(&ctx, a).await?;
            }
        }
        for s in &spec.shares {
            be.shared_folder_add(&spec.name, s).await?;
        }
        be.store_spec(&ctx, spec).await
    }
    .await;
    if let Err(e) = rest {
        let _ = be.undefine(&spec.name).await;
        return Err(e);
    }
    Ok(())
}

/// Remove the VM, its snapshots and every medium only it used, without ever deleting the
/// user's own disks. `unregistervm --delete` cannot do that: it deletes every disk it can,
/// and a user disk still referenced by a snapshot makes it fail after unregistering, leaving
/// the differencing media registered. So: refuse up front when linked clones depend on the
/// VM; otherwise unregister, then close the VM's media leaves first, deleting differencing
/// images and images VirtualBox made in the machine folder, keeping (only unregistering)
/// the rest; then remove the machine's own files.
pub(super) async fn undefine(be: &VirtualBoxBackend, vm: &VmName) -> Result<()> {
    let ctx = Ctx::vm("undefine", vm);
    let kv = be.info(&ctx, vm).await?;
    let uuid = parse::get(&kv, "UUID").unwrap_or_default().to_string();
    let cfg = parse::get(&kv, "CfgFile").map(PathBuf::from);
    let folder = cfg.as_ref().and_then(|c| c.parent()).map(Path::to_path_buf);
    let spec = be.spec(vm).await.ok().flatten();
    let before = be.media(&ctx).await?;
    let names = be.vm_names(&ctx).await?;
    let deps: std::collections::BTreeSet<String> = media::clone_links(&before, &names)
        .into_iter()
        .filter(|l| l.base == vm.as_str())
        .map(|l| l.clone)
        .collect();
    if !deps.is_empty() {
        return Err(Error::InvalidState {
            ctx,
            state: format!(
                "has linked clones: {}",
                deps.into_iter().collect::<Vec<_>>().join(", ")
            ),
            hint: Some("destroy the clones first, or destroy with --with-clones".into()),
        });
    }
    let keep: Vec<PathBuf> = spec
        .as_ref()
        .map(|s| {
            s.disks
                .iter()
                .filter(|d| !d.owned)
                .flat_map(|d| {
                    [
                        d.path.clone(),
                        std::fs::canonicalize(&d.path).unwrap_or_default(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let mine: Vec<parse::Medium> = media::media_of(&before, &uuid)
        .into_iter()
        .cloned()
        .collect();

    be.vbox(&ctx, os(&["unregistervm", vm.as_str()])).await?;

    // From here the VM is gone from VirtualBox: finish the clean-up, report what could not.
    let mut problems: Vec<String> = Vec::new();
    let after = be.media(&ctx).await.unwrap_or_default();
    for m in &mine {
        let loc = PathBuf::from(&m.location);
        let registered = after.iter().any(|a| a.uuid == m.uuid);
        if registered && media::still_needed(&after, &m.uuid) {
            continue; // shared with another VM: stays registered
        }
        let made_for_vm = folder.as_ref().is_some_and(|f| loc.starts_with(f));
        let delete = !keep.contains(&loc) && (m.differencing || made_for_vm);
        if registered {
            let mut a = os(&["closemedium", "disk"]);
            a.push(loc.clone().into_os_string());
            if delete {
                a.push("--delete".into());
            }
            if let Err(e) = be.vbox(&ctx, a).await {
                problems.push(format!("{}: {e}", loc.display()));
            }
        } else if delete {
            if let Err(e) = std::fs::remove_file(&loc) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    problems.push(format!("{}: {e}", loc.display()));
                }
            }
        }
    }
    if let (Some(cfg), Some(folder)) = (&cfg, &folder) {
        remove_machine_files(&kv, cfg, folder);
    }
    let _ = std::fs::remove_file(be.console_path(vm));
    // A clone made at the base's current state left a snapshot on the base: drop it too.
    let auto = spec.as_ref().and_then(|s| {
        (!s.labels.contains_key(crate::labels::CLONE_SNAPSHOT))
            .then(|| s.labels.get(crate::labels::CLONE_BASE))
            .flatten()
    });
    if let Some(base) = auto {
        let snap = format!("anyvm-clone-{vm}");
        if let Err(e) = be
            .vbox(&ctx, os(&["snapshot", base, "delete", &snap]))
            .await
        {
            if !matches!(e, Error::NotFound { .. }) {
                tracing::warn!(vm = %vm, base = %base, error = %e, "could not delete the clone's base snapshot");
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::backend(
            ctx,
            "VBoxManage",
            format!(
                "the VM is unregistered, but these media could not be removed: {}; remove them with 'VBoxManage closemedium disk PATH --delete'",
                problems.join("; ")
            ),
        ))
    }
}

pub(super) async fn start(be: &VirtualBoxBackend, vm: &VmName) -> Result<()> {
    let ctx = Ctx::vm("start", vm);
    let args = os(&["startvm", vm.as_str(), "--type", &be.opts.start_type]);
    match be.vbox_call(&ctx, args, None, None).await {
        (Ok(_), _) => Ok(()),
        (Err(e), driver) => {
            if let Some(w) = driver {
                return Err(Error::BackendUnavailable {
                    ctx,
                    backend: "virtualbox".into(),
                    reason: format!(
                        "VirtualBox cannot start VMs on this host: its kernel driver is not loaded ({w}); install virtualbox-dkms and the headers of the running kernel, then load it (modprobe vboxdrv). VBoxManage said: {e}"
                    ),
                });
            }
            // Some versions exit 1 after a successful start; the state says the truth.
            if matches!(e, Error::Backend { .. })
                && be.state(vm).await.ok() == Some(VmState::Running)
            {
                return Ok(());
            }
            Err(e)
        }
    }
}

pub(super) async fn request_shutdown(be: &VirtualBoxBackend, vm: &VmName) -> Result<()> {
    be.vbox(
        &Ctx::vm("shutdown", vm),
        os(&["controlvm", vm.as_str(), "acpipowerbutton"]),
    )
    .await
    .map(|_| ())
}

pub(super) async fn reset(be: &VirtualBoxBackend, vm: &VmName) -> Result<()> {
    let ctx = Ctx::vm("reset", vm);
    be.vbox(&ctx, os(&["controlvm", vm.as_str(), "reset"]))
        .await
        .map(|_| ())
}

pub(super) async fn power_off(be: &VirtualBoxBackend, vm: &VmName) -> Result<()> {
    let ctx = Ctx::vm("power off", vm);
    match be
        .vbox(&ctx, os(&["controlvm", vm.as_str(), "poweroff"]))
        .await
    {
        Ok(_) => Ok(()),
        Err(Error::InvalidState { .. })
            if matches!(be.state(vm).await, Ok(VmState::ShutOff | VmState::Saved)) =>
        {
            Ok(())
        }
        Err(e) => Err(e),
    }
}

pub(super) async fn pause(be: &VirtualBoxBackend, vm: &VmName) -> Result<()> {
    be.vbox(
        &Ctx::vm("pause", vm),
        os(&["controlvm", vm.as_str(), "pause"]),
    )
    .await
    .map(|_| ())
}

pub(super) async fn resume(be: &VirtualBoxBackend, vm: &VmName) -> Result<()> {
    be.vbox(
        &Ctx::vm("resume", vm),
        os(&["controlvm", vm.as_str(), "resume"]),
    )
    .await
    .map(|_| ())
}

pub(super) async fn save_state(be: &VirtualBoxBackend, vm: &VmName) -> Result<()> {
    be.vbox(
        &Ctx::vm("save state", vm),
        os(&["controlvm", vm.as_str(), "savestate"]),
    )
    .await
    .map(|_| ())
}

pub(super) async fn status(be: &VirtualBoxBackend, vm: &VmName) -> Result<VmStatus> {
    let ctx = Ctx::vm("status", vm);
    let kv = be.info(&ctx, vm).await?;
    Ok(VmStatus {
        name: vm.to_string(),
        state: VirtualBoxBackend::state_of(&ctx, &kv)?,
        forwards: parse::forwards(&kv, 1)
            .map_err(|m| Error::backend(ctx.clone(), "VBoxManage", m))?,
        snapshots: snapshot_infos(&kv),
    })
}

pub(super) async fn export_appliance(
    be: &VirtualBoxBackend,
    vm: &VmName,
    path: &Path,
) -> Result<()> {
    let ctx = Ctx::vm(format!("export to {}", path.display()), vm);
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if !matches!(ext, "ova" | "ovf") {
        return Err(Error::invalid_arg(
            format!("appliance path {}", path.display()),
            "must end in .ova (one file) or .ovf",
        ));
    }
    if path.exists() {
        return Err(Error::InvalidState {
            ctx,
            state: format!("{} exists", path.display()),
            hint: Some("remove it or choose another file name".into()),
        });
    }
    match be.state(vm).await? {
        VmState::ShutOff => {}
        st => {
            return Err(Error::InvalidState {
                ctx,
                state: st.to_string(),
                hint: Some(
                    "stop the VM first (anyvm stop); VirtualBox exports powered-off machines"
                        .into(),
                ),
            })
        }
    }
    let mut a = os(&["export", vm.as_str(), "--output"]);
    a.push(path.as_os_str().to_owned());
    a.extend(os(&["--vsys", "0", "--vmname", vm.as_str()]));
    let r = be
        .vbox_with(&ctx, a, None, Some(be.opts.long_timeout))
        .await;
    if r.is_err() {
        // A failed export leaves a partial file behind.
        let _ = std::fs::remove_file(path);
    }
    r.map(|_| ())
}
