//! `anyvm gc`: remove job clones whose owner died (SIGKILL, node crash, reboot), and the port
//! leases and host-side share mounts of VMs that are gone.

use serde::Serialize;

use super::owner::{Liveness, Owner};
use crate::client::Client;
use crate::error::Result;
use crate::ports::Lease;

/// What gc did with one clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GcAction {
    /// Removed.
    Removed,
    /// Dry run: would have been removed.
    WouldRemove,
    /// Kept: its owner lives, or another host owns it.
    Kept,
    /// Removing it failed (`error` says why).
    Failed,
}

/// One job clone gc looked at.
#[derive(Debug, Clone, Serialize)]
pub struct GcEntry {
    /// The clone.
    pub vm: String,
    /// The process that made it.
    pub owner: Owner,
    /// Whether that process still runs.
    pub liveness: Liveness,
    /// What gc did.
    pub action: GcAction,
    /// Why removing failed.
    pub error: Option<String>,
}

/// What one gc run found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Every job clone looked at.
    pub clones: Vec<GcEntry>,
    /// Port leases of VMs that no longer exist, given back.
    pub leases_released: Vec<Lease>,
    /// What the backend kept on the host for VMs that are gone (share mounts, clone disks,
    /// frozen bases), released or, on a dry run, to release.
    pub host_state_released: Vec<crate::backend::Leftover>,
    /// Why part of the host state was not swept this time (run gc again).
    pub host_state_skipped: Option<String>,
}

impl GcReport {
    /// Clones removed.
    pub fn removed(&self) -> usize {
        self.clones
            .iter()
            .filter(|e| e.action == GcAction::Removed)
            .count()
    }
}

/// Find job clones on `client`'s backend and destroy those whose owner is dead. Clones owned by
/// live processes or by other hosts are kept and reported.
pub async fn gc(client: &Client, dry_run: bool) -> Result<GcReport> {
    let mut report = GcReport::default();
    let vms = client.list().await?;
    for info in &vms {
        if info.managed == Some(false) {
            continue;
        }
        let Ok(vm) = client.vm(&info.name).await else {
            continue; // removed meanwhile
        };
        let Some(owner) = vm
            .spec()
            .await
            .ok()
            .flatten()
            .and_then(|s| Owner::from_labels(&s.labels))
        else {
            continue;
        };
        let liveness = owner.liveness();
        let (action, error) = match (liveness, dry_run) {
            (Liveness::Dead, true) => (GcAction::WouldRemove, None),
            (Liveness::Dead, false) => match vm.destroy().await {
                Ok(()) => (GcAction::Removed, None),
                Err(e) if e.kind() == crate::ErrorKind::NotFound => (GcAction::Removed, None),
                Err(e) => (GcAction::Failed, Some(e.to_string())),
            },
            _ => (GcAction::Kept, None),
        };
        if action == GcAction::Removed {
            tracing::info!(vm = %info.name, pid = owner.pid, "removed orphaned job clone");
        }
        report.clones.push(GcEntry {
            vm: info.name.clone(),
            owner,
            liveness,
            action,
            error,
        });
    }
    let names: Vec<String> = client.list().await?.into_iter().map(|i| i.name).collect();
    if !dry_run {
        report.leases_released = client
            .ports()
            .release_stale(&client.backend().uri(), |vm| names.iter().any(|n| n == vm))?;
    }
    let sweep = client
        .backend()
        .release_stale_host_state(&names, dry_run)
        .await?;
    report.host_state_released = sweep.released;
    report.host_state_skipped = sweep.skipped;
    Ok(report)
}
