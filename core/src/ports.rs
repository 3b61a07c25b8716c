//! Host port allocation that is safe across threads and processes.
//!
//! Every lease lives in one JSON registry guarded by an exclusive file lock. A port is handed out
//! only if no other VM holds a lease on it AND it can be bound on the host right now, so two callers
//! (or a caller and an unrelated program) never get the same port. Forwards and VNC consoles share it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Ctx, Error, Result};
use crate::types::Protocol;

pub const DEFAULT_PORT_RANGE: RangeInclusive<u16> = 40000..=44999;

/// One port held for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub port: u16,
    pub proto: Protocol,
    pub backend: String,
    pub vm: String,
    /// e.g. "forward:ssh" or "console:vnc".
    pub purpose: String,
    pub pid: u32,
    pub created: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Registry {
    leases: Vec<Lease>,
}

/// Allocates host ports from a range, backed by `<state_dir>/ports.json`.
#[derive(Debug, Clone)]
pub struct PortAllocator {
    dir: PathBuf,
    range: RangeInclusive<u16>,
}

struct Locked {
    _lock: File,
    path: PathBuf,
    reg: Registry,
}

impl PortAllocator {
    pub fn new(state_dir: impl Into<PathBuf>, range: RangeInclusive<u16>) -> Self {
        PortAllocator {
            dir: state_dir.into(),
            range,
        }
    }

    pub fn range(&self) -> RangeInclusive<u16> {
        self.range.clone()
    }

    fn ctx(op: &str, vm: &str) -> Ctx {
        Ctx::vm(op, vm)
    }

    fn lock(&self, ctx: &Ctx) -> Result<Locked> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(ctx.clone(), &self.dir, e))?;
        let lock_path = self.dir.join("ports.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(ctx.clone(), &lock_path, e))?;
        lock.lock()
            .map_err(|e| Error::io(ctx.clone(), &lock_path, e))?;
        let path = self.dir.join("ports.json");
        let reg = match File::open(&path) {
            Ok(mut f) => {
                let mut s = String::new();
                f.read_to_string(&mut s)
                    .map_err(|e| Error::io(ctx.clone(), &path, e))?;
                if s.trim().is_empty() {
                    Registry::default()
                } else {
                    serde_json::from_str(&s).map_err(|e| {
                        Error::backend(
                            ctx.clone(),
                            "ports",
                            format!(
                                "{} is corrupt ({e}); move it aside to reset leases",
                                path.display()
                            ),
                        )
                    })?
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Registry::default(),
            Err(e) => return Err(Error::io(ctx.clone(), &path, e)),
        };
        Ok(Locked {
            _lock: lock,
            path,
            reg,
        })
    }

    fn save(locked: &Locked, ctx: &Ctx) -> Result<()> {
        let tmp = locked.path.with_extension("json.tmp");
        let data = serde_json::to_vec_pretty(&locked.reg).expect("registry serializes");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &locked.path)
        };
        write().map_err(|e| Error::io(ctx.clone(), &locked.path, e))
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
        let ctx = Self::ctx("allocate port", vm);
        let mut locked = self.lock(&ctx)?;
        if let Some(l) = locked.reg.leases.iter().find(|l| {
            l.backend == backend && l.vm == vm && l.purpose == purpose && l.proto == proto
        }) {
            return Ok(l.port);
        }
        let taken: std::collections::HashSet<(u16, Protocol)> = locked
            .reg
            .leases
            .iter()
            .map(|l| (l.port, l.proto))
            .collect();
        // Start at a pid-dependent offset so concurrent processes rarely probe the same ports.
        let span = (*self.range.end() as u32 - *self.range.start() as u32 + 1) as usize;
        let offset = (std::process::id() as usize * 7919) % span;
        let ports: Vec<u16> = self.range.clone().collect();
        for i in 0..span {
            let port = ports[(offset + i) % span];
            if taken.contains(&(port, proto)) || !Self::host_port_free(addr, port, proto) {
                continue;
            }
            locked
                .reg
                .leases
                .push(Self::lease(backend, vm, purpose, proto, port));
            Self::save(&locked, &ctx)?;
            tracing::debug!(vm, purpose, port, "allocated host port");
            return Ok(port);
        }
        Err(Error::PortInUse {
            ctx,
            port: *self.range.end(),
            reason: format!(
                "no free {proto} port left in {}-{}; release leases (anyvm destroy) or widen port_range",
                self.range.start(),
                self.range.end()
            ),
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
        let ctx = Self::ctx("reserve port", vm);
        let mut locked = self.lock(&ctx)?;
        if let Some(l) = locked
            .reg
            .leases
            .iter()
            .find(|l| l.port == port && l.proto == proto)
        {
            if l.backend == backend && l.vm == vm && l.purpose == purpose {
                return Ok(());
            }
            return Err(Error::PortInUse {
                ctx,
                port,
                reason: format!("leased to vm '{}' ({}) on {}", l.vm, l.purpose, l.backend),
            });
        }
        if !Self::host_port_free(addr, port, proto) {
            return Err(Error::PortInUse {
                ctx,
                port,
                reason: format!(
                    "another program is bound to {addr}:{port}; pick another port or use 'auto'"
                ),
            });
        }
        locked
            .reg
            .leases
            .push(Self::lease(backend, vm, purpose, proto, port));
        Self::save(&locked, &ctx)
    }

    /// Release the leases of `vm` (only those for `purpose` when given).
    pub fn release(&self, backend: &str, vm: &str, purpose: Option<&str>) -> Result<()> {
        let ctx = Self::ctx("release port", vm);
        let mut locked = self.lock(&ctx)?;
        let before = locked.reg.leases.len();
        locked.reg.leases.retain(|l| {
            !(l.backend == backend && l.vm == vm && purpose.is_none_or(|p| p == l.purpose))
        });
        if locked.reg.leases.len() != before {
            Self::save(&locked, &ctx)?;
        }
        Ok(())
    }

    pub fn leases(&self) -> Result<Vec<Lease>> {
        Ok(self.lock(&Ctx::new("list port leases"))?.reg.leases)
    }

    pub fn registry_path(&self) -> PathBuf {
        self.dir.join("ports.json")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
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
