//! `anyvm_vm_t`: one VM's lifecycle, readiness, copies, forwards and snapshots.

use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use anyvm::{ExecRequest, ForwardSpec, HostPort, Probe, ReadySpec, StopOptions};

use crate::anyvm_error_t;
use crate::call::*;
use crate::handles::Registry;

/// A VM's power state.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum anyvm_vm_state_t {
    ANYVM_STATE_RUNNING = 1,
    ANYVM_STATE_PAUSED = 2,
    ANYVM_STATE_SAVED = 3,
    ANYVM_STATE_SHUT_OFF = 4,
    ANYVM_STATE_BUSY = 5,
    ANYVM_STATE_CRASHED = 6,
    ANYVM_STATE_UNKNOWN = 7,
}

/// How anyvm_vm_stop() ended.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum anyvm_stop_outcome_t {
    ANYVM_STOP_ALREADY_OFF = 1,
    ANYVM_STOP_GRACEFUL = 2,
    ANYVM_STOP_FORCED = 3,
}

/// One VM.
pub struct anyvm_vm_t {
    pub(crate) vm: anyvm::Vm,
}

pub(crate) static VMS: Registry<anyvm_vm_t> = Registry::new("anyvm_vm_t");

/// Free a VM handle (the VM itself is untouched). NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_delete(vm: *mut anyvm_vm_t) {
    let _ = catch_unwind(AssertUnwindSafe(|| VMS.remove(vm)));
}

pub(crate) fn vm_call(
    vm: *const anyvm_vm_t,
    f: impl FnOnce(&anyvm::Vm) -> Res<()>,
) -> *mut anyvm_error_t {
    guard(|| VMS.with(vm, |v| f(&v.vm))?)
}

/// The VM's name. Free with anyvm_string_delete().
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_name(
    vm: *const anyvm_vm_t,
    out: *mut *mut c_char,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        out_ptr(out, "out")?;
        *out = owned_string(v.name().as_str());
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_state(
    vm: *const anyvm_vm_t,
    out: *mut anyvm_vm_state_t,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        out_ptr(out, "out")?;
        use anyvm_vm_state_t::*;
        *out = match block(v.state())? {
            anyvm::VmState::Running => ANYVM_STATE_RUNNING,
            anyvm::VmState::Paused => ANYVM_STATE_PAUSED,
            anyvm::VmState::Saved => ANYVM_STATE_SAVED,
            anyvm::VmState::ShutOff => ANYVM_STATE_SHUT_OFF,
            anyvm::VmState::Busy => ANYVM_STATE_BUSY,
            anyvm::VmState::Crashed => ANYVM_STATE_CRASHED,
            anyvm::VmState::Unknown => ANYVM_STATE_UNKNOWN,
        };
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_start(vm: *const anyvm_vm_t) -> *mut anyvm_error_t {
    vm_call(vm, |v| block(v.start()))
}

/// Graceful shutdown within `timeout_s`, then power off. \param outcome may be NULL
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_stop(
    vm: *const anyvm_vm_t,
    force: bool,
    timeout_s: f64,
    outcome: *mut anyvm_stop_outcome_t,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        let r = block(v.stop(StopOptions {
            force,
            timeout: secs(timeout_s, "timeout_s")?,
        }))?;
        if !outcome.is_null() {
            *outcome = match r {
                anyvm::StopOutcome::AlreadyOff => anyvm_stop_outcome_t::ANYVM_STOP_ALREADY_OFF,
                anyvm::StopOutcome::Graceful => anyvm_stop_outcome_t::ANYVM_STOP_GRACEFUL,
                anyvm::StopOutcome::Forced => anyvm_stop_outcome_t::ANYVM_STOP_FORCED,
            };
        }
        Ok(())
    })
}

/// Hardware reset: the guest restarts at once, without a shutdown.
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_reset(vm: *const anyvm_vm_t) -> *mut anyvm_error_t {
    vm_call(vm, |v| block(v.reset()))
}

/// Flag for anyvm_vm_destroy_with() and anyvm_vm_snapshot_delete_with(): destroy the linked
/// clones that depend on what is removed (deepest first) instead of refusing.
pub const ANYVM_WITH_CLONES: u32 = 1;

pub(crate) fn destroy_options(flags: u32) -> anyvm::DestroyOptions {
    anyvm::DestroyOptions::default().with_clones(flags & ANYVM_WITH_CLONES != 0)
}

/// Power off and remove the VM with its snapshots, clone disks and port leases. Fails with
/// ANYVM_ERROR_INVALID_STATE, naming them, while linked clones depend on the VM.
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_destroy(vm: *const anyvm_vm_t) -> *mut anyvm_error_t {
    vm_call(vm, |v| block(v.destroy()))
}

/// anyvm_vm_destroy() with \p flags (0 or ANYVM_WITH_CLONES).
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_destroy_with(
    vm: *const anyvm_vm_t,
    flags: u32,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        block(v.destroy_with(destroy_options(flags))).map(|_| ())
    })
}

/// Write the powered-off VM as an OVA appliance at \p path (VirtualBox).
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_export(
    vm: *const anyvm_vm_t,
    path: *const c_char,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        let path = cstr(path, "path")?;
        block(v.export_appliance(path))
    })
}

/// Wait until the guest passes its probes, or fail with the probe still failing.
/// \param probes array of "agent", "tcp:PORT", "ssh:PORT", "command:[\"ARG\", ...]" (the
///        syntax of anyvm.toml and the command line; NULL with n_probes 0: the agent)
/// \param any true: one passing probe is enough; false: all must pass
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_wait_ready(
    vm: *const anyvm_vm_t,
    probes: *const *const c_char,
    n_probes: usize,
    any: bool,
    timeout_s: f64,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        let mut spec = ReadySpec::default().timeout(secs(timeout_s, "timeout_s")?);
        if n_probes > 0 {
            if probes.is_null() {
                return Err(invalid("probes", "must not be NULL when n_probes > 0"));
            }
            spec.probes.clear();
            for i in 0..n_probes {
                let p = cstr(*probes.add(i), "probe")?;
                spec.probes.push(p.parse::<Probe>().map_err(from_core)?);
            }
        }
        if any {
            spec = spec.any();
        }
        block(v.wait_ready(&spec)).map(|_| ())
    })
}

/// Copy a host file into the guest. \param bytes may be NULL
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_copy_to(
    vm: *const anyvm_vm_t,
    host_path: *const c_char,
    guest_path: *const c_char,
    bytes: *mut u64,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        let (h, g) = (
            cstr(host_path, "host_path")?,
            cstr(guest_path, "guest_path")?,
        );
        let n = block(v.copy_to(h, g))?;
        if !bytes.is_null() {
            *bytes = n;
        }
        Ok(())
    })
}

/// Copy a guest file to the host. \param bytes may be NULL
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_copy_from(
    vm: *const anyvm_vm_t,
    guest_path: *const c_char,
    host_path: *const c_char,
    bytes: *mut u64,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        let (g, h) = (
            cstr(guest_path, "guest_path")?,
            cstr(host_path, "host_path")?,
        );
        let n = block(v.copy_from(g, PathBuf::from(h)))?;
        if !bytes.is_null() {
            *bytes = n;
        }
        Ok(())
    })
}

/// Forward a TCP host port to `guest_port`. \param host_port 0 allocates a free one
/// \param host_port_out receives the port in effect (may be NULL)
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_forward_add(
    vm: *const anyvm_vm_t,
    name: *const c_char,
    guest_port: u16,
    host_port: u16,
    host_port_out: *mut u16,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        let name = cstr(name, "name")?;
        let hp = if host_port == 0 {
            HostPort::Auto
        } else {
            HostPort::Fixed(host_port)
        };
        let f = block(v.forward_add(&ForwardSpec::new(name, guest_port).host_port(hp)))?;
        if !host_port_out.is_null() {
            *host_port_out = f.host_port;
        }
        Ok(())
    })
}

/// Remove a forward by name (or host port).
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_forward_remove(
    vm: *const anyvm_vm_t,
    name: *const c_char,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        let name = cstr(name, "name")?;
        block(v.forward_remove(name)).map(|_| ())
    })
}

/// The VM's forwards as a JSON array of {name, proto, host_addr, host_port, guest_port}.
/// Free with anyvm_string_delete().
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_forwards_json(
    vm: *const anyvm_vm_t,
    out: *mut *mut c_char,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        out_ptr(out, "out")?;
        let f = block(v.forwards())?;
        *out = owned_json(&f, "forwards")?;
        Ok(())
    })
}

/// Save a PNG of the running guest's screen at `path`; `width`/`height` (may be NULL) receive
/// its size. libvirt needs a display (console.vnc in the spec); VMware the guest account.
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_screenshot(
    vm: *const anyvm_vm_t,
    path: *const c_char,
    width: *mut u32,
    height: *mut u32,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        let path = cstr(path, "path")?;
        let shot = block(v.screenshot_to(path))?;
        if !width.is_null() {
            *width = shot.width;
        }
        if !height.is_null() {
            *height = shot.height;
        }
        Ok(())
    })
}

/// Where a viewer reaches the guest's screen, as JSON {"protocol","host","port","url"}, or
/// `null` when the VM has none. Free with anyvm_string_delete().
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_remote_display_json(
    vm: *const anyvm_vm_t,
    out: *mut *mut c_char,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        out_ptr(out, "out")?;
        let d = block(v.remote_display())?;
        *out = owned_json(&d, "remote_display")?;
        Ok(())
    })
}

#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_snapshot_take(
    vm: *const anyvm_vm_t,
    name: *const c_char,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        let name = cstr(name, "name")?;
        block(v.snapshot_take(name, ""))
    })
}

#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_snapshot_restore(
    vm: *const anyvm_vm_t,
    name: *const c_char,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        let name = cstr(name, "name")?;
        block(v.snapshot_restore(name))
    })
}

/// Delete a snapshot; fails, naming them, while linked clones were made from it.
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_snapshot_delete(
    vm: *const anyvm_vm_t,
    name: *const c_char,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        let name = cstr(name, "name")?;
        block(v.snapshot_delete(name))
    })
}

/// anyvm_vm_snapshot_delete() with \p flags (0 or ANYVM_WITH_CLONES).
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_snapshot_delete_with(
    vm: *const anyvm_vm_t,
    name: *const c_char,
    flags: u32,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        let name = cstr(name, "name")?;
        block(v.snapshot_delete_with(name, destroy_options(flags)))
    })
}

/// An OpenSSH config block with the guest's host key pinned. \param user, identity_file may be NULL
/// \param out free with anyvm_string_delete()
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_ssh_config(
    vm: *const anyvm_vm_t,
    user: *const c_char,
    identity_file: *const c_char,
    out: *mut *mut c_char,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        out_ptr(out, "out")?;
        let opts = anyvm::SshOptions {
            user: opt_cstr(user, "user")?.map(str::to_string),
            identity_file: opt_cstr(identity_file, "identity_file")?.map(PathBuf::from),
            ..Default::default()
        };
        let cfg = block(v.ssh_config(&opts))?;
        *out = owned_string(&cfg.stanza);
        Ok(())
    })
}

/// For benchmarks only: time `n` calls of `op` ("exec_true" or "state") made inside Rust,
/// writing seconds per call into `out` (n elements), to compare with the same calls through C.
#[no_mangle]
pub unsafe extern "C" fn anyvm_bench_rust_timings(
    vm: *const anyvm_vm_t,
    op: *const c_char,
    n: usize,
    out: *mut f64,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        out_ptr(out, "out")?;
        let exec = match cstr(op, "op")? {
            "exec_true" => true,
            "state" => false,
            o => return Err(invalid("op", &format!("{o:?} is not exec_true or state"))),
        };
        let req = ExecRequest::new("true");
        let times = block(async {
            let mut t = Vec::with_capacity(n);
            for _ in 0..n {
                let s = std::time::Instant::now();
                if exec {
                    v.exec(&req).await?;
                } else {
                    v.state().await?;
                }
                t.push(s.elapsed().as_secs_f64());
            }
            Ok(t)
        })?;
        std::ptr::copy_nonoverlapping(times.as_ptr(), out, n);
        Ok(())
    })
}
