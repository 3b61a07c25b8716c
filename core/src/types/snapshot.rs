//! Snapshots, the clone graph and how removals treat dependent clones.

use serde::Serialize;

/// A snapshot as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// Seconds since the epoch, when known.
    pub created: Option<i64>,
    /// The VM state captured (running snapshots include memory).
    pub state: Option<String>,
    /// Whether the VM is at this snapshot now.
    pub current: bool,
    /// The snapshot it was taken on top of.
    pub parent: Option<String>,
}

/// One edge of the clone graph: `clone` is a linked clone of `base` (at `snapshot`, when the
/// backend ties clones to one) and cannot outlive the disks it shares with it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
pub struct CloneLink {
    /// The clone.
    pub clone: String,
    /// The VM whose disks it shares.
    pub base: String,
    /// The snapshot of `base` it was made at.
    pub snapshot: Option<String>,
}

/// The clones that depend on `base` (on its `snapshot`, when given), transitively, deepest first.
pub fn dependants_of(links: &[CloneLink], base: &str, snapshot: Option<&str>) -> Vec<String> {
    let mut seen: std::collections::BTreeSet<String> = std::iter::once(base.to_string()).collect();
    let mut level: Vec<String> = Vec::new();
    for l in links.iter().filter(|l| l.base == base) {
        if (snapshot.is_none() || l.snapshot.as_deref() == snapshot) && seen.insert(l.clone.clone())
        {
            level.push(l.clone.clone());
        }
    }
    let mut levels: Vec<Vec<String>> = Vec::new();
    while !level.is_empty() {
        let mut next = Vec::new();
        for l in links.iter().filter(|l| level.contains(&l.base)) {
            if seen.insert(l.clone.clone()) {
                next.push(l.clone.clone());
            }
        }
        levels.push(std::mem::replace(&mut level, next));
    }
    levels.into_iter().rev().flatten().collect()
}

/// How `destroy` (and `snapshot delete`) treat linked clones that depend on what is removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DestroyOptions {
    /// Destroy the dependent clones first (deepest first). Without it, dependants make the call
    /// fail up front, naming them, and nothing changes.
    pub with_clones: bool,
}

impl DestroyOptions {
    /// Also destroy dependent linked clones (deepest first) instead of refusing.
    pub fn with_clones(mut self, yes: bool) -> Self {
        self.with_clones = yes;
        self
    }
}
