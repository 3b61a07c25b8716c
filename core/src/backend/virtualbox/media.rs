//! VirtualBox's media registry (`list -l hdds`) read as a graph: which VM's disks are
//! differencing children of which other VM's, and what a destroy must close or delete.
//!
//! Why the registry and not anyvm's own labels: VirtualBox refuses to remove media that another
//! VM's disks descend from, whoever made that clone, and a destroy that learns it half-way leaves
//! registered orphans. Reading the registry first lets a destroy refuse up front.

use std::collections::{BTreeMap, BTreeSet};

use super::parse::Medium;
use crate::types::CloneLink;

fn by_uuid(media: &[Medium]) -> BTreeMap<&str, &Medium> {
    media.iter().map(|m| (m.uuid.as_str(), m)).collect()
}

/// The registered ancestors of `m`, nearest first (bounded: a corrupt registry may loop).
fn ancestors<'a>(index: &BTreeMap<&str, &'a Medium>, m: &Medium) -> Vec<&'a Medium> {
    let mut out = Vec::new();
    let mut cur = m.parent.as_deref().and_then(|p| index.get(p).copied());
    while let Some(a) = cur {
        if out.len() >= 4096 {
            break;
        }
        out.push(a);
        cur = a.parent.as_deref().and_then(|p| index.get(p).copied());
    }
    out
}

fn used_by<'a>(m: &'a Medium, vm: &str) -> Option<&'a super::parse::MediumUser> {
    m.users.iter().find(|u| u.vm == vm)
}

/// Clone edges. A VM Y is a linked clone of X when a disk of Y descends from a medium X uses;
/// the nearest such ancestor names the base. One link per snapshot of X the clone pins: the
/// snapshots on that ancestor and on its parent (VirtualBox cannot merge either away while the
/// ancestor has the clone's disk as an extra child). `names` maps VM UUIDs to names.
pub fn clone_links(media: &[Medium], names: &BTreeMap<String, String>) -> Vec<CloneLink> {
    let index = by_uuid(media);
    let mut out: BTreeSet<CloneLink> = BTreeSet::new();
    for m in media {
        for y in &m.users {
            // The nearest ancestor another VM uses names the base.
            let Some((a, x)) = ancestors(&index, m)
                .into_iter()
                .find_map(|a| a.users.iter().find(|u| u.vm != y.vm).map(|x| (a, x)))
            else {
                continue;
            };
            let mut pinned: Vec<Option<String>> =
                x.snapshots.iter().map(|(n, _)| Some(n.clone())).collect();
            if let Some(xu) = a
                .parent
                .as_deref()
                .and_then(|p| index.get(p))
                .and_then(|parent| used_by(parent, &x.vm))
            {
                pinned.extend(xu.snapshots.iter().map(|(n, _)| Some(n.clone())));
            }
            if pinned.is_empty() {
                pinned.push(None);
            }
            let name = |u: &str| names.get(u).cloned().unwrap_or_else(|| u.to_string());
            for snapshot in pinned {
                out.insert(CloneLink {
                    clone: name(&y.vm),
                    base: name(&x.vm),
                    snapshot,
                });
            }
        }
    }
    out.into_iter().collect()
}

/// The media a VM uses (current state or any snapshot), leaves first: the order in which
/// they can be closed.
pub fn media_of<'a>(media: &'a [Medium], vm_uuid: &str) -> Vec<&'a Medium> {
    let index = by_uuid(media);
    let mut mine: Vec<&Medium> = media
        .iter()
        .filter(|m| used_by(m, vm_uuid).is_some())
        .collect();
    mine.sort_by_key(|m| std::cmp::Reverse(ancestors(&index, m).len()));
    mine
}

/// Whether a medium is still needed by someone after its VM is gone: it has users, or other
/// registered media have it as their parent.
pub fn still_needed(media: &[Medium], uuid: &str) -> bool {
    media
        .iter()
        .any(|m| (m.uuid == uuid && !m.users.is_empty()) || m.parent.as_deref() == Some(uuid))
}

#[cfg(test)]
mod tests {
    use super::super::parse::{media, MediumUser};
    use super::*;

    /// base (user disk sl6) with snapshots s1, s2; c1 cloned at s1; c2 cloned from c1 at cs1;
    /// c3 cloned at s2. Shapes as the real VBoxManage 7.2 prints them.
    const HDDS: &str = "\
UUID:           d0
Parent UUID:    base
Type:           normal (base)
Location:       /v/sl6.vdi
Storage format: VDI
In use by VMs:  base (UUID: B) [s1 (UUID: S1)]
Child UUIDs:    d1
                c1a
UUID:           d1
Parent UUID:    d0
Type:           normal (differencing)
Location:       /v/base/Snapshots/{d1}.vdi
Storage format: VDI
In use by VMs:  base (UUID: B) [s2 (UUID: S2)]
UUID:           d2
Parent UUID:    d1
Type:           normal (differencing)
Location:       /v/base/Snapshots/{d2}.vdi
Storage format: VDI
In use by VMs:  base (UUID: B)
UUID:           c1a
Parent UUID:    d0
Type:           normal (differencing)
Location:       /v/c1/Snapshots/{c1a}.vdi
Storage format: VDI
In use by VMs:  c1 (UUID: C1) [cs1 (UUID: CS1)]
UUID:           c1b
Parent UUID:    c1a
Type:           normal (differencing)
Location:       /v/c1/Snapshots/{c1b}.vdi
Storage format: VDI
In use by VMs:  c1 (UUID: C1)
UUID:           c2a
Parent UUID:    c1a
Type:           normal (differencing)
Location:       /v/c2/Snapshots/{c2a}.vdi
Storage format: VDI
In use by VMs:  c2 (UUID: C2)
UUID:           c3a
Parent UUID:    d1
Type:           normal (differencing)
Location:       /v/c3/Snapshots/{c3a}.vdi
Storage format: VDI
In use by VMs:  c3 (UUID: C3)
";

    fn names() -> BTreeMap<String, String> {
        [("B", "base"), ("C1", "c1"), ("C2", "c2"), ("C3", "c3")]
            .into_iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn link(c: &str, b: &str, s: Option<&str>) -> CloneLink {
        CloneLink {
            clone: c.into(),
            base: b.into(),
            snapshot: s.map(str::to_string),
        }
    }

    #[test]
    fn links_follow_the_nearest_foreign_ancestor() {
        let m = media(HDDS).unwrap();
        let l = clone_links(&m, &names());
        assert!(l.contains(&link("c1", "base", Some("s1"))), "{l:?}");
        assert!(l.contains(&link("c2", "c1", Some("cs1"))), "{l:?}");
        // c3 hangs off the diff taken at s2, whose parent s1 references: it pins both.
        assert!(l.contains(&link("c3", "base", Some("s2"))), "{l:?}");
        assert!(l.contains(&link("c3", "base", Some("s1"))), "{l:?}");
        // c2 is not a direct clone of base; base's own snapshot chain is no clone.
        assert!(!l.iter().any(|x| x.clone == "c2" && x.base == "base"));
        assert!(!l.iter().any(|x| x.clone == "base"));
        let all = crate::types::dependants_of(&l, "base", None);
        assert_eq!(
            all.first().map(String::as_str),
            Some("c2"),
            "deepest first: {all:?}"
        );
        assert_eq!(all.len(), 3);
        assert_eq!(
            crate::types::dependants_of(&l, "base", Some("s2")),
            vec!["c3".to_string()]
        );
    }

    #[test]
    fn media_of_a_vm_come_leaves_first() {
        let m = media(HDDS).unwrap();
        let mine: Vec<&str> = media_of(&m, "B").iter().map(|m| m.uuid.as_str()).collect();
        assert_eq!(mine, vec!["d2", "d1", "d0"]);
        assert!(still_needed(&m, "d0"));
        assert!(still_needed(&m, "c2a"));
        // Once c2 is unregistered its disk has neither users nor children.
        let mut gone = m.clone();
        gone.retain(|x| x.uuid != "c2a");
        assert!(!still_needed(&gone, "c2a"));
        let mut unused = m.clone();
        unused.iter_mut().for_each(|x| {
            if x.uuid == "c2a" {
                x.users.clear()
            }
        });
        assert!(!still_needed(&unused, "c2a"));
        let lone = vec![Medium {
            uuid: "x".into(),
            parent: None,
            location: "/x.vdi".into(),
            format: "VDI".into(),
            differencing: false,
            users: vec![MediumUser {
                vm: "V".into(),
                snapshots: vec![],
            }],
        }];
        assert!(still_needed(&lone, "x"));
        assert!(clone_links(&lone, &BTreeMap::new()).is_empty());
    }
}
