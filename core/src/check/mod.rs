//! `anyvm check PROFILE`: every declared resource verified from inside the guest.
//!
//! The probe is a POSIX shell script (guest_probe.sh) run through the VM's guest channel; it
//! opens the connection and hands back the first bytes in hex, and the host judges them (a MySQL
//! greeting is parsed here, not guessed from an open port). Old frozen guests have sh, and bash
//! or nc; nothing is installed in them.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::profile::{Profile, Resource};
use crate::types::{ExecRequest, VmState};
use crate::vm::Vm;

const PROBE: &str = include_str!("guest_probe.sh");

/// How one resource check went.
#[derive(Debug, Clone, Serialize)]
pub struct ResourceReport {
    /// The resource's name in the profile.
    pub name: String,
    /// Its kind (`tcp`, `mysql`, `folder`, ...).
    pub kind: String,
    /// What was checked (`host:port`, a path).
    pub target: String,
    /// Whether it is usable.
    pub ok: bool,
    /// What was seen: the server version, the folder's access, or why it failed.
    pub detail: String,
    /// How long the check took.
    pub elapsed_ms: u64,
}

/// A profile checked from inside one guest.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    /// The profile.
    pub profile: String,
    /// The guest.
    pub vm: String,
    /// Whether every resource is usable.
    pub ok: bool,
    /// Each resource, in the profile's order.
    pub resources: Vec<ResourceReport>,
}

/// Parse the first packet a MySQL/MariaDB server sends: `Ok(version)` for a protocol-10
/// greeting, `Err(reason)` for an error packet (e.g. "host not allowed") or anything else.
pub fn mysql_greeting(b: &[u8]) -> std::result::Result<String, String> {
    if b.len() < 5 {
        return Err(format!("{} bytes are not a MySQL packet", b.len()));
    }
    let len = usize::from(b[0]) | usize::from(b[1]) << 8 | usize::from(b[2]) << 16;
    let payload = &b[4..b.len().min(4 + len)];
    match payload.first() {
        Some(0x0a) => {
            let v = &payload[1..];
            let end = v
                .iter()
                .position(|&c| c == 0)
                .ok_or("greeting without a version string")?;
            Ok(format!(
                "protocol 10, server {}",
                String::from_utf8_lossy(&v[..end])
            ))
        }
        Some(0xff) if payload.len() >= 3 => {
            let code = u16::from(payload[1]) | u16::from(payload[2]) << 8;
            let mut msg = &payload[3..];
            if msg.first() == Some(&b'#') && msg.len() >= 6 {
                msg = &msg[6..];
            }
            Err(format!(
                "server refused the connection: error {code}: {}",
                String::from_utf8_lossy(msg)
            ))
        }
        Some(p) => Err(format!(
            "not a MySQL greeting (first payload byte {p:#04x})"
        )),
        None => Err("empty MySQL packet".into()),
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

struct ProbeOut {
    connected: bool,
    data: Vec<u8>,
    errors: Vec<String>,
    flags: Vec<String>,
}

fn parse(out: &str) -> ProbeOut {
    let mut p = ProbeOut {
        connected: false,
        data: Vec::new(),
        errors: Vec::new(),
        flags: Vec::new(),
    };
    for line in out.lines() {
        match line.split_once(' ') {
            Some(("data", h)) => p.data = hex(h.trim()),
            Some(("error", e)) => p.errors.push(e.trim().to_string()),
            Some(("rc", _)) => {}
            _ if line == "connected" => p.connected = true,
            _ if !line.is_empty() => p.flags.push(line.to_string()),
            _ => {}
        }
    }
    p
}

async fn probe(vm: &Vm, args: &[String], timeout: Duration) -> Result<ProbeOut> {
    let req = ExecRequest::new("/bin/sh")
        .args(
            ["-c", PROBE, "anyvm-probe"]
                .iter()
                .map(|s| s.to_string())
                .chain(args.iter().cloned()),
        )
        .timeout(timeout + Duration::from_secs(15));
    let out = vm.exec_internal("check", &req).await?;
    Ok(parse(&out.stdout_str()))
}

fn why_not_connected(p: &ProbeOut, secs: u64) -> String {
    match p.errors.first() {
        Some(e) => e.clone(),
        None => format!("no connection within {secs}s (filtered, or nothing listening)"),
    }
}

async fn check_one(vm: &Vm, r: &Resource, timeout: Duration) -> Result<(bool, String)> {
    let secs = timeout.as_secs().max(1);
    let tcp = |host: &str, port: u16, read: u32| {
        vec![
            "tcp".to_string(),
            host.to_string(),
            port.to_string(),
            secs.to_string(),
            read.to_string(),
        ]
    };
    Ok(match r {
        Resource::Tcp { host, port } | Resource::CvsPserver { host, port } => {
            let p = probe(vm, &tcp(host, *port, 0), timeout).await?;
            if p.connected {
                (true, "accepts connections".into())
            } else {
                (false, why_not_connected(&p, secs))
            }
        }
        Resource::Mysql { host, port } => {
            let p = probe(vm, &tcp(host, *port, 512), timeout).await?;
            if !p.connected {
                (false, why_not_connected(&p, secs))
            } else if p.data.is_empty() {
                (false, "connected, but no server greeting arrived".into())
            } else {
                match mysql_greeting(&p.data) {
                    Ok(v) => (true, v),
                    Err(e) => (false, e),
                }
            }
        }
        Resource::Ssh { host, port } => {
            let p = probe(vm, &tcp(host, *port, 255), timeout).await?;
            let text = String::from_utf8_lossy(&p.data).to_string();
            if !p.connected {
                (false, why_not_connected(&p, secs))
            } else if text.starts_with("SSH-") {
                (true, text.lines().next().unwrap_or("").trim().to_string())
            } else {
                (
                    false,
                    format!("connected, but no SSH banner ({:?})", text.trim()),
                )
            }
        }
        Resource::Folder { path, writable } => {
            let p = probe(vm, &["folder".into(), path.clone()], timeout).await?;
            if let Some(e) = p.errors.first() {
                return Ok((false, e.clone()));
            }
            let has = |f: &str| p.flags.iter().any(|x| x == f);
            let (mounted, readable, can_write) = (has("mounted"), has("readable"), has("writable"));
            let access = format!(
                "{}, {}, {}",
                if mounted {
                    "mounted"
                } else {
                    "not a mount point"
                },
                if readable { "readable" } else { "not readable" },
                if can_write {
                    "writable"
                } else {
                    "not writable"
                }
            );
            let ok = mounted && readable && can_write == *writable;
            let why = match (mounted, readable, can_write, *writable) {
                (false, ..) => format!("{path} is not mounted ({access})"),
                (_, false, ..) => format!("{path} is not readable ({access})"),
                (_, _, true, false) => {
                    format!("{path} is writable but declared read-only ({access})")
                }
                (_, _, false, true) => {
                    format!("{path} is declared read-write but cannot be written ({access})")
                }
                _ => access,
            };
            (ok, why)
        }
    })
}

/// Verify every resource of `profile` from inside `vm`, mounting the profile's shares first
/// where they name a guest path. Fails only when the VM cannot be asked at all; each resource's
/// outcome is in the report. Audited as "check" under the VM's policy.
pub async fn check(vm: &Vm, profile: &Profile, per_resource: Duration) -> Result<CheckReport> {
    let args = serde_json::json!({"profile": profile.name});
    vm.audited("check", args, check_unaudited(vm, profile, per_resource))
        .await
}

async fn check_unaudited(
    vm: &Vm,
    profile: &Profile,
    per_resource: Duration,
) -> Result<CheckReport> {
    let state = vm.state().await?;
    if state != VmState::Running {
        return Err(Error::InvalidState {
            ctx: crate::error::Ctx::vm(format!("check {}", profile.name), vm.name()),
            state: state.to_string(),
            hint: Some(format!(
                "start it and wait until it is ready (anyvm up {})",
                vm.name()
            )),
        });
    }
    let mut resources: Vec<(String, Resource)> = Vec::new();
    let mut reports = Vec::new();
    for s in &profile.shares {
        let Some(gp) = &s.guest_path else { continue };
        let t = Instant::now();
        if let Err(e) = vm.shared_folder_mount(s).await {
            reports.push(ResourceReport {
                name: format!("share:{}", s.name),
                kind: "folder".into(),
                target: gp.clone(),
                ok: false,
                detail: format!("mount failed: {e}"),
                elapsed_ms: t.elapsed().as_millis() as u64,
            });
            continue;
        }
        resources.push((
            format!("share:{}", s.name),
            Resource::Folder {
                path: gp.clone(),
                writable: !s.readonly,
            },
        ));
    }
    resources.extend(
        profile
            .resources
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    for (name, r) in resources {
        let t = Instant::now();
        let (ok, detail) = match check_one(vm, &r, per_resource).await {
            Ok(x) => x,
            Err(e) => (false, format!("could not run the probe in the guest: {e}")),
        };
        reports.push(ResourceReport {
            name,
            kind: r.kind().into(),
            target: r.target(),
            ok,
            detail,
            elapsed_ms: t.elapsed().as_millis() as u64,
        });
    }
    if profile.check_accounts {
        let t = Instant::now();
        let (ok, detail) = match probe(vm, &["accounts".into()], per_resource).await {
            Ok(p) if !p.errors.is_empty() => (false, p.errors.join("; ")),
            Ok(p) => {
                let empty: Vec<&str> = p
                    .flags
                    .iter()
                    .filter_map(|f| f.strip_prefix("empty_password "))
                    .collect();
                if empty.is_empty() {
                    (true, "no account has an empty password".into())
                } else {
                    (
                        false,
                        format!("accounts with an empty password: {}", empty.join(", ")),
                    )
                }
            }
            Err(e) => (false, format!("could not run the probe in the guest: {e}")),
        };
        reports.push(ResourceReport {
            name: "accounts".into(),
            kind: "accounts".into(),
            target: "/etc/shadow".into(),
            ok,
            detail,
            elapsed_ms: t.elapsed().as_millis() as u64,
        });
    }
    Ok(CheckReport {
        profile: profile.name.clone(),
        vm: vm.name().to_string(),
        ok: reports.iter().all(|r| r.ok),
        resources: reports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_parsing() {
        let mut g = vec![0u8, 0, 0, 0, 0x0a];
        g.extend_from_slice(b"10.11.6-MariaDB-0+deb12u1\0rest");
        let n = g.len() - 4;
        g[0] = n as u8;
        assert_eq!(
            mysql_greeting(&g).unwrap(),
            "protocol 10, server 10.11.6-MariaDB-0+deb12u1"
        );
        let mut e = vec![0u8, 0, 0, 0, 0xff, 0x6a, 0x04];
        e.extend_from_slice(b"Host '10.0.2.15' is not allowed to connect");
        e[0] = (e.len() - 4) as u8;
        let err = mysql_greeting(&e).unwrap_err();
        assert!(
            err.contains("error 1130") && err.contains("not allowed"),
            "{err}"
        );
        assert!(mysql_greeting(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(mysql_greeting(b"").is_err());
    }

    #[test]
    fn probe_output_parsing() {
        let p = parse("rc 0\nconnected\ndata 4a0000\nerror x y\nmounted\n");
        assert!(p.connected);
        assert_eq!(p.data, vec![0x4a, 0, 0]);
        assert_eq!(p.errors, vec!["x y"]);
        assert_eq!(p.flags, vec!["mounted"]);
    }

    /// The probe script itself, run by this host's sh against a local listener: both the bash
    /// and the nc paths must report connections, data and refusals the same way.
    #[test]
    fn probe_script_runs_under_posix_sh() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                use std::io::Write;
                let mut c = c;
                let _ = c.write_all(b"SSH-2.0-test\r\n");
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let bin = tempfile::tempdir().unwrap();
        // nc-only environment: a PATH with busybox applets and no bash.
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        for applet in [
            "sh", "nc", "timeout", "dd", "od", "tr", "grep", "sed", "head", "mktemp", "rm",
            "mkdir", "chmod", "printf", "awk", "ls",
        ] {
            if let Some(b) = busybox {
                std::os::unix::fs::symlink(b, bin.path().join(applet)).unwrap();
            }
        }
        let mut paths = vec![std::env::var("PATH").unwrap()];
        if busybox.is_some() {
            paths.push(bin.path().display().to_string());
        }
        for path in paths {
            let run = |port: u16, want: &str| {
                let out = std::process::Command::new("/bin/sh")
                    .args([
                        "-c",
                        PROBE,
                        "anyvm-probe",
                        "tcp",
                        "127.0.0.1",
                        &port.to_string(),
                        "3",
                        want,
                    ])
                    .env("PATH", &path)
                    .output()
                    .unwrap();
                parse(&String::from_utf8_lossy(&out.stdout))
            };
            let p = run(port, "64");
            assert!(p.connected, "{path}: {:?}", p.errors);
            assert!(p.data.starts_with(b"SSH-2.0-test"), "{path}");
            let p = run(closed, "0");
            assert!(!p.connected, "{path}");
            assert!(!p.errors.is_empty(), "{path}: a refusal says why");
        }
    }
}
