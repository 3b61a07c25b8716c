//! Entry points for the parser fuzz drill (`tests/faults`): every reader of hypervisor output
//! and configuration, reachable with one text. Not part of the API: it exists so the drill can
//! reach parsers that stay private to their backends.
//!
//! A target returns nothing; what it checks is that no input makes a parser panic (or loop),
//! and for the writers that read back what they wrote, that the round trip is exact.

/// One parser family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `showvminfo --machinereadable` (with VBoxManage's WARNING blocks), the keys the backend
    /// reads from it: state, NAT forwards of every NIC, snapshots.
    VboxShowvminfo,
    /// `list vms`, `--version`, `guestproperty get`.
    VboxList,
    /// `list -l hdds` read as a graph (clone links, media of a VM), and `list extpacks`.
    VboxMedia,
    /// VBoxManage's stderr turned into typed errors.
    VboxErrors,
    /// `vmrun list`, `listSnapshots`, `listHostNetworks`, guest exit codes, `Error:` lines.
    VmrunOutput,
    /// A `.vmx` file, read, rewritten and read again.
    Vmx,
    /// A qemu-guest-agent reply (exec status, file read).
    AgentReply,
    /// Domain XML: the anyvm metadata element and snapshot fields.
    DomainXml,
    /// `anyvm.toml`.
    Config,
}

impl Target {
    /// Every target, in the order the drill runs them.
    pub const ALL: [Target; 9] = [
        Target::VboxShowvminfo,
        Target::VboxList,
        Target::VboxMedia,
        Target::VboxErrors,
        Target::VmrunOutput,
        Target::Vmx,
        Target::AgentReply,
        Target::DomainXml,
        Target::Config,
    ];

    /// A short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            Target::VboxShowvminfo => "VBoxManage showvminfo",
            Target::VboxList => "VBoxManage list/version",
            Target::VboxMedia => "VBoxManage list hdds/extpacks",
            Target::VboxErrors => "VBoxManage errors",
            Target::VmrunOutput => "vmrun outputs",
            Target::Vmx => ".vmx files",
            Target::AgentReply => "guest agent JSON",
            Target::DomainXml => "domain XML",
            Target::Config => "anyvm.toml",
        }
    }
}

/// Feed `text` to every parser of `target`.
pub fn parse(target: Target, text: &str) {
    match target {
        Target::VboxShowvminfo | Target::VboxList | Target::VboxMedia | Target::VboxErrors => {
            crate::backend::virtualbox::fuzz_parse(target, text)
        }
        Target::VmrunOutput | Target::Vmx => crate::backend::vmware::fuzz_parse(target, text),
        #[cfg(feature = "libvirt")]
        Target::AgentReply | Target::DomainXml => crate::backend::libvirt::fuzz_parse(target, text),
        #[cfg(not(feature = "libvirt"))]
        Target::AgentReply | Target::DomainXml => {}
        Target::Config => {
            if let Ok(c) = crate::Config::parse(text, None) {
                let _ = c.client_options();
                let _ = c.backend_uri();
                for name in c.machines.keys() {
                    let _ = c.machine(name);
                    let _ = c.profile_for_machine(name);
                }
            }
        }
    }
}

/// Write `spec` into libvirt domain metadata and read it back: panics unless it is equal.
pub fn metadata_roundtrip(spec: &crate::VmSpec) {
    #[cfg(feature = "libvirt")]
    crate::backend::libvirt::fuzz_metadata_roundtrip(spec);
    #[cfg(not(feature = "libvirt"))]
    let _ = spec;
}
