//! Exec and file copy over OpenSSH, for guests whose tools channel needs a password on a command
//! line (vmrun `-gp`) or is not there at all.
//!
//! Logins are key-only (`BatchMode=yes`): the ssh client never prompts, and no password goes to
//! it. The host key is pinned in anyvm's per-VM known_hosts file: keys read from the guest through
//! its agent when there is one, else the first key seen (`accept-new`), and strict from then on.
//! ssh runs the remote program through the login shell, so the argv is quoted element by element
//! ([`shell_quote`]); nothing the caller passes is interpreted by that shell.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Ctx, Error, Result};
use crate::types::{ExecOutput, ExecRequest};
use crate::util::command::ToolCommand;
pub use crate::util::shell::shell_quote;
use crate::util::tool::resolve_binary;

/// How to reach one guest's sshd.
#[derive(Debug, Clone)]
pub struct SshTarget {
    /// VM name, for messages.
    pub vm: String,
    /// The host ssh connects to.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The guest user.
    pub user: String,
    /// The private key.
    pub identity_file: PathBuf,
    /// The known_hosts file with the guest's pinned key.
    pub known_hosts: PathBuf,
    /// The name that key is filed under.
    pub host_key_alias: String,
    /// How long connecting may take.
    pub connect_timeout: Duration,
}

/// Runs the program (positional parameters) in the background with stdin from /dev/null and
/// watches the session's stdin: when the ssh client goes away (a dropped or cancelled exec),
/// sshd closes it and the watcher kills the whole process group, program included. A normal
/// exit stops the watcher.
pub const WATCHED: &str = "exec 3<&0; \"$@\" </dev/null 3<&- & p=$!; { cat <&3 >/dev/null 2>&1; kill -KILL 0; } </dev/null >/dev/null 2>&1 & w=$!; exec 3<&-; wait $p; s=$?; kill $w 2>/dev/null; exit $s";

/// The remote command line for an exec request: `cd DIR && exec env K=V PROGRAM ARGS...`.
pub fn remote_command(req: &ExecRequest) -> String {
    let mut words: Vec<String> = Vec::new();
    if let Some(cwd) = &req.cwd {
        words.push(format!("cd {} &&", shell_quote(cwd)));
    }
    words.push("exec".into());
    if !req.env.is_empty() {
        words.push("env".into());
        words.extend(
            req.env
                .iter()
                .map(|(k, v)| shell_quote(&format!("{k}={v}"))),
        );
    }
    words.push(shell_quote(&req.program));
    words.extend(req.args.iter().map(|a| shell_quote(a)));
    words.join(" ")
}

/// [`remote_command`] under the [`WATCHED`] wrapper, for requests without stdin data.
pub fn watched_remote_command(req: &ExecRequest) -> String {
    let mut r = req.clone();
    let mut argv = vec!["-c".to_string(), WATCHED.to_string(), "sh".into()];
    if !req.env.is_empty() {
        argv.push("env".into());
        argv.extend(req.env.iter().map(|(k, v)| format!("{k}={v}")));
        r.env.clear();
    }
    argv.push(req.program.clone());
    argv.extend(req.args.iter().cloned());
    r.program = "sh".into();
    r.args = argv;
    remote_command(&r)
}

pub(crate) fn ssh_binary(name: &str) -> Result<PathBuf> {
    let env = if name == "scp" {
        "ANYVM_SCP"
    } else {
        "ANYVM_SSH"
    };
    resolve_binary(name, None, env)
}

impl SshTarget {
    fn ctx(&self, op: &str) -> Ctx {
        Ctx::vm(
            format!("{op} (ssh {}@{}:{})", self.user, self.host, self.port),
            &self.vm,
        )
    }

    /// Options every ssh/scp call shares: no user config, no prompts, pinned host key.
    pub(crate) fn options(&self) -> Vec<OsString> {
        let pinned = std::fs::metadata(&self.known_hosts)
            .map(|m| m.len() > 0)
            .unwrap_or(false);
        let mut o: Vec<OsString> = vec!["-F".into(), "none".into()];
        for opt in [
            "BatchMode=yes".to_string(),
            "IdentitiesOnly=yes".to_string(),
            "PasswordAuthentication=no".to_string(),
            "KbdInteractiveAuthentication=no".to_string(),
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "GlobalKnownHostsFile=/dev/null".to_string(),
            format!("HostKeyAlias={}", self.host_key_alias),
            format!(
                "StrictHostKeyChecking={}",
                if pinned { "yes" } else { "accept-new" }
            ),
            "CheckHostIP=no".to_string(),
            format!("ConnectTimeout={}", self.connect_timeout.as_secs().max(1)),
            "ServerAliveInterval=5".to_string(),
            "ServerAliveCountMax=3".to_string(),
            "LogLevel=ERROR".to_string(),
        ] {
            o.push("-o".into());
            o.push(opt.into());
        }
        o.push("-i".into());
        o.push(self.identity_file.clone().into());
        o
    }

    fn check_identity(&self, ctx: &Ctx) -> Result<()> {
        if self.identity_file.is_file() {
            return Ok(());
        }
        Err(Error::Auth {
            ctx: ctx.clone(),
            reason: format!(
                "identity file {} does not exist (ssh logins use keys only)",
                self.identity_file.display()
            ),
        })
    }

    fn ensure_known_hosts_dir(&self, ctx: &Ctx) -> Result<()> {
        if let Some(d) = self.known_hosts.parent() {
            std::fs::create_dir_all(d).map_err(|e| Error::io(ctx.clone(), d, e))?;
        }
        Ok(())
    }

    /// `user@host` (IPv6 in brackets when `scp` needs it).
    fn destination(&self, bracket_v6: bool) -> String {
        if bracket_v6 && self.host.contains(':') {
            format!("{}@[{}]", self.user, self.host)
        } else {
            format!("{}@{}", self.user, self.host)
        }
    }

    /// Run a program in the guest. Exit code 255 with one of ssh's own error lines is an ssh
    /// failure (typed error), anything else is the program's result.
    pub async fn exec(&self, req: &ExecRequest) -> Result<ExecOutput> {
        self.exec_into(req, None).await
    }

    /// [`SshTarget::exec`] forwarding output to `sink` as ssh relays it; the returned output
    /// then has empty stdout/stderr. Dropping the future kills the ssh client; without a tty
    /// sshd then closes the session's pipes, so the program ends at its next write (SIGPIPE).
    pub async fn exec_into(
        &self,
        req: &ExecRequest,
        sink: Option<crate::types::OutputSink>,
    ) -> Result<ExecOutput> {
        let streamed = sink.is_some();
        let ctx = self.ctx(&format!("exec {}", req.program));
        self.check_identity(&ctx)?;
        self.ensure_known_hosts_dir(&ctx)?;
        let mut args = self.options();
        args.extend(["-p".into(), self.port.to_string().into()]);
        // Without stdin data the session's stdin is a pipe held open while ssh runs: the remote
        // watcher kills the program when it closes (this call dropped, ssh killed).
        args.push(self.destination(false).into());
        args.push("--".into());
        args.push(match req.stdin {
            Some(_) => remote_command(req).into(),
            None => watched_remote_command(req).into(),
        });
        let mut cmd = ToolCommand::new(ssh_binary("ssh")?, args, req.timeout);
        cmd.display = format!("ssh {} {}", self.destination(false), req.program);
        cmd.stdin = req.stdin.clone();
        cmd.hold_stdin = req.stdin.is_none();
        cmd.sink = sink;
        let mut out = cmd.run(&ctx).await?;
        if out.code == Some(255) {
            if let Some(err) = classify(&ctx, &out.stderr_str()) {
                return Err(err);
            }
        }
        if streamed {
            out.stdout.clear();
            out.stderr.clear();
        }
        Ok(ExecOutput {
            exit_code: out.code,
            signal: None,
            stdout: out.stdout,
            stderr: out.stderr,
            duration: out.duration,
            stdout_truncated: false,
            stderr_truncated: false,
        })
    }

    /// Copy a host file into the guest (scp over the SFTP protocol).
    pub async fn upload(&self, host: &Path, guest: &str, timeout: Duration) -> Result<u64> {
        let ctx = self.ctx(&format!("copy {} to {guest}", host.display()));
        let len = std::fs::metadata(host)
            .map_err(|e| Error::io(ctx.clone(), host, e))?
            .len();
        let dst = format!("{}:{guest}", self.destination(true));
        self.scp(&ctx, host.as_os_str().to_owned(), dst.into(), timeout)
            .await?;
        Ok(len)
    }

    /// Copy a guest file to the host.
    pub async fn download(&self, guest: &str, host: &Path, timeout: Duration) -> Result<u64> {
        let ctx = self.ctx(&format!("copy {guest} to {}", host.display()));
        let src = format!("{}:{guest}", self.destination(true));
        self.scp(&ctx, src.into(), host.as_os_str().to_owned(), timeout)
            .await?;
        Ok(std::fs::metadata(host)
            .map_err(|e| Error::io(ctx.clone(), host, e))?
            .len())
    }

    async fn scp(&self, ctx: &Ctx, src: OsString, dst: OsString, timeout: Duration) -> Result<()> {
        self.check_identity(ctx)?;
        self.ensure_known_hosts_dir(ctx)?;
        let mut args = self.options();
        args.extend(["-q".into(), "-P".into(), self.port.to_string().into()]);
        args.extend(["--".into(), src, dst]);
        let mut cmd = ToolCommand::new(ssh_binary("scp")?, args, timeout);
        cmd.display = format!("scp {}", self.destination(false));
        let out = cmd.run(ctx).await?;
        match out.code {
            Some(0) => Ok(()),
            _ => {
                if let Some(err) = classify(ctx, &out.stderr_str()) {
                    return Err(err);
                }
                let msg = out.stderr_str().trim().to_string();
                if msg.contains("No such file") {
                    return Err(Error::NotFound {
                        ctx: ctx.clone(),
                        what: msg,
                    });
                }
                Err(Error::backend(ctx.clone(), "scp", msg))
            }
        }
    }
}

/// Turn ssh's own failures (a known message on stderr) into typed errors. Callers only ask when
/// the exit code can be ssh's: 255 for ssh, any failure for scp.
pub(crate) fn classify(ctx: &Ctx, text: &str) -> Option<Error> {
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string();
    let has = |s: &str| text.contains(s);
    if has("Permission denied (") || has("Too many authentication failures") {
        return Some(Error::Auth {
            ctx: ctx.clone(),
            reason: format!("the guest refused the key: {line}"),
        });
    }
    if has("REMOTE HOST IDENTIFICATION HAS CHANGED") || has("Host key verification failed") {
        return Some(Error::Auth {
            ctx: ctx.clone(),
            reason: "the guest's host key does not match the pinned one; if the guest was \
                     rebuilt, remove its known_hosts file in anyvm's state dir"
                .into(),
        });
    }
    if has("Connection timed out") || has("Operation timed out") {
        return Some(Error::Timeout {
            ctx: ctx.clone(),
            after: None,
            what: format!("the guest's sshd ({line})"),
        });
    }
    let ssh_own = [
        "Connection refused",
        "No route to host",
        "Could not resolve hostname",
        "Connection closed by",
        "Connection reset by",
        "kex_exchange_identification",
        "Network is unreachable",
    ];
    if ssh_own.iter().any(|s| has(s)) {
        return Some(Error::backend(
            ctx.clone(),
            "ssh",
            format!("cannot reach the guest's sshd: {line}"),
        ));
    }
    None
}

/// Write keys (`type base64` lines) as the pinned known_hosts of a target.
pub(crate) fn pin_keys(ctx: &Ctx, known_hosts: &Path, alias: &str, keys: &[String]) -> Result<()> {
    if let Some(d) = known_hosts.parent() {
        std::fs::create_dir_all(d).map_err(|e| Error::io(ctx.clone(), d, e))?;
    }
    let body: String = keys.iter().map(|k| format!("{alias} {k}\n")).collect();
    crate::util::replace::replace_file(known_hosts, &known_hosts.with_extension("tmp"), body)
        .map_err(|e| Error::io(ctx.clone(), known_hosts, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn quoting_survives_metacharacters() {
        assert_eq!(shell_quote("/bin/echo"), "/bin/echo");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's; rm -rf /"), r"'it'\''s; rm -rf /'");
        assert_eq!(shell_quote("$(id)`x`"), "'$(id)`x`'");
    }

    /// Run a remote command line in a local `sh`, in a process group of its own (the watcher
    /// kills its group).
    fn local_session(line: &str) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("/bin/sh")
            .args(["-c", line])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap()
    }

    #[test]
    fn the_watched_command_keeps_argv_env_and_exit_code_and_dies_with_its_session() {
        let req = ExecRequest::new("sh")
            .args([
                "-c",
                "printf '%s|' \"$@\" \"$X\"; pwd; exit 3",
                "x",
                "a b",
                "$HOME;`id`",
            ])
            .env("X", "y z")
            .cwd("/tmp");
        let mut child = local_session(&watched_remote_command(&req));
        let held = child.stdin.take(); // open while it runs, as ssh keeps it
        let out = child.wait_with_output().unwrap();
        drop(held);
        assert_eq!(out.status.code(), Some(3));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "a b|$HOME;`id`|y z|/tmp\n"
        );

        // The session's stdin closing (the ssh client gone) kills the program.
        let dir = tempfile::tempdir().unwrap();
        let pidf = dir.path().join("pid");
        let script = format!("echo $$ > {}; exec sleep 300", pidf.display());
        let mut child = local_session(&watched_remote_command(
            &ExecRequest::new("sh").args(["-c", script.as_str()]),
        ));
        let pid = (0..100)
            .find_map(|_| {
                std::thread::sleep(Duration::from_millis(20));
                std::fs::read_to_string(&pidf)
                    .ok()
                    .and_then(|p| p.trim().parse::<i32>().ok())
            })
            .expect("the program started");
        drop(child.stdin.take());
        let started = std::time::Instant::now();
        let st = child.wait().unwrap();
        assert!(st.code().is_none() || st.code() != Some(0), "{st:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // SIGKILL is queued by kill() and acted on when the target next runs: under load the
        // program may still show for a moment after the session itself is gone.
        let gone_by = std::time::Instant::now() + Duration::from_secs(5);
        let alive = loop {
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false);
            if !alive || std::time::Instant::now() >= gone_by {
                break alive;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!alive, "the program {pid} outlived its session by 5 s");
    }

    #[test]
    fn remote_command_keeps_argv_boundaries() {
        let mut req = ExecRequest::new("/bin/printf");
        req.args = vec!["%s|".into(), "a b".into(), "$HOME".into()];
        req.cwd = Some("/tmp/x y".into());
        req.env = BTreeMap::from([("K".to_string(), "v w".to_string())]);
        assert_eq!(
            remote_command(&req),
            "cd '/tmp/x y' && exec env 'K=v w' /bin/printf '%s|' 'a b' '$HOME'"
        );
    }
}
