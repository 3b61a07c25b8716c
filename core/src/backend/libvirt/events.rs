//! libvirt's event loop and the domain events anyvm listens to (lifecycle, guest-agent state).
//! The `virt` crate does not wrap event registration, so this is the one place with raw FFI.

use std::ffi::CStr;
use std::os::raw::{c_int, c_void};
use std::sync::OnceLock;

use tokio::sync::broadcast;
use virt::connect::Connect;
use virt::sys;

use crate::backend::{VmEvent, VmEventKind};

static EVENT_LOOP: OnceLock<Result<(), String>> = OnceLock::new();

/// Register libvirt's default event implementation and run it on a dedicated thread.
/// Must happen before the first connection is opened for that connection to deliver events.
pub fn ensure_event_loop() -> Result<(), String> {
    EVENT_LOOP
        .get_or_init(|| {
            // libvirt prints every error to stderr by default; anyvm reports them as typed errors.
            virt::error::clear_error_callback();
            virt::event::event_register_default_impl().map_err(|e| e.to_string())?;
            std::thread::Builder::new()
                .name("anyvm-libvirt-events".into())
                .spawn(|| loop {
                    if let Err(e) = virt::event::event_run_default_impl() {
                        tracing::error!(error = %e, "libvirt event loop iteration failed");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                })
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .clone()
}

type Tx = broadcast::Sender<VmEvent>;

unsafe fn dom_name(dom: sys::virDomainPtr) -> Option<String> {
    let p = sys::virDomainGetName(dom);
    (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) {
    let tx = &*(opaque as *const Tx);
    let kind = match event as u32 {
        sys::VIR_DOMAIN_EVENT_STARTED => VmEventKind::Started,
        sys::VIR_DOMAIN_EVENT_SUSPENDED => VmEventKind::Paused,
        sys::VIR_DOMAIN_EVENT_RESUMED => VmEventKind::Resumed,
        sys::VIR_DOMAIN_EVENT_STOPPED if detail as u32 == sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED => {
            VmEventKind::Crashed
        }
        sys::VIR_DOMAIN_EVENT_STOPPED => VmEventKind::Stopped,
        sys::VIR_DOMAIN_EVENT_CRASHED => VmEventKind::Crashed,
        // Redefinitions (snapshots, config updates) are not new VMs.
        sys::VIR_DOMAIN_EVENT_DEFINED if detail as u32 == sys::VIR_DOMAIN_EVENT_DEFINED_ADDED => {
            VmEventKind::Defined
        }
        sys::VIR_DOMAIN_EVENT_UNDEFINED => VmEventKind::Undefined,
        _ => return,
    };
    if let Some(vm) = dom_name(dom) {
        let _ = tx.send(VmEvent { vm, kind });
    }
}

unsafe extern "C" fn on_agent(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    state: c_int,
    _reason: c_int,
    opaque: *mut c_void,
) {
    let tx = &*(opaque as *const Tx);
    let kind = match state as u32 {
        sys::VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED => {
            VmEventKind::AgentConnected
        }
        sys::VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_DISCONNECTED => {
            VmEventKind::AgentDisconnected
        }
        _ => return,
    };
    if let Some(vm) = dom_name(dom) {
        let _ = tx.send(VmEvent { vm, kind });
    }
}

unsafe extern "C" fn free_tx(opaque: *mut c_void) {
    drop(Box::from_raw(opaque as *mut Tx));
}

/// Subscribe `tx` to lifecycle and agent events of every domain on `conn`.
pub fn register(conn: &Connect, tx: &Tx) -> Result<(), String> {
    let reg = |id: u32, cb: sys::virConnectDomainEventGenericCallback| -> Result<(), String> {
        let opaque = Box::into_raw(Box::new(tx.clone())) as *mut c_void;
        // SAFETY: the callback types match the event IDs (libvirt's documented casting
        // convention); `opaque` is freed by `free_tx` when libvirt drops the registration.
        let rc = unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                id as c_int,
                cb,
                opaque,
                Some(free_tx),
            )
        };
        if rc < 0 {
            unsafe { free_tx(opaque) };
            return Err(virt::error::Error::last_error().to_string());
        }
        Ok(())
    };
    // SAFETY: transmuting between C function pointer types, as libvirt's VIR_DOMAIN_EVENT_CALLBACK does.
    unsafe {
        reg(
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE,
            std::mem::transmute::<
                unsafe extern "C" fn(
                    sys::virConnectPtr,
                    sys::virDomainPtr,
                    c_int,
                    c_int,
                    *mut c_void,
                ),
                sys::virConnectDomainEventGenericCallback,
            >(on_lifecycle),
        )?;
        reg(
            sys::VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE,
            std::mem::transmute::<
                unsafe extern "C" fn(
                    sys::virConnectPtr,
                    sys::virDomainPtr,
                    c_int,
                    c_int,
                    *mut c_void,
                ),
                sys::virConnectDomainEventGenericCallback,
            >(on_agent),
        )?;
    }
    Ok(())
}
