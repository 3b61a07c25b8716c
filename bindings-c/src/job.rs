//! Transient jobs through the C ABI: build a job, run it (optionally cancellable from another
//! thread), read its report. A job's own failure (non-zero exit, timeout, boot failure) is in
//! the report; the returned error is only for bad arguments.

use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};

use anyvm::job::{Cancel, JobReport, JobSpec, Outcome, Stage};

use crate::handles::Registry;
use crate::{
    anyvm_client_t, c_string, cstr, guard, opt_cstr, out_ptr, runtime, secs, Res, CLIENTS,
};

/// How a job ended.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum anyvm_job_outcome_t {
    /// The command exited 0.
    ANYVM_JOB_SUCCEEDED = 1,
    /// The command exited non-zero or died of a signal.
    ANYVM_JOB_FAILED = 2,
    ANYVM_JOB_TIMED_OUT = 3,
    ANYVM_JOB_CANCELLED = 4,
    /// anyvm could not run it (clone, boot, readiness, checks or staging failed).
    ANYVM_JOB_ERROR = 5,
}

/// A job to run: template, command, files in and out, limits.
pub struct anyvm_job_t {
    client: anyvm::Client,
    template: anyvm::Vm,
    spec: JobSpec,
    /// anyvm_job_on_phase(): the callback and its user data (a C pointer, kept as a number).
    on_phase: (anyvm_phase_cb, usize),
}

/// Called as each phase of a job begins ("clone", "boot", "ready", "check", "stage_in",
/// "run", "stage_out", "teardown"), on the thread that called anyvm_job_run(). `vm` is the
/// clone's name (NULL before it has one). The strings are valid during the call only. Return
/// 0 to go on; anything else cancels the job (its clone is removed; the report says
/// ANYVM_JOB_CANCELLED).
pub type anyvm_phase_cb = Option<
    unsafe extern "C" fn(
        user_data: *mut std::ffi::c_void,
        job_id: *const c_char,
        phase: *const c_char,
        vm: *const c_char,
    ) -> i32,
>;

/// Cancels a running job from another thread (not from a signal handler: use a thread that
/// waits for the signal, e.g. with sigwait()).
pub struct anyvm_cancel_t {
    cancel: Cancel,
}

/// What a job did.
pub struct anyvm_job_report_t {
    report: JobReport,
}

static JOBS: Registry<anyvm_job_t> = Registry::new("anyvm_job_t");
static CANCELS: Registry<anyvm_cancel_t> = Registry::new("anyvm_cancel_t");
static REPORTS: Registry<anyvm_job_report_t> = Registry::new("anyvm_job_report_t");

/// A job running `program` in a fresh linked clone of `template` (NULL: the profile's machine).
/// \param profile a profile of the client's config whose resources are checked first, or NULL
/// \param out free with anyvm_job_delete()
#[no_mangle]
pub unsafe extern "C" fn anyvm_job_new(
    client: *const anyvm_client_t,
    template_name: *const c_char,
    profile: *const c_char,
    program: *const c_char,
    out: *mut *mut anyvm_job_t,
) -> *mut crate::anyvm_error_t {
    guard(|| {
        out_ptr(out, "out")?;
        let template = opt_cstr(template_name, "template_name")?.map(str::to_string);
        let profile = opt_cstr(profile, "profile")?.map(str::to_string);
        let program = cstr(program, "program")?.to_string();
        let job = CLIENTS.with(client, |c| -> Res<anyvm_job_t> {
            let (vm, spec) = crate::block(anyvm::job::prepare(
                &c.client,
                template.as_deref(),
                profile.as_deref(),
                &[program.as_str()],
            ))?;
            Ok(anyvm_job_t {
                on_phase: (None, 0),
                client: c.client.clone(),
                template: vm,
                spec,
            })
        })??;
        *out = JOBS.insert(job);
        Ok(())
    })
}

fn job_call(
    j: *mut anyvm_job_t,
    f: impl FnOnce(&mut JobSpec) -> Res<()>,
) -> *mut crate::anyvm_error_t {
    guard(|| JOBS.with_mut(j, |x| f(&mut x.spec))?)
}

/// Append one argument to the command.
#[no_mangle]
pub unsafe extern "C" fn anyvm_job_arg(
    job: *mut anyvm_job_t,
    arg: *const c_char,
) -> *mut crate::anyvm_error_t {
    job_call(job, |s| {
        s.command.args.push(cstr(arg, "arg")?.to_string());
        Ok(())
    })
}

/// Set an environment variable for the command.
#[no_mangle]
pub unsafe extern "C" fn anyvm_job_env(
    job: *mut anyvm_job_t,
    key: *const c_char,
    value: *const c_char,
) -> *mut crate::anyvm_error_t {
    job_call(job, |s| {
        s.command.env.insert(
            cstr(key, "key")?.to_string(),
            cstr(value, "value")?.to_string(),
        );
        Ok(())
    })
}

/// Copy a host file or directory into the guest before the command.
#[no_mangle]
pub unsafe extern "C" fn anyvm_job_input(
    job: *mut anyvm_job_t,
    host_path: *const c_char,
    guest_path: *const c_char,
) -> *mut crate::anyvm_error_t {
    job_call(job, |s| {
        let (h, g) = (
            cstr(host_path, "host_path")?,
            cstr(guest_path, "guest_path")?,
        );
        s.inputs.push(Stage {
            host: h.into(),
            guest: g.into(),
        });
        Ok(())
    })
}

/// Copy a guest file or directory out after the command (also when it failed).
#[no_mangle]
pub unsafe extern "C" fn anyvm_job_output(
    job: *mut anyvm_job_t,
    guest_path: *const c_char,
    host_path: *const c_char,
) -> *mut crate::anyvm_error_t {
    job_call(job, |s| {
        let (g, h) = (
            cstr(guest_path, "guest_path")?,
            cstr(host_path, "host_path")?,
        );
        s.outputs.push(Stage {
            host: h.into(),
            guest: g.into(),
        });
        Ok(())
    })
}

/// Wall-clock limit of the command in seconds (default: none).
#[no_mangle]
pub unsafe extern "C" fn anyvm_job_timeout(
    job: *mut anyvm_job_t,
    timeout_s: f64,
) -> *mut crate::anyvm_error_t {
    job_call(job, |s| {
        s.command.timeout = secs(timeout_s, "timeout_s")?;
        Ok(())
    })
}

/// Boot the clone (`cold` non-zero) instead of starting it from the template's warm state (the
/// default where the backend can).
#[no_mangle]
pub unsafe extern "C" fn anyvm_job_cold(
    job: *mut anyvm_job_t,
    cold: i32,
) -> *mut crate::anyvm_error_t {
    job_call(job, |s| {
        s.warm = cold == 0;
        Ok(())
    })
}

/// Call `cb` as each phase of the job begins (NULL: no callback). \param user_data passed to
/// `cb` unchanged
#[no_mangle]
pub unsafe extern "C" fn anyvm_job_on_phase(
    job: *mut anyvm_job_t,
    cb: anyvm_phase_cb,
    user_data: *mut std::ffi::c_void,
) -> *mut crate::anyvm_error_t {
    guard(|| {
        JOBS.with_mut(job, |j| {
            j.on_phase = (cb, user_data as usize);
        })
    })
}

/// Free a job. NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn anyvm_job_delete(job: *mut anyvm_job_t) {
    let _ = catch_unwind(AssertUnwindSafe(|| JOBS.remove(job)));
}

/// A cancellation token. Free with anyvm_cancel_delete().
#[no_mangle]
pub unsafe extern "C" fn anyvm_cancel_new(
    out: *mut *mut anyvm_cancel_t,
) -> *mut crate::anyvm_error_t {
    guard(|| {
        out_ptr(out, "out")?;
        *out = CANCELS.insert(anyvm_cancel_t {
            cancel: Cancel::new(),
        });
        Ok(())
    })
}

/// Cancel every job run with this token: they stop, remove their clones, and report
/// ANYVM_JOB_CANCELLED. Safe from any thread.
#[no_mangle]
pub unsafe extern "C" fn anyvm_cancel_trigger(
    c: *const anyvm_cancel_t,
) -> *mut crate::anyvm_error_t {
    guard(|| CANCELS.with(c, |x| x.cancel.cancel()))
}

/// Free a token. NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn anyvm_cancel_delete(c: *mut anyvm_cancel_t) {
    let _ = catch_unwind(AssertUnwindSafe(|| CANCELS.remove(c)));
}

/// Run the job to the end: clone, boot, ready, stage in, run, stage out, remove the clone.
/// Blocks. \param cancel a token, or NULL \param out free with anyvm_job_report_delete()
#[no_mangle]
pub unsafe extern "C" fn anyvm_job_run(
    job: *const anyvm_job_t,
    cancel: *const anyvm_cancel_t,
    out: *mut *mut anyvm_job_report_t,
) -> *mut crate::anyvm_error_t {
    guard(|| {
        out_ptr(out, "out")?;
        let token = if cancel.is_null() {
            Cancel::new()
        } else {
            CANCELS.with(cancel, |c| c.cancel.clone())?
        };
        let (client, template, spec, on_phase) = JOBS.with(job, |j| {
            (
                j.client.clone(),
                j.template.clone(),
                j.spec.clone(),
                j.on_phase,
            )
        })?;
        let report = match on_phase {
            (None, _) => runtime().block_on(anyvm::run_job(&client, &template, &spec, &token)),
            (Some(cb), ud) => {
                let stop = token.clone();
                let hook: anyvm::PhaseFn = std::sync::Arc::new(move |e: &anyvm::JobEvent| {
                    let (id, phase) = (c_string(&e.job), c_string(&e.phase.to_string()));
                    let vm = e.vm.as_deref().map(c_string);
                    let vm_ptr = vm.as_ref().map_or(std::ptr::null(), |v| v.as_ptr());
                    // SAFETY: the caller's callback, on the caller's thread (block_on polls the
                    // job there), with strings alive for the call.
                    if unsafe {
                        cb(
                            ud as *mut std::ffi::c_void,
                            id.as_ptr(),
                            phase.as_ptr(),
                            vm_ptr,
                        )
                    } != 0
                    {
                        stop.cancel();
                    }
                });
                runtime().block_on(anyvm::run_job_with(&client, &template, &spec, &token, hook))
            }
        };
        *out = REPORTS.insert(anyvm_job_report_t { report });
        Ok(())
    })
}

/// How the job ended; ANYVM_JOB_ERROR if `r` is not live.
#[no_mangle]
pub unsafe extern "C" fn anyvm_job_report_outcome(
    r: *const anyvm_job_report_t,
) -> anyvm_job_outcome_t {
    use anyvm_job_outcome_t::*;
    REPORTS
        .with(r, |x| match x.report.outcome {
            Outcome::Succeeded => ANYVM_JOB_SUCCEEDED,
            Outcome::Failed => ANYVM_JOB_FAILED,
            Outcome::TimedOut => ANYVM_JOB_TIMED_OUT,
            Outcome::Cancelled => ANYVM_JOB_CANCELLED,
            Outcome::Error => ANYVM_JOB_ERROR,
        })
        .unwrap_or(ANYVM_JOB_ERROR)
}

/// The status a shell would see: the command's exit code, 128+N for signal N, 124 on timeout,
/// 125 when anyvm failed, 130 when cancelled (-1 if `r` is not live).
#[no_mangle]
pub unsafe extern "C" fn anyvm_job_report_exit_status(r: *const anyvm_job_report_t) -> i32 {
    REPORTS.with(r, |x| x.report.exit_status()).unwrap_or(-1)
}

unsafe fn report_bytes(
    r: *const anyvm_job_report_t,
    len: *mut usize,
    f: fn(&JobReport) -> &Vec<u8>,
) -> *const u8 {
    let (p, n) = REPORTS
        .with(r, |x| (f(&x.report).as_ptr(), f(&x.report).len()))
        .unwrap_or((std::ptr::null(), 0));
    if !len.is_null() {
        *len = n;
    }
    p
}

/// The command's standard output, valid until anyvm_job_report_delete().
#[no_mangle]
pub unsafe extern "C" fn anyvm_job_report_stdout(
    r: *const anyvm_job_report_t,
    len: *mut usize,
) -> *const u8 {
    report_bytes(r, len, |x| &x.stdout)
}

/// The command's standard error, valid until anyvm_job_report_delete().
#[no_mangle]
pub unsafe extern "C" fn anyvm_job_report_stderr(
    r: *const anyvm_job_report_t,
    len: *mut usize,
) -> *const u8 {
    report_bytes(r, len, |x| &x.stderr)
}

/// The whole report as JSON (phases and timings, error, outputs, console log).
/// \param out free with anyvm_string_delete()
#[no_mangle]
pub unsafe extern "C" fn anyvm_job_report_json(
    r: *const anyvm_job_report_t,
    out: *mut *mut c_char,
) -> *mut crate::anyvm_error_t {
    guard(|| {
        out_ptr(out, "out")?;
        *out = REPORTS.with(r, |x| crate::owned_json(&x.report, "report"))??;
        Ok(())
    })
}

/// Free a report. NULL is ignored.
#[no_mangle]
pub unsafe extern "C" fn anyvm_job_report_delete(r: *mut anyvm_job_report_t) {
    let _ = catch_unwind(AssertUnwindSafe(|| REPORTS.remove(r)));
}

/// Remove job clones whose owner process is gone, stale port leases and share mounts of VMs
/// that are gone; `*out` receives a JSON report (free with anyvm_string_delete()).
#[no_mangle]
pub unsafe extern "C" fn anyvm_client_gc(
    client: *const anyvm_client_t,
    dry_run: bool,
    out: *mut *mut c_char,
) -> *mut crate::anyvm_error_t {
    guard(|| {
        out_ptr(out, "out")?;
        let r = CLIENTS.with(client, |c| {
            crate::block(anyvm::job::gc::gc(&c.client, dry_run))
        })??;
        *out = crate::owned_json(&r, "gc")?;
        Ok(())
    })
}
