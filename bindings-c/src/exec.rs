//! `anyvm_exec_t` and `anyvm_exec_result_t`: a guest program to run, and what it produced.

use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};

use anyvm::ExecRequest;

use crate::anyvm_error_t;
use crate::anyvm_vm_t;
use crate::call::*;
use crate::handles::Registry;
use crate::vm_call;

/// A guest program to run: program, arguments, environment, working directory, stdin, timeout.
pub struct anyvm_exec_t {
    pub(crate) req: ExecRequest,
}

/// What a guest program produced.
pub struct anyvm_exec_result_t {
    pub(crate) out: anyvm::ExecOutput,
    /// For the error anyvm_exec_result_check() makes.
    vm: String,
    argv: String,
}

impl anyvm_exec_result_t {
    fn insert(vm: &anyvm::Vm, req: &ExecRequest, out: anyvm::ExecOutput) -> *mut Self {
        RESULTS.insert(anyvm_exec_result_t {
            out,
            vm: vm.name().to_string(),
            argv: req.display_argv(),
        })
    }
}

/// Which output a chunk of anyvm_vm_exec_stream() came from.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum anyvm_output_stream_t {
    ANYVM_STDOUT = 1,
    ANYVM_STDERR = 2,
}

/// Called with each chunk of a guest program's output as it arrives, on the thread that
/// called anyvm_vm_exec_stream(). `data` is valid during the call only. Return 0 to go on;
/// anything else kills the program and makes the call fail with ANYVM_ERROR_CANCELLED.
pub type anyvm_output_cb = Option<
    unsafe extern "C" fn(
        user_data: *mut std::ffi::c_void,
        stream: anyvm_output_stream_t,
        data: *const u8,
        len: usize,
    ) -> i32,
>;

pub(crate) static EXECS: Registry<anyvm_exec_t> = Registry::new("anyvm_exec_t");
pub(crate) static RESULTS: Registry<anyvm_exec_result_t> = Registry::new("anyvm_exec_result_t");

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

pub(crate) fn exec_call(
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
        *out = anyvm_exec_result_t::insert(v, &req, o);
        Ok(())
    })
}

/// Run the request, handing its output to `cb` as it is written (the ssh and VirtualBox
/// channels as the tool relays it, the libvirt agent polled). The result holds the exit status
/// and no output. A non-zero exit is a result, not an error.
/// \param cb called per chunk; returning non-zero stops the program (ANYVM_ERROR_CANCELLED)
/// \param user_data passed to `cb` unchanged
/// \param out free with anyvm_exec_result_delete()
#[no_mangle]
pub unsafe extern "C" fn anyvm_vm_exec_stream(
    vm: *const anyvm_vm_t,
    exec: *const anyvm_exec_t,
    cb: anyvm_output_cb,
    user_data: *mut std::ffi::c_void,
    out: *mut *mut anyvm_exec_result_t,
) -> *mut anyvm_error_t {
    vm_call(vm, |v| {
        out_ptr(out, "out")?;
        let Some(cb) = cb else {
            return Err(invalid("cb", "must not be NULL"));
        };
        let req = EXECS.with(exec, |e| e.req.clone())?;
        let o = block(async {
            let mut s = v.exec_stream(&req).await?;
            while let Some(c) = s.next().await {
                let stream = match c.stream {
                    anyvm::OutputStream::Stdout => anyvm_output_stream_t::ANYVM_STDOUT,
                    anyvm::OutputStream::Stderr => anyvm_output_stream_t::ANYVM_STDERR,
                };
                if cb(user_data, stream, c.data.as_ptr(), c.data.len()) != 0 {
                    s.cancel();
                }
            }
            s.wait().await
        })?;
        *out = anyvm_exec_result_t::insert(v, &req, o);
        Ok(())
    })
}

/// NULL if the program exited 0; else an ANYVM_ERROR_GUEST_COMMAND error naming the VM, the
/// program, its exit code (anyvm_error_exit_code()) or signal and its stderr, as the core
/// raises it. Free with anyvm_error_delete().
#[no_mangle]
pub unsafe extern "C" fn anyvm_exec_result_check(
    r: *const anyvm_exec_result_t,
) -> *mut anyvm_error_t {
    guard(|| {
        RESULTS.with(r, |x| {
            if x.out.success() {
                return Ok(());
            }
            Err(from_core(anyvm::guest_command_error(
                &x.vm,
                &x.argv,
                x.out.exit_code,
                x.out.signal,
                &x.out.stderr,
            )))
        })?
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

pub(crate) unsafe fn bytes_of(
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
