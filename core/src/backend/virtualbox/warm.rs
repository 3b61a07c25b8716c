//! Warm states: a ready VM saved once (`controlvm savestate`), and clones that resume it
//! instead of booting.
//!
//! The state lives in a holder VM, `anyvm-warm-<key>`: a full clone of the saved helper (the
//! clone carries the saved state and a flattened disk) with one snapshot, `anyvm-warm`, taken
//! while saved, so the snapshot holds the memory too. `clonevm --snapshot anyvm-warm --options
//! link` makes a clone that is itself "saved" (its own copy of the state file, a differencing
//! disk on the holder's); `startvm` resumes it. These are the real VBoxManage 7.2's answers
//! (checked offline with `adoptstate`). A saved machine is immutable except its NAT rules,
//! VRDE settings, extradata and name, so a clone gets its own forwards and remote-display
//! port before it resumes, and its serial port is pointed at its own log right after
//! (`controlvm changeuartmode1`). VirtualBox has no VM generation ID: the core feeds the
//! guest's entropy pool and sets its clock through guest control after the resume.

use std::path::PathBuf;
use std::time::Instant;

use crate::backend::WarmInfo;
use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::{VmSpec, VmState};

use super::*;

/// The snapshot of the holder that clones are made from.
const SNAP: &str = "anyvm-warm";
/// Extradata of the holder with its [`WarmInfo`], written last: a holder without it is
/// unfinished (a preparation killed half-way) and is replaced.
const INFO_KEY: &str = "anyvm/warm";
const HOLDER_PREFIX: &str = "anyvm-warm-";

/// Whether `name` is a warm-state holder (hidden from listings).
pub(super) fn is_holder(name: &str) -> bool {
    name.strip_prefix(HOLDER_PREFIX)
        .is_some_and(|k| k.len() == 16 && k.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The key already hashes the template's definition, name included.
fn holder(key: &str) -> Result<VmName> {
    VmName::new(format!("{HOLDER_PREFIX}{key}"))
}

async fn info_of(be: &VirtualBoxBackend, holder: &VmName) -> Result<Option<WarmInfo>> {
    let ctx = Ctx::vm("read the warm state", holder);
    let out = match be
        .vbox(&ctx, os(&["getextradata", holder.as_str(), INFO_KEY]))
        .await
    {
        Ok(o) => o,
        Err(Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(parse::guest_property(&out.stdout_str()).and_then(|j| serde_json::from_str(&j).ok()))
}

pub(super) async fn find(
    be: &VirtualBoxBackend,
    template: &VmName,
    key: &str,
) -> Result<Option<WarmInfo>> {
    let info = info_of(be, &holder(key)?).await?;
    Ok(info.filter(|i| i.template == template.as_str()))
}

/// Size of a file, 0 when it is not there.
fn size(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Save running (or already saved) `vm`, a ready clone of `template`, as the warm state
/// `key`. `vm` is left saved: destroy it afterwards.
pub(super) async fn save(
    be: &VirtualBoxBackend,
    vm: &VmName,
    template: &VmName,
    key: &str,
    spec: &VmSpec,
) -> Result<WarmInfo> {
    let ctx = Ctx::vm(format!("save the warm state of {template}"), vm);
    let hold = holder(key)?;
    if be.exists(&hold).await? {
        // Unfinished (find said no): what a killed preparation left. The caller holds the
        // preparation lock.
        be.undefine(&hold).await?;
    }
    let started = Instant::now();
    match be.state(vm).await? {
        VmState::Running => {
            // Clones point the port at their own log once resumed; until then it writes nowhere.
            if let Err(e) = be
                .vbox(
                    &ctx,
                    os(&["controlvm", vm.as_str(), "changeuartmode1", "disconnected"]),
                )
                .await
            {
                tracing::debug!(vm = %vm, error = %e, "serial port left as it was");
            }
            tracing::debug!(vm = %vm, phase = "warm-save", "warm");
            be.vbox_with(
                &ctx,
                os(&["controlvm", vm.as_str(), "savestate"]),
                None,
                Some(be.opts.long_timeout),
            )
            .await?;
        }
        VmState::Saved => {}
        other => {
            return Err(Error::InvalidState {
                ctx,
                state: other.to_string(),
                hint: Some("a warm state is saved from a running, ready VM".into()),
            })
        }
    }
    // A full clone: the holder outlives the helper and owns a flattened disk.
    be.vbox_with(
        &ctx,
        os(&[
            "clonevm",
            vm.as_str(),
            "--name",
            hold.as_str(),
            "--register",
        ]),
        None,
        Some(be.opts.long_timeout),
    )
    .await?;
    let made: Result<WarmInfo> = async {
        be.vbox_with(
            &ctx,
            os(&[
                "snapshot",
                hold.as_str(),
                "take",
                SNAP,
                "--description",
                "warm state of a template, made by anyvm",
            ]),
            None,
            Some(be.opts.long_timeout),
        )
        .await?;
        // The holder is no job's clone: without the helper's owner labels gc leaves it alone.
        let mut hspec = spec.clone();
        hspec.name = hold.clone();
        hspec
            .labels
            .retain(|k, _| !k.starts_with(crate::labels::JOB_PREFIX));
        hspec
            .labels
            .insert(crate::labels::WARM_OF.into(), template.to_string());
        be.store_spec(&ctx, &hspec).await?;
        let kv = be.info(&ctx, &hold).await?;
        let state_file = parse::get(&kv, "VMStateFile").map(PathBuf::from);
        let uuid = parse::get(&kv, "UUID").unwrap_or_default().to_string();
        let media = be.media(&ctx).await?;
        let info = WarmInfo {
            template: template.to_string(),
            key: key.to_string(),
            dir: parse::get(&kv, "CfgFile")
                .and_then(|c| std::path::Path::new(c).parent().map(|p| p.to_path_buf()))
                .unwrap_or_default(),
            memory_bytes: state_file.as_deref().map(size).unwrap_or(0),
            disk_bytes: media::media_of(&media, &uuid)
                .iter()
                .map(|m| size(std::path::Path::new(&m.location)))
                .sum(),
            saved_in: Some(started.elapsed()),
        };
        let json = serde_json::to_string(&info).expect("info serializes");
        be.vbox(
            &ctx,
            vec![
                "setextradata".into(),
                hold.as_str().into(),
                INFO_KEY.into(),
                json.into(),
            ],
        )
        .await?;
        Ok(info)
    }
    .await;
    if made.is_err() {
        let _ = be.undefine(&hold).await;
    }
    made
}

/// Clone the warm state `key` as `clone` (its own forwards and remote-display port) and
/// resume it: running when this returns; on failure nothing of the clone is left.
pub(super) async fn start(
    be: &VirtualBoxBackend,
    template: &VmName,
    key: &str,
    clone: &VmSpec,
) -> Result<()> {
    let name = &clone.name;
    let ctx = Ctx::vm(format!("warm start from {template}"), name);
    let hold = holder(key)?;
    if find(be, template, key).await?.is_none() {
        return Err(Error::NotFound {
            ctx,
            what: format!("warm state {hold} of {template}"),
        });
    }
    be.vbox_with(
        &ctx,
        os(&[
            "clonevm",
            hold.as_str(),
            "--snapshot",
            SNAP,
            "--options",
            "link",
            "--name",
            name.as_str(),
            "--register",
        ]),
        None,
        Some(be.opts.long_timeout),
    )
    .await?;
    let up: Result<()> = async {
        be.vbox(&ctx, saved_modify_args(be, &ctx, clone).await?)
            .await?;
        let mut spec = clone.clone();
        spec.disks.iter_mut().for_each(|d| d.owned = true);
        // Made from the holder's own snapshot: destroying the clone leaves the holder's alone.
        spec.labels
            .insert(crate::labels::CLONE_SNAPSHOT.into(), SNAP.into());
        be.store_spec(&ctx, &spec).await?;
        tracing::debug!(vm = %name, phase = "resume", "warm");
        be.start(name).await?;
        let log = be.console_path(name);
        let mut a = os(&["controlvm", name.as_str(), "changeuartmode1", "file"]);
        a.push(log.into_os_string());
        if let Err(e) = be.vbox(&ctx, a).await {
            tracing::warn!(vm = %name, error = %e, "the warm clone's serial log is not written");
        }
        Ok(())
    }
    .await;
    if let Err(e) = up {
        if be.state(name).await.ok() == Some(VmState::Running) {
            let _ = be.power_off(name).await;
        }
        let _ = be.undefine(name).await;
        return Err(e);
    }
    Ok(())
}

/// The settings a saved machine accepts (VBoxManage refuses the rest, "not mutable (state is
/// Saved)"): its inherited NAT rules replaced by the clone's, and its VRDE port.
async fn saved_modify_args(
    be: &VirtualBoxBackend,
    ctx: &Ctx,
    spec: &VmSpec,
) -> Result<Vec<OsString>> {
    let inherited = parse::forwards(&be.info(ctx, &spec.name).await?, 1)
        .map_err(|m| Error::backend(ctx.clone(), "VBoxManage", m))?;
    let mut a = os(&["modifyvm", spec.name.as_str()]);
    for f in inherited {
        a.extend(os(&["--natpf1", "delete", &f.name]));
    }
    a.extend(VirtualBoxBackend::forward_and_display_args(spec));
    Ok(a)
}

/// Remove `template`'s warm states other than `keep`; a holder that still has clones is
/// refused by undefine and stays.
pub(super) async fn discard(be: &VirtualBoxBackend, template: &VmName, keep: Option<&str>) {
    let ctx = Ctx::vm("discard warm states", template);
    let Ok(names) = be.vm_names(&ctx).await else {
        return;
    };
    for name in names.values() {
        let Some(key) = name.strip_prefix(HOLDER_PREFIX) else {
            continue;
        };
        if Some(key) == keep {
            continue;
        }
        let Ok(hold) = VmName::new(name) else {
            continue;
        };
        let Ok(Some(info)) = info_of(be, &hold).await else {
            continue;
        };
        if info.template != template.as_str() {
            continue;
        }
        if let Err(e) = be.undefine(&hold).await {
            tracing::debug!(vm = %hold, error = %e, "warm state kept");
        }
    }
}
