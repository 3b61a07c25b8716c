//! Turning VBoxManage's stderr into typed errors. `VBoxManage: error:` lines mean failure even
//! with exit code 0; progress lines (`0%...10%...`) and warnings do not.

use crate::error::{Ctx, Error};
use crate::util::command::ToolOutput;

/// What a failed call means, before it becomes an [`Error`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The VM or a file does not exist.
    NotFound(String),
    /// Session lock held or object in the wrong state: worth retrying.
    Busy(String),
    /// Guest control is not up yet.
    NotReady(String),
    /// Guest login failed.
    Auth(String),
    /// Not possible in the VM's state.
    InvalidState(String),
    /// Anything else, with VBoxManage's message.
    Other(String),
}

pub fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter_map(|l| l.trim().strip_prefix("VBoxManage: error:").map(str::trim))
        .collect()
}

/// `None` when the call succeeded.
pub fn classify(out: &ToolOutput) -> Option<Failure> {
    let stderr = out.stderr_str();
    let lines = error_lines(&stderr);
    if lines.is_empty() && out.code == Some(0) {
        return None;
    }
    let text = lines.join("; ");
    let msg = if text.is_empty() {
        let s = stderr.trim();
        if s.is_empty() {
            format!("exit code {:?} with no message", out.code)
        } else {
            s.chars().take(500).collect()
        }
    } else {
        // Keep the human sentence, drop "Context:" noise.
        lines
            .iter()
            .filter(|l| !l.starts_with("Context:"))
            .cloned()
            .collect::<Vec<_>>()
            .join("; ")
    };
    let has = |s: &str| stderr.contains(s);
    Some(
        if has("VBOX_E_OBJECT_NOT_FOUND")
            || has("Could not find a registered machine")
            || has("Could not find a snapshot")
            || has("VERR_FILE_NOT_FOUND")
        {
            Failure::NotFound(msg)
        } else if has("is already locked") || has("VBOX_E_INVALID_OBJECT_STATE") && has("lock") {
            Failure::Busy(msg)
        } else if has("guest execution service is not ready")
            || has("Guest Additions are not installed or not ready")
        {
            Failure::NotReady(msg)
        } else if has("VERR_AUTHENTICATION_FAILURE")
            || has("not able to logon")
            || has("The specified user was not able to logon")
        {
            Failure::Auth(msg)
        } else if has("VBOX_E_INVALID_VM_STATE")
            || has("VBOX_E_INVALID_OBJECT_STATE")
            || has("is not currently running")
        {
            Failure::InvalidState(msg)
        } else {
            Failure::Other(msg)
        },
    )
}

pub fn to_error(ctx: &Ctx, f: Failure) -> Error {
    match f {
        Failure::NotFound(m) => Error::NotFound {
            ctx: ctx.clone(),
            what: m,
        },
        Failure::Busy(m) => Error::Busy {
            ctx: ctx.clone(),
            reason: format!("{m} (retried; another session holds the VM)"),
        },
        Failure::NotReady(m) => Error::NotReady {
            ctx: ctx.clone(),
            after: None,
            probe: "guest additions".into(),
            last_error: m,
        },
        Failure::Auth(m) => Error::Auth {
            ctx: ctx.clone(),
            reason: m,
        },
        Failure::InvalidState(m) => Error::InvalidState {
            ctx: ctx.clone(),
            state: m,
            hint: None,
        },
        Failure::Other(m) => Error::backend(ctx.clone(), "VBoxManage", m),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn out(code: i32, stderr: &str) -> ToolOutput {
        ToolOutput {
            code: Some(code),
            stdout: vec![],
            stderr: stderr.as_bytes().to_vec(),
            duration: Duration::ZERO,
        }
    }

    #[test]
    fn classifies_real_messages() {
        let locked = "VBoxManage: error: The machine 'mc1' is already locked for a session (or being unlocked)\nVBoxManage: error: Details: code VBOX_E_INVALID_OBJECT_STATE (0x80bb0007), component MachineWrap, interface IMachine, callee nsISupports\nVBoxManage: error: Context: \"LockMachine(a->session, LockType_Write)\" at line 531 of file VBoxManageModifyVM.cpp\n";
        match classify(&out(1, locked)).unwrap() {
            Failure::Busy(m) => {
                assert!(m.contains("already locked"));
                assert!(!m.contains("Context:"));
            }
            f => panic!("{f:?}"),
        }
        let nf = "VBoxManage: error: Could not find a registered machine named 'x'\nVBoxManage: error: Details: code VBOX_E_OBJECT_NOT_FOUND (0x80bb0001), component VirtualBoxWrap\n";
        assert!(matches!(classify(&out(1, nf)), Some(Failure::NotFound(_))));
        // exit 0 with an error line is still an error
        assert!(matches!(
            classify(&out(0, "VBoxManage: error: Something odd\n")),
            Some(Failure::Other(_))
        ));
        // progress is not an error
        assert_eq!(
            classify(&out(
                0,
                "0%...10%...20%...30%...40%...50%...60%...70%...80%...90%...100%\n"
            )),
            None
        );
        assert!(matches!(
            classify(&out(
                1,
                "VBoxManage: error: The guest execution service is not ready (yet)\n"
            )),
            Some(Failure::NotReady(_))
        ));
        assert!(
            matches!(classify(&out(1, "")), Some(Failure::Other(m)) if m.contains("exit code"))
        );
    }
}
