//! Lifecycle: list, status, define, up, start, stop, pause, resume, reset, save, destroy,
//! export, wait-ready, check.

use std::path::PathBuf;

use anyvm::{DestroyOptions, StopOptions};
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
    pub name: String,
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
        let UpArgs { name, timeout } = self;
        let c = &app.client;
        let m = app.machine(&name)?;
        let mut ready = m.ready.clone();
        if let Some(t) = timeout {
            ready.timeout = secs(t, "--timeout")?;
        }
        let spinner = crate::progress::Spinner::start(format!("bringing up {name}"));
        let res = c.up(m.spec.clone(), &ready).await;
        spinner.stop();
        let vm = res?;
        let forwards = vm.forwards().await?;
        app.out(
            json!({"name": name, "state": "running", "ready": true, "forwards": forwards}),
            || {
                let mut s = format!("{name}: running and ready");
                for f in &forwards {
                    s.push_str(&format!("\n  forward {f}"));
                }
                s
            },
        );
        Ok(0)
    }
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
