//! Host port allocation that is safe across threads and processes.
//!
//! Every lease lives in one JSON registry guarded by an exclusive file lock. A port is handed out
//! only if no other VM holds a lease on it AND it can be bound on the host right now, so two callers
//! (or a caller and an unrelated program) never get the same port. Forwards and VNC consoles share it.

use std::collections::HashSet;
use std::net::{TcpListener, UdpSocket};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Ctx, Error, Result};
use crate::types::Protocol;
use crate::util::json_store::JsonStore;

/// Forward ports come from here unless configured otherwise.
pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 40000..=44999;

/// One port held for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The port.
    pub port: u16,
    /// TCP or UDP.
    pub proto: Protocol,
    /// The backend URI of the VM.
    pub backend: String,
    /// The VM.
    pub vm: String,
    /// e.g. "forward:ssh" or "console:vnc".
    pub purpose: String,
    /// The process that took the lease.
    pub pid: u32,
    /// When (seconds since the epoch).
    pub created: u64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Registry {
    leases: Vec<Lease>,
}

/// Allocates host ports from a range, backed by `<state_dir>/ports.json`.
#[derive(Debug, Clone)]
pub struct PortAllocator {
    store: JsonStore,
    range: RangeInclusive<u16>,
}

impl PortAllocator {
    /// An allocator keeping its leases in `state_dir`, handing out ports in `range`.
    pub fn new(state_dir: impl Into<PathBuf>, range: RangeInclusive<u16>) -> Self {
        PortAllocator {
            store: JsonStore::new(state_dir, "ports"),
            range,
        }
    }

    /// The range ports come from.
    pub fn range(&self) -> RangeInclusive<u16> {
        self.range.clone()
    }

    /// Whether the port can be bound on the host right now.
    pub fn host_port_free(addr: &str, port: u16, proto: Protocol) -> bool {
        match proto {
            Protocol::Tcp => TcpListener::bind((addr, port)).is_ok(),
            Protocol::Udp => UdpSocket::bind((addr, port)).is_ok(),
        }
    }

    fn lease(backend: &str, vm: &str, purpose: &str, proto: Protocol, port: u16) -> Lease {
        Lease {
            port,
            proto,
            backend: backend.into(),
            vm: vm.into(),
            purpose: purpose.into(),
            pid: std::process::id(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }

    /// Allocate a free port for `vm`'s `purpose`. An existing lease for the same purpose is reused.
    pub fn allocate(
        &self,
        backend: &str,
        vm: &str,
        purpose: &str,
        addr: &str,
        proto: Protocol,
    ) -> Result<u16> {
        let ctx = Ctx::vm("allocate port", vm);
        self.store.update(&ctx, |reg: &mut Registry| {
            if let Some(l) =
                reg.leases.iter().find(|l| l.backend == backend && l.vm == vm && l.purpose == purpose && l.proto == proto)
            {
                return Ok((false, l.port));
            }
            let taken: HashSet<(u16, Protocol)> = reg.leases.iter().map(|l| (l.port, l.proto)).collect();
            // Start at a pid-dependent offset so concurrent processes rarely probe the same ports.
            let span = (*self.range.end() as usize) - (*self.range.start() as usize) + 1;
            let offset = (std::process::id() as usize * 7919) % span;
            let port = (0..span)
                .map(|i| self.range.start() + ((offset + i) % span) as u16)
                .find(|p| !taken.contains(&(*p, proto)) && Self::host_port_free(addr, *p, proto))
                .ok_or_else(|| Error::PortInUse {
                    ctx: ctx.clone(),
                    port: *self.range.end(),
                    reason: format!(
                        "no free {proto} port left in {}-{}; release leases (anyvm destroy) or widen port_range",
                        self.range.start(),
                        self.range.end()
                    ),
                })?;
            reg.leases.push(Self::lease(backend, vm, purpose, proto, port));
            tracing::debug!(vm, purpose, port, "allocated host port");
            Ok((true, port))
        })
    }

    /// Record a fixed port for `vm`; fails if another VM leases it or the host is using it.
    pub fn reserve(
        &self,
        backend: &str,
        vm: &str,
        purpose: &str,
        addr: &str,
        proto: Protocol,
        port: u16,
    ) -> Result<()> {
        let ctx = Ctx::vm("reserve port", vm);
        self.store.update(&ctx, |reg: &mut Registry| {
            if let Some(l) = reg.leases.iter().find(|l| l.port == port && l.proto == proto) {
                if l.backend == backend && l.vm == vm && l.purpose == purpose {
                    return Ok((false, ()));
                }
                return Err(Error::PortInUse {
                    ctx: ctx.clone(),
                    port,
                    reason: format!("leased to vm '{}' ({}) on {}", l.vm, l.purpose, l.backend),
                });
            }
            if !Self::host_port_free(addr, port, proto) {
                return Err(Error::PortInUse {
                    ctx: ctx.clone(),
                    port,
                    reason: format!("another program is bound to {addr}:{port}; pick another port or use 'auto'"),
                });
            }
            reg.leases.push(Self::lease(backend, vm, purpose, proto, port));
            Ok((true, ()))
        })
    }

    /// Release the leases of `vm` (only those for `purpose` when given).
    pub fn release(&self, backend: &str, vm: &str, purpose: Option<&str>) -> Result<()> {
        let ctx = Ctx::vm("release port", vm);
        self.store.update(&ctx, |reg: &mut Registry| {
            let before = reg.leases.len();
            reg.leases.retain(|l| {
                !(l.backend == backend && l.vm == vm && purpose.is_none_or(|p| p == l.purpose))
            });
            Ok((reg.leases.len() != before, ()))
        })
    }

    /// Drop the leases on `backend` held for VMs that no longer exist (`exists` says which do),
    /// once the process that took them is gone: a live process may be between leasing and
    /// defining.
    pub fn release_stale(
        &self,
        backend: &str,
        exists: impl Fn(&str) -> bool,
    ) -> Result<Vec<Lease>> {
        let ctx = Ctx::new("release stale port leases");
        self.store.update(&ctx, |reg: &mut Registry| {
            let (gone, keep): (Vec<Lease>, Vec<Lease>) =
                std::mem::take(&mut reg.leases).into_iter().partition(|l| {
                    l.backend == backend
                        && !exists(&l.vm)
                        && !std::path::Path::new(&format!("/proc/{}", l.pid)).exists()
                });
            reg.leases = keep;
            Ok((!gone.is_empty(), gone))
        })
    }

    /// Every lease held now.
    pub fn leases(&self) -> Result<Vec<Lease>> {
        Ok(self
            .store
            .read::<Registry>(&Ctx::new("list port leases"))?
            .leases)
    }

    /// The lease file.
    pub fn registry_path(&self) -> PathBuf {
        self.store.path()
    }

    /// The directory the lease file lives in.
    pub fn dir(&self) -> &Path {
        self.store.dir()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    #[test]
    fn sixteen_threads_get_distinct_ports() {
        let dir = tempfile::tempdir().unwrap();
        let alloc = Arc::new(PortAllocator::new(dir.path(), 41000..=41999));
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let a = alloc.clone();
                std::thread::spawn(move || {
                    a.allocate(
                        "t",
                        &format!("vm{i}"),
                        "forward:ssh",
                        "127.0.0.1",
                        Protocol::Tcp,
                    )
                    .unwrap()
                })
            })
            .collect();
        let ports: HashSet<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(ports.len(), 16);
        assert_eq!(alloc.leases().unwrap().len(), 16);
    }

    #[test]
    fn skips_ports_bound_by_other_programs_and_reuses_own_lease() {
        let dir = tempfile::tempdir().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = l.local_addr().unwrap().port();
        let a = PortAllocator::new(dir.path(), busy..=busy.saturating_add(1));
        let p = a
            .allocate("t", "v", "forward:ssh", "127.0.0.1", Protocol::Tcp)
            .unwrap();
        assert_ne!(p, busy);
        assert_eq!(
            a.allocate("t", "v", "forward:ssh", "127.0.0.1", Protocol::Tcp)
                .unwrap(),
            p
        );
        let e = a
            .reserve("t", "w", "forward:x", "127.0.0.1", Protocol::Tcp, p)
            .unwrap_err();
        assert!(e.to_string().contains("leased to vm 'v'"), "{e}");
        let e = a
            .reserve("t", "w", "forward:x", "127.0.0.1", Protocol::Tcp, busy)
            .unwrap_err();
        assert!(matches!(e, Error::PortInUse { .. }));
        a.release("t", "v", None).unwrap();
        assert!(a.leases().unwrap().is_empty());
    }

    #[test]
    fn exhausted_range_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = l.local_addr().unwrap().port();
        let a = PortAllocator::new(dir.path(), busy..=busy);
        let e = a
            .allocate("t", "v", "forward:ssh", "127.0.0.1", Protocol::Tcp)
            .unwrap_err();
        assert!(e.to_string().contains("no free tcp port"), "{e}");
    }
}
