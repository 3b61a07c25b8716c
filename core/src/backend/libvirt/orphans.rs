//! Files an interrupted anyvm leaves in the images dir, and the lock that tells them apart
//! from a clone in progress.
//!
//! A clone writes files before libvirt knows the domain (a frozen base, then the overlay), and a
//! destroy removes the domain before its files. A process killed in between (SIGKILL from a
//! batch system, a node's OOM killer) leaves files no domain names. Cloners and destroyers hold
//! a shared `flock` on the images dir while such files exist; gc takes it exclusively, so what it
//! finds without a domain is really orphaned. The kernel drops a killed process's lock.
//!
//! Only for a local libvirt: a remote host's images dir is not locked nor swept.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backend::{Leftover, LeftoverKind};
use crate::error::{Ctx, Error, Result};
use crate::name::VmName;

const LOCK_FILE: &str = ".anyvm.lock";

/// A held lock on the images dir (none for a remote host); released when dropped.
pub(super) struct ImagesLock(#[allow(dead_code)] Option<std::fs::File>);

impl ImagesLock {
    /// Shared: clones and destroys run side by side. Waits while gc sweeps (briefly).
    pub async fn shared(ctx: &Ctx, dir: &Path, local: bool, wait: Duration) -> Result<Self> {
        match Self::take(ctx, dir, local, true, wait).await? {
            Some(l) => Ok(l),
            None => Err(Error::Busy {
                ctx: ctx.clone(),
                reason: format!(
                    "{} stayed locked for {wait:?} (an 'anyvm gc' sweeping it?)",
                    dir.display()
                ),
            }),
        }
    }

    /// Exclusive, for gc: `None` when clones kept it busy for `wait`.
    pub async fn exclusive(ctx: &Ctx, dir: &Path, wait: Duration) -> Result<Option<Self>> {
        Self::take(ctx, dir, true, false, wait).await
    }

    async fn take(
        ctx: &Ctx,
        dir: &Path,
        local: bool,
        shared: bool,
        wait: Duration,
    ) -> Result<Option<Self>> {
        if !local {
            return Ok(Some(ImagesLock(None)));
        }
        let f =
            crate::util::file_lock::lock_within(ctx, &dir.join(LOCK_FILE), shared, wait).await?;
        Ok(f.map(|f| ImagesLock(Some(f))))
    }
}

/// The backing file a qcow2 image names in its header, if any (read from the header itself:
/// no qemu-img process per file).
pub(super) fn qcow2_backing(path: &Path) -> Option<PathBuf> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = [0u8; 20];
    f.read_exact(&mut h).ok()?;
    if &h[..4] != b"QFI\xfb" {
        return None;
    }
    let off = u64::from_be_bytes(h[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(h[16..20].try_into().ok()?) as usize;
    if off == 0 || len == 0 || len > 4096 {
        return None;
    }
    let mut name = vec![0u8; len];
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(off)).ok()?;
    f.read_exact(&mut name).ok()?;
    let p = PathBuf::from(String::from_utf8(name).ok()?);
    Some(if p.is_relative() {
        path.parent()?.join(p)
    } else {
        p
    })
}

/// Every `<source file=…>` in a domain's XML (disks and their backing chains).
pub(super) fn disk_sources(xml: &str) -> Vec<PathBuf> {
    let mut r = quick_xml::Reader::from_str(xml);
    let mut out = Vec::new();
    loop {
        match r.read_event() {
            Ok(quick_xml::events::Event::Start(e)) | Ok(quick_xml::events::Event::Empty(e))
                if e.name().as_ref() == b"source" =>
            {
                if let Some(Ok(a)) = e
                    .attributes()
                    .find(|a| a.as_ref().is_ok_and(|a| a.key.as_ref() == b"file"))
                {
                    if let Ok(v) = a.unescape_value() {
                        out.push(PathBuf::from(v.into_owned()));
                    }
                }
            }
            Ok(quick_xml::events::Event::Eof) | Err(_) => return out,
            _ => {}
        }
    }
}

/// What a file in the images dir is, by the names anyvm gives them.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ImageFile {
    /// `VM-N.qcow2`: a clone's overlay.
    Overlay(String),
    /// `BASE+SNAPSHOT+STAMP+N.base.qcow2`; `snapshot` empty for a stopped VM's current disks.
    Frozen { base: String, snapshot: String },
    /// `….tmp`: qemu-img was writing it.
    Partial,
    /// Anything else (the lock, a user's file): never touched.
    Other,
}

pub(super) fn classify(file: &str) -> ImageFile {
    if file.ends_with(".tmp") {
        return ImageFile::Partial;
    }
    if let Some(stem) = file.strip_suffix(".base.qcow2") {
        let parts: Vec<&str> = stem.split('+').collect();
        if parts.len() == 4 {
            return ImageFile::Frozen {
                base: parts[0].into(),
                snapshot: parts[1].into(),
            };
        }
        return ImageFile::Other;
    }
    if let Some((vm, n)) = file.strip_suffix(".qcow2").and_then(|s| s.rsplit_once('-')) {
        if !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) && VmName::new(vm).is_ok() {
            return ImageFile::Overlay(vm.into());
        }
    }
    ImageFile::Other
}

/// The orphans among `files` (names in `dir`): overlays and frozen bases no domain uses, frozen
/// bases of a base that is gone, partial images. `used` are the disk sources of every domain,
/// `domains` their names. Frozen bases of a snapshot stay while their base exists: later
/// clones from that snapshot reuse them.
pub(super) fn orphans(
    dir: &Path,
    files: &[String],
    used: &BTreeSet<PathBuf>,
    domains: &BTreeSet<String>,
) -> Vec<Leftover> {
    // Backing files of the overlays that stay.
    let backing: BTreeSet<PathBuf> = files
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| used.contains(p))
        .filter_map(|p| qcow2_backing(&p))
        .collect();
    let mut out = Vec::new();
    for f in files {
        let p = dir.join(f);
        let kind = match classify(f) {
            ImageFile::Partial => Some(LeftoverKind::PartialImage),
            ImageFile::Overlay(_) if !used.contains(&p) => Some(LeftoverKind::CloneDisk),
            ImageFile::Frozen { base, snapshot }
                if !used.contains(&p)
                    && !backing.contains(&p)
                    && (snapshot.is_empty() || !domains.contains(&base)) =>
            {
                Some(LeftoverKind::FrozenBase)
            }
            _ => None,
        };
        if let Some(kind) = kind {
            out.push(Leftover {
                kind,
                path: p.display().to_string(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_files_are_told_apart_by_name() {
        assert_eq!(classify("mc-7-0.qcow2"), ImageFile::Overlay("mc-7".into()));
        assert_eq!(
            classify("mc+golden+17+0.base.qcow2"),
            ImageFile::Frozen {
                base: "mc".into(),
                snapshot: "golden".into()
            }
        );
        assert_eq!(
            classify("mc++17+1.base.qcow2"),
            ImageFile::Frozen {
                base: "mc".into(),
                snapshot: String::new()
            }
        );
        assert_eq!(classify("mc++17+1.base.tmp"), ImageFile::Partial);
        for other in [
            ".anyvm.lock",
            "data.qcow2",
            "mc-x.qcow2",
            "a b-0.qcow2",
            "x+y.base.qcow2",
        ] {
            assert_eq!(classify(other), ImageFile::Other, "{other}");
        }
    }

    #[test]
    fn orphans_are_files_no_domain_uses() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A qcow2 header naming its backing file, as qemu-img writes it.
        let overlay = |name: &str, backing: &str| {
            let mut h = vec![0u8; 512];
            h[..4].copy_from_slice(b"QFI\xfb");
            h[4..8].copy_from_slice(&3u32.to_be_bytes());
            h[8..16].copy_from_slice(&112u64.to_be_bytes());
            h[16..20].copy_from_slice(&(backing.len() as u32).to_be_bytes());
            h[112..112 + backing.len()].copy_from_slice(backing.as_bytes());
            std::fs::write(d.join(name), h).unwrap();
        };
        let frozen_live = d.join("t++1+0.base.qcow2").display().to_string();
        overlay("c1-0.qcow2", &frozen_live);
        overlay(
            "c2-0.qcow2",
            &d.join("t++2+0.base.qcow2").display().to_string(),
        );
        for f in [
            "t++1+0.base.qcow2",
            "t++2+0.base.qcow2",
            "t+gold+3+0.base.qcow2",
            "gone+gold+4+0.base.qcow2",
            "t++5+0.base.tmp",
            "data.qcow2",
        ] {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        assert_eq!(
            qcow2_backing(&d.join("c1-0.qcow2")),
            Some(PathBuf::from(&frozen_live))
        );
        let files: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        // c1 is defined; c2's domain is gone (killed before define, or during destroy).
        let used: BTreeSet<PathBuf> = [d.join("c1-0.qcow2")].into();
        let domains: BTreeSet<String> = ["t".to_string(), "c1".into()].into();
        let mut found: Vec<(LeftoverKind, String)> = orphans(d, &files, &used, &domains)
            .into_iter()
            .map(|l| {
                let name = Path::new(&l.path)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                (l.kind, name)
            })
            .collect();
        found.sort_by(|a, b| a.1.cmp(&b.1));
        assert_eq!(
            found,
            vec![
                (LeftoverKind::CloneDisk, "c2-0.qcow2".to_string()),
                (LeftoverKind::FrozenBase, "gone+gold+4+0.base.qcow2".into()),
                (LeftoverKind::FrozenBase, "t++2+0.base.qcow2".into()),
                (LeftoverKind::PartialImage, "t++5+0.base.tmp".into()),
            ]
        );
    }

    #[test]
    fn disk_sources_come_from_every_source_element() {
        let xml = "<domain><devices><disk type='file'><source file='/i/c-0.qcow2'/>\
                   <backingStore type='file'><source file='/i/t++1+0.base.qcow2'/></backingStore>\
                   </disk><disk type='file'><source file='/d/a&amp;b.qcow2'></source></disk>\
                   <interface><source network='default'/></interface></devices></domain>";
        assert_eq!(
            disk_sources(xml),
            vec![
                PathBuf::from("/i/c-0.qcow2"),
                "/i/t++1+0.base.qcow2".into(),
                "/d/a&b.qcow2".into()
            ]
        );
    }
}
