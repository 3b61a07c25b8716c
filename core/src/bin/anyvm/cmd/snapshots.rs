//! Snapshots and linked clones.

use anyvm::{DestroyOptions, VmName};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::app::App;

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    Take {
        name: String,
        snapshot: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    Restore {
        name: String,
        snapshot: String,
    },
    /// Refuses while linked clones were made from the snapshot, unless --with-clones.
    Delete {
        name: String,
        snapshot: String,
        /// Destroy the clones made from this snapshot (and theirs) first.
        #[arg(long)]
        with_clones: bool,
    },
    List {
        name: String,
    },
}

/// Arguments of `anyvm clone`.
#[derive(Args, Debug)]
pub struct CloneArgs {
    pub base: String,
    pub new: String,
    #[arg(long, conflicts_with = "warm")]
    pub snapshot: Option<String>,
    /// Start the clone from the base's warm state (made first if needed): running and ready
    /// when this returns.
    #[arg(long)]
    pub warm: bool,
}

/// Arguments of `anyvm warm`.
#[derive(Args, Debug)]
pub struct WarmArgs {
    /// The template (stopped) whose ready state clones and jobs start from.
    pub template: String,
    /// Seconds the template's boot may take to become ready (default: its config's).
    #[arg(long)]
    pub timeout: Option<f64>,
}

/// The readiness a template's clones are waited for with: its machine config's, if it has one.
pub(crate) fn ready_of(
    app: &App,
    template: &str,
    timeout: Option<f64>,
) -> anyvm::Result<anyvm::ReadySpec> {
    let mut ready = app
        .machine(template)
        .map(|m| m.ready.clone())
        .unwrap_or_default();
    if let Some(t) = timeout {
        ready.timeout = crate::app::secs(t, "--timeout")?;
    }
    Ok(ready)
}

impl WarmArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let ready = ready_of(app, &self.template, self.timeout)?;
        let t = app.open(&self.template).await?;
        let spinner = crate::progress::Spinner::start(format!(
            "preparing the warm state of {}",
            self.template
        ));
        let r = t.warm(&ready).await;
        spinner.stop();
        let info = r?;
        app.out(serde_json::to_value(&info).unwrap_or_default(), || {
            format!(
                "{}: warm state {} ({} MiB memory, {} MiB disks{}) in {}",
                info.template,
                info.key,
                info.memory_bytes >> 20,
                info.disk_bytes >> 20,
                info.saved_in
                    .map(|d| format!(", saved in {:.1}s", d.as_secs_f64()))
                    .unwrap_or_default(),
                info.dir.display()
            )
        });
        Ok(0)
    }
}

impl SnapshotCmd {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        match self {
            SnapshotCmd::Take {
                name,
                snapshot,
                description,
            } => {
                app.open(&name)
                    .await?
                    .snapshot_take(&snapshot, &description)
                    .await?;
                app.out(json!({"name": name, "snapshot": snapshot}), || {
                    format!("{name}: snapshot {snapshot} taken")
                });
            }
            SnapshotCmd::Restore { name, snapshot } => {
                app.open(&name).await?.snapshot_restore(&snapshot).await?;
                app.out(json!({"name": name, "snapshot": snapshot}), || {
                    format!("{name}: restored {snapshot}")
                });
            }
            SnapshotCmd::Delete {
                name,
                snapshot,
                with_clones,
            } => {
                app.open(&name)
                    .await?
                    .snapshot_delete_with(
                        &snapshot,
                        DestroyOptions::default().with_clones(with_clones),
                    )
                    .await?;
                app.out(json!({"name": name, "snapshot": snapshot}), || {
                    format!("{name}: deleted {snapshot}")
                });
            }
            SnapshotCmd::List { name } => {
                let l = app.open(&name).await?.snapshots().await?;
                app.out(json!(l), || {
                    l.iter()
                        .map(|s| format!("{}{}", s.name, if s.current { " (current)" } else { "" }))
                        .collect::<Vec<_>>()
                        .join("\n")
                });
            }
        }
        Ok(0)
    }
}

impl CloneArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let c = &app.client;
        let CloneArgs {
            base,
            new,
            snapshot,
            warm,
        } = self;
        let new_name = VmName::new(new)?;
        let b = c.vm(&base).await?;
        let vm = if warm {
            b.clone_warm(&new_name, &ready_of(app, &base, None)?)
                .await?
        } else {
            b.clone_linked(&new_name, snapshot.as_deref()).await?
        };
        let f = vm.forwards().await?;
        app.out(
            json!({"name": new_name, "base": base, "forwards": f}),
            || {
                if warm {
                    format!("{new_name}: warm clone of {base}, running and ready")
                } else {
                    format!("{new_name}: linked clone of {base}")
                }
            },
        );
        Ok(0)
    }
}
