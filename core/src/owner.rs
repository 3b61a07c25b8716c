//! Who owns a VM anyvm made for a while (a job clone, a warm state being prepared), and
//! whether that owner still lives.
//!
//! A pid alone is not an identity (pids are reused, hosts reboot), so a clone records the
//! owner's host, the kernel boot id and the process start time next to the pid. A clone is an
//! orphan when its owner ran on this host and that exact process is gone.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::labels::JOB_PREFIX as LABEL_PREFIX;

/// Label: the job id of a job clone.
pub const LABEL_JOB: &str = "anyvm.job/id";
/// Label: the owning process's pid.
pub const LABEL_PID: &str = "anyvm.job/owner-pid";
/// Label: the owning host.
pub const LABEL_HOST: &str = "anyvm.job/owner-host";
/// Label: that host's boot id (a reboot kills every owner).
pub const LABEL_BOOT: &str = "anyvm.job/owner-boot";
/// Label: the owner's start time, so a reused pid does not pass for it.
pub const LABEL_START: &str = "anyvm.job/owner-start";
/// Label: the owning user.
pub const LABEL_USER: &str = "anyvm.job/owner-user";
/// Label: when the clone was made (seconds since the epoch).
pub const LABEL_STARTED_AT: &str = "anyvm.job/started-at";
/// Label: the template the clone was made from.
pub const LABEL_TEMPLATE: &str = "anyvm.job/template";

/// A process, identified so that a reused pid does not pass for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Owner {
    /// Its pid.
    pub pid: u32,
    /// Its host name.
    pub host: String,
    /// The host's boot id.
    pub boot_id: String,
    /// Start time in clock ticks after boot (`/proc/PID/stat` field 22).
    pub start_ticks: u64,
    /// The user it runs as.
    pub user: String,
}

/// What `anyvm gc` concluded about an owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    /// It still runs.
    Alive,
    /// It is gone.
    Dead,
    /// Owned from another host: this host cannot tell.
    Foreign,
}

impl Owner {
    /// This process.
    pub fn current() -> Owner {
        let pid = std::process::id();
        Owner {
            pid,
            host: hostname(),
            boot_id: boot_id(),
            start_ticks: start_ticks(pid).unwrap_or(0),
            user: std::env::var("USER")
                .or_else(|_| std::env::var("LOGNAME"))
                .unwrap_or_else(|_| unsafe { libc::geteuid() }.to_string()),
        }
    }

    /// The labels that record this owner on a clone.
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_PID.to_string(), self.pid.to_string()),
            (LABEL_HOST.to_string(), self.host.clone()),
            (LABEL_BOOT.to_string(), self.boot_id.clone()),
            (LABEL_START.to_string(), self.start_ticks.to_string()),
            (LABEL_USER.to_string(), self.user.clone()),
        ])
    }

    /// The owner recorded in a VM's labels; `None` for VMs no job made.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Option<Owner> {
        if !labels.keys().any(|k| k.starts_with(LABEL_PREFIX)) {
            return None;
        }
        Some(Owner {
            pid: labels.get(LABEL_PID)?.parse().ok()?,
            host: labels.get(LABEL_HOST)?.clone(),
            boot_id: labels.get(LABEL_BOOT).cloned().unwrap_or_default(),
            start_ticks: labels.get(LABEL_START)?.parse().ok()?,
            user: labels.get(LABEL_USER).cloned().unwrap_or_default(),
        })
    }

    /// Whether this owner still runs, as far as this host can tell.
    pub fn liveness(&self) -> Liveness {
        if self.host != hostname() {
            return Liveness::Foreign;
        }
        if self.boot_id != boot_id() {
            return Liveness::Dead;
        }
        match start_ticks(self.pid) {
            Some(t) if t == self.start_ticks => Liveness::Alive,
            _ => Liveness::Dead,
        }
    }
}

/// This host's name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub(crate) use crate::util::process::start_ticks;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_process_is_alive_and_round_trips_through_labels() {
        let me = Owner::current();
        assert!(me.start_ticks > 0);
        let back = Owner::from_labels(&me.labels()).unwrap();
        assert_eq!(back, me);
        assert_eq!(back.liveness(), Liveness::Alive);
    }

    #[test]
    fn reused_pid_dead_pid_and_other_hosts() {
        let me = Owner::current();
        let reused = Owner {
            start_ticks: me.start_ticks + 1,
            ..me.clone()
        };
        assert_eq!(reused.liveness(), Liveness::Dead);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let gone = Owner { pid, ..me.clone() };
        assert_eq!(gone.liveness(), Liveness::Dead);
        let rebooted = Owner {
            boot_id: "00000000-0000-0000-0000-000000000000".into(),
            ..me.clone()
        };
        assert_eq!(rebooted.liveness(), Liveness::Dead);
        let foreign = Owner {
            host: "elsewhere.example".into(),
            ..me
        };
        assert_eq!(foreign.liveness(), Liveness::Foreign);
    }

    #[test]
    fn labels_without_owner_are_not_jobs() {
        assert_eq!(Owner::from_labels(&BTreeMap::new()), None);
        let other = BTreeMap::from([("team".to_string(), "mc".to_string())]);
        assert_eq!(Owner::from_labels(&other), None);
    }
}
