//! Power states, listings and how a stop is asked for and how it ended.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::*;

/// A VM's power state, normalized across hypervisors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Running.
    Running,
    /// Paused: CPUs frozen, memory kept.
    Paused,
    /// Memory saved to disk (managed save / savestate / suspend).
    Saved,
    /// Powered off.
    ShutOff,
    /// Transitional: starting, stopping, saving, restoring.
    Busy,
    /// The guest or its hypervisor process crashed.
    Crashed,
    /// The hypervisor reports a state anyvm does not know.
    Unknown,
}

impl VmState {
    /// Whether the guest runs (not paused, off or crashed).
    pub fn is_running(self) -> bool {
        matches!(self, VmState::Running)
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Saved => "saved",
            VmState::ShutOff => "shut off",
            VmState::Busy => "busy",
            VmState::Crashed => "crashed",
            VmState::Unknown => "unknown",
        })
    }
}

/// What an `up` is doing, for progress displays ([`crate::Client::up_with`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpStep {
    /// Defining the VM from its spec.
    Defining,
    /// Another process is starting (or saving, snapshotting) it: waiting for that to settle.
    Settling,
    /// Starting it.
    Booting,
    /// Resuming it from pause.
    Resuming,
    /// Waiting for its readiness probes, described for a person ("the guest agent, ssh on
    /// :2222").
    Waiting(String),
}

impl fmt::Display for UpStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpStep::Defining => f.write_str("defining"),
            UpStep::Settling => f.write_str("waiting for another start of it to settle"),
            UpStep::Booting => f.write_str("booting"),
            UpStep::Resuming => f.write_str("resuming"),
            UpStep::Waiting(what) => write!(f, "waiting for {what}"),
        }
    }
}

/// One line of `list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmInfo {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: VmState,
    /// Whether anyvm defined the VM (and so knows its spec); `None` when the backend cannot
    /// tell without extra calls per VM.
    pub managed: Option<bool>,
}

/// Everything `anyvm status` shows, read in as few hypervisor calls as the backend allows
/// (one `showvminfo` on VirtualBox).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmStatus {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: VmState,
    /// The forwards in effect.
    pub forwards: Vec<PortForward>,
    /// Its snapshots.
    pub snapshots: Vec<SnapshotInfo>,
}

/// How to stop a VM.
#[derive(Debug, Clone, Copy)]
pub struct StopOptions {
    /// Time allowed for a graceful shutdown before forcing power off.
    pub timeout: Duration,
    /// Skip the graceful attempt.
    pub force: bool,
}

impl Default for StopOptions {
    fn default() -> Self {
        StopOptions {
            timeout: Duration::from_secs(60),
            force: false,
        }
    }
}

/// Which way a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopOutcome {
    /// It was already off.
    AlreadyOff,
    /// The guest shut down when asked.
    Graceful,
    /// The graceful request was ignored or too slow; power was cut.
    Forced,
}

impl StopOutcome {
    /// `already_off`, `graceful`, `forced`: the one spelling (JSON, Python, the CLI).
    pub fn as_str(self) -> &'static str {
        match self {
            StopOutcome::AlreadyOff => "already_off",
            StopOutcome::Graceful => "graceful",
            StopOutcome::Forced => "forced",
        }
    }
}

impl fmt::Display for StopOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
