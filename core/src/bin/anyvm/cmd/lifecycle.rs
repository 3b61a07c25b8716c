//! Lifecycle: list, status, define, up, start, stop, pause, resume, reset, save, destroy,
//! export, wait-ready, check.

use std::path::PathBuf;

use anyvm::{DestroyOptions, Error, ReadySpec, StopOptions};
use clap::Args;
use serde_json::json;

use crate::app::{secs, App};

/// Arguments of `anyvm status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    pub name: String,
}

/// Arguments of `anyvm up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// Machines to bring up, at once (none: every machine in the config). A VM that is defined
    /// but not in the config is started and waited for with the default probes.
    pub names: Vec<String>,
    /// Override the readiness timeout from the config, in seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
}

/// Arguments of `anyvm define`.
#[derive(Args, Debug)]
pub struct DefineArgs {
    pub name: String,
}

/// Arguments of `anyvm start`.
#[derive(Args, Debug)]
pub struct StartArgs {
    pub name: String,
}

/// Arguments of `anyvm stop`.
#[derive(Args, Debug)]
pub struct StopArgs {
    pub name: String,
    #[arg(long)]
    pub force: bool,
    /// Seconds allowed for the graceful shutdown.
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
}

/// Arguments of `anyvm pause`.
#[derive(Args, Debug)]
pub struct PauseArgs {
    pub name: String,
}

/// Arguments of `anyvm resume`.
#[derive(Args, Debug)]
pub struct ResumeArgs {
    pub name: String,
}

/// Arguments of `anyvm reset`.
#[derive(Args, Debug)]
pub struct ResetArgs {
    pub name: String,
}

/// Arguments of `anyvm save`.
#[derive(Args, Debug)]
pub struct SaveArgs {
    pub name: String,
}

/// Arguments of `anyvm destroy`.
#[derive(Args, Debug)]
pub struct DestroyArgs {
    pub name: String,
    /// Destroy the VM's linked clones (and theirs) first.
    #[arg(long)]
    pub with_clones: bool,
}

/// Arguments of `anyvm export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    pub name: String,
    /// Output file, ending in .ova.
    pub path: PathBuf,
}

/// Arguments of `anyvm wait-ready`.
#[derive(Args, Debug)]
pub struct WaitReadyArgs {
    pub name: String,
    #[arg(long)]
    pub timeout: Option<f64>,
}

/// Arguments of `anyvm check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    pub profile: String,
    /// Seconds allowed per resource.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
}

pub async fn list(app: &App) -> anyvm::Result<u8> {
    let c = &app.client;
    let vms = c.list().await?;
    app.out(json!(vms), || {
        vms.iter()
            .map(|v| {
                format!(
                    "{:<24} {:<10}{}",
                    v.name,
                    v.state.to_string(),
                    if v.managed != Some(false) {
                        ""
                    } else {
                        " (not defined by anyvm)"
                    }
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    });
    Ok(0)
}

impl StatusArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let StatusArgs { name } = self;
        let c = &app.client;
        let st = c.status(&name).await?;
        app.out(json!(st), || {
            let mut s = format!("{name}: {}", st.state);
            for f in &st.forwards {
                s.push_str(&format!("\n  forward {f}"));
            }
            for sn in &st.snapshots {
                s.push_str(&format!(
                    "\n  snapshot {}{}",
                    sn.name,
                    if sn.current { " (current)" } else { "" }
                ));
            }
            s
        });
        Ok(0)
    }
}

impl DefineArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let DefineArgs { name } = self;
        let c = &app.client;
        let m = app.machine(&name)?;
        c.define(m.spec.clone()).await?;
        app.out(json!({"name": name, "defined": true}), || {
            format!("{name}: defined")
        });
        Ok(0)
    }
}

impl UpArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let UpArgs { names, timeout } = self;
        let timeout = timeout.map(|t| secs(t, "--timeout")).transpose()?;
        let one = names.len() == 1;
        let names = if names.is_empty() {
            let all: Vec<String> = app
                .client
                .config()
                .map(|c| c.machines.keys().cloned().collect())
                .unwrap_or_default();
            if all.is_empty() {
                return Err(Error::config(
                    None,
                    "machines",
                    "no machines to bring up: name them (anyvm up NAME ...) or list them in anyvm.toml",
                ));
            }
            all
        } else {
            names
        };
        let board = crate::progress::Board::start(&names);
        let ups = names.iter().enumerate().map(|(i, name)| {
            let board = &board;
            async move {
                let r = up_one(app, name, timeout, |s| board.step(i, s.to_string())).await;
                board.finish(i, r.is_ok());
                r
            }
        });
        let results = futures::future::join_all(ups).await;
        board.stop();
        let mut values = Vec::new();
        let mut lines = Vec::new();
        let mut failed = 0u8;
        for (name, r) in names.iter().zip(results) {
            match r {
                Ok(forwards) => {
                    let mut t = format!("{name}: running and ready");
                    for f in &forwards {
                        t.push_str(&format!("\n  forward {f}"));
                    }
                    lines.push(t);
                    values.push(
                        json!({"name": name, "state": "running", "ready": true, "forwards": forwards}),
                    );
                }
                // One machine: its error is the command's, as before.
                Err(e) if one => return Err(e),
                Err(e) => {
                    failed = 1;
                    eprintln!("anyvm: {name}: {e}");
                    values.push(json!({"name": name, "ready": false, "kind": e.kind(), "error": e.to_string()}));
                }
            }
        }
        if one {
            app.out(values.remove(0), || lines.remove(0));
        } else {
            app.out(json!(values), || lines.join("\n"));
        }
        Ok(failed)
    }
}

/// One machine of `up`: from the config, else a VM that exists, with the default probes.
async fn up_one(
    app: &App,
    name: &str,
    timeout: Option<std::time::Duration>,
    on_step: impl Fn(anyvm::UpStep) + Send + Sync,
) -> anyvm::Result<Vec<anyvm::PortForward>> {
    let configured = app.client.config().and_then(|c| c.machines.get(name));
    let vm = match configured {
        Some(m) => {
            let mut ready = m.ready.clone();
            if let Some(t) = timeout {
                ready.timeout = t;
            }
            app.client.up_with(m.spec.clone(), &ready, on_step).await?
        }
        None => {
            let vm = app.open(name).await.map_err(|e| match e {
                Error::NotFound { ctx, what } => Error::NotFound {
                    ctx,
                    what: format!(
                        "{what}; it is not in the config either, so anyvm cannot define it"
                    ),
                },
                e => e,
            })?;
            let mut ready = ReadySpec::default();
            if let Some(t) = timeout {
                ready.timeout = t;
            }
            vm.up_with(&ready, on_step).await?;
            vm
        }
    };
    vm.forwards().await
}

impl StartArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let StartArgs { name } = self;
        app.open(&name).await?.start().await?;
        app.out(json!({"name": name, "state": "running"}), || {
            format!("{name}: started")
        });
        Ok(0)
    }
}

impl StopArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let StopArgs {
            name,
            force,
            timeout,
        } = self;
        let vm = app.open(&name).await?;
        let spinner = crate::progress::Spinner::start(format!("stopping {name}"));
        let res = vm
            .stop(StopOptions {
                force,
                timeout: secs(timeout, "--timeout")?,
            })
            .await;
        spinner.stop();
        let outcome = res?;
        app.out(json!({"name": name, "outcome": outcome}), || {
            format!("{name}: stopped ({outcome:?})").to_lowercase()
        });
        Ok(0)
    }
}

impl PauseArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let PauseArgs { name } = self;
        app.open(&name).await?.pause().await?;
        app.out(json!({"name": name, "state": "paused"}), || {
            format!("{name}: paused")
        });
        Ok(0)
    }
}

impl ResumeArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let ResumeArgs { name } = self;
        app.open(&name).await?.resume().await?;
        app.out(json!({"name": name, "state": "running"}), || {
            format!("{name}: resumed")
        });
        Ok(0)
    }
}

impl CheckArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let CheckArgs { profile, timeout } = self;
        let cfg = app.client.config().ok_or_else(|| {
            anyvm::Error::invalid_arg("check", "profiles come from a config file (--config)")
        })?;
        let p = cfg.profile(&profile)?.clone();
        let vm = app.open(&p.machine).await?;
        let rep = anyvm::check::check(&vm, &p, secs(timeout, "--timeout")?).await?;
        app.out(json!(rep), || {
            let mut t = format!(
                "profile {} on {}: {}\n",
                rep.profile,
                rep.vm,
                if rep.ok {
                    "all resources usable"
                } else {
                    "NOT READY"
                }
            );
            for r in &rep.resources {
                t.push_str(&format!(
                    "  {:<6} {:<20} {:<12} {:<28} {}\n",
                    if r.ok { "ok" } else { "FAILED" },
                    r.name,
                    r.kind,
                    r.target,
                    r.detail
                ));
            }
            t.trim_end().to_string()
        });
        Ok(if rep.ok { 0 } else { 1 })
    }
}

impl ResetArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let ResetArgs { name } = self;
        app.open(&name).await?.reset().await?;
        app.out(json!({"name": name, "state": "running"}), || {
            format!("{name}: reset")
        });
        Ok(0)
    }
}

impl SaveArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let SaveArgs { name } = self;
        app.open(&name).await?.save_state().await?;
        app.out(json!({"name": name, "state": "saved"}), || {
            format!("{name}: saved")
        });
        Ok(0)
    }
}

impl DestroyArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let DestroyArgs { name, with_clones } = self;
        let clones = app
            .open(&name)
            .await?
            .destroy_with(DestroyOptions::default().with_clones(with_clones))
            .await?;
        app.out(
            json!({"name": name, "destroyed": true, "clones_destroyed": clones}),
            || {
                clones
                    .iter()
                    .map(|c| format!("{c}: destroyed (clone of {name})\n"))
                    .collect::<String>()
                    + &format!("{name}: destroyed")
            },
        );
        Ok(0)
    }
}

impl ExportArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let ExportArgs { name, path } = self;
        app.open(&name).await?.export_appliance(&path).await?;
        app.out(
            json!({"name": name, "exported": path.display().to_string()}),
            || format!("{name}: exported to {}", path.display()),
        );
        Ok(0)
    }
}

impl WaitReadyArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let WaitReadyArgs { name, timeout } = self;
        let vm = app.open(&name).await?;
        let mut spec = app.ready_spec(&name);
        if let Some(t) = timeout {
            spec.timeout = secs(t, "--timeout")?;
        }
        let spinner = crate::progress::Spinner::start(format!("waiting for {name}"));
        let res = vm.wait_ready(&spec).await;
        spinner.stop();
        let report = res?;
        app.out(json!(report), || {
            format!("{name}: ready after {:.2}s", report.elapsed.as_secs_f64())
        });
        Ok(0)
    }
}
