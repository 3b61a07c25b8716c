//! Port forwards and the guest's address.

use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::{ForwardSpec, PortForward, VmSpec, VmState};

use super::*;

pub(super) async fn forwards(be: &VmwareBackend, vm: &VmName) -> Result<Vec<PortForward>> {
    let ctx = Ctx::vm("forwards", vm);
    Ok(be
        .entry(&ctx, vm)?
        .spec
        .as_ref()
        .map(VmSpec::resolved_forwards)
        .unwrap_or_default())
}

pub(super) async fn forward_add(be: &VmwareBackend, vm: &VmName, fwd: &PortForward) -> Result<()> {
    let ctx = Ctx::vm(format!("forward add {}", fwd.name), vm);
    let e = be.entry(&ctx, vm)?;
    if be.forward_transport() == ForwardTransport::Hypervisor {
        let net = be.host_network(&ctx).await?;
        if be.state(vm).await? == VmState::Running {
            let ip = be.guest_ip(&ctx, &e.vmx).await?;
            be.set_forward(&ctx, vm, &net, &ip, fwd).await?;
        }
    }
    be.update_entry(&ctx, vm, |e| {
        if let Some(s) = e.spec.as_mut() {
            s.forwards.push(ForwardSpec::from(fwd));
        }
    })
}

pub(super) async fn forward_remove(
    be: &VmwareBackend,
    vm: &VmName,
    fwd: &PortForward,
) -> Result<()> {
    let ctx = Ctx::vm(format!("forward remove {}", fwd.name), vm);
    if be.forward_transport() == ForwardTransport::Hypervisor {
        let net = be.host_network(&ctx).await?;
        match be.delete_forward(&ctx, &net, fwd).await {
            Ok(()) | Err(Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    be.update_entry(&ctx, vm, |e| {
        if let Some(s) = e.spec.as_mut() {
            s.forwards.retain(|f| f.name != fwd.name);
        }
    })
}

impl VmwareBackend {
    pub(super) async fn host_network(&self, ctx: &Ctx) -> Result<String> {
        if let Some(n) = &self.opts.host_network {
            return Ok(n.clone());
        }
        let out = self.vmrun(ctx, "listHostNetworks", vec![], None).await.map_err(|e| Error::InvalidState {
            ctx: ctx.clone(),
            state: format!("no host-network commands ({e})"),
            hint: Some("port forwarding needs VMware Workstation Pro or Fusion Pro; on Player use 'ssh -L' through the guest".into()),
        })?;
        let nets = parse::host_networks(&out.stdout_str())
            .map_err(|m| Error::backend(ctx.clone(), "vmrun", m))?;
        nets.into_iter()
            .find(|(_, t)| t == "nat")
            .map(|(n, _)| n)
            .ok_or_else(|| Error::InvalidState {
                ctx: ctx.clone(),
                state: "no NAT host network".into(),
                hint: Some("create one in the Virtual Network Editor or set host_network".into()),
            })
    }

    pub(super) async fn set_forward(
        &self,
        ctx: &Ctx,
        vm: &VmName,
        net: &str,
        ip: &str,
        f: &PortForward,
    ) -> Result<()> {
        let desc = format!("anyvm:{vm}:{}", f.name);
        let args = vec![
            net.into(),
            f.proto.to_string().into(),
            f.host_port.to_string().into(),
            ip.into(),
            f.guest_port.to_string().into(),
            desc.into(),
        ];
        self.vmrun(ctx, "setPortForwarding", args, None)
            .await
            .map(|_| ())
    }

    pub(super) async fn delete_forward(&self, ctx: &Ctx, net: &str, f: &PortForward) -> Result<()> {
        let args = vec![
            net.into(),
            f.proto.to_string().into(),
            f.host_port.to_string().into(),
        ];
        self.vmrun(ctx, "deletePortForwarding", args, None)
            .await
            .map(|_| ())
    }
}
