//! Plain data types shared by every backend and binding, one file per concern.

use std::time::Duration;

mod display;
mod exec;
mod forward;
mod job;
mod lifecycle;
mod snapshot;
mod spec;

pub use display::*;
pub use exec::*;
pub use forward::*;
pub use job::*;
pub use lifecycle::*;
pub use snapshot::*;
pub use spec::*;

/// A timeout given in seconds by a person or another language: finite and positive, or an
/// InvalidArgument naming `what`. The one check the CLI, Python and C share.
pub fn positive_secs(s: f64, what: &str) -> crate::error::Result<Duration> {
    if s.is_finite() && s > 0.0 && s <= 1e12 {
        Ok(Duration::from_secs_f64(s))
    } else {
        Err(crate::error::Error::invalid_arg(
            what,
            format!("{s} is not a positive number of seconds"),
        ))
    }
}

#[cfg(test)]
mod tests;
