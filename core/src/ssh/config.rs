//! OpenSSH client configuration with the guest's host key pinned.
//!
//! Guests behind 127.0.0.1 on different ports would collide in `~/.ssh/known_hosts` and trip
//! "REMOTE HOST IDENTIFICATION HAS CHANGED". Instead the key is read from inside the guest through
//! the agent (a channel that does not depend on the network being trusted), written to a per-VM
//! known_hosts file, and bound to a per-VM `HostKeyAlias`. Host key checking stays strict.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Ctx, Result};

/// Public host key files tried in the guest, strongest first.
pub const HOST_KEY_PATHS: &[&str] = &[
    "/etc/ssh/ssh_host_ed25519_key.pub",
    "/etc/ssh/ssh_host_ecdsa_key.pub",
    "/etc/ssh/ssh_host_rsa_key.pub",
];

const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
];

/// How `anyvm ssh-config` and the ssh channel log in.
#[derive(Debug, Clone, Default)]
pub struct SshOptions {
    /// Guest user (default "root").
    pub user: Option<String>,
    /// The private key (default: the credentials').
    pub identity_file: Option<PathBuf>,
    /// Guest port sshd listens on (default 22); a forward to it must exist.
    pub guest_port: Option<u16>,
    /// `Host` alias (default `anyvm-VM`).
    pub alias: Option<String>,
}

/// An OpenSSH `Host` block for one guest, with its host key pinned.
#[derive(Debug, Clone, Serialize)]
pub struct SshConfig {
    /// The `Host` alias.
    pub alias: String,
    /// Where ssh connects (the forward's host).
    pub host_name: String,
    /// The forward's host port.
    pub port: u16,
    /// The guest user.
    pub user: String,
    /// The private key.
    pub identity_file: Option<PathBuf>,
    /// The name the pinned host key is filed under.
    pub host_key_alias: String,
    /// The known_hosts file holding it.
    pub known_hosts: PathBuf,
    /// The `Host` block to append to an ssh_config or pass with `ssh -F`.
    pub stanza: String,
}

/// Validate one `type base64 [comment]` line and return `type base64`.
pub fn parse_public_key(line: &str) -> Option<String> {
    let mut it = line.split_whitespace();
    let (kt, b64) = (it.next()?, it.next()?);
    let b64_ok = !b64.is_empty()
        && b64.len() < 16384
        && b64
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'='));
    (KEY_TYPES.contains(&kt) && b64_ok).then(|| format!("{kt} {b64}"))
}

fn quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.contains(' ') {
        format!("\"{s}\"")
    } else {
        s
    }
}

/// anyvm's known_hosts file for one VM; ssh logins made by anyvm itself use it too.
pub(crate) fn known_hosts_path(state_dir: &Path, uri: &str, vm: &str) -> PathBuf {
    state_dir
        .join("ssh")
        .join(sanitize(uri))
        .join(format!("{vm}.known_hosts"))
}

/// The `HostKeyAlias` a VM's keys are pinned under.
pub(crate) fn host_key_alias(vm: &str) -> String {
    format!("anyvm.{vm}")
}

/// The config block for a VM reached at `host_name:port` whose guest showed `keys`: pins the
/// keys in the VM's known_hosts file under its alias. The facade reads the keys
/// ([`crate::Vm::ssh_config`]); this layer knows only OpenSSH.
pub(crate) fn build_config(
    ctx: &Ctx,
    target: &PinTarget<'_>,
    host_name: String,
    port: u16,
    keys: &[String],
    opts: &SshOptions,
) -> Result<SshConfig> {
    let host_key_alias = host_key_alias(target.vm);
    let known_hosts = known_hosts_path(target.state_dir, target.backend_uri, target.vm);
    super::session::pin_keys(ctx, &known_hosts, &host_key_alias, keys)?;
    let alias = opts
        .alias
        .clone()
        .unwrap_or_else(|| format!("anyvm-{}", target.vm));
    let user = opts.user.clone().unwrap_or_else(|| "root".into());
    let mut stanza = format!(
        "Host {alias}\n  HostName {host_name}\n  Port {port}\n  User {user}\n  HostKeyAlias {host_key_alias}\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n  CheckHostIP no\n",
        quote(&known_hosts)
    );
    if let Some(id) = &opts.identity_file {
        stanza.push_str(&format!(
            "  IdentityFile {}\n  IdentitiesOnly yes\n",
            quote(id)
        ));
    }
    Ok(SshConfig {
        alias,
        host_name,
        port,
        user,
        identity_file: opts.identity_file.clone(),
        host_key_alias,
        known_hosts,
        stanza,
    })
}

/// Whose keys are pinned where: the VM, its backend and anyvm's state dir.
pub(crate) struct PinTarget<'a> {
    pub vm: &'a str,
    pub backend_uri: &'a str,
    pub state_dir: &'a Path,
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_only_well_formed_keys() {
        assert_eq!(
            parse_public_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA+x/y= root@g").as_deref(),
            Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA+x/y=")
        );
        assert_eq!(parse_public_key("ssh-ed25519"), None);
        assert_eq!(parse_public_key("evil AAAA"), None);
        assert_eq!(parse_public_key("ssh-rsa AA\"AA"), None);
        assert_eq!(parse_public_key("# comment"), None);
    }
}
