//! The guest: programs, files, agent pings, shared folders.

use crate::credentials::Credentials;
use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::SharedFolder;
use crate::types::{ExecOutput, ExecRequest, OutputSink, VmState};
use crate::util::command::ToolOutput;
use std::path::Path;
use std::time::Duration;

use super::*;

pub(super) async fn exec_streaming(
    be: &VirtualBoxBackend,
    vm: &VmName,
    req: &ExecRequest,
    sink: OutputSink,
) -> Result<ExecOutput> {
    let mut out = be.exec_into(vm, req, Some(sink)).await?;
    // The output went to the sink; what the call kept is only its tail.
    out.stdout.clear();
    out.stderr.clear();
    Ok(out)
}

pub(super) async fn copy_to(
    be: &VirtualBoxBackend,
    vm: &VmName,
    host: &Path,
    guest: &str,
    creds: Option<Credentials>,
    _progress: crate::events::CopyProgress,
) -> Result<u64> {
    let ctx = Ctx::vm(format!("copy {} to {guest}", host.display()), vm);
    let creds = VirtualBoxBackend::need_creds(&ctx, creds.as_ref())?;
    let (dir, base) = guest
        .rsplit_once('/')
        .ok_or_else(|| Error::invalid_arg("guest path", "must be absolute"))?;
    let dir = if dir.is_empty() { "/" } else { dir };
    // copyto keeps the source's file name: stage the file under the target name.
    let stage = tempfile::tempdir().map_err(|e| Error::io(ctx.clone(), std::env::temp_dir(), e))?;
    let staged = stage.path().join(base);
    let n = std::fs::copy(host, &staged).map_err(|e| Error::io(ctx.clone(), host, e))?;
    let mut rest = os(&["--target-directory", dir]);
    rest.push(staged.into_os_string());
    be.guestcontrol(
        &ctx,
        vm,
        "copyto",
        &creds,
        rest,
        GuestCall {
            stdin: None,
            timeout: be.opts.long_timeout,
            raw: false,
            sink: None,
        },
    )
    .await?;
    Ok(n)
}

pub(super) async fn copy_from(
    be: &VirtualBoxBackend,
    vm: &VmName,
    guest: &str,
    host: &Path,
    creds: Option<Credentials>,
    _progress: crate::events::CopyProgress,
) -> Result<u64> {
    let ctx = Ctx::vm(format!("copy {guest} to {}", host.display()), vm);
    let creds = VirtualBoxBackend::need_creds(&ctx, creds.as_ref())?;
    let base = guest.rsplit('/').next().unwrap_or("file");
    let stage = tempfile::tempdir().map_err(|e| Error::io(ctx.clone(), std::env::temp_dir(), e))?;
    let mut rest = os(&["--target-directory"]);
    rest.push(stage.path().as_os_str().to_owned());
    rest.push(guest.into());
    be.guestcontrol(
        &ctx,
        vm,
        "copyfrom",
        &creds,
        rest,
        GuestCall {
            stdin: None,
            timeout: be.opts.long_timeout,
            raw: false,
            sink: None,
        },
    )
    .await?;
    let staged = stage.path().join(base);
    let n = std::fs::copy(&staged, host).map_err(|e| Error::io(ctx.clone(), host, e))?;
    Ok(n)
}

/// Ready when the Guest Additions run level reaches the configured level; while it has not,
/// block in `guestproperty wait` (an event wait inside VirtualBox) instead of sleeping.
pub(super) async fn agent_ping(
    be: &VirtualBoxBackend,
    vm: &VmName,
    timeout: Duration,
) -> Result<()> {
    let ctx = Ctx::vm("guest additions", vm);
    let level = |out: ToolOutput| {
        parse::guest_property(&out.stdout_str())
            .and_then(|v| v.trim().parse::<u32>().ok())
            .unwrap_or(0)
    };
    let get = os(&["guestproperty", "get", vm.as_str(), RUN_LEVEL]);
    let now = level(be.vbox(&ctx, get.clone()).await?);
    if now >= be.opts.ready_run_level {
        return be.ready_properties(&ctx, vm).await;
    }
    let wait_ms = timeout
        .saturating_sub(Duration::from_millis(200))
        .as_millis()
        .max(100)
        .to_string();
    let wait = os(&[
        "guestproperty",
        "wait",
        vm.as_str(),
        RUN_LEVEL,
        "--timeout",
        &wait_ms,
    ]);
    // Exit 0 on timeout in older versions, 2 with a notice in newer: both mean "not yet".
    let _ = be
        .tool
        .run(
            &ctx,
            wait,
            None,
            Some(timeout + Duration::from_secs(5)),
            "VBoxManage guestproperty wait".into(),
        )
        .await?;
    let now = level(be.vbox(&ctx, get).await?);
    if now >= be.opts.ready_run_level {
        be.ready_properties(&ctx, vm).await
    } else {
        Err(Error::backend(
            ctx,
            "VBoxManage",
            format!("Guest Additions run level is {now}, waiting for {} (0 = not running, 1 = system, 2 = services, 3 = desktop)", be.opts.ready_run_level),
        ))
    }
}

pub(super) async fn shared_folder_add(
    be: &VirtualBoxBackend,
    vm: &VmName,
    folder: &SharedFolder,
) -> Result<()> {
    let ctx = Ctx::vm(format!("shared folder add {}", folder.name), vm);
    let mut a = os(&[
        "sharedfolder",
        "add",
        vm.as_str(),
        "--name",
        &folder.name,
        "--hostpath",
    ]);
    a.push(folder.host_path.as_os_str().to_owned());
    if folder.readonly {
        a.push("--readonly".into());
    }
    if folder.automount {
        a.push("--automount".into());
    }
    if be.state(vm).await? == VmState::Running {
        // A running VM only takes transient shares; they end with this power cycle.
        a.push("--transient".into());
    }
    be.vbox(&ctx, a).await.map(|_| ())
}

pub(super) async fn shared_folder_remove(
    be: &VirtualBoxBackend,
    vm: &VmName,
    name: &str,
) -> Result<()> {
    let ctx = Ctx::vm(format!("shared folder remove {name}"), vm);
    let mut a = os(&["sharedfolder", "remove", vm.as_str(), "--name", name]);
    if be.state(vm).await? == VmState::Running {
        a.push("--transient".into());
    }
    be.vbox(&ctx, a).await.map(|_| ())
}

pub(super) async fn shared_folders(
    be: &VirtualBoxBackend,
    vm: &VmName,
) -> Result<Vec<SharedFolder>> {
    let ctx = Ctx::vm("shared folders", vm);
    let kv = be.info(&ctx, vm).await?;
    Ok(kv
        .iter()
        .filter_map(|(k, v)| {
            let i = k.strip_prefix("SharedFolderNameMachineMapping")?;
            let path = parse::get(&kv, &format!("SharedFolderPathMachineMapping{i}"))?;
            Some(SharedFolder {
                name: v.clone(),
                host_path: path.into(),
                readonly: false,
                automount: false,
                guest_path: None,
            })
        })
        .collect())
}

impl VirtualBoxBackend {
    /// Write the password to a private file that lives for one call.
    pub(super) fn password_file(
        &self,
        ctx: &Ctx,
        creds: &Credentials,
    ) -> Result<Option<tempfile::NamedTempFile>> {
        let Some(src) = &creds.password else {
            return Ok(None);
        };
        let secret = src.resolve(ctx)?;
        let mut f = tempfile::Builder::new()
            .prefix(".anyvm-pw-")
            .tempfile()
            .map_err(|e| Error::io(ctx.clone(), std::env::temp_dir(), e))?;
        // NamedTempFile is created 0600.
        f.write_all(secret.expose().as_bytes())
            .and_then(|_| f.flush())
            .map_err(|e| Error::io(ctx.clone(), f.path(), e))?;
        Ok(Some(f))
    }

    pub(super) fn need_creds(ctx: &Ctx, creds: Option<&Credentials>) -> Result<Credentials> {
        crate::backend::require_credentials(ctx, creds, "VirtualBox guest control")
    }

    /// `guestcontrol VM SUBCMD --username U [--passwordfile F] ...rest`
    pub(super) async fn guestcontrol(
        &self,
        ctx: &Ctx,
        vm: &VmName,
        sub: &str,
        creds: &Credentials,
        rest: Vec<OsString>,
        call: GuestCall,
    ) -> Result<ToolOutput> {
        let pw = self.password_file(ctx, creds)?;
        let mut args = os(&["guestcontrol", vm.as_str(), sub, "--username", &creds.user]);
        if let Some(f) = &pw {
            args.push("--passwordfile".into());
            args.push(f.path().as_os_str().to_owned());
        }
        args.extend(rest);
        let display = format!("VBoxManage guestcontrol {vm} {sub}");
        let GuestCall {
            stdin,
            timeout,
            raw,
            sink,
        } = call;
        if raw {
            // Exit code is the guest program's: classify only VBoxManage's own error lines.
            let out = self
                .tool
                .run_into(ctx, args, stdin, Some(timeout), display, sink)
                .await?;
            if !errors::error_lines(&out.stderr_str()).is_empty() {
                return Err(errors::to_error(
                    ctx,
                    errors::classify(&out).expect("has error lines"),
                ));
            }
            Ok(out)
        } else {
            self.vbox_with(ctx, args, stdin, Some(timeout)).await
        }
    }

    /// `guestcontrol run`, its output forwarded to `sink` as VBoxManage relays it.
    pub(super) async fn exec_into(
        &self,
        vm: &VmName,
        req: &ExecRequest,
        sink: Option<OutputSink>,
    ) -> Result<ExecOutput> {
        let ctx = Ctx::vm(format!("exec {}", req.program), vm);
        let creds = Self::need_creds(&ctx, req.credentials.as_ref())?;
        let (major, _, _) = self.version().await?;
        let started = Instant::now();
        let mut rest: Vec<OsString> = Vec::new();
        let (exe, argv): (String, Vec<String>) = match (&req.cwd, major >= 7) {
            (Some(d), true) => {
                rest.push("--cwd".into());
                rest.push(d.into());
                (
                    req.program.clone(),
                    std::iter::once(req.program.clone())
                        .chain(req.args.iter().cloned())
                        .collect(),
                )
            }
            // 6.1 has no --cwd: a fixed prologue takes the directory as a parameter.
            (Some(d), false) => {
                let mut a = vec![
                    "sh".to_string(),
                    "-c".into(),
                    "cd -- \"$1\" || exit 127; shift; exec \"$@\"".into(),
                    "sh".into(),
                    d.clone(),
                    req.program.clone(),
                ];
                a.extend(req.args.iter().cloned());
                ("/bin/sh".into(), a)
            }
            (None, _) => (
                req.program.clone(),
                std::iter::once(req.program.clone())
                    .chain(req.args.iter().cloned())
                    .collect(),
            ),
        };
        rest.extend(os(&[
            "--exe",
            &exe,
            "--wait-stdout",
            "--wait-stderr",
            "--timeout",
        ]));
        // VBoxManage reads the limit as a 32-bit millisecond count (about 49 days); longer
        // limits are anyvm's own deadline alone.
        rest.push(
            req.timeout
                .as_millis()
                .min(u128::from(u32::MAX))
                .to_string()
                .into(),
        );
        for (k, v) in &req.env {
            rest.push("--putenv".into());
            rest.push(format!("{k}={v}").into());
        }
        rest.push("--".into());
        rest.extend(argv.into_iter().map(OsString::from));
        // VBoxManage's own deadline is the guest timeout; ours adds slack so its report arrives.
        let out = self
            .guestcontrol(
                &ctx,
                vm,
                "run",
                &creds,
                rest,
                GuestCall {
                    stdin: req.stdin.clone(),
                    timeout: req.timeout + Duration::from_secs(15),
                    raw: true,
                    sink,
                },
            )
            .await?;
        if started.elapsed() >= req.timeout {
            return Err(Error::Timeout {
                ctx,
                after: Some(req.timeout),
                what: format!("'{}' to exit", req.display_argv()),
            });
        }
        Ok(ExecOutput {
            exit_code: out.code,
            signal: None,
            stdout: out.stdout,
            stderr: out.stderr,
            duration: started.elapsed(),
            stdout_truncated: false,
            stderr_truncated: false,
        })
    }
}

/// How one `guestcontrol` call runs.
pub(super) struct GuestCall {
    pub(super) stdin: Option<Vec<u8>>,
    pub(super) timeout: Duration,
    /// The exit code is the guest program's: only VBoxManage's own error lines mean failure.
    pub(super) raw: bool,
    /// Forward the guest program's output here as VBoxManage relays it.
    pub(super) sink: Option<OutputSink>,
}
