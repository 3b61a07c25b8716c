//! The guest: programs, files, agent pings, shared folders.

use crate::credentials::Credentials;
use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::{ExecOutput, ExecRequest, SharedFolder};
use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use super::*;

pub(super) async fn exec(be: &VmwareBackend, vm: &VmName, req: &ExecRequest) -> Result<ExecOutput> {
    let ctx = Ctx::vm(format!("exec {}", req.program), vm);
    let creds = VmwareBackend::need_creds(&ctx, req.credentials.as_ref())?;
    let e = be.entry(&ctx, vm)?;
    let started = Instant::now();
    // vmrun returns no output: the guest writes stdout/stderr to files anyvm copies back.
    let (out_f, err_f) = (
        VmwareBackend::temp_name("out"),
        VmwareBackend::temp_name("err"),
    );
    let in_f = match &req.stdin {
        Some(data) => {
            let f = VmwareBackend::temp_name("in");
            let host = tempfile::NamedTempFile::new()
                .map_err(|err| Error::io(ctx.clone(), std::env::temp_dir(), err))?;
            std::fs::write(host.path(), data)
                .map_err(|err| Error::io(ctx.clone(), host.path(), err))?;
            be.copy_to(
                vm,
                host.path(),
                &f,
                Some(creds.clone()),
                crate::events::CopyProgress::none(),
            )
            .await?;
            Some(f)
        }
        None => None,
    };
    let mut args: Vec<OsString> = vec![
        e.vmx.clone().into(),
        "/bin/sh".into(),
        "-c".into(),
        EXEC_SCRIPT.into(),
        "anyvm".into(),
    ];
    args.push(out_f.clone().into());
    args.push(err_f.clone().into());
    args.push(in_f.clone().unwrap_or_else(|| "/dev/null".into()).into());
    args.push(req.cwd.clone().unwrap_or_default().into());
    if !req.env.is_empty() {
        args.push("env".into());
        args.extend(
            req.env
                .iter()
                .map(|(k, v)| OsString::from(format!("{k}={v}"))),
        );
    }
    args.push(req.program.clone().into());
    args.extend(req.args.iter().map(OsString::from));
    let run = be
        .vmrun_auth(
            &ctx,
            "runProgramInGuest",
            args,
            Some(req.timeout),
            Some(&creds),
            true,
        )
        .await;
    let run = match run {
        Err(Error::Timeout { .. }) => {
            return Err(Error::Timeout {
                ctx,
                after: Some(req.timeout),
                what: format!("'{}' to exit (vmrun killed)", req.display_argv()),
            })
        }
        other => other?,
    };
    let exit_code = parse::guest_exit_code(&run.stdout_str()).unwrap_or(0);
    let stage =
        tempfile::tempdir().map_err(|err| Error::io(ctx.clone(), std::env::temp_dir(), err))?;
    let (so, se) = (stage.path().join("out"), stage.path().join("err"));
    let fetched = async {
        be.copy_from(vm, &out_f, &so, Some(creds.clone()), Default::default())
            .await?;
        be.copy_from(vm, &err_f, &se, Some(creds.clone()), Default::default())
            .await
    }
    .await;
    for f in [Some(out_f), Some(err_f), in_f].into_iter().flatten() {
        let _ = be
            .vmrun_auth(
                &ctx,
                "deleteFileInGuest",
                vec![e.vmx.clone().into(), f.into()],
                None,
                Some(&creds),
                false,
            )
            .await;
    }
    fetched?;
    Ok(ExecOutput {
        exit_code: Some(exit_code),
        signal: None,
        stdout: std::fs::read(&so).map_err(|err| Error::io(ctx.clone(), &so, err))?,
        stderr: std::fs::read(&se).map_err(|err| Error::io(ctx.clone(), &se, err))?,
        duration: started.elapsed(),
        stdout_truncated: false,
        stderr_truncated: false,
    })
}

pub(super) async fn copy_to(
    be: &VmwareBackend,
    vm: &VmName,
    host: &Path,
    guest: &str,
    creds: Option<Credentials>,
    _progress: crate::events::CopyProgress,
) -> Result<u64> {
    let ctx = Ctx::vm(format!("copy {} to {guest}", host.display()), vm);
    let creds = VmwareBackend::need_creds(&ctx, creds.as_ref())?;
    let e = be.entry(&ctx, vm)?;
    let n = std::fs::metadata(host)
        .map_err(|err| Error::io(ctx.clone(), host, err))?
        .len();
    let args = vec![e.vmx.into(), host.into(), guest.into()];
    be.vmrun_auth(
        &ctx,
        "copyFileFromHostToGuest",
        args,
        Some(be.opts.long_timeout),
        Some(&creds),
        false,
    )
    .await?;
    Ok(n)
}

pub(super) async fn copy_from(
    be: &VmwareBackend,
    vm: &VmName,
    guest: &str,
    host: &Path,
    creds: Option<Credentials>,
    _progress: crate::events::CopyProgress,
) -> Result<u64> {
    let ctx = Ctx::vm(format!("copy {guest} to {}", host.display()), vm);
    let creds = VmwareBackend::need_creds(&ctx, creds.as_ref())?;
    let e = be.entry(&ctx, vm)?;
    // copyFileFromGuestToHost says only "A file was not found", which could be either side.
    let exists = be
        .vmrun_auth(
            &ctx,
            "fileExistsInGuest",
            vec![e.vmx.clone().into(), guest.into()],
            None,
            Some(&creds),
            false,
        )
        .await?;
    if exists.stdout_str().contains("does not exist") {
        return Err(Error::NotFound {
            ctx,
            what: format!("guest file {guest}"),
        });
    }
    let args = vec![e.vmx.into(), guest.into(), host.into()];
    be.vmrun_auth(
        &ctx,
        "copyFileFromGuestToHost",
        args,
        Some(be.opts.long_timeout),
        Some(&creds),
        false,
    )
    .await?;
    Ok(std::fs::metadata(host)
        .map_err(|err| Error::io(ctx.clone(), host, err))?
        .len())
}

/// Ready when VMware Tools report "running".
pub(super) async fn agent_ping(be: &VmwareBackend, vm: &VmName, timeout: Duration) -> Result<()> {
    let ctx = Ctx::vm("vmware tools", vm);
    let e = be.entry(&ctx, vm)?;
    let out = be
        .vmrun(
            &ctx,
            "checkToolsState",
            vec![e.vmx.clone().into()],
            Some(timeout),
        )
        .await?;
    match out.stdout_str().trim() {
        "running" => {
            for var in &be.opts.ready_guest_vars {
                let args = vec![e.vmx.clone().into(), "guestVar".into(), var.into()];
                let v = be.vmrun(&ctx, "readVariable", args, Some(timeout)).await?;
                if v.stdout_str().trim().is_empty() {
                    return Err(Error::backend(
                        ctx,
                        "vmrun",
                        format!("guest variable {var} is not set yet"),
                    ));
                }
            }
            Ok(())
        }
        s => Err(Error::backend(
            ctx,
            "vmrun",
            format!("VMware Tools state is {s:?}, waiting for \"running\""),
        )),
    }
}

pub(super) async fn shared_folder_add(
    be: &VmwareBackend,
    vm: &VmName,
    folder: &SharedFolder,
) -> Result<()> {
    let ctx = Ctx::vm(format!("shared folder add {}", folder.name), vm);
    let e = be.entry(&ctx, vm)?;
    let vmx: OsString = e.vmx.into();
    be.vmrun(&ctx, "enableSharedFolders", vec![vmx.clone()], None)
        .await?;
    be.vmrun(
        &ctx,
        "addSharedFolder",
        vec![
            vmx.clone(),
            folder.name.clone().into(),
            folder.host_path.clone().into(),
        ],
        None,
    )
    .await?;
    let mode = if folder.readonly {
        "readonly"
    } else {
        "writable"
    };
    let args = vec![
        vmx,
        folder.name.clone().into(),
        folder.host_path.clone().into(),
        mode.into(),
    ];
    be.vmrun(&ctx, "setSharedFolderState", args, None)
        .await
        .map(|_| ())
}

pub(super) async fn shared_folder_remove(
    be: &VmwareBackend,
    vm: &VmName,
    name: &str,
) -> Result<()> {
    let ctx = Ctx::vm(format!("shared folder remove {name}"), vm);
    let e = be.entry(&ctx, vm)?;
    be.vmrun(
        &ctx,
        "removeSharedFolder",
        vec![e.vmx.into(), name.into()],
        None,
    )
    .await
    .map(|_| ())
}
