//! The C ABI of anyvm (`libanyvm`). Opaque handles, explicit `_delete` functions, an error object
//! returned by every fallible call, no panic across the boundary, NULL and bad UTF-8 reported as
//! errors, and a registry of live handles so use-after-delete is an error instead of a crash.
//! The header `include/anyvm.h` is generated from this file by cbindgen.

#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)]

mod doctor;
mod handles;
mod job;

pub use doctor::*;
pub use job::*;

use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use anyvm::{
    Client, ClientOptions, Config, ErrorKind, ExecRequest, ForwardSpec, HostPort, Probe, ReadySpec,
    StopOptions,
};

use handles::Registry;

/// Error kinds, mirroring the core's (anyvm::ErrorKind).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum anyvm_error_kind_t {
    ANYVM_ERROR_NOT_FOUND = 1,
    ANYVM_ERROR_INVALID_STATE = 2,
    ANYVM_ERROR_TIMEOUT = 3,
    ANYVM_ERROR_NOT_READY = 4,
    ANYVM_ERROR_AUTH = 5,
    ANYVM_ERROR_PORT_IN_USE = 6,
    ANYVM_ERROR_BACKEND_UNAVAILABLE = 7,
    ANYVM_ERROR_GUEST_COMMAND = 8,
    ANYVM_ERROR_CONFIG = 9,
    ANYVM_ERROR_INVALID_ARGUMENT = 10,
    ANYVM_ERROR_POLICY_DENIED = 11,
    ANYVM_ERROR_BUSY = 12,
    ANYVM_ERROR_IO = 13,
    ANYVM_ERROR_BACKEND = 14,
    /// The caller cancelled the operation (an output callback returned nonzero).
    ANYVM_ERROR_CANCELLED = 15,
    /// A bug in anyvm (a caught panic); the message says where.
    ANYVM_ERROR_INTERNAL = 99,
}

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

/// An error: a kind and a message naming the VM, the operation and the cause.
pub struct anyvm_error_t {
    kind: anyvm_error_kind_t,
    message: CString,
}

/// A connection to one hypervisor.
pub struct anyvm_client_t {
    client: Client,
}

/// One VM.
pub struct anyvm_vm_t {
    vm: anyvm::Vm,
}

/// A guest program to run: program, arguments, environment, working directory, stdin, timeout.
pub struct anyvm_exec_t {
    req: ExecRequest,
}

/// What a guest program produced.
pub struct anyvm_exec_result_t {
    out: anyvm::ExecOutput,
}

static CLIENTS: Registry<anyvm_client_t> = Registry::new("anyvm_client_t");
static VMS: Registry<anyvm_vm_t> = Registry::new("anyvm_vm_t");
static EXECS: Registry<anyvm_exec_t> = Registry::new("anyvm_exec_t");
static RESULTS: Registry<anyvm_exec_result_t> = Registry::new("anyvm_exec_result_t");
static ERRORS: Registry<anyvm_error_t> = Registry::new("anyvm_error_t");

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("anyvm-c")
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

fn kind_of(k: ErrorKind) -> anyvm_error_kind_t {
    use anyvm_error_kind_t::*;
    match k {
        ErrorKind::NotFound => ANYVM_ERROR_NOT_FOUND,
        ErrorKind::InvalidState => ANYVM_ERROR_INVALID_STATE,
        ErrorKind::Timeout => ANYVM_ERROR_TIMEOUT,
        ErrorKind::NotReady => ANYVM_ERROR_NOT_READY,
        ErrorKind::Auth => ANYVM_ERROR_AUTH,
        ErrorKind::PortInUse => ANYVM_ERROR_PORT_IN_USE,
        ErrorKind::BackendUnavailable => ANYVM_ERROR_BACKEND_UNAVAILABLE,
        ErrorKind::GuestCommand => ANYVM_ERROR_GUEST_COMMAND,
        ErrorKind::Config => ANYVM_ERROR_CONFIG,
        ErrorKind::InvalidArgument => ANYVM_ERROR_INVALID_ARGUMENT,
        ErrorKind::PolicyDenied => ANYVM_ERROR_POLICY_DENIED,
        ErrorKind::Busy => ANYVM_ERROR_BUSY,
        ErrorKind::Io => ANYVM_ERROR_IO,
        ErrorKind::Backend => ANYVM_ERROR_BACKEND,
        ErrorKind::Cancelled => ANYVM_ERROR_CANCELLED,
    }
}

type Res<T> = Result<T, (anyvm_error_kind_t, String)>;

fn from_core(e: anyvm::Error) -> (anyvm_error_kind_t, String) {
    (kind_of(e.kind()), e.to_string())
}

fn invalid(what: &str, why: &str) -> (anyvm_error_kind_t, String) {
    (
        anyvm_error_kind_t::ANYVM_ERROR_INVALID_ARGUMENT,
        format!("invalid argument: {what}: {why}"),
    )
}

fn new_error(kind: anyvm_error_kind_t, msg: String) -> *mut anyvm_error_t {
    let message = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    ERRORS.insert(anyvm_error_t { kind, message })
}

/// Run `f`, turning errors and panics into an error object (NULL on success).
fn guard(f: impl FnOnce() -> Res<()>) -> *mut anyvm_error_t {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err((k, m))) => new_error(k, m),
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            new_error(
                anyvm_error_kind_t::ANYVM_ERROR_INTERNAL,
                format!("internal error in anyvm (please report): {what}"),
            )
        }
    }
}

unsafe fn cstr<'a>(p: *const c_char, what: &str) -> Res<&'a str> {
    if p.is_null() {
        return Err(invalid(what, "must not be NULL"));
    }
    CStr::from_ptr(p)
        .to_str()
        .map_err(|_| invalid(what, "is not valid UTF-8"))
}

unsafe fn opt_cstr<'a>(p: *const c_char, what: &str) -> Res<Option<&'a str>> {
    if p.is_null() {
        Ok(None)
    } else {
        cstr(p, what).map(Some)
    }
}

fn out_ptr<T>(p: *mut T, what: &str) -> Res<()> {
    if p.is_null() {
        Err(invalid(what, "out-parameter must not be NULL"))
    } else {
        Ok(())
    }
}

fn secs(s: f64, what: &str) -> Res<Duration> {
    anyvm::positive_secs(s, what).map_err(from_core)
}

fn block<T>(f: impl std::future::Future<Output = anyvm::Result<T>>) -> Res<T> {
    runtime().block_on(f).map_err(from_core)
}

// ---------------------------------------------------------------- errors

/// The error's message (UTF-8). Valid until anyvm_error_delete(); NULL if `err` is not a live error.
#[no_mangle]
pub unsafe extern "C" fn anyvm_error_message(err: *const anyvm_error_t) -> *const c_char {
    ERRORS
        .with(err, |e| e.message.as_ptr())
        .unwrap_or(std::ptr::null())
}

/// The error's kind; ANYVM_ERROR_INVALID_ARGUMENT if `err` is not a live error.
#[no_mangle]
pub unsafe extern "C" fn anyvm_error_kind(err: *const anyvm_error_t) -> anyvm_error_kind_t {
    ERRORS
        .with(err, |e| e.kind)
        .unwrap_or(anyvm_error_kind_t::ANYVM_ERROR_INVALID_ARGUMENT)
}

/// Free an error. NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn anyvm_error_delete(err: *mut anyvm_error_t) {
    let _ = catch_unwind(AssertUnwindSafe(|| ERRORS.remove(err)));
}

/// Free a string returned by anyvm. NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn anyvm_string_delete(s: *mut c_char) {
    if !s.is_null() {
        drop(CString::from_raw(s));
    }
}

// ---------------------------------------------------------------- client

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

// ---------------------------------------------------------------- vm

/// Free a VM handle (the VM itself is untouched). NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_delete(vm: *mut anyvm_vm_t) {
    let _ = catch_unwind(AssertUnwindSafe(|| VMS.remove(vm)));
}

fn vm_call(vm: *const anyvm_vm_t, f: impl FnOnce(&anyvm::Vm) -> Res<()>) -> *mut anyvm_error_t {
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
        *out = CString::new(v.name().as_str())
            .expect("names have no NUL")
            .into_raw();
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

fn destroy_options(flags: u32) -> anyvm::DestroyOptions {
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
        *out = CString::new(serde_json::to_string(&f).expect("json"))
            .expect("no NUL")
            .into_raw();
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
        *out = CString::new(cfg.stanza).expect("no NUL").into_raw();
        Ok(())
    })
}

// ---------------------------------------------------------------- exec

/// A new exec request for `program` (looked up on the guest's PATH). Free with anyvm_exec_delete().
#[no_mangle]
pub unsafe extern "C" fn anyvm_exec_new(
    program: *const c_char,
    out: *mut *mut anyvm_exec_t,
) -> *mut anyvm_error_t {
    guard(|| {
        out_ptr(out, "out")?;
        let p = cstr(program, "program")?;
        if p.is_empty() {
            return Err(invalid("program", "must not be empty"));
        }
        *out = EXECS.insert(anyvm_exec_t {
            req: ExecRequest::new(p),
        });
        Ok(())
    })
}

fn exec_call(
    e: *mut anyvm_exec_t,
    f: impl FnOnce(&mut ExecRequest) -> Res<()>,
) -> *mut anyvm_error_t {
    guard(|| EXECS.with_mut(e, |x| f(&mut x.req))?)
}

/// Append one argument.
#[no_mangle]
pub unsafe extern "C" fn anyvm_exec_arg(
    exec: *mut anyvm_exec_t,
    arg: *const c_char,
) -> *mut anyvm_error_t {
    exec_call(exec, |r| {
        r.args.push(cstr(arg, "arg")?.to_string());
        Ok(())
    })
}

/// Set an environment variable for the program.
#[no_mangle]
pub unsafe extern "C" fn anyvm_exec_env(
    exec: *mut anyvm_exec_t,
    key: *const c_char,
    value: *const c_char,
) -> *mut anyvm_error_t {
    exec_call(exec, |r| {
        r.env.insert(
            cstr(key, "key")?.to_string(),
            cstr(value, "value")?.to_string(),
        );
        Ok(())
    })
}

/// Run in this guest directory.
#[no_mangle]
pub unsafe extern "C" fn anyvm_exec_cwd(
    exec: *mut anyvm_exec_t,
    dir: *const c_char,
) -> *mut anyvm_error_t {
    exec_call(exec, |r| {
        r.cwd = Some(cstr(dir, "dir")?.to_string());
        Ok(())
    })
}

/// Bytes fed to the program's standard input (copied). `data` may be NULL when `len` is 0.
#[no_mangle]
pub unsafe extern "C" fn anyvm_exec_stdin(
    exec: *mut anyvm_exec_t,
    data: *const u8,
    len: usize,
) -> *mut anyvm_error_t {
    exec_call(exec, |r| {
        if data.is_null() && len > 0 {
            return Err(invalid("data", "must not be NULL when len > 0"));
        }
        r.stdin = Some(if len == 0 {
            Vec::new()
        } else {
            std::slice::from_raw_parts(data, len).to_vec()
        });
        Ok(())
    })
}

/// Seconds before the program is killed (default 300).
#[no_mangle]
pub unsafe extern "C" fn anyvm_exec_timeout(
    exec: *mut anyvm_exec_t,
    timeout_s: f64,
) -> *mut anyvm_error_t {
    exec_call(exec, |r| {
        r.timeout = secs(timeout_s, "timeout_s")?;
        Ok(())
    })
}

/// Free an exec request. NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn anyvm_exec_delete(exec: *mut anyvm_exec_t) {
    let _ = catch_unwind(AssertUnwindSafe(|| EXECS.remove(exec)));
}

/// Run the request in the guest. A non-zero exit is a result, not an error.
/// \param out free with anyvm_exec_result_delete()
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_exec(
    vm: *const anyvm_vm_t,
    exec: *const anyvm_exec_t,
    out: *mut *mut anyvm_exec_result_t,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        out_ptr(out, "out")?;
        let req = EXECS.with(exec, |e| e.req.clone())?;
        let o = block(v.exec(&req))?;
        *out = RESULTS.insert(anyvm_exec_result_t { out: o });
        Ok(())
    })
}

/// True if the program exited (false: killed by a signal).
#[no_mangle]
pub unsafe extern "C" fn anyvm_exec_result_exited(r: *const anyvm_exec_result_t) -> bool {
    RESULTS
        .with(r, |x| x.out.exit_code.is_some())
        .unwrap_or(false)
}

/// The exit code (or -1 when it was killed by a signal or `r` is not live).
#[no_mangle]
pub unsafe extern "C" fn anyvm_exec_result_exit_code(r: *const anyvm_exec_result_t) -> i32 {
    RESULTS
        .with(r, |x| x.out.exit_code.unwrap_or(-1))
        .unwrap_or(-1)
}

/// Standard output bytes, valid until anyvm_exec_result_delete(); `*len` receives the length.
#[no_mangle]
pub unsafe extern "C" fn anyvm_exec_result_stdout(
    r: *const anyvm_exec_result_t,
    len: *mut usize,
) -> *const u8 {
    bytes_of(r, len, |o| &o.stdout)
}

/// Standard error bytes, valid until anyvm_exec_result_delete(); `*len` receives the length.
#[no_mangle]
pub unsafe extern "C" fn anyvm_exec_result_stderr(
    r: *const anyvm_exec_result_t,
    len: *mut usize,
) -> *const u8 {
    bytes_of(r, len, |o| &o.stderr)
}

unsafe fn bytes_of(
    r: *const anyvm_exec_result_t,
    len: *mut usize,
    f: fn(&anyvm::ExecOutput) -> &Vec<u8>,
) -> *const u8 {
    let (p, n) = RESULTS
        .with(r, |x| (f(&x.out).as_ptr(), f(&x.out).len()))
        .unwrap_or((std::ptr::null(), 0));
    if !len.is_null() {
        *len = n;
    }
    p
}

/// Wall-clock seconds the program took.
#[no_mangle]
pub unsafe extern "C" fn anyvm_exec_result_duration(r: *const anyvm_exec_result_t) -> f64 {
    RESULTS
        .with(r, |x| x.out.duration.as_secs_f64())
        .unwrap_or(0.0)
}

/// Free a result. NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn anyvm_exec_result_delete(r: *mut anyvm_exec_result_t) {
    let _ = catch_unwind(AssertUnwindSafe(|| RESULTS.remove(r)));
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
