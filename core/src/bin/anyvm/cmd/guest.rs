//! The guest: exec (output streamed live), cp, console, ssh-config.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyvm::{Error, ExecRequest, SshOptions, VmName};
use clap::Args;
use serde_json::json;

use crate::app::{secs, App};

/// Arguments of `anyvm exec`.
#[derive(Args, Debug)]
pub struct ExecArgs {
    pub name: String,
    /// KEY=VALUE, repeatable.
    #[arg(long = "env", short = 'e')]
    pub env: Vec<String>,
    #[arg(long)]
    pub cwd: Option<String>,
    /// Seconds before the guest program is killed.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    /// Pass this process's standard input to the program.
    #[arg(long)]
    pub stdin: bool,
    #[arg(last = true, required = true)]
    pub argv: Vec<String>,
}

/// Run `req`, writing its output to this process's stdout/stderr as the guest writes it.
/// Ctrl-C or SIGTERM kills the guest program (and waits for that) before anyvm exits with
/// 130 or 143: `Err(code)`.
async fn stream_to_terminal(
    vm: &anyvm::Vm,
    req: &ExecRequest,
) -> anyvm::Result<Result<anyvm::ExecOutput, u8>> {
    use tokio::signal::unix::{signal, SignalKind};
    let ctx = || anyvm::Ctx::vm("exec", vm.name());
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::io(ctx(), "SIGINT", e))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::io(ctx(), "SIGTERM", e))?;
    let mut s = vm.exec_stream(req).await?;
    loop {
        let code = tokio::select! {
            c = s.next() => match c {
                Some(c) => {
                    match c.stream {
                        anyvm::OutputStream::Stdout => {
                            let mut o = std::io::stdout().lock();
                            let _ = o.write_all(&c.data).and_then(|_| o.flush());
                        }
                        anyvm::OutputStream::Stderr => {
                            let _ = std::io::stderr().lock().write_all(&c.data);
                        }
                    }
                    continue;
                }
                None => break,
            },
            _ = int.recv() => 130,
            _ = term.recv() => 143,
        };
        s.cancel();
        let _ = s.wait().await;
        anyvm::wait_for_cleanups(std::time::Duration::from_secs(10));
        eprintln!("anyvm: interrupted: the guest program was killed");
        return Ok(Err(code));
    }
    s.wait().await.map(Ok)
}

/// Arguments of `anyvm cp`.
#[derive(Args, Debug)]
pub struct CpArgs {
    pub src: String,
    pub dst: String,
}

/// Arguments of `anyvm ssh-config`.
#[derive(Args, Debug)]
pub struct SshConfigArgs {
    pub name: String,
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub identity: Option<PathBuf>,
    #[arg(long, default_value_t = 22)]
    pub guest_port: u16,
}

/// Arguments of `anyvm console`.
#[derive(Args, Debug)]
pub struct ConsoleArgs {
    pub name: String,
}

impl ExecArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let ExecArgs {
            name,
            env,
            cwd,
            timeout,
            stdin,
            argv,
        } = self;
        let vm = app.open(&name).await?;
        let mut req = ExecRequest::from_argv(&argv)?.timeout(secs(timeout, "--timeout")?);
        for kv in env {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| Error::invalid_arg(format!("--env {kv:?}"), "expected KEY=VALUE"))?;
            req = req.env(k, v);
        }
        if let Some(d) = cwd {
            req = req.cwd(d);
        }
        if stdin {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| Error::io(anyvm::Ctx::new("read stdin"), "<stdin>", e))?;
            req = req.stdin(buf);
        }
        let out = if app.json {
            let out = vm.exec(&req).await?;
            app.out(json!(out), String::new);
            out
        } else {
            match stream_to_terminal(&vm, &req).await? {
                Ok(out) => out,
                Err(code) => return Ok(code),
            }
        };
        Ok(match (out.exit_code, out.signal) {
            (Some(code), _) => code.clamp(0, 255) as u8,
            (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
            _ => 1,
        })
    }
}

impl CpArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let CpArgs { src, dst } = self;
        let split = |s: &str| -> Option<(String, String)> {
            let (vm, path) = s.split_once(':')?;
            (path.starts_with('/') && VmName::new(vm).is_ok())
                .then(|| (vm.to_string(), path.to_string()))
        };
        let (n, dir) = match (split(&src), split(&dst)) {
            (Some((vm, g)), None) => (app.open(&vm).await?.copy_from(&g, &dst).await?, "from"),
            (None, Some((vm, g))) => (app.open(&vm).await?.copy_to(&src, &g).await?, "to"),
            _ => {
                return Err(Error::invalid_arg(
                    "cp",
                    "exactly one side must be VM:/absolute/path",
                ))
            }
        };
        app.out(json!({"bytes": n}), || {
            format!("copied {n} bytes ({dir} guest)")
        });
        Ok(0)
    }
}

impl SshConfigArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let SshConfigArgs {
            name,
            user,
            identity,
            guest_port,
        } = self;
        let _c = &app.client;
        let cred = app.client.config().and_then(|c| c.credentials(&name));
        let opts = SshOptions {
            user: user.or(cred.as_ref().map(|c| c.user.clone())),
            identity_file: identity.or(cred.and_then(|c| c.identity_file)),
            guest_port: Some(guest_port),
            alias: None,
        };
        let cfg = app.open(&name).await?.ssh_config(&opts).await?;
        app.out(json!(cfg), || cfg.stanza.trim_end().to_string());
        Ok(0)
    }
}

impl ConsoleArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let ConsoleArgs { name } = self;
        let p = app.open(&name).await?.console_log().await?;
        app.out(json!({"console_log": p}), || {
            p.map(|p| p.display().to_string())
                .unwrap_or_else(|| "(none)".into())
        });
        Ok(0)
    }
}
