//! Staging job files between host and guest. Files go through the backend's copy; directories
//! as one tar archive (host `tar`, guest `tar`), so a tree of many small files costs one copy.

use std::path::Path;
use std::time::Duration;

use crate::error::{Ctx, Error, Result};
use crate::types::{ExecOutput, ExecRequest};
use crate::util::command::ToolCommand;
use crate::vm::Vm;

const TAR_TIMEOUT: Duration = Duration::from_secs(3600);

async fn guest_sh(vm: &Vm, ctx: &Ctx, script: &str, args: &[&str]) -> Result<ExecOutput> {
    let req = ExecRequest::new("/bin/sh")
        .args(["-c", script, "anyvm-stage"])
        .args(args.iter().copied())
        .timeout(TAR_TIMEOUT);
    let out = vm.exec_internal("job stage", &req).await?;
    if out.success() {
        return Ok(out);
    }
    let reason = out.stderr_str().trim().to_string();
    if out.exit_code == Some(3) {
        return Err(Error::NotFound {
            ctx: ctx.clone(),
            what: reason,
        });
    }
    Err(Error::GuestCommand {
        ctx: ctx.clone(),
        program: "sh".into(),
        exit_code: out.exit_code,
        reason,
        stderr: out.stderr.into_boxed_slice(),
    })
}

async fn host_tar(ctx: &Ctx, args: Vec<std::ffi::OsString>) -> Result<()> {
    let out = ToolCommand::new("tar", args, TAR_TIMEOUT).run(ctx).await?;
    if out.code == Some(0) {
        return Ok(());
    }
    Err(Error::Io {
        ctx: ctx.clone(),
        path: "tar".into(),
        source: std::io::Error::other(out.stderr_str().trim().to_string()),
    })
}

fn scratch_name(vm: &Vm) -> String {
    format!("/tmp/.anyvm-stage-{}-{}.tar", vm.name(), rand_suffix())
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish() & 0xffff_ffff
}

/// Copy a host file or directory to `guest`, creating the guest's parent directories.
pub(super) async fn put(vm: &Vm, host: &Path, guest: &str) -> Result<u64> {
    let ctx = Ctx::vm(format!("stage in {} -> {guest}", host.display()), vm.name());
    let meta = std::fs::metadata(host).map_err(|e| Error::io(ctx.clone(), host, e))?;
    if !meta.is_dir() {
        guest_sh(vm, &ctx, "mkdir -p \"$(dirname \"$1\")\"", &[guest]).await?;
        return vm.copy_to(host, guest).await;
    }
    let tmp = tempfile::tempdir().map_err(|e| Error::io(ctx.clone(), std::env::temp_dir(), e))?;
    let archive = tmp.path().join("in.tar");
    host_tar(
        &ctx,
        vec![
            "-C".into(),
            host.into(),
            "-cf".into(),
            archive.clone().into(),
            ".".into(),
        ],
    )
    .await?;
    let remote = scratch_name(vm);
    let bytes = vm.copy_to(&archive, &remote).await?;
    guest_sh(
        vm,
        &ctx,
        "mkdir -p \"$2\" && tar -xf \"$1\" -C \"$2\"; rc=$?; rm -f \"$1\"; exit $rc",
        &[&remote, guest],
    )
    .await?;
    Ok(bytes)
}

/// Copy a guest file or directory to `host`, creating the host's parent directories. A missing
/// guest path is `NotFound` naming it.
pub(super) async fn get(vm: &Vm, guest: &str, host: &Path) -> Result<u64> {
    let ctx = Ctx::vm(
        format!("stage out {guest} -> {}", host.display()),
        vm.name(),
    );
    let remote = scratch_name(vm);
    let kind = guest_sh(
        vm,
        &ctx,
        "if [ -d \"$1\" ]; then tar -cf \"$2\" -C \"$1\" . && echo dir; \
         elif [ -e \"$1\" ]; then echo file; \
         else echo \"no such file or directory in the guest: $1\" >&2; exit 3; fi",
        &[guest, &remote],
    )
    .await?;
    if let Some(parent) = host.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(ctx.clone(), parent, e))?;
    }
    if kind.stdout_str().trim() != "dir" {
        return vm.copy_from(guest, host).await;
    }
    let tmp = tempfile::tempdir().map_err(|e| Error::io(ctx.clone(), std::env::temp_dir(), e))?;
    let archive = tmp.path().join("out.tar");
    let bytes = vm.copy_from(&remote, &archive).await;
    let _ = guest_sh(vm, &ctx, "rm -f \"$1\"", &[&remote]).await;
    let bytes = bytes?;
    std::fs::create_dir_all(host).map_err(|e| Error::io(ctx.clone(), host, e))?;
    host_tar(
        &ctx,
        vec![
            "-C".into(),
            host.into(),
            "--no-same-owner".into(),
            "-xf".into(),
            archive.into(),
        ],
    )
    .await?;
    Ok(bytes)
}
