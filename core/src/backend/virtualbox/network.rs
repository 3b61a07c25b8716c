//! Port forwards and the guest's address.

use crate::error::{Ctx, Result};
use crate::name::VmName;
use crate::types::PortForward;

use super::*;

pub(super) async fn forward_add(
    be: &VirtualBoxBackend,
    vm: &VmName,
    fwd: &PortForward,
) -> Result<()> {
    let ctx = Ctx::vm(format!("forward add {}", fwd.name), vm);
    be.natpf1(&ctx, vm, &[&rule(fwd)]).await?;
    if let Some(mut spec) = be.spec(vm).await? {
        spec.forwards.push(crate::types::ForwardSpec::from(fwd));
        be.store_spec(&ctx, &spec).await?;
    }
    Ok(())
}

pub(super) async fn forward_remove(
    be: &VirtualBoxBackend,
    vm: &VmName,
    fwd: &PortForward,
) -> Result<()> {
    let ctx = Ctx::vm(format!("forward remove {}", fwd.name), vm);
    be.natpf1(&ctx, vm, &["delete", &fwd.name]).await?;
    if let Some(mut spec) = be.spec(vm).await? {
        spec.forwards.retain(|f| f.name != fwd.name);
        be.store_spec(&ctx, &spec).await?;
    }
    Ok(())
}

impl VirtualBoxBackend {
    /// Change NAT rules of NIC 1: live (`controlvm natpf1`) when the VM runs, in its settings
    /// (`modifyvm --natpf1`) otherwise.
    pub(super) async fn natpf1(&self, ctx: &Ctx, vm: &VmName, rule_args: &[&str]) -> Result<()> {
        let live = !matches!(
            self.state(vm).await?,
            VmState::ShutOff | VmState::Saved | VmState::Crashed
        );
        let mut a = if live {
            os(&["controlvm", vm.as_str(), "natpf1"])
        } else {
            os(&["modifyvm", vm.as_str(), "--natpf1"])
        };
        a.extend(os(rule_args));
        self.vbox(ctx, a).await.map(|_| ())
    }
}
