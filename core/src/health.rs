//! Health-check results and the host probes backends contribute to `anyvm doctor`. A leaf
//! module: backends use it, and the report that opens every backend lives above them
//! ([`crate::doctor`]).

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    /// Works.
    Ok,
    /// Works, with a limitation worth knowing.
    Warn,
    /// The backend (or a feature of it) cannot work until this is fixed.
    Fail,
}

impl std::fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            CheckStatus::Ok => "ok",
            CheckStatus::Warn => "warn",
            CheckStatus::Fail => "fail",
        })
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// `virtualbox`, `libvirt`, `vmware` or `host`.
    pub backend: String,
    /// Short name: "VBoxManage", "kernel driver", "KVM", ...
    pub name: String,
    /// How it went.
    pub status: CheckStatus,
    /// What was found (versions, paths, the tool's own words).
    pub detail: String,
    /// What to do about it; `None` when there is nothing to do.
    pub hint: Option<String>,
}

impl Check {
    /// A passing check.
    pub fn ok(backend: &str, name: &str, detail: impl Into<String>) -> Check {
        Check {
            backend: backend.into(),
            name: name.into(),
            status: CheckStatus::Ok,
            detail: detail.into(),
            hint: None,
        }
    }
    /// A check that works but wants attention.
    pub fn warn(
        backend: &str,
        name: &str,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Check {
        Check::with_hint(CheckStatus::Warn, backend, name, detail.into(), hint.into())
    }
    /// A check that fails, with what to do.
    pub fn fail(
        backend: &str,
        name: &str,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) -> Check {
        Check::with_hint(CheckStatus::Fail, backend, name, detail.into(), hint.into())
    }
    fn with_hint(
        status: CheckStatus,
        backend: &str,
        name: &str,
        detail: String,
        hint: String,
    ) -> Check {
        Check {
            status,
            hint: Some(hint),
            ..Check::ok(backend, name, detail)
        }
    }
}

/// The state dir can be created and written (port leases, known_hosts, clone disks live there).
pub fn check_state_dir(dir: &Path) -> Check {
    let probe = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let f = tempfile::Builder::new()
            .prefix(".anyvm-doctor-")
            .tempfile_in(dir)?;
        std::fs::write(f.path(), b"ok")?;
        Ok(())
    };
    match probe() {
        Ok(()) => Check::ok(
            "host",
            "state dir",
            format!("{} is writable", dir.display()),
        ),
        Err(e) => Check::fail(
            "host",
            "state dir",
            format!("{}: {e}", dir.display()),
            "set state_dir in anyvm.toml (or ANYVM_STATE_DIR) to a directory this user can write",
        ),
    }
}

/// Whether this kernel is at least `major.minor` (from `uname -r`-style text).
pub(crate) fn kernel_at_least(release: &str, want: (u32, u32)) -> bool {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<u32>().unwrap_or(0));
    let v = (it.next().unwrap_or(0), it.next().unwrap_or(0));
    v >= want
}

pub(crate) fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Does KVM really run guests? A `/dev/kvm` that opens is not enough: on some hosts (nested
/// clouds) KVM guests crawl, hang or die at once. Boots SeaBIOS with no disk under KVM and under
/// TCG and compares how long each takes to report that nothing is bootable: a working KVM is
/// the faster one (well under a second), a broken one is slower than software emulation.
pub async fn probe_kvm(qemu: &Path, timeout: Duration) -> Result<Duration, String> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Err("/dev/kvm cannot be opened".into());
    }
    let kvm = probe_bios(qemu, "kvm", timeout).await?;
    // Where KVM is broken (nested virtualization without the features it needs), guests crawl
    // or die once the kernel starts; the BIOS alone then takes longer than under TCG.
    let tcg = probe_bios(qemu, "tcg", timeout).await?;
    if kvm > Duration::from_secs(2) && kvm > tcg {
        return Err(format!(
            "a KVM guest needed {} ms for its BIOS, software emulation {} ms: KVM does not accelerate here",
            kvm.as_millis(),
            tcg.as_millis()
        ));
    }
    Ok(kvm)
}

/// Boot SeaBIOS without a disk under `accel` until it reports that nothing is bootable.
async fn probe_bios(qemu: &Path, accel: &str, timeout: Duration) -> Result<Duration, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let log = dir.path().join("debugcon.log");
    let started = std::time::Instant::now();
    let mut child = tokio::process::Command::new(qemu)
        .args([
            "-accel",
            accel,
            "-M",
            "pc",
            "-m",
            "16",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-global",
            "isa-debugcon.iobase=0x402",
            "-debugcon",
        ])
        .arg(format!("file:{}", log.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{}: {e}", qemu.display()))?;
    let result = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("No bootable device") || text.contains("Booting from") {
            break Ok(started.elapsed());
        }
        if let Ok(Some(st)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            break Err(format!(
                "QEMU under {accel} exited ({st}) before the BIOS finished: {}",
                err.trim().lines().last().unwrap_or("no message")
            ));
        }
        if started.elapsed() >= timeout {
            break Err(format!(
                "a {accel} guest did not get through its BIOS in {timeout:.0?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill().await;
    result
}

/// Every check, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DoctorReport {
    /// Every check, in the order they ran.
    pub checks: Vec<Check>,
}

impl DoctorReport {
    /// The worst status (Ok for an empty report).
    pub fn status(&self) -> CheckStatus {
        self.checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(CheckStatus::Ok)
    }
    /// Whether any check failed.
    pub fn failed(&self) -> bool {
        self.status() == CheckStatus::Fail
    }
    /// Human-readable lines: `fail  virtualbox  kernel driver: ...` and the hint under it.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for c in &self.checks {
            s.push_str(&format!(
                "{:<5} {:<10} {}: {}\n",
                c.status, c.backend, c.name, c.detail
            ));
            if let Some(h) = &c.hint {
                s.push_str(&format!("{:<16}-> {h}\n", ""));
            }
        }
        s
    }
}

/// How many ports of the range are neither leased nor in use on the loopback.
pub fn check_ports(ports: &crate::ports::PortAllocator) -> Check {
    let range = ports.range();
    let leased: std::collections::BTreeSet<u16> = ports
        .leases()
        .map(|l| l.into_iter().map(|l| l.port).collect())
        .unwrap_or_default();
    let total = usize::from(range.end() - range.start()) + 1;
    let free = range
        .clone()
        .filter(|p| !leased.contains(p))
        .filter(|p| {
            crate::ports::PortAllocator::host_port_free("127.0.0.1", *p, crate::Protocol::Tcp)
        })
        .count();
    let detail = format!(
        "{free} of {total} ports free in {}-{} ({} leased)",
        range.start(),
        range.end(),
        leased.len()
    );
    if free == 0 {
        Check::fail(
            "host",
            "port range",
            detail,
            "widen port_range in anyvm.toml or run 'anyvm gc' to release stale leases",
        )
    } else if free < 8 {
        Check::warn(
            "host",
            "port range",
            detail,
            "few ports left: widen port_range or run 'anyvm gc'",
        )
    } else {
        Check::ok("host", "port range", detail)
    }
}

/// Whether libvirt's power-offs wait on a late reaper. libvirt waits for a killed QEMU to be
/// reaped before it reports the VM off; QEMU is an orphan (libvirt daemonizes it), reaped by
/// the nearest subreaper above libvirtd or else by PID 1, and some container inits reap only
/// every second or two. libvirtd under `tini -s` is reaped at once; otherwise an orphan of
/// this process measures how late PID 1 reaps.
pub async fn check_orphan_reaping() -> Check {
    const NAME: &str = "orphan reaping";
    let hint = "run libvirtd under a reaper that waits at once, e.g. 'tini -s -- libvirtd' (scripts/setup-host.sh does), or on a host with a real init (systemd)";
    let cmdline = |pid: &str| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .replace('\0', " ")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default()
    };
    let parent = |pid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("PPid:").map(|p| p.trim().to_string()))
    };
    let libvirtd = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "libvirtd")
        });
    if let Some(pp) = libvirtd.as_deref().and_then(parent) {
        let up = cmdline(&pp);
        if pp != "1" && up.split_whitespace().any(|w| w == "-s") && up.contains("tini") {
            return Check::ok(
                "host",
                NAME,
                format!("libvirtd runs under '{up}', which reaps its QEMUs at once"),
            );
        }
    }
    let init = cmdline("1");
    let init = init.split_whitespace().next().unwrap_or("?").to_string();
    let spawned = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::process::Command::new("sh")
            .args(["-c", "sleep 0 & echo $!"])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    let pid: Option<u32> = spawned
        .ok()
        .and_then(Result::ok)
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok());
    let Some(pid) = pid else {
        return Check::warn("host", NAME, "could not start a test process", hint);
    };
    let t = std::time::Instant::now();
    let limit = std::time::Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() && t.elapsed() < limit {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let ms = t.elapsed().as_millis();
    if ms < 100 {
        Check::ok(
            "host",
            NAME,
            format!("an orphaned process was reaped in {ms} ms"),
        )
    } else {
        Check::warn(
            "host",
            NAME,
            format!("PID 1 ({init}) left an orphaned process a zombie for {ms} ms: each libvirt power-off waits about as long"),
            hint,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn report_status_is_the_worst_check() {
        let mut r = DoctorReport::default();
        assert_eq!(r.status(), CheckStatus::Ok);
        r.checks.push(Check::ok("host", "a", "fine"));
        r.checks.push(Check::warn("host", "b", "meh", "do x"));
        assert_eq!(r.status(), CheckStatus::Warn);
        assert!(!r.failed());
        r.checks
            .push(Check::fail("virtualbox", "c", "broken", "fix it"));
        assert!(r.failed());
        let text = r.render();
        assert!(text.contains("fail  virtualbox c: broken"), "{text}");
        assert!(text.contains("-> fix it"), "{text}");
    }

    #[test]
    fn state_dir_check_reports_unwritable_dirs() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(check_state_dir(d.path()).status, CheckStatus::Ok);
        let file = d.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        // A path under a regular file can never be created.
        let c = check_state_dir(&file.join("sub"));
        assert_eq!(c.status, CheckStatus::Fail);
        assert!(c.hint.unwrap().contains("state_dir"));
    }

    #[test]
    fn kernel_versions_compare() {
        assert!(kernel_at_least("6.12.0-1-amd64", (6, 12)));
        assert!(kernel_at_least("6.13.2", (6, 12)));
        assert!(!kernel_at_least("6.1.0-28-cloud-amd64", (6, 12)));
        assert!(!kernel_at_least("", (6, 12)));
    }
}
