//! The guest: exec (output streamed live), cp, console, ssh, ssh-config.

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

/// How `anyvm ssh` and `ssh-config` log in.
#[derive(Args, Debug)]
pub struct LoginArgs {
    /// Guest user (default: the machine's credentials, else root).
    #[arg(long)]
    pub user: Option<String>,
    /// Private key (default: the machine's credentials).
    #[arg(long)]
    pub identity: Option<PathBuf>,
    #[arg(long, default_value_t = 22)]
    pub guest_port: u16,
}

impl LoginArgs {
    /// The flags, else the machine's credentials.
    fn options(self, app: &App, name: &str) -> SshOptions {
        let cred = app.client.config().and_then(|c| c.credentials(name));
        SshOptions {
            user: self.user.or(cred.as_ref().map(|c| c.user.clone())),
            identity_file: self.identity.or(cred.and_then(|c| c.identity_file)),
            guest_port: Some(self.guest_port),
            alias: None,
        }
    }
}

/// Arguments of `anyvm ssh-config`.
#[derive(Args, Debug)]
pub struct SshConfigArgs {
    pub name: String,
    #[command(flatten)]
    pub login: LoginArgs,
}

/// Arguments of `anyvm ssh`.
#[derive(Args, Debug)]
pub struct SshArgs {
    pub name: String,
    #[command(flatten)]
    pub login: LoginArgs,
    /// Shell text for the guest's login shell to run, as with `ssh HOST 'TEXT'`.
    #[arg(long, conflicts_with = "argv")]
    pub command: Option<String>,
    /// Give the session a terminal even for a command.
    #[arg(short = 't', conflicts_with = "no_tty")]
    pub tty: bool,
    /// No terminal, even for a login.
    #[arg(short = 'T')]
    pub no_tty: bool,
    /// A program and its arguments, passed as they are (nothing in them is shell syntax).
    #[arg(last = true)]
    pub argv: Vec<String>,
}

/// Arguments of `anyvm console`.
#[derive(Args, Debug)]
pub struct ConsoleArgs {
    pub name: String,
    /// Print the serial log and keep printing what the guest writes, until Ctrl-C.
    #[arg(long, short = 'f', conflicts_with = "remote")]
    pub follow: bool,
    /// Print where a viewer reaches the guest's screen (VNC; RDP on VirtualBox).
    #[arg(long)]
    pub remote: bool,
}

/// Arguments of `anyvm screenshot`.
#[derive(Args, Debug)]
pub struct ScreenshotArgs {
    pub name: String,
    /// Where the PNG goes.
    pub out: PathBuf,
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
        let SshConfigArgs { name, login } = self;
        let opts = login.options(app, &name);
        let cfg = app.open(&name).await?.ssh_config(&opts).await?;
        app.out(json!(cfg), || cfg.stanza.trim_end().to_string());
        Ok(0)
    }
}

impl SshArgs {
    /// Replaces this process with `ssh`, so the terminal, signals and the exit code are the
    /// session's own (255: ssh itself failed).
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        use std::os::unix::process::CommandExt;
        let SshArgs {
            name,
            login,
            command,
            tty,
            no_tty,
            argv,
        } = self;
        let opts = login.options(app, &name);
        let login = app.open(&name).await?.ssh_login(&opts).await?;
        let remote = command.or_else(|| {
            (!argv.is_empty()).then(|| {
                argv.iter()
                    .map(|a| anyvm::ssh::shell_quote(a))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
        });
        let tty = match (tty, no_tty) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        };
        let ssh = login.argv(remote.as_deref(), tty)?;
        let _ = std::io::stdout().flush();
        let err = std::process::Command::new(&ssh[0]).args(&ssh[1..]).exec();
        Err(Error::io(anyvm::Ctx::vm("ssh", &name), &ssh[0], err))
    }
}

impl ConsoleArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let ConsoleArgs {
            name,
            follow,
            remote,
        } = self;
        let vm = app.open(&name).await?;
        if remote {
            let d = vm.remote_display().await?;
            app.out(json!({"name": name, "remote_display": d}), || match &d {
                Some(d) => d.url.clone(),
                None => format!(
                    "(none: {name} has no remote display; set console = {{ vnc = \"auto\" }} in its machine)"
                ),
            });
            return Ok(0);
        }
        let p = vm.console_log().await?;
        if !follow {
            app.out(json!({"console_log": p}), || {
                p.map(|p| p.display().to_string())
                    .unwrap_or_else(|| "(none)".into())
            });
            return Ok(0);
        }
        let Some(p) = p else {
            return Err(Error::InvalidState {
                ctx: anyvm::Ctx::vm("console --follow", &name),
                state: "its backend keeps no serial console log".into(),
                hint: None,
            });
        };
        follow_file(&name, &p).await
    }
}

/// Print `path` and then whatever is appended to it, until Ctrl-C or SIGTERM (exit 0). A log
/// that is replaced or truncated (the VM restarted) is read again from its start.
async fn follow_file(name: &str, path: &std::path::Path) -> anyvm::Result<u8> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::MetadataExt;
    use tokio::signal::unix::{signal, SignalKind};
    let ctx = || anyvm::Ctx::vm("console --follow", name);
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::io(ctx(), "SIGINT", e))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::io(ctx(), "SIGTERM", e))?;
    let mut file: Option<(std::fs::File, u64)> = None;
    let mut pos = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let meta = std::fs::metadata(path).ok();
        let replaced = match (&file, &meta) {
            (Some((_, ino)), Some(m)) => m.ino() != *ino || m.len() < pos,
            (None, Some(_)) => true,
            _ => false,
        };
        if replaced {
            if let (Ok(f), Some(m)) = (std::fs::File::open(path), &meta) {
                file = Some((f, m.ino()));
                pos = 0;
            }
        }
        if let Some((f, _)) = file.as_mut() {
            let _ = f.seek(SeekFrom::Start(pos));
            loop {
                let n = f.read(&mut buf).map_err(|e| Error::io(ctx(), path, e))?;
                if n == 0 {
                    break;
                }
                pos += n as u64;
                let mut o = std::io::stdout().lock();
                let _ = o.write_all(&buf[..n]).and_then(|_| o.flush());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
            _ = int.recv() => return Ok(0),
            _ = term.recv() => return Ok(0),
        }
    }
}

impl ScreenshotArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let ScreenshotArgs { name, out } = self;
        let shot = app.open(&name).await?.screenshot_to(&out).await?;
        app.out(
            json!({"name": name, "path": out, "width": shot.width, "height": shot.height, "bytes": shot.png.len()}),
            || format!("{name}: {}x{} screenshot in {}", shot.width, shot.height, out.display()),
        );
        Ok(0)
    }
}
