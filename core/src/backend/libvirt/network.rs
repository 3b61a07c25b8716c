//! Port forwards and the guest's address.

use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::{ForwardSpec, PortForward, VmState};

use super::*;

pub(super) async fn forward_add(be: &LibvirtBackend, vm: &VmName, fwd: &PortForward) -> Result<()> {
    let ctx = Ctx::vm(format!("forward add {}", fwd.name), vm);
    let mut spec = be.stored_spec(&ctx, vm).await?;
    let running = be.state(vm).await? != VmState::ShutOff;
    if running {
        let rule =
            domain_xml::hostfwd_rule(fwd.proto, &fwd.host_addr, fwd.host_port, fwd.guest_port);
        let out = be
            .monitor(
                &ctx,
                vm,
                format!("hostfwd_add {} {rule}", domain_xml::NETDEV_ID),
            )
            .await?;
        if !out.trim().is_empty() {
            return Err(Error::PortInUse {
                ctx,
                port: fwd.host_port,
                reason: format!("QEMU refused the rule: {}", out.trim()),
            });
        }
    }
    spec.forwards.push(ForwardSpec::from(fwd));
    if let Err(e) = be.redefine(&ctx, spec).await {
        if running {
            let _ = be.monitor(&ctx, vm, domain_xml::hostfwd_remove(fwd)).await;
        }
        return Err(e);
    }
    Ok(())
}

pub(super) async fn forward_remove(
    be: &LibvirtBackend,
    vm: &VmName,
    fwd: &PortForward,
) -> Result<()> {
    let ctx = Ctx::vm(format!("forward remove {}", fwd.name), vm);
    let mut spec = be.stored_spec(&ctx, vm).await?;
    if be.state(vm).await? != VmState::ShutOff {
        let out = be
            .monitor(&ctx, vm, domain_xml::hostfwd_remove(fwd))
            .await?;
        if !out.contains("removed") {
            tracing::warn!(vm = %vm, reply = %out.trim(), "QEMU did not confirm the forward removal");
        }
    }
    spec.forwards.retain(|f| f.name != fwd.name);
    be.redefine(&ctx, spec).await
}
