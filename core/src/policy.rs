//! Security policy attached to a VM handle (from its profile): which host folders may be shared,
//! which guest programs may be run, whether secrets may appear on command lines, and where every
//! operation is audited. Every check runs before any side effect and refuses with
//! [`Error::PolicyDenied`] naming the rule. The network part lives in the VM's definition
//! ([`crate::Network`]) because the hypervisor enforces it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::error::{Ctx, Error, Result};

/// What a site allows its guests and users: programs, shared-folder roots, secrets on command
/// lines, and an audit log of every operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Host folders that may be shared (a share must lie inside one). Empty: any not denied.
    #[serde(default)]
    pub share_roots_allow: Vec<PathBuf>,
    /// Host folders that may never be shared (nor anything inside them), e.g. `/home`.
    #[serde(default)]
    pub share_roots_deny: Vec<PathBuf>,
    /// Absolute guest paths of the programs exec may run. `None`: any; set: only these.
    #[serde(default)]
    pub exec_allow: Option<Vec<String>>,
    /// Whether a hypervisor tool may receive the guest password on its command line (vmrun `-gp`).
    #[serde(default = "yes")]
    pub secrets_in_argv: bool,
    /// JSON-lines audit log of every operation on the VM.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            share_roots_allow: Vec::new(),
            share_roots_deny: Vec::new(),
            exec_allow: None,
            secrets_in_argv: true,
            audit_log: None,
        }
    }
}

/// Resolve symlinks as far as the path exists, so `/data/link-to-home` counts as `/home/...`.
fn resolve(p: &Path) -> PathBuf {
    if let Ok(c) = std::fs::canonicalize(p) {
        return c;
    }
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) => resolve(parent).join(name),
        _ => p.to_path_buf(),
    }
}

impl Policy {
    /// Check the policy itself; errors are (key, why).
    pub fn validate(&self) -> std::result::Result<(), (String, String)> {
        for (key, list) in [
            ("share_roots_allow", &self.share_roots_allow),
            ("share_roots_deny", &self.share_roots_deny),
        ] {
            if let Some(p) = list.iter().find(|p| !p.is_absolute()) {
                return Err((
                    key.into(),
                    format!("{} is not an absolute path", p.display()),
                ));
            }
        }
        if let Some(p) = self
            .exec_allow
            .iter()
            .flatten()
            .find(|p| !p.starts_with('/') || p.contains(".."))
        {
            return Err((
                "exec_allow".into(),
                format!("{p:?} is not an absolute guest path (without '..')"),
            ));
        }
        Ok(())
    }

    /// May `host_path` (already canonical or not) be shared?
    pub fn check_share(&self, ctx: &Ctx, host_path: &Path) -> Result<()> {
        let p = resolve(host_path);
        let deny = |reason: String| Error::PolicyDenied {
            ctx: ctx.clone(),
            reason,
        };
        if let Some(d) = self
            .share_roots_deny
            .iter()
            .find(|d| p.starts_with(resolve(d)))
        {
            return Err(deny(format!(
                "host folder {} lies in the denied root {}",
                p.display(),
                d.display()
            )));
        }
        if !self.share_roots_allow.is_empty()
            && !self
                .share_roots_allow
                .iter()
                .any(|a| p.starts_with(resolve(a)))
        {
            return Err(deny(format!(
                "host folder {} is outside the allowed roots ({})",
                p.display(),
                self.share_roots_allow
                    .iter()
                    .map(|a| a.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(())
    }

    /// May the guest program `program` be run?
    pub fn check_exec(&self, ctx: &Ctx, program: &str) -> Result<()> {
        let Some(allow) = &self.exec_allow else {
            return Ok(());
        };
        if !program.starts_with('/') {
            return Err(Error::PolicyDenied {
                ctx: ctx.clone(),
                reason: format!(
                    "{program:?} is not an absolute path; with an exec allowlist programs are named by absolute path"
                ),
            });
        }
        if allow.iter().any(|a| a == program) {
            return Ok(());
        }
        Err(Error::PolicyDenied {
            ctx: ctx.clone(),
            reason: format!("{program} is not in the exec allowlist"),
        })
    }
}

/// One audit record.
#[derive(Debug, Serialize)]
struct Record<'a> {
    time: String,
    user: String,
    host_pid: u32,
    vm: &'a str,
    operation: &'a str,
    arguments: &'a serde_json::Value,
    outcome: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

static AUDIT_LOCK: Mutex<()> = Mutex::new(());

fn host_user() -> String {
    // SAFETY: getuid has no preconditions; getpwuid_r fills our buffer.
    let uid = unsafe { libc::getuid() };
    let mut buf = vec![0 as libc::c_char; 1024];
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let r = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if r == 0 && !out.is_null() {
        // SAFETY: pw_name points into buf, NUL-terminated, while buf lives.
        let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) };
        return name.to_string_lossy().into_owned();
    }
    format!("uid:{uid}")
}

/// Append one JSON line to `path`. Arguments must already be free of secrets (callers pass
/// names, paths and argv, never credentials). One `write` per record under a process lock and
/// O_APPEND, so concurrent writers do not interleave lines.
pub fn audit(
    path: &Path,
    vm: &str,
    operation: &str,
    arguments: &serde_json::Value,
    outcome: std::result::Result<(), &Error>,
) {
    let rec = Record {
        time: chrono_now(),
        user: host_user(),
        host_pid: std::process::id(),
        vm,
        operation,
        arguments,
        outcome: if outcome.is_ok() { "ok" } else { "error" },
        error: outcome.err().map(|e| e.to_string()),
    };
    let Ok(mut line) = serde_json::to_vec(&rec) else {
        return;
    };
    line.push(b'\n');
    let _g = AUDIT_LOCK.lock();
    let res = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(&line));
    if let Err(e) = res {
        tracing::error!(path = %path.display(), error = %e, "cannot write the audit log");
    }
}

/// RFC 3339 UTC time without a date crate.
fn chrono_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_roots_resolve_symlinks_and_deny_wins() {
        let t = tempfile::tempdir().unwrap();
        let home = t.path().join("home");
        let data = t.path().join("data");
        std::fs::create_dir_all(home.join("alice")).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        std::os::unix::fs::symlink(home.join("alice"), data.join("sneaky")).unwrap();
        let p = Policy {
            share_roots_allow: vec![data.clone()],
            share_roots_deny: vec![home.clone()],
            ..Default::default()
        };
        let ctx = Ctx::vm("share", "v");
        p.check_share(&ctx, &data.join("calib")).unwrap();
        let e = p.check_share(&ctx, &data.join("sneaky")).unwrap_err();
        assert!(e.to_string().contains("denied root"), "{e}");
        let e = p.check_share(&ctx, Path::new("/etc")).unwrap_err();
        assert!(e.to_string().contains("outside the allowed roots"), "{e}");
    }

    #[test]
    fn exec_allowlist_is_exact_and_absolute() {
        let p = Policy {
            exec_allow: Some(vec!["/usr/bin/scons".into()]),
            ..Default::default()
        };
        let ctx = Ctx::vm("exec", "v");
        p.check_exec(&ctx, "/usr/bin/scons").unwrap();
        assert!(p.check_exec(&ctx, "scons").is_err());
        assert!(p.check_exec(&ctx, "/bin/sh").is_err());
        Policy::default().check_exec(&ctx, "sh").unwrap();
        assert!(Policy {
            exec_allow: Some(vec!["bin/x".into()]),
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn audit_lines_are_json() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("audit.jsonl");
        audit(
            &log,
            "v",
            "exec",
            &serde_json::json!({"argv": ["/bin/true"]}),
            Ok(()),
        );
        let e = Error::invalid_arg("x", "y");
        audit(&log, "v", "start", &serde_json::json!({}), Err(&e));
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["outcome"], "ok");
        assert_eq!(lines[1]["outcome"], "error");
        assert!(lines[0]["time"].as_str().unwrap().ends_with('Z'));
        assert!(!lines[0]["user"].as_str().unwrap().is_empty());
    }
}
