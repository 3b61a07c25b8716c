//! Networking: port forwards, leases, shared folders.

use std::path::PathBuf;

use anyvm::{ForwardSpec, HostPort, Protocol};
use clap::{Args, Subcommand};
use serde_json::json;

use crate::app::App;

#[derive(Subcommand, Debug)]
pub enum ShareCmd {
    Add {
        name: String,
        /// Share name the guest sees.
        #[arg(long = "name")]
        share: String,
        #[arg(long)]
        host_path: PathBuf,
        #[arg(long)]
        readonly: bool,
        #[arg(long)]
        automount: bool,
    },
    /// `share remove VM SHARE` or `share remove VM --name SHARE` (the shape `add` takes).
    Remove {
        name: String,
        #[arg(required_unless_present = "label", conflicts_with = "label")]
        share: Option<String>,
        #[arg(long = "name")]
        label: Option<String>,
    },
    List {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ForwardCmd {
    Add {
        name: String,
        #[arg(long)]
        guest_port: u16,
        /// A port number or "auto".
        #[arg(long, default_value = "auto")]
        host_port: String,
        /// Label of the forward (default: proto-guestport).
        #[arg(long = "name")]
        label: Option<String>,
        #[arg(long, default_value = "tcp")]
        proto: String,
        #[arg(long, default_value = "127.0.0.1")]
        host_addr: String,
    },
    /// `forward remove VM LABEL|HOST_PORT` or `forward remove VM --name LABEL` (the shape
    /// `add` takes) or `--host-port PORT`.
    Remove {
        name: String,
        /// Label or host port.
        #[arg(required_unless_present_any = ["label", "host_port"], conflicts_with_all = ["label", "host_port"])]
        forward: Option<String>,
        #[arg(long = "name", conflicts_with = "host_port")]
        label: Option<String>,
        #[arg(long)]
        host_port: Option<u16>,
    },
}

/// Arguments of `anyvm ports`.
#[derive(Args, Debug)]
pub struct PortsArgs {
    pub name: Option<String>,
    #[arg(long)]
    pub all: bool,
}

impl ForwardCmd {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        match self {
            ForwardCmd::Add {
                name,
                guest_port,
                host_port,
                label,
                proto,
                host_addr,
            } => {
                let proto: Protocol = proto.parse()?;
                let hp: HostPort = host_port.parse()?;
                let mut spec = ForwardSpec::new(
                    label.unwrap_or_else(|| format!("{proto}-{guest_port}")),
                    guest_port,
                )
                .host_port(hp)
                .proto(proto);
                spec.host_addr = host_addr;
                let f = app.open(&name).await?.forward_add(&spec).await?;
                app.out(json!(f), || format!("{name}: forward {f}"));
            }
            ForwardCmd::Remove {
                name,
                forward,
                label,
                host_port,
            } => {
                let forward = forward
                    .or(label)
                    .or(host_port.map(|p| p.to_string()))
                    .expect("clap requires one");
                let f = app.open(&name).await?.forward_remove(&forward).await?;
                app.out(json!(f), || format!("{name}: removed forward {f}"));
            }
        }
        Ok(0)
    }
}

impl PortsArgs {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        let PortsArgs { name, all } = self;
        let c = &app.client;
        if all || name.is_none() {
            let leases = c.ports().leases()?;
            app.out(json!(leases), || {
                leases
                    .iter()
                    .map(|l| {
                        format!(
                            "{:<6} {:<4} {:<20} {:<16} {}",
                            l.port,
                            l.proto.to_string(),
                            l.vm,
                            l.purpose,
                            l.backend
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        } else if let Some(n) = name {
            let f = app.open(&n).await?.forwards().await?;
            app.out(json!(f), || {
                f.iter()
                    .map(|f| f.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Ok(0)
    }
}

impl ShareCmd {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        match self {
            ShareCmd::Add {
                name,
                share,
                host_path,
                readonly,
                automount,
            } => {
                let f = anyvm::SharedFolder {
                    name: share,
                    host_path,
                    readonly,
                    automount,
                    guest_path: None,
                };
                let f = app.open(&name).await?.shared_folder_add(&f).await?;
                app.out(json!(f), || {
                    format!("{name}: sharing {} as {}", f.host_path.display(), f.name)
                });
            }
            ShareCmd::Remove { name, share, label } => {
                let share = share.or(label).expect("clap requires one");
                app.open(&name).await?.shared_folder_remove(&share).await?;
                app.out(json!({"name": name, "removed": share}), || {
                    format!("{name}: removed share {share}")
                });
            }
            ShareCmd::List { name } => {
                let l = app.open(&name).await?.shared_folders().await?;
                app.out(json!(l), || {
                    l.iter()
                        .map(|f| format!("{} {}", f.name, f.host_path.display()))
                        .collect::<Vec<_>>()
                        .join("\n")
                });
            }
        }
        Ok(0)
    }
}
