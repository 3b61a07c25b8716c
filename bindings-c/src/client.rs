//! `anyvm_client_t`: a connection to one hypervisor.

use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};

use anyvm::{Client, ClientOptions, Config};

use crate::anyvm_error_t;
use crate::anyvm_vm_t;
use crate::call::*;
use crate::handles::Registry;
use crate::VMS;

/// A connection to one hypervisor.
pub struct anyvm_client_t {
    pub(crate) client: Client,
}

pub(crate) static CLIENTS: Registry<anyvm_client_t> = Registry::new("anyvm_client_t");

/// Open a backend: "libvirt:qemu:///system", "virtualbox", "vmware:ws".
/// \param uri backend URI (NULL: libvirt:qemu:///system)
/// \param state_dir where port leases and clone disks live (NULL: the default)
/// \param out receives the client; free with anyvm_client_delete()
#[no_mangle]
pub unsafe extern "C" fn anyvm_client_open(
    uri: *const c_char,
    state_dir: *const c_char,
    out: *mut *mut anyvm_client_t,
) -> *mut anyvm_error_t {
    guard(|| {
        out_ptr(out, "out")?;
        let uri = opt_cstr(uri, "uri")?
            .unwrap_or(anyvm::DEFAULT_BACKEND)
            .to_string();
        let mut opts = ClientOptions::default();
        if let Some(d) = opt_cstr(state_dir, "state_dir")? {
            opts = opts.state_dir(d);
        }
        let client = block(Client::connect_with(&uri, opts))?;
        *out = CLIENTS.insert(anyvm_client_t { client });
        Ok(())
    })
}

/// Open the backend named in an anyvm.toml; its machines become usable with anyvm_client_up().
#[no_mangle]
pub unsafe extern "C" fn anyvm_client_open_config(
    config_path: *const c_char,
    out: *mut *mut anyvm_client_t,
) -> *mut anyvm_error_t {
    guard(|| {
        out_ptr(out, "out")?;
        let path = cstr(config_path, "config_path")?;
        let config = Config::load(path).map_err(from_core)?;
        let client = block(Client::from_config(config))?;
        *out = CLIENTS.insert(anyvm_client_t { client });
        Ok(())
    })
}

/// Free a client. VMs opened through it stay valid. NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn anyvm_client_delete(client: *mut anyvm_client_t) {
    let _ = catch_unwind(AssertUnwindSafe(|| CLIENTS.remove(client)));
}

/// Open an existing VM by name. \param out free with anyvm_vm_delete()
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_open(
    client: *const anyvm_client_t,
    name: *const c_char,
    out: *mut *mut anyvm_vm_t,
) -> *mut anyvm_error_t {
    guard(|| {
        out_ptr(out, "out")?;
        let name = cstr(name, "name")?;
        let vm = CLIENTS.with(client, |c| block(c.client.vm(name)))??;
        *out = VMS.insert(anyvm_vm_t { vm });
        Ok(())
    })
}

/// Define a VM from a JSON spec (anyvm's VmSpec: name, cpus, memory_mib, boot, disks, forwards).
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_define_json(
    client: *const anyvm_client_t,
    spec_json: *const c_char,
    out: *mut *mut anyvm_vm_t,
) -> *mut anyvm_error_t {
    guard(|| {
        out_ptr(out, "out")?;
        let json = cstr(spec_json, "spec_json")?;
        let spec: anyvm::VmSpec =
            serde_json::from_str(json).map_err(|e| invalid("spec_json", &e.to_string()))?;
        let vm = CLIENTS.with(client, |c| block(c.client.define(spec.clone())))??;
        *out = VMS.insert(anyvm_vm_t { vm });
        Ok(())
    })
}

/// Define (if needed), start and wait until ready, for a machine of the client's config.
/// \param timeout_s readiness deadline; <= 0 uses the config's
#[no_mangle]
pub unsafe extern "C" fn anyvm_client_up(
    client: *const anyvm_client_t,
    name: *const c_char,
    timeout_s: f64,
    out: *mut *mut anyvm_vm_t,
) -> *mut anyvm_error_t {
    guard(|| {
        out_ptr(out, "out")?;
        let name = cstr(name, "name")?;
        let vm = CLIENTS.with(client, |c| -> Res<anyvm::Vm> {
            let cfg = c.client.config().ok_or_else(|| {
                invalid("client", "was not opened with anyvm_client_open_config()")
            })?;
            let m = cfg.machine(name).map_err(from_core)?;
            let mut ready = m.ready.clone();
            if timeout_s > 0.0 {
                ready.timeout = secs(timeout_s, "timeout_s")?;
            }
            block(c.client.up(m.spec.clone(), &ready))
        })??;
        *out = VMS.insert(anyvm_vm_t { vm });
        Ok(())
    })
}
