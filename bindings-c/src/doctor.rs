//! `anyvm doctor` through the C ABI: the report as JSON.

use std::ffi::c_char;

use crate::{anyvm_client_t, guard, out_ptr, runtime, CLIENTS};

/// Health checks of the client's backend and of the host. \p out receives a JSON report
/// (`{"status": "ok"|"warn"|"fail", "checks": [{backend, name, status, detail, hint}]}`, free
/// with anyvm_string_delete()); \p failed (may be NULL) is set when any check failed.
#[no_mangle]
pub unsafe extern "C" fn anyvm_client_doctor(
    client: *const anyvm_client_t,
    out: *mut *mut c_char,
    failed: *mut bool,
) -> *mut crate::anyvm_error_t {
    guard(|| {
        out_ptr(out, "out")?;
        let r = CLIENTS.with(client, |c| runtime().block_on(c.client.doctor()))?;
        let text = serde_json::json!({"status": r.status(), "checks": r.checks}).to_string();
        *out = crate::owned_string(&text);
        if !failed.is_null() {
            *failed = r.failed();
        }
        Ok(())
    })
}
