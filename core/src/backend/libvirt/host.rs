//! The machine libvirtd runs on. libvirt's API covers domains, not files: clone overlays
//! (qemu-img), console logs and disk clean-up happen on the hypervisor host, which for a
//! `qemu+ssh://` URI is reached with the same ssh user, port and key the URI names.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Ctx, Error, Result};
use crate::util::command::{ToolCommand, ToolOutput};
use crate::util::shell::shell_quote;

const SSH_CONNECT_TIMEOUT_S: u32 = 10;
const FILE_OP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HypervisorHost {
    Local,
    Ssh {
        /// `user@host` or `host`.
        target: String,
        host: String,
        port: Option<u16>,
        keyfile: Option<PathBuf>,
        /// URI `no_verify=1`: accept an unknown host key, as libvirt itself then does.
        no_verify: bool,
        known_hosts: Option<PathBuf>,
    },
    /// A remote transport without file access (tls, tcp): domain operations work, file
    /// operations fail with this reason.
    NoFileAccess(String),
}

impl HypervisorHost {
    /// From a libvirt URI: local unless it names a host; `+ssh` transports are reachable,
    /// other remote transports (tls, tcp) have no file access and are refused.
    pub fn from_uri(uri: &str) -> Result<HypervisorHost> {
        let bad = |why: &str| Error::invalid_arg(format!("libvirt URI {uri:?}"), why);
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("missing ://"))?;
        let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.is_empty() {
            return Ok(HypervisorHost::Local);
        }
        let transport = scheme.split_once('+').map(|(_, t)| t).unwrap_or("tls");
        if transport != "ssh" {
            return Err(bad(&format!(
                "transport {transport:?} gives anyvm no access to the host's files (clone disks, console logs); use qemu+ssh://"
            )));
        }
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || hostport.starts_with('[') => (
                h.trim_matches(|c| c == '[' || c == ']').to_string(),
                Some(p.parse::<u16>().map_err(|_| bad("bad port"))?),
            ),
            _ => (hostport.to_string(), None),
        };
        let valid = |s: &str| {
            !s.is_empty()
                && !s.starts_with('-')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-:".contains(c))
        };
        if !valid(&host) || user.is_some_and(|u| !valid(u)) {
            return Err(bad("user and host must be plain names or addresses"));
        }
        let mut keyfile = None;
        let mut no_verify = false;
        let mut known_hosts = None;
        if let Some((_, query)) = tail.split_once('?') {
            for kv in query.split('&') {
                match kv.split_once('=') {
                    Some(("keyfile", v)) => keyfile = Some(PathBuf::from(v)),
                    Some(("no_verify", v)) => no_verify = v == "1",
                    Some(("known_hosts", v)) => known_hosts = Some(PathBuf::from(v)),
                    _ => {}
                }
            }
        }
        Ok(HypervisorHost::Ssh {
            target: match user {
                Some(u) => format!("{u}@{host}"),
                None => host.clone(),
            },
            host,
            port,
            keyfile,
            no_verify,
            known_hosts,
        })
    }

    /// [`HypervisorHost::from_uri`], falling back to [`HypervisorHost::NoFileAccess`].
    pub fn for_uri(uri: &str) -> HypervisorHost {
        HypervisorHost::from_uri(uri)
            .unwrap_or_else(|e| HypervisorHost::NoFileAccess(e.to_string()))
    }

    pub fn is_local(&self) -> bool {
        matches!(self, HypervisorHost::Local)
    }

    /// The remote host's name, where forwards listen.
    pub fn remote_name(&self) -> Option<&str> {
        match self {
            HypervisorHost::Local | HypervisorHost::NoFileAccess(_) => None,
            HypervisorHost::Ssh { host, .. } => Some(host),
        }
    }

    /// Run `argv` on the hypervisor host under `timeout`.
    pub async fn run(&self, ctx: &Ctx, argv: &[String], timeout: Duration) -> Result<ToolOutput> {
        match self {
            HypervisorHost::NoFileAccess(reason) => Err(Error::InvalidState {
                ctx: ctx.clone(),
                state: "remote libvirt host without file access".into(),
                hint: Some(reason.clone()),
            }),
            HypervisorHost::Local => {
                ToolCommand::new(&argv[0], &argv[1..], timeout)
                    .run(ctx)
                    .await
            }
            HypervisorHost::Ssh {
                target,
                port,
                keyfile,
                no_verify,
                known_hosts,
                ..
            } => {
                let mut a: Vec<String> = vec![
                    "-o".into(),
                    "BatchMode=yes".into(),
                    "-o".into(),
                    format!("ConnectTimeout={SSH_CONNECT_TIMEOUT_S}"),
                    "-o".into(),
                    "ServerAliveInterval=5".into(),
                    "-o".into(),
                    "ServerAliveCountMax=3".into(),
                    "-T".into(),
                ];
                if let Some(p) = port {
                    a.extend(["-p".into(), p.to_string()]);
                }
                if let Some(k) = keyfile {
                    a.extend(["-i".into(), k.display().to_string()]);
                }
                if *no_verify {
                    a.extend(["-o".into(), "StrictHostKeyChecking=no".into()]);
                }
                if let Some(k) = known_hosts {
                    a.extend(["-o".into(), format!("UserKnownHostsFile={}", k.display())]);
                }
                a.push(target.clone());
                a.push("--".into());
                // ssh hands the remote shell one string: each word is quoted on its own.
                a.push(
                    argv.iter()
                        .map(|w| shell_quote(w))
                        .collect::<Vec<_>>()
                        .join(" "),
                );
                let out = ToolCommand::new("ssh", a, timeout).run(ctx).await?;
                if out.code == Some(255) {
                    return Err(Error::BackendUnavailable {
                        ctx: ctx.clone(),
                        backend: format!("ssh {target}"),
                        reason: out.stderr_str().trim().to_string(),
                    });
                }
                Ok(out)
            }
        }
    }

    async fn run_ok(&self, ctx: &Ctx, argv: &[&str], what: &str) -> Result<ToolOutput> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let out = self.run(ctx, &argv, FILE_OP_TIMEOUT).await?;
        if out.code != Some(0) {
            return Err(Error::backend(
                ctx.clone(),
                "hypervisor host",
                format!("{what}: {}", out.stderr_str().trim()),
            ));
        }
        Ok(out)
    }

    pub async fn exists(&self, ctx: &Ctx, p: &Path) -> Result<bool> {
        if self.is_local() {
            return Ok(p.exists());
        }
        let argv = vec!["test".to_string(), "-e".into(), p.display().to_string()];
        Ok(self.run(ctx, &argv, FILE_OP_TIMEOUT).await?.code == Some(0))
    }

    pub async fn create_dir_all(&self, ctx: &Ctx, p: &Path) -> Result<()> {
        if self.is_local() {
            return std::fs::create_dir_all(p).map_err(|e| Error::io(ctx.clone(), p, e));
        }
        let s = p.display().to_string();
        self.run_ok(ctx, &["mkdir", "-p", "--", &s], &format!("mkdir {s}"))
            .await
            .map(|_| ())
    }

    pub async fn rename(&self, ctx: &Ctx, from: &Path, to: &Path) -> Result<()> {
        if self.is_local() {
            return std::fs::rename(from, to).map_err(|e| Error::io(ctx.clone(), to, e));
        }
        let (f, t) = (from.display().to_string(), to.display().to_string());
        self.run_ok(ctx, &["mv", "-f", "--", &f, &t], &format!("rename {f}"))
            .await
            .map(|_| ())
    }

    /// Remove a file; a missing one is not an error.
    pub async fn remove_file(&self, ctx: &Ctx, p: &Path) -> Result<()> {
        if self.is_local() {
            return match std::fs::remove_file(p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io(ctx.clone(), p, e))
                }
                _ => Ok(()),
            };
        }
        let s = p.display().to_string();
        self.run_ok(ctx, &["rm", "-f", "--", &s], &format!("remove {s}"))
            .await
            .map(|_| ())
    }

    /// File names in a directory (empty when it does not exist).
    pub async fn list_dir(&self, ctx: &Ctx, dir: &Path) -> Result<Vec<String>> {
        if self.is_local() {
            return Ok(std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect());
        }
        let s = dir.display().to_string();
        let argv = vec!["ls".to_string(), "-1A".into(), "--".into(), s];
        let out = self.run(ctx, &argv, FILE_OP_TIMEOUT).await?;
        Ok(out.stdout_str().lines().map(str::to_string).collect())
    }

    /// The last `limit` bytes of a file (empty when it does not exist).
    pub async fn read_tail(&self, ctx: &Ctx, p: &Path, limit: usize) -> Result<Vec<u8>> {
        if self.is_local() {
            return crate::util::tail::read_tail(p, limit)
                .map_err(|e| Error::io(ctx.clone(), p, e));
        }
        let s = p.display().to_string();
        let argv = vec![
            "sh".to_string(),
            "-c".into(),
            "test ! -e \"$2\" || tail -c \"$1\" -- \"$2\"".into(),
            "anyvm-tail".into(),
            limit.to_string(),
            s.clone(),
        ];
        let out = self.run(ctx, &argv, FILE_OP_TIMEOUT).await?;
        if out.code != Some(0) {
            return Err(Error::backend(
                ctx.clone(),
                "hypervisor host",
                format!("read {s}: {}", out.stderr_str().trim()),
            ));
        }
        Ok(out.stdout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_local_and_ssh_uris() {
        assert!(HypervisorHost::from_uri("qemu:///system")
            .unwrap()
            .is_local());
        assert!(HypervisorHost::from_uri("qemu:///session")
            .unwrap()
            .is_local());
        let h = HypervisorHost::from_uri(
            "qemu+ssh://root@10.1.2.3:2222/system?keyfile=/k/id&no_verify=1&no_tty=1",
        )
        .unwrap();
        assert_eq!(
            h,
            HypervisorHost::Ssh {
                target: "root@10.1.2.3".into(),
                host: "10.1.2.3".into(),
                port: Some(2222),
                keyfile: Some("/k/id".into()),
                no_verify: true,
                known_hosts: None,
            }
        );
        assert_eq!(h.remote_name(), Some("10.1.2.3"));
        let h = HypervisorHost::from_uri("qemu+ssh://hv1.lab/system").unwrap();
        assert_eq!(h.remote_name(), Some("hv1.lab"));
        assert!(HypervisorHost::from_uri("qemu+tls://hv1/system").is_err());
        assert!(HypervisorHost::from_uri("qemu://hv1/system").is_err());
        assert!(HypervisorHost::from_uri("qemu+ssh://-oProxyCommand=x/system").is_err());
        assert!(HypervisorHost::from_uri("qemu+ssh://u;rm@h/system").is_err());
    }

    #[tokio::test]
    async fn local_file_operations() {
        let d = tempfile::tempdir().unwrap();
        let h = HypervisorHost::Local;
        let ctx = Ctx::new("t");
        let sub = d.path().join("a/b");
        h.create_dir_all(&ctx, &sub).await.unwrap();
        let f = sub.join("f");
        std::fs::write(&f, b"0123456789").unwrap();
        assert!(h.exists(&ctx, &f).await.unwrap());
        assert_eq!(h.read_tail(&ctx, &f, 4).await.unwrap(), b"6789");
        let g = sub.join("g");
        h.rename(&ctx, &f, &g).await.unwrap();
        h.remove_file(&ctx, &g).await.unwrap();
        h.remove_file(&ctx, &g).await.unwrap();
        assert!(!h.exists(&ctx, &g).await.unwrap());
        assert!(h.read_tail(&ctx, &g, 4).await.unwrap().is_empty());
    }
}
