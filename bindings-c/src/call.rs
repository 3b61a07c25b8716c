//! The plumbing every C function shares: the runtime, turning core errors and panics into
//! error objects, checked C strings and out-parameters.

use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;
use std::time::Duration;

use anyvm::ErrorKind;

use crate::error::{anyvm_error_kind_t, anyvm_error_t, ERRORS};

pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
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

pub(crate) fn kind_of(k: ErrorKind) -> anyvm_error_kind_t {
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

/// Why a call failed, before it becomes an `anyvm_error_t`.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) kind: anyvm_error_kind_t,
    pub(crate) message: String,
    /// A guest program's exit code, for ANYVM_ERROR_GUEST_COMMAND.
    pub(crate) exit_code: Option<i32>,
}

pub(crate) type Res<T> = Result<T, Failure>;

pub(crate) fn from_core(e: anyvm::Error) -> Failure {
    let exit_code = match &e {
        anyvm::Error::GuestCommand { exit_code, .. } => *exit_code,
        _ => None,
    };
    Failure {
        kind: kind_of(e.kind()),
        message: e.to_string(),
        exit_code,
    }
}

pub(crate) fn invalid(what: &str, why: &str) -> Failure {
    from_core(anyvm::Error::invalid_arg(what, why))
}

/// `s` as a C string; a NUL inside (which C cannot hold) becomes a space.
pub(crate) fn c_string(s: &str) -> CString {
    CString::new(s.replace('\0', " ")).unwrap_or_default()
}

pub(crate) fn new_error(f: Failure) -> *mut anyvm_error_t {
    let message = c_string(&f.message);
    ERRORS.insert(anyvm_error_t {
        kind: f.kind,
        message,
        exit_code: f.exit_code,
    })
}

/// A string handed to C, freed with anyvm_string_delete(); a NUL inside becomes a space.
pub(crate) fn owned_string(s: &str) -> *mut c_char {
    c_string(s).into_raw()
}

/// `value` as JSON, handed to C like [`owned_string`].
pub(crate) fn owned_json(value: &impl serde::Serialize, what: &str) -> Res<*mut c_char> {
    serde_json::to_string(value)
        .map(|j| owned_string(&j))
        .map_err(|e| invalid(what, &e.to_string()))
}

/// Run `f`, turning errors and panics into an error object (NULL on success).
pub(crate) fn guard(f: impl FnOnce() -> Res<()>) -> *mut anyvm_error_t {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err(f)) => new_error(f),
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            new_error(Failure {
                kind: anyvm_error_kind_t::ANYVM_ERROR_INTERNAL,
                message: format!("internal error in anyvm (please report): {what}"),
                exit_code: None,
            })
        }
    }
}

pub(crate) unsafe fn cstr<'a>(p: *const c_char, what: &str) -> Res<&'a str> {
    if p.is_null() {
        return Err(invalid(what, "must not be NULL"));
    }
    CStr::from_ptr(p)
        .to_str()
        .map_err(|_| invalid(what, "is not valid UTF-8"))
}

pub(crate) unsafe fn opt_cstr<'a>(p: *const c_char, what: &str) -> Res<Option<&'a str>> {
    if p.is_null() {
        Ok(None)
    } else {
        cstr(p, what).map(Some)
    }
}

pub(crate) fn out_ptr<T>(p: *mut T, what: &str) -> Res<()> {
    if p.is_null() {
        Err(invalid(what, "out-parameter must not be NULL"))
    } else {
        Ok(())
    }
}

pub(crate) fn secs(s: f64, what: &str) -> Res<Duration> {
    anyvm::positive_secs(s, what).map_err(from_core)
}

pub(crate) fn block<T>(f: impl std::future::Future<Output = anyvm::Result<T>>) -> Res<T> {
    runtime().block_on(f).map_err(from_core)
}
