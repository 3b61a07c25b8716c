//! `anyvm_events_t` and `anyvm_event_t`: a client's event stream (VM state changes, job phases,
//! copy progress), pulled one event at a time.

use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use anyvm::Event;

use crate::anyvm_error_t;
use crate::call::*;
use crate::client::{anyvm_client_t, CLIENTS};
use crate::error::anyvm_error_kind_t;
use crate::handles::Registry;

/// A client's events from the moment it was made. Events wait in it (up to 1024; a reader that
/// falls behind gets one ANYVM_EVENT_LAGGED) until anyvm_events_next() takes them.
pub struct anyvm_events_t {
    // The stream needs `&mut` to read; the mutex lets several threads share the handle.
    stream: tokio::sync::Mutex<anyvm::EventStream>,
}

/// One event. Its strings live as long as it does.
pub struct anyvm_event_t {
    event: Event,
    vm: Option<CString>,
    kind: Option<CString>,
    job: Option<CString>,
    phase: Option<CString>,
}

/// What an anyvm_event_t tells.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum anyvm_event_type_t {
    /// Not a live event handle.
    ANYVM_EVENT_NONE = 0,
    /// A VM changed: anyvm_event_vm(), anyvm_event_kind() ("started", "agent_connected", ...).
    ANYVM_EVENT_VM = 1,
    /// A job entered a phase: anyvm_event_job(), anyvm_event_phase(), anyvm_event_vm() (its clone,
    /// once it has one).
    ANYVM_EVENT_JOB = 2,
    /// A copy made progress: anyvm_event_vm(), anyvm_event_copy().
    ANYVM_EVENT_COPY = 3,
    /// The reader fell behind: anyvm_event_missed() events were dropped for it.
    ANYVM_EVENT_LAGGED = 4,
}

static STREAMS: Registry<anyvm_events_t> = Registry::new("anyvm_events_t");
static EVENTS: Registry<anyvm_event_t> = Registry::new("anyvm_event_t");

impl anyvm_event_t {
    fn new(event: Event) -> Self {
        let c = |s: &str| Some(c_string(s));
        let (vm, kind, job, phase) = match &event {
            Event::Vm(v) => (c(&v.vm), c(v.kind.as_str()), None, None),
            Event::Job(j) => (
                j.vm.as_deref().and_then(c),
                None,
                c(&j.job),
                c(&j.phase.to_string()),
            ),
            Event::Copy(x) => (c(&x.vm), None, None, None),
            Event::Lagged(_) => (None, None, None, None),
        };
        anyvm_event_t {
            event,
            vm,
            kind,
            job,
            phase,
        }
    }
}

/// Start receiving the client's events: everything that happens from now on to its VMs (through
/// any handle), its jobs and its copies. Free with anyvm_events_delete().
#[no_mangle]
pub unsafe extern "C" fn anyvm_client_events(
    client: *const anyvm_client_t,
    out: *mut *mut anyvm_events_t,
) -> *mut anyvm_error_t {
    guard(|| {
        out_ptr(out, "out")?;
        // The backend's own events are relayed on the library's runtime.
        let _rt = runtime().enter();
        let stream = CLIENTS.with(client, |c| c.client.events())?;
        *out = STREAMS.insert(anyvm_events_t {
            stream: tokio::sync::Mutex::new(stream),
        });
        Ok(())
    })
}

/// Take the next event, waiting at most `timeout_s` seconds (0: only one already waiting;
/// negative: as long as it takes). `*out` is NULL, and no error returned, when none came in time.
/// Once the client and every VM handle opened through it are deleted no more can come: the call
/// fails with ANYVM_ERROR_CANCELLED.
/// \param out free with anyvm_event_delete()
#[no_mangle]
pub unsafe extern "C" fn anyvm_events_next(
    events: *mut anyvm_events_t,
    timeout_s: f64,
    out: *mut *mut anyvm_event_t,
) -> *mut anyvm_error_t {
    guard(|| {
        out_ptr(out, "out")?;
        if timeout_s.is_nan() {
            return Err(invalid("timeout_s", "must be a number"));
        }
        let got = STREAMS.with(events, |s| {
            runtime().block_on(async {
                let mut stream = s.stream.lock().await;
                if timeout_s < 0.0 {
                    return Some(stream.next().await);
                }
                let limit = Duration::try_from_secs_f64(timeout_s).unwrap_or(Duration::MAX);
                tokio::time::timeout(limit, stream.next()).await.ok()
            })
        })?;
        *out = match got {
            None => std::ptr::null_mut(),
            Some(Some(e)) => EVENTS.insert(anyvm_event_t::new(e)),
            Some(None) => {
                return Err(Failure {
                    kind: anyvm_error_kind_t::ANYVM_ERROR_CANCELLED,
                    message: "no more events: the client and all its VM handles are deleted".into(),
                    exit_code: None,
                })
            }
        };
        Ok(())
    })
}

/// Free an event stream. NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn anyvm_events_delete(events: *mut anyvm_events_t) {
    let _ = catch_unwind(AssertUnwindSafe(|| STREAMS.remove(events)));
}

/// What the event tells (ANYVM_EVENT_NONE if `ev` is not a live event).
#[no_mangle]
pub unsafe extern "C" fn anyvm_event_type(ev: *const anyvm_event_t) -> anyvm_event_type_t {
    use anyvm_event_type_t::*;
    EVENTS
        .with(ev, |e| match e.event {
            Event::Vm(_) => ANYVM_EVENT_VM,
            Event::Job(_) => ANYVM_EVENT_JOB,
            Event::Copy(_) => ANYVM_EVENT_COPY,
            Event::Lagged(_) => ANYVM_EVENT_LAGGED,
        })
        .unwrap_or(ANYVM_EVENT_NONE)
}

fn text(ev: *const anyvm_event_t, f: fn(&anyvm_event_t) -> &Option<CString>) -> *const c_char {
    EVENTS
        .with(ev, |e| {
            f(e).as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
        })
        .unwrap_or(std::ptr::null())
}

/// The VM the event is about (a job's clone once it has a name), or NULL.
#[no_mangle]
pub unsafe extern "C" fn anyvm_event_vm(ev: *const anyvm_event_t) -> *const c_char {
    text(ev, |e| &e.vm)
}

/// What happened to the VM ("defined", "undefined", "started", "stopped", "crashed", "paused",
/// "resumed", "agent_connected", "agent_disconnected"), or NULL for other events.
#[no_mangle]
pub unsafe extern "C" fn anyvm_event_kind(ev: *const anyvm_event_t) -> *const c_char {
    text(ev, |e| &e.kind)
}

/// The job's id, or NULL for other events.
#[no_mangle]
pub unsafe extern "C" fn anyvm_event_job(ev: *const anyvm_event_t) -> *const c_char {
    text(ev, |e| &e.job)
}

/// The phase the job entered ("clone", "boot", "ready", "run", "teardown", ...), or NULL.
#[no_mangle]
pub unsafe extern "C" fn anyvm_event_phase(ev: *const anyvm_event_t) -> *const c_char {
    text(ev, |e| &e.phase)
}

/// A copy's progress: bytes done, bytes in all (-1 when not known yet) and whether it ended.
/// Returns false, writing nothing, for other events. Any out-parameter may be NULL.
#[no_mangle]
pub unsafe extern "C" fn anyvm_event_copy(
    ev: *const anyvm_event_t,
    done: *mut u64,
    total: *mut i64,
    finished: *mut bool,
) -> bool {
    let Ok(Some((d, t, f))) = EVENTS.with(ev, |e| match &e.event {
        Event::Copy(x) => Some((x.done, x.total, x.finished)),
        _ => None,
    }) else {
        return false;
    };
    if !done.is_null() {
        *done = d;
    }
    if !total.is_null() {
        *total = t.and_then(|t| i64::try_from(t).ok()).unwrap_or(-1);
    }
    if !finished.is_null() {
        *finished = f;
    }
    true
}

/// How many events a lagging reader missed (0 for other events).
#[no_mangle]
pub unsafe extern "C" fn anyvm_event_missed(ev: *const anyvm_event_t) -> u64 {
    EVENTS
        .with(ev, |e| match e.event {
            Event::Lagged(n) => n,
            _ => 0,
        })
        .unwrap_or(0)
}

/// The whole event as JSON, the shape Python's event dicts have: {"type":"vm","vm":..,"kind":..},
/// {"type":"job","job":..,"vm":..,"phase":..}, {"type":"copy","vm":..,"direction":..,"guest":..,
/// "host":..,"done":..,"total":..,"finished":..} or {"type":"lagged","missed":..}.
/// \param out free with anyvm_string_delete()
#[no_mangle]
pub unsafe extern "C" fn anyvm_event_json(
    ev: *const anyvm_event_t,
    out: *mut *mut c_char,
) -> *mut anyvm_error_t {
    guard(|| {
        out_ptr(out, "out")?;
        *out = EVENTS.with(ev, |e| owned_json(&e.event, "ev"))??;
        Ok(())
    })
}

/// Free an event. NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn anyvm_event_delete(ev: *mut anyvm_event_t) {
    let _ = catch_unwind(AssertUnwindSafe(|| EVENTS.remove(ev)));
}
