//! Interactive logins and commands run by the operator's own `ssh` (`anyvm ssh`), through the
//! pinned config, with OpenSSH connection sharing so repeated commands reuse one connection.
//!
//! Each (VM, user, port) gets a config file and a ControlMaster socket under the state dir. The
//! first login starts a master that lingers for [`CONTROL_PERSIST`]; later ones find it alive
//! (`ssh -O check`) and skip everything else, the host key read included. Stopping or
//! destroying the VM through anyvm ends its masters ([`Logins::close_all`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::config::SshConfig;
use super::session::ssh_binary;
use super::tunnel::fnv1a;
use crate::error::{Ctx, Error, Result};
use crate::util::replace::replace_file;

/// How long an idle shared connection stays up after its last session.
pub const CONTROL_PERSIST: Duration = Duration::from_secs(600);

/// A second `Host` name every login config defines, so a live login is used without knowing
/// the VM's own alias.
const SHARED_ALIAS: &str = "anyvm";

/// A guest whose sshd does not answer fails the login instead of hanging the terminal.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// A `ssh -O` control call answers at once or not at all.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where one VM's login configs and control sockets live.
#[derive(Debug, Clone)]
pub struct Logins {
    dir: PathBuf,
}

/// Everything `ssh` needs for one login: the config file (pinned host key, shared connection)
/// and the `Host` alias in it.
#[derive(Debug, Clone)]
pub struct SshLogin {
    /// The config file passed with `-F`.
    pub config_file: PathBuf,
    /// The `Host` alias the file defines.
    pub alias: String,
    /// The ControlMaster socket.
    pub control_path: PathBuf,
}

impl Logins {
    /// The logins of `vm` on the backend `uri`, under `state_dir`.
    pub fn new(state_dir: &Path, uri: &str, vm: &str) -> Self {
        // Unix socket paths are limited to 108 bytes, so the directory is a short hash.
        let key = format!("{uri}\0{vm}");
        Logins {
            dir: state_dir
                .join("login")
                .join(format!("{:016x}", fnv1a(&key))),
        }
    }

    /// The login whose files are `base.config` and `base.sock`.
    fn at(base: &Path, alias: &str) -> SshLogin {
        SshLogin {
            config_file: base.with_extension("config"),
            alias: alias.into(),
            control_path: base.with_extension("sock"),
        }
    }

    fn base(&self, user: &str, port: u16) -> PathBuf {
        self.dir
            .join(format!("{:016x}", fnv1a(&format!("{user}\0{port}"))))
    }

    /// The login for `user` on guest port `port` if its shared connection is up: nothing else
    /// needs asking.
    pub async fn live(&self, user: &str, port: u16) -> Option<SshLogin> {
        let login = Self::at(&self.base(user, port), SHARED_ALIAS);
        (login.config_file.is_file() && login.control_path.exists() && login.check().await)
            .then_some(login)
    }

    /// Write the config for `cfg` (a pinned `Host` block) with connection sharing added.
    pub fn write(&self, ctx: &Ctx, cfg: &SshConfig, guest_port: u16) -> Result<SshLogin> {
        let login = Self::at(&self.base(&cfg.user, guest_port), &cfg.alias);
        if login.control_path.as_os_str().len() > 100 {
            return Err(Error::invalid_arg(
                "state_dir",
                format!(
                    "{} is too long for a Unix socket path; use a shorter state_dir",
                    login.control_path.display()
                ),
            ));
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(ctx.clone(), &self.dir, e))?;
        let mut text = cfg.stanza.replacen(
            &format!("Host {}\n", cfg.alias),
            &format!("Host {} {SHARED_ALIAS}\n", cfg.alias),
            1,
        );
        text.push_str(&format!(
            "  ControlMaster auto\n  ControlPath {}\n  ControlPersist {}\n  ConnectTimeout {}\n  ServerAliveInterval 5\n  ServerAliveCountMax 3\n  LogLevel ERROR\n",
            login.control_path.display(),
            CONTROL_PERSIST.as_secs(),
            CONNECT_TIMEOUT.as_secs()
        ));
        let tmp = login.config_file.with_extension("config.tmp");
        replace_file(&login.config_file, &tmp, text)
            .map_err(|e| Error::io(ctx.clone(), &login.config_file, e))?;
        Ok(login)
    }

    /// End every shared connection of the VM and remove its login files (the VM stopped or
    /// went away: the next login pins and connects afresh).
    pub async fn close_all(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for p in entries.flatten().map(|e| e.path()) {
            if p.extension().is_some_and(|x| x == "config") {
                let login = Self::at(&p, SHARED_ALIAS);
                if login.control_path.exists() {
                    login.control("exit").await;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl SshLogin {
    /// The `ssh` argv: an interactive login (`command` None) or a command. `tty` forces a
    /// terminal (`-t`) or none (`-T`); by default a login gets one when stdin is a terminal.
    pub fn argv(&self, command: Option<&str>, tty: Option<bool>) -> Result<Vec<OsString>> {
        let mut a: Vec<OsString> = vec![
            ssh_binary("ssh")?.into(),
            "-F".into(),
            self.config_file.clone().into(),
        ];
        match tty {
            Some(true) => a.push("-t".into()),
            Some(false) => a.push("-T".into()),
            None => {}
        }
        a.push(self.alias.clone().into());
        if let Some(c) = command {
            a.push("--".into());
            a.push(c.into());
        }
        Ok(a)
    }

    async fn check(&self) -> bool {
        self.control("check").await
    }

    /// `ssh -O op`, bounded; true when it succeeded.
    async fn control(&self, op: &str) -> bool {
        let Ok(ssh) = ssh_binary("ssh") else {
            return false;
        };
        let mut cmd = tokio::process::Command::new(ssh);
        cmd.arg("-F")
            .arg(&self.config_file)
            .args(["-O", op])
            .arg(&self.alias)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let Ok(mut child) = cmd.spawn() else {
            return false;
        };
        match tokio::time::timeout(CONTROL_TIMEOUT, child.wait()).await {
            Ok(Ok(s)) => s.success(),
            _ => false,
        }
    }
}
