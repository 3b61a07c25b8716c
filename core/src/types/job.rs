//! The phases of a transient job, shared by jobs and the event stream.

use serde::Serialize;

/// The steps of a job, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for a slot in a pool.
    Queue,
    /// Making the transient linked clone.
    Clone,
    /// Starting it.
    Boot,
    /// Waiting until the guest is ready.
    Ready,
    /// Checking the guest against its profile.
    Check,
    /// Copying inputs in.
    StageIn,
    /// Running the command.
    Run,
    /// Copying outputs out.
    StageOut,
    /// Removing the clone.
    Teardown,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self).ok();
        f.write_str(s.as_ref().and_then(|v| v.as_str()).unwrap_or("?"))
    }
}
