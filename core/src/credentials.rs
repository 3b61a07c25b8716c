//! Guest credentials. Secrets are read when needed from a file, an environment variable or a
//! callback; they never appear in `Debug`/`Display` output, logs or error messages.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Ctx, Error, Result};

/// A secret string whose formatting is always redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret from a string (zeroed when dropped).
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself. Call only where it is handed to the guest or a tool's private input.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // Best effort: do not leave the password in freed memory.
        // SAFETY: overwriting initialized bytes with zeros keeps the String valid UTF-8.
        unsafe { self.0.as_bytes_mut().iter_mut().for_each(|b| *b = 0) };
    }
}

type SecretCallback = Arc<dyn Fn() -> std::result::Result<Secret, String> + Send + Sync>;

/// Where a secret comes from. There is deliberately no variant holding a literal from config.
#[derive(Clone)]
pub enum SecretSource {
    /// First line of a file (trailing newline stripped).
    File(PathBuf),
    /// An environment variable of the calling process.
    Env(String),
    /// A callback, e.g. a keyring lookup in the embedding application.
    Callback(SecretCallback),
    /// A secret already held in memory by the caller (never from a config file).
    Value(Secret),
}

impl SecretSource {
    /// A secret asked for when needed (a keyring, a prompt).
    pub fn callback(
        f: impl Fn() -> std::result::Result<Secret, String> + Send + Sync + 'static,
    ) -> Self {
        SecretSource::Callback(Arc::new(f))
    }

    /// The secret itself; errors say which source failed.
    pub fn resolve(&self, ctx: &Ctx) -> Result<Secret> {
        match self {
            SecretSource::File(p) => {
                let s = std::fs::read_to_string(p).map_err(|e| Error::io(ctx.clone(), p, e))?;
                Ok(Secret(s.lines().next().unwrap_or("").to_string()))
            }
            SecretSource::Env(var) => std::env::var(var).map(Secret).map_err(|_| Error::Auth {
                ctx: ctx.clone(),
                reason: format!("environment variable {var} (password source) is not set"),
            }),
            SecretSource::Callback(f) => f().map_err(|reason| Error::Auth {
                ctx: ctx.clone(),
                reason: format!("password callback failed: {reason}"),
            }),
            SecretSource::Value(s) => Ok(s.clone()),
        }
    }
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(p) => write!(f, "File({})", p.display()),
            SecretSource::Env(v) => write!(f, "Env({v})"),
            SecretSource::Callback(_) => f.write_str("Callback(..)"),
            SecretSource::Value(_) => f.write_str("Value(***)"),
        }
    }
}

/// A guest account: user name, an optional password source and an optional ssh identity.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    /// The guest user.
    pub user: String,
    /// Where the password comes from, when the channel uses one.
    pub password: Option<SecretSource>,
    /// The private key for ssh, when the channel uses one.
    pub identity_file: Option<PathBuf>,
}

impl Credentials {
    /// An account with no secret yet.
    pub fn user(user: impl Into<String>) -> Self {
        Credentials {
            user: user.into(),
            ..Default::default()
        }
    }
    /// Take the password from `src`.
    pub fn password(mut self, src: SecretSource) -> Self {
        self.password = Some(src);
        self
    }
    /// Log in with this ssh private key.
    pub fn identity_file(mut self, p: impl Into<PathBuf>) -> Self {
        self.identity_file = Some(p.into());
        self
    }
}

impl fmt::Display for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.user)?;
        if self.password.is_some() {
            f.write_str(" (password: ***)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_everywhere() {
        let c = Credentials::user("mc").password(SecretSource::Value(Secret::new("hunter2")));
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{c}").contains("hunter2"));
        let s = c
            .password
            .as_ref()
            .unwrap()
            .resolve(&Ctx::new("t"))
            .unwrap();
        assert_eq!(s.expose(), "hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** Secret(***)");
    }

    #[test]
    fn file_and_env_sources() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret\nignored\n").unwrap();
        assert_eq!(
            SecretSource::File(p)
                .resolve(&Ctx::new("t"))
                .unwrap()
                .expose(),
            "s3cret"
        );
        let e = SecretSource::Env("ANYVM_TEST_UNSET_VAR".into())
            .resolve(&Ctx::vm("exec", "v"))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("ANYVM_TEST_UNSET_VAR (password source) is not set"),
            "{e}"
        );
        let e = SecretSource::callback(|| Err("keyring locked".into()))
            .resolve(&Ctx::new("t"))
            .unwrap_err();
        assert!(e.to_string().contains("keyring locked"));
    }
}
