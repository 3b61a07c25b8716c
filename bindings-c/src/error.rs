//! `anyvm_error_t`: the error object every fallible call returns (NULL on success).

use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::handles::Registry;

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

/// An error: a kind and a message naming the VM, the operation and the cause.
pub struct anyvm_error_t {
    pub(crate) kind: anyvm_error_kind_t,
    pub(crate) message: CString,
    pub(crate) exit_code: Option<i32>,
}

pub(crate) static ERRORS: Registry<anyvm_error_t> = Registry::new("anyvm_error_t");

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

/// A failed guest program's exit code (errors of kind ANYVM_ERROR_GUEST_COMMAND that exited):
/// true and `*code` set, else false (killed by a signal, another kind, or not a live error).
#[no_mangle]
pub unsafe extern "C" fn anyvm_error_exit_code(err: *const anyvm_error_t, code: *mut i32) -> bool {
    match ERRORS.with(err, |e| e.exit_code).ok().flatten() {
        Some(c) => {
            if !code.is_null() {
                *code = c;
            }
            true
        }
        None => false,
    }
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
