//! vmrun reports failures as `Error: ...` lines (usually with exit code 255, sometimes not): the
//! text decides, not only the code.

use crate::error::{Ctx, Error};
use crate::util::command::ToolOutput;

pub fn message(out: &ToolOutput) -> Option<String> {
    let all = format!("{}\n{}", out.stdout_str(), out.stderr_str());
    let line = all
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("Error:"))
        .map(|l| l.trim_start_matches("Error:").trim().to_string());
    match (line, out.code) {
        (Some(m), _) => Some(m),
        (None, Some(0)) => None,
        (None, code) => Some(format!(
            "vmrun failed with exit code {code:?}: {}",
            all.trim().chars().take(300).collect::<String>()
        )),
    }
}

pub fn to_error(ctx: &Ctx, msg: String) -> Error {
    let m = msg.to_lowercase();
    if m.contains("invalid user name or password") {
        Error::Auth {
            ctx: ctx.clone(),
            reason: msg,
        }
    } else if m.contains("vmware tools are not running") {
        Error::NotReady {
            ctx: ctx.clone(),
            after: None,
            probe: "vmware tools".into(),
            last_error: msg,
        }
    } else if m.contains("unable to connect to host") {
        Error::BackendUnavailable {
            ctx: ctx.clone(),
            backend: "vmware".into(),
            reason: msg,
        }
    } else if m.contains("cannot be found")
        || m.contains("was not found")
        || m.contains("does not exist")
        || m.contains("not found")
    {
        Error::NotFound {
            ctx: ctx.clone(),
            what: msg,
        }
    } else if m.contains("not powered on") || m.contains("is not running") || m.contains("in use") {
        Error::InvalidState {
            ctx: ctx.clone(),
            state: msg,
            hint: None,
        }
    } else {
        Error::backend(ctx.clone(), "vmrun", msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn out(code: i32, stdout: &str) -> ToolOutput {
        ToolOutput {
            code: Some(code),
            stdout: stdout.as_bytes().to_vec(),
            stderr: vec![],
            duration: Duration::ZERO,
        }
    }

    #[test]
    fn classifies_vmrun_errors() {
        let c = Ctx::vm("x", "v");
        let e = |s: &str| to_error(&c, message(&out(255, s)).unwrap());
        assert!(matches!(
            e("Error: The virtual machine is not powered on: /v/v.vmx"),
            Error::InvalidState { .. }
        ));
        assert!(matches!(
            e("Error: Invalid user name or password for the guest OS"),
            Error::Auth { .. }
        ));
        assert!(matches!(
            e("Error: The VMware Tools are not running in the virtual machine: /v.vmx"),
            Error::NotReady { .. }
        ));
        assert!(matches!(
            e("Error: Unable to connect to host."),
            Error::BackendUnavailable { .. }
        ));
        assert!(matches!(
            e("Error: Cannot open VM: /v.vmx, The virtual machine cannot be found"),
            Error::NotFound { .. }
        ));
        assert_eq!(message(&out(0, "")), None);
        assert!(message(&out(0, "Error: odd but exit 0")).is_some());
        assert!(message(&out(3, "")).is_some());
    }
}
