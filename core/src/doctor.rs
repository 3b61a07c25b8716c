//! `anyvm doctor`: what is wrong with this host for each hypervisor, with a fix for each problem.
//!
//! Each backend contributes its own checks ([`crate::Backend::doctor`]); this module adds the
//! host-side ones (state dir, port range) and the report type. Checks never fail as calls: a
//! problem is a [`Check`] with status `fail`, so one broken backend does not hide the others.

pub use crate::health::{
    check_ports, check_state_dir, probe_kvm, Check, CheckStatus, DoctorReport,
};

/// Checks for every backend this build knows, then the host's. The `configured` backend's
/// problems count in full; a backend nobody asked for that is not installed is a warning.
pub async fn run_all(configured: &str, opts: crate::ClientOptions) -> DoctorReport {
    let configured: Option<crate::BackendUri> = configured.parse().ok();
    let mut candidates: Vec<String> = Vec::new();
    if let Some(c) = &configured {
        candidates.push(c.to_string());
    }
    for uri in ["libvirt:qemu:///system", "virtualbox", "vmware:ws"] {
        let kind = uri.split(':').next().unwrap_or(uri);
        if !candidates
            .iter()
            .any(|c| c.split(':').next().unwrap_or(c) == kind)
        {
            candidates.push(uri.to_string());
        }
    }
    let mut checks = Vec::new();
    for (i, uri) in candidates.iter().enumerate() {
        let name = uri.split(':').next().unwrap_or(uri).to_string();
        match crate::Client::connect_with(uri, opts.clone()).await {
            Ok(c) => {
                let own = i == 0 && configured.is_some();
                checks.extend(c.backend().doctor().await.into_iter().map(|mut ch| {
                    // A backend nobody asked for cannot fail this host.
                    if !own && ch.status == CheckStatus::Fail {
                        ch.status = CheckStatus::Warn;
                        ch.detail.push_str(" (not the configured backend)");
                    }
                    ch
                }));
            }
            Err(e) if i == 0 && configured.is_some() => checks.push(Check::fail(
                &name,
                "connect",
                e.to_string(),
                "install and start it, or choose another backend (--backend, backend = in anyvm.toml)",
            )),
            Err(e) => checks.push(Check::warn(
                &name,
                "connect",
                format!("not available: {e}"),
                format!("only needed to run VMs on {name}"),
            )),
        }
    }
    checks.push(check_state_dir(&opts.state_dir));
    checks.push(check_ports(&crate::ports::PortAllocator::new(
        opts.state_dir.clone(),
        opts.port_range.clone(),
    )));
    DoctorReport { checks }
}
