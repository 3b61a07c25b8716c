//! Port forwards as ssh local forwards, for hypervisors that cannot forward ports themselves
//! (VMware Player, vmrun without host-network commands).
//!
//! Each forward is one OpenSSH master process: `ssh -f -N -M -S SOCKET -L HOST:PORT:127.0.0.1:GUEST`.
//! `ExitOnForwardFailure` makes a clash on the host port fail the add instead of leaving a tunnel
//! that forwards nothing; the control socket lets any later anyvm process check (`-O check`) and
//! close (`-O exit`) it without tracking pids. A tunnel lives until its forward is removed, the VM
//! is stopped or destroyed through anyvm, or the guest stops answering (ServerAlive, ~15 s);
//! `Vm::wait_ready` reopens the ones that died with a guest reboot.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::session::{ssh_binary, SshTarget};
use crate::error::{Ctx, Error, Result};
use crate::types::{PortForward, Protocol};

/// Where a VM's tunnels keep their control sockets and logs.
#[derive(Debug, Clone)]
pub struct Tunnels {
    dir: PathBuf,
    uri: String,
    vm: String,
}

/// FNV-1a: a hash that every anyvm build (CLI, Python, C) computes the same way.
pub(crate) fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Tunnels {
    /// The tunnels of one VM, their control sockets under `state_dir`.
    pub fn new(state_dir: &Path, uri: &str, vm: &str) -> Self {
        Tunnels {
            dir: state_dir.join("tunnels"),
            uri: uri.into(),
            vm: vm.into(),
        }
    }

    /// Unix socket paths are limited to 108 bytes, so the name is a short hash.
    fn base(&self, name: &str) -> PathBuf {
        let key = format!("{}\0{}\0{}", self.uri, self.vm, name);
        self.dir.join(format!("{:016x}", fnv1a(&key)))
    }

    /// The control socket of tunnel `name`.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.base(name).with_extension("sock")
    }

    fn log(&self, name: &str) -> PathBuf {
        self.base(name).with_extension("log")
    }

    fn ctx(&self, op: String) -> Ctx {
        Ctx::vm(op, &self.vm)
    }

    /// Open the tunnel for `fwd`; returns once the host port listens.
    pub async fn open(
        &self,
        target: &SshTarget,
        fwd: &PortForward,
        timeout: Duration,
    ) -> Result<()> {
        let ctx = self.ctx(format!("forward {} (ssh tunnel)", fwd.name));
        if fwd.proto != Protocol::Tcp {
            return Err(Error::invalid_arg(
                format!("forward {:?}", fwd.name),
                "ssh tunnels carry TCP only; this hypervisor cannot forward UDP",
            ));
        }
        if self.is_open(&fwd.name).await {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(ctx.clone(), &self.dir, e))?;
        let sock = self.socket(&fwd.name);
        if sock.as_os_str().len() > 100 {
            return Err(Error::invalid_arg(
                "state_dir",
                format!(
                    "{} is too long for a Unix socket path; use a shorter state_dir",
                    sock.display()
                ),
            ));
        }
        let _ = std::fs::remove_file(&sock);
        let log = self.log(&fwd.name);
        let logf = std::fs::File::create(&log).map_err(|e| Error::io(ctx.clone(), &log, e))?;
        let errf = logf
            .try_clone()
            .map_err(|e| Error::io(ctx.clone(), &log, e))?;

        let mut args: Vec<OsString> = target.options();
        for o in [
            "ExitOnForwardFailure=yes",
            "ControlMaster=yes",
            "ControlPersist=no",
        ] {
            args.extend(["-o".into(), o.into()]);
        }
        args.extend([
            "-f".into(),
            "-N".into(),
            "-S".into(),
            sock.clone().into(),
            "-p".into(),
            target.port.to_string().into(),
            "-L".into(),
            format!(
                "{}:{}:127.0.0.1:{}",
                fwd.host_addr, fwd.host_port, fwd.guest_port
            )
            .into(),
            format!("{}@{}", target.user, target.host).into(),
        ]);
        // The backgrounded master keeps the stdio it was given: a file, never one of our pipes,
        // or waiting for it would wait for the tunnel to end.
        let mut child = tokio::process::Command::new(ssh_binary("ssh")?)
            .args(&args)
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(logf)
            .stderr(errf)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| Error::io(ctx.clone(), "ssh", e))?;
        let status = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(s) => s.map_err(|e| Error::io(ctx.clone(), "ssh", e))?,
            Err(_) => {
                if let Some(pid) = child.id() {
                    // SAFETY: signalling the group we created; no memory is touched.
                    unsafe { libc::killpg(pid as i32, libc::SIGKILL) };
                }
                let _ = child.wait().await;
                return Err(Error::Timeout {
                    ctx,
                    after: Some(timeout),
                    what: format!("ssh to {}:{} to open the tunnel", target.host, target.port),
                });
            }
        };
        if status.success() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(e) = super::session::classify(&ctx, &text) {
            return Err(e);
        }
        if text.contains("Address already in use") || text.contains("cannot listen to port") {
            return Err(Error::PortInUse {
                ctx,
                port: fwd.host_port,
                reason: text.trim().to_string(),
            });
        }
        Err(Error::backend(ctx, "ssh", text.trim().to_string()))
    }

    async fn control(&self, name: &str, op: &str) -> bool {
        let sock = self.socket(name);
        if !sock.exists() {
            return false;
        }
        let Ok(ssh) = ssh_binary("ssh") else {
            return false;
        };
        let fut = tokio::process::Command::new(ssh)
            .args(["-F", "none", "-S"])
            .arg(&sock)
            .args(["-O", op, "anyvm-tunnel"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .status();
        matches!(
            tokio::time::timeout(Duration::from_secs(10), fut).await,
            Ok(Ok(s)) if s.success()
        )
    }

    /// Whether tunnel `name` is running.
    pub async fn is_open(&self, name: &str) -> bool {
        self.control(name, "check").await
    }

    /// Close one tunnel (no error when it is already gone).
    pub async fn close(&self, name: &str) {
        self.control(name, "exit").await;
        let _ = std::fs::remove_file(self.socket(name));
        let _ = std::fs::remove_file(self.log(name));
    }

    /// Close the tunnels of these forwards.
    pub async fn close_all(&self, forwards: &[PortForward]) {
        for f in forwards {
            self.close(&f.name).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names_are_short_stable_and_distinct() {
        let t = Tunnels::new(Path::new("/var/lib/anyvm"), "vmware:player", "mc-1");
        let a = t.socket("ssh");
        assert_eq!(a, t.socket("ssh"));
        assert_ne!(a, t.socket("rdp"));
        assert_ne!(
            a,
            Tunnels::new(Path::new("/var/lib/anyvm"), "vmware:ws", "mc-1").socket("ssh")
        );
        assert!(a.as_os_str().len() < 60);
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
    }
}
