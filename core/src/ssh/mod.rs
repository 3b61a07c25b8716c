//! Everything anyvm does over OpenSSH: client configuration with the guest's host key pinned
//! (`config`), exec and file copy for guests reached by ssh instead of their tools channel
//! ([`session`]), and port forwards as ssh tunnels where the hypervisor has none ([`tunnel`]).

mod config;
pub mod session;
pub mod tunnel;

pub(crate) use config::{build_config, host_key_alias, known_hosts_path, PinTarget};
pub use config::{parse_public_key, SshConfig, SshOptions, HOST_KEY_PATHS};
pub use session::{shell_quote, SshTarget};
pub use tunnel::Tunnels;
