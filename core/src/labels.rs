//! The labels anyvm stores in a VM's spec, and what they mean. A leaf module: backends read them
//! (the clone graph), the facade writes them (clones), the job runner owns its own prefix.

/// The VM a linked clone was made from (the clone graph where the backend has no registry of its
/// own).
pub const CLONE_BASE: &str = "anyvm.clone/base";
/// The snapshot of the base a linked clone was made at, when one was named.
pub const CLONE_SNAPSHOT: &str = "anyvm.clone/snapshot";
/// Labels under this prefix describe a clone's place in the graph; they belong to one clone.
pub const CLONE_PREFIX: &str = "anyvm.clone/";
/// Labels under this prefix belong to the job runner (the owner of a transient clone).
pub const JOB_PREFIX: &str = "anyvm.job/";
/// On a backend that keeps a warm state in a VM of its own (VirtualBox): the template it was
/// made from.
pub const WARM_OF: &str = "anyvm.warm/template";
