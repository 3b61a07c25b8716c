//! Everything anyvm does over OpenSSH: client configuration with the guest's host key pinned
//! (`config`), exec and file copy for guests reached by ssh instead of their tools channel
//! (`session`), port forwards as ssh tunnels where the hypervisor has none (`tunnel`), and the
//! operator's own logins with connection sharing (`login`).

mod config;
mod login;
pub(crate) mod session;
pub(crate) mod tunnel;

pub(crate) use config::{build_config, host_key_alias, known_hosts_path, PinTarget};
pub use config::{parse_public_key, SshConfig, SshOptions, HOST_KEY_PATHS};
pub use login::{Logins, SshLogin, CONTROL_PERSIST};
pub use session::shell_quote;
pub(crate) use session::SshTarget;
pub(crate) use tunnel::Tunnels;
