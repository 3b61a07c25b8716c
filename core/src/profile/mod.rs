//! Activity profiles: a named activity (Monte Carlo production, the SCons release manager,
//! reprocessing, ...) bound to a machine, the resources it needs, the folders it shares, its
//! network mode and its security policy. [`crate::check`] verifies from INSIDE the running guest that
//! every declared resource is usable before work starts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::policy::Policy;
use crate::readiness::ReadySpec;
use crate::types::{ForwardSpec, Network, SharedFolder};

/// Something an activity needs, as the guest sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Resource {
    /// A TCP endpoint accepts connections.
    Tcp {
        /// The host, as the guest names it.
        host: String,
        /// The port.
        port: u16,
    },
    /// A MySQL/MariaDB server answers with a protocol-10 greeting (not just an open port).
    Mysql {
        /// The server, as the guest names it.
        host: String,
        /// Its port (default 3306).
        #[serde(default = "mysql_port")]
        port: u16,
    },
    /// A CVS pserver accepts connections.
    CvsPserver {
        /// The server, as the guest names it.
        host: String,
        /// Its port (default 2401).
        #[serde(default = "cvs_port")]
        port: u16,
    },
    /// An ssh server answers with its identification line.
    Ssh {
        /// The server, as the guest names it.
        host: String,
        /// Its port (default 22).
        #[serde(default = "ssh_port")]
        port: u16,
    },
    /// A folder in the guest is mounted and readable; writable exactly when `writable`.
    Folder {
        /// The guest path.
        path: String,
        /// Whether it must be writable (and otherwise must not be).
        #[serde(default)]
        writable: bool,
    },
}

fn mysql_port() -> u16 {
    3306
}
fn cvs_port() -> u16 {
    2401
}
fn ssh_port() -> u16 {
    22
}

impl Resource {
    /// The kind as the configuration spells it.
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Tcp { .. } => "tcp",
            Resource::Mysql { .. } => "mysql",
            Resource::CvsPserver { .. } => "cvs_pserver",
            Resource::Ssh { .. } => "ssh",
            Resource::Folder { .. } => "folder",
        }
    }

    /// What is checked, for reports: `host:port` or the folder.
    pub fn target(&self) -> String {
        match self {
            Resource::Tcp { host, port }
            | Resource::Mysql { host, port }
            | Resource::CvsPserver { host, port }
            | Resource::Ssh { host, port } => format!("{host}:{port}"),
            Resource::Folder { path, writable } => {
                format!(
                    "{path} ({})",
                    if *writable { "read-write" } else { "read-only" }
                )
            }
        }
    }

    /// Check the resource's own fields.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match self {
            Resource::Tcp { host, port }
            | Resource::Mysql { host, port }
            | Resource::CvsPserver { host, port }
            | Resource::Ssh { host, port } => {
                if *port == 0 {
                    return Err("port must be 1-65535".into());
                }
                if host.is_empty()
                    || !host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c))
                {
                    return Err(format!("host {host:?} must be an IP address or a DNS name"));
                }
                Ok(())
            }
            Resource::Folder { path, .. } => {
                if !path.starts_with('/') || path.contains("..") || path.contains('\n') {
                    return Err(format!("path {path:?} must be absolute, without '..'"));
                }
                Ok(())
            }
        }
    }
}

/// One activity.
#[derive(Debug, Clone, Default)]
pub struct Profile {
    /// The profile's name.
    pub name: String,
    /// What the activity is.
    pub description: String,
    /// The machine (from `[machines]`) the activity runs on.
    pub machine: String,
    /// What it needs, by name.
    pub resources: BTreeMap<String, Resource>,
    /// Shares the activity needs (merged into the machine's definition).
    pub shares: Vec<SharedFolder>,
    /// Forwards every machine of this activity gets.
    pub forwards: Vec<ForwardSpec>,
    /// Its guests' outbound network.
    pub network: Network,
    /// What its guests and users may do.
    pub policy: Policy,
    /// When its guests count as ready (default: the machine's).
    pub ready: Option<ReadySpec>,
    /// Flag guest accounts with an empty password (default true).
    pub check_accounts: bool,
}
