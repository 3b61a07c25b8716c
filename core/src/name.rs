//! Validated VM names. Names reach hypervisor tools as argv elements, file names and XML text,
//! so anything that could be read as an option, a path or a shell token is refused up front.

use std::fmt;

use crate::error::{Error, Result};

/// A VM name that is safe to hand to every backend.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct VmName(String);

/// The longest name anyvm accepts.
pub const MAX_NAME_LEN: usize = 64;

impl VmName {
    /// Validate a name: letters, digits, `.`, `_`, `-`, starting with a letter or digit.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let bad = |reason: &str| Err(Error::invalid_arg(format!("VM name {name:?}"), reason));
        if name.is_empty() {
            return bad("must not be empty");
        }
        if name.len() > MAX_NAME_LEN {
            return bad("must be at most 64 bytes");
        }
        if name.starts_with('-') {
            return bad("must not start with '-' (it would be read as an option)");
        }
        if name.starts_with('.') {
            return bad("must not start with '.'");
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            let what = if c.is_control() {
                "control characters are not allowed".to_string()
            } else if c == '/' {
                "'/' is not allowed".to_string()
            } else {
                format!("character {c:?} is not allowed; use letters, digits, '-', '_' and '.'")
            };
            return bad(&what);
        }
        Ok(VmName(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VmName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        VmName::new(s)
    }
}

impl TryFrom<&str> for VmName {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        VmName::new(s)
    }
}

impl From<VmName> for String {
    fn from(n: VmName) -> String {
        n.0
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for VmName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for n in ["build1", "mc-prod_7", "sl6.rm", "A"] {
            assert_eq!(VmName::new(n).unwrap().as_str(), n);
        }
    }

    #[test]
    fn rejects_dangerous_names() {
        for (n, why) in [
            ("", "empty"),
            ("-rf", "start with '-'"),
            ("a/b", "'/'"),
            ("a\nb", "control"),
            ("a;rm -rf", "';'"),
            ("$(id)", "'$'"),
            ("a b", "' '"),
            ("..", "start with '.'"),
            ("`x`", "'`'"),
        ] {
            let e = VmName::new(n).unwrap_err().to_string();
            assert!(e.contains(why), "{n:?}: {e}");
        }
        assert!(VmName::new("x".repeat(65)).is_err());
    }
}
