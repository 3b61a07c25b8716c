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
    #[arg(long)]
    pub snapshot: Option<String>,
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
        } = self;
        let new_name = VmName::new(new)?;
        let vm = c
            .vm(&base)
            .await?
            .clone_linked(&new_name, snapshot.as_deref())
            .await?;
        let f = vm.forwards().await?;
        app.out(
            json!({"name": new_name, "base": base, "forwards": f}),
            || format!("{new_name}: linked clone of {base}"),
        );
        Ok(0)
    }
}
