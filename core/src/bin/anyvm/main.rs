//! `anyvm`: the operator's command line over the same API the bindings use.

mod job;
mod progress;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyvm::{
    Client, ClientOptions, Config, DestroyOptions, Error, ExecRequest, ForwardSpec, HostPort,
    Protocol, ReadySpec, SshOptions, StopOptions, VmName,
};
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "anyvm",
    version,
    about = "Drive VMs on libvirt/QEMU, VirtualBox and VMware through one interface"
)]
struct Cli {
    /// Backend URI: libvirt:qemu:///system, virtualbox, vmware:ws (default: config, then libvirt).
    #[arg(long, global = true, env = "ANYVM_BACKEND")]
    backend: Option<String>,
    /// Configuration file (default: ./anyvm.toml when present).
    #[arg(long, short = 'c', global = true, env = "ANYVM_CONFIG")]
    config: Option<PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List VMs.
    List,
    /// State, forwards and snapshots of one VM.
    Status {
        name: String,
    },
    /// Define (from the config) if needed, start, and wait until ready.
    Up {
        name: String,
        /// Override the readiness timeout from the config, in seconds.
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Define a VM from the config without starting it.
    Define {
        name: String,
    },
    Start {
        name: String,
    },
    /// Graceful shutdown with a deadline, then power off.
    Stop {
        name: String,
        #[arg(long)]
        force: bool,
        /// Seconds allowed for the graceful shutdown.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    /// Hardware reset: restart the guest at once, without a shutdown.
    Reset {
        name: String,
    },
    /// Save memory to disk and stop; the next start resumes.
    Save {
        name: String,
    },
    /// Power off and remove the VM, its snapshots, clone disks and port leases. Refuses while
    /// linked clones depend on it, naming them, unless --with-clones.
    Destroy {
        name: String,
        /// Destroy the VM's linked clones (and theirs) first.
        #[arg(long)]
        with_clones: bool,
    },
    /// Write a powered-off VM as an OVA appliance (VirtualBox).
    Export {
        name: String,
        /// Output file, ending in .ova.
        path: PathBuf,
    },
    /// Check this host for every backend: tools and versions, drivers, KVM, state dir, ports.
    /// Exit code 1 when a check fails.
    Doctor,
    /// Wait until the VM passes its readiness probes (from the config, or the guest agent).
    WaitReady {
        name: String,
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Verify from inside the running guest that every resource a profile declares is usable
    /// (mounting its shares first). Exit code 1 when any fails.
    Check {
        profile: String,
        /// Seconds allowed per resource.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Run a program in the guest; its exit code becomes anyvm's.
    Exec {
        name: String,
        /// KEY=VALUE, repeatable.
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        #[arg(long)]
        cwd: Option<String>,
        /// Seconds before the guest program is killed.
        #[arg(long, default_value_t = 300.0)]
        timeout: f64,
        /// Pass this process's standard input to the program.
        #[arg(long)]
        stdin: bool,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Copy a file: `anyvm cp VM:/guest/path host/path` or `anyvm cp host/path VM:/guest/path`.
    Cp {
        src: String,
        dst: String,
    },
    /// Port forwards.
    #[command(subcommand)]
    Forward(ForwardCmd),
    /// List a VM's forwards (or every lease with --all).
    Ports {
        name: Option<String>,
        #[arg(long)]
        all: bool,
    },
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Linked (copy-on-write) clone.
    Clone {
        base: String,
        new: String,
        #[arg(long)]
        snapshot: Option<String>,
    },
    /// Print an OpenSSH config block with the guest's host key pinned.
    SshConfig {
        name: String,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        identity: Option<PathBuf>,
        #[arg(long, default_value_t = 22)]
        guest_port: u16,
    },
    /// Path of the serial console log.
    Console {
        name: String,
    },
    /// Host folders shared with the guest.
    #[command(subcommand)]
    Share(ShareCmd),
    /// Transient jobs: one command in a throwaway clone of a template VM.
    #[command(subcommand)]
    Job(job::JobCmd),
    /// Remove job clones whose owning process is gone (killed, crashed, rebooted) and port
    /// leases of VMs that no longer exist.
    Gc {
        /// Only report what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ShareCmd {
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
    Remove {
        name: String,
        share: String,
    },
    List {
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum ForwardCmd {
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
    Remove {
        name: String,
        /// Label or host port.
        forward: String,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    Take {
        name: String,
        snapshot: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    Restore {
        name: String,
        snapshot: String,
    },
    /// Refuses while linked clones were made from the snapshot, unless --with-clones.
    Delete {
        name: String,
        snapshot: String,
        /// Destroy the clones made from this snapshot (and theirs) first.
        #[arg(long)]
        with_clones: bool,
    },
    List {
        name: String,
    },
}

struct App {
    /// Owns the configuration (`client.config()`), which its handles follow.
    client: Client,
    json: bool,
}

fn secs(s: f64, what: &str) -> anyvm::Result<Duration> {
    anyvm::positive_secs(s, what)
}

impl App {
    fn out(&self, value: serde_json::Value, text: impl FnOnce() -> String) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(&value).expect("json"));
        } else {
            let t = text();
            if !t.is_empty() {
                println!("{t}");
            }
        }
    }

    fn ready_spec(&self, name: &str) -> ReadySpec {
        self.client
            .config()
            .and_then(|c| c.machines.get(name))
            .map(|m| m.ready.clone())
            .unwrap_or_default()
    }

    /// A handle on an existing VM (it follows the client's config).
    async fn open(&self, name: &str) -> anyvm::Result<anyvm::Vm> {
        self.client.vm(name).await
    }

    fn machine(&self, name: &str) -> anyvm::Result<&anyvm::MachineConfig> {
        match self.client.config() {
            Some(c) => c.machine(name),
            None => Err(Error::config(
                None,
                format!("machines.{name}"),
                "no configuration file; pass --config or create ./anyvm.toml",
            )),
        }
    }

    async fn run(&self, cmd: Cmd) -> anyvm::Result<u8> {
        let c = &self.client;
        match cmd {
            Cmd::Job(j) => return self.job(j).await,
            Cmd::Gc { dry_run } => return self.gc(dry_run).await,
            Cmd::List => {
                let vms = c.list().await?;
                self.out(json!(vms), || {
                    vms.iter()
                        .map(|v| {
                            format!(
                                "{:<24} {:<10}{}",
                                v.name,
                                v.state.to_string(),
                                if v.managed != Some(false) {
                                    ""
                                } else {
                                    " (not defined by anyvm)"
                                }
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                });
            }
            Cmd::Status { name } => {
                let st = c.status(&name).await?;
                self.out(json!(st), || {
                    let mut s = format!("{name}: {}", st.state);
                    for f in &st.forwards {
                        s.push_str(&format!("\n  forward {f}"));
                    }
                    for sn in &st.snapshots {
                        s.push_str(&format!(
                            "\n  snapshot {}{}",
                            sn.name,
                            if sn.current { " (current)" } else { "" }
                        ));
                    }
                    s
                });
            }
            Cmd::Define { name } => {
                let m = self.machine(&name)?;
                c.define(m.spec.clone()).await?;
                self.out(json!({"name": name, "defined": true}), || {
                    format!("{name}: defined")
                });
            }
            Cmd::Up { name, timeout } => {
                let m = self.machine(&name)?;
                let mut ready = m.ready.clone();
                if let Some(t) = timeout {
                    ready.timeout = secs(t, "--timeout")?;
                }
                let spinner = progress::Spinner::start(format!("bringing up {name}"));
                let res = c.up(m.spec.clone(), &ready).await;
                spinner.stop();
                let vm = res?;
                let forwards = vm.forwards().await?;
                self.out(
                    json!({"name": name, "state": "running", "ready": true, "forwards": forwards}),
                    || {
                        let mut s = format!("{name}: running and ready");
                        for f in &forwards {
                            s.push_str(&format!("\n  forward {f}"));
                        }
                        s
                    },
                );
            }
            Cmd::Start { name } => {
                self.open(&name).await?.start().await?;
                self.out(json!({"name": name, "state": "running"}), || {
                    format!("{name}: started")
                });
            }
            Cmd::Stop {
                name,
                force,
                timeout,
            } => {
                let vm = self.open(&name).await?;
                let spinner = progress::Spinner::start(format!("stopping {name}"));
                let res = vm
                    .stop(StopOptions {
                        force,
                        timeout: secs(timeout, "--timeout")?,
                    })
                    .await;
                spinner.stop();
                let outcome = res?;
                self.out(json!({"name": name, "outcome": outcome}), || {
                    format!("{name}: stopped ({outcome:?})").to_lowercase()
                });
            }
            Cmd::Pause { name } => {
                self.open(&name).await?.pause().await?;
                self.out(json!({"name": name, "state": "paused"}), || {
                    format!("{name}: paused")
                });
            }
            Cmd::Resume { name } => {
                self.open(&name).await?.resume().await?;
                self.out(json!({"name": name, "state": "running"}), || {
                    format!("{name}: resumed")
                });
            }
            Cmd::Check { profile, timeout } => {
                let cfg = self.client.config().ok_or_else(|| {
                    anyvm::Error::invalid_arg(
                        "check",
                        "profiles come from a config file (--config)",
                    )
                })?;
                let p = cfg.profile(&profile)?.clone();
                let vm = self.open(&p.machine).await?;
                let rep = anyvm::profile::check(&vm, &p, secs(timeout, "--timeout")?).await?;
                self.out(json!(rep), || {
                    let mut t = format!(
                        "profile {} on {}: {}\n",
                        rep.profile,
                        rep.vm,
                        if rep.ok {
                            "all resources usable"
                        } else {
                            "NOT READY"
                        }
                    );
                    for r in &rep.resources {
                        t.push_str(&format!(
                            "  {:<6} {:<20} {:<12} {:<28} {}\n",
                            if r.ok { "ok" } else { "FAILED" },
                            r.name,
                            r.kind,
                            r.target,
                            r.detail
                        ));
                    }
                    t.trim_end().to_string()
                });
                return Ok(if rep.ok { 0 } else { 1 });
            }
            Cmd::Reset { name } => {
                self.open(&name).await?.reset().await?;
                self.out(json!({"name": name, "state": "running"}), || {
                    format!("{name}: reset")
                });
            }
            Cmd::Save { name } => {
                self.open(&name).await?.save_state().await?;
                self.out(json!({"name": name, "state": "saved"}), || {
                    format!("{name}: saved")
                });
            }
            Cmd::Destroy { name, with_clones } => {
                let clones = self
                    .open(&name)
                    .await?
                    .destroy_with(DestroyOptions::default().with_clones(with_clones))
                    .await?;
                self.out(
                    json!({"name": name, "destroyed": true, "clones_destroyed": clones}),
                    || {
                        clones
                            .iter()
                            .map(|c| format!("{c}: destroyed (clone of {name})\n"))
                            .collect::<String>()
                            + &format!("{name}: destroyed")
                    },
                );
            }
            Cmd::Export { name, path } => {
                self.open(&name).await?.export_appliance(&path).await?;
                self.out(
                    json!({"name": name, "exported": path.display().to_string()}),
                    || format!("{name}: exported to {}", path.display()),
                );
            }
            Cmd::Doctor => unreachable!("doctor runs before a backend is opened"),
            Cmd::WaitReady { name, timeout } => {
                let vm = self.open(&name).await?;
                let mut spec = self.ready_spec(&name);
                if let Some(t) = timeout {
                    spec.timeout = secs(t, "--timeout")?;
                }
                let spinner = progress::Spinner::start(format!("waiting for {name}"));
                let res = vm.wait_ready(&spec).await;
                spinner.stop();
                let report = res?;
                self.out(json!(report), || {
                    format!("{name}: ready after {:.2}s", report.elapsed.as_secs_f64())
                });
            }
            Cmd::Exec {
                name,
                env,
                cwd,
                timeout,
                stdin,
                argv,
            } => {
                let vm = self.open(&name).await?;
                let mut req = ExecRequest::from_argv(&argv)?.timeout(secs(timeout, "--timeout")?);
                for kv in env {
                    let (k, v) = kv.split_once('=').ok_or_else(|| {
                        Error::invalid_arg(format!("--env {kv:?}"), "expected KEY=VALUE")
                    })?;
                    req = req.env(k, v);
                }
                if let Some(d) = cwd {
                    req = req.cwd(d);
                }
                if stdin {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .map_err(|e| Error::io(anyvm::Ctx::new("read stdin"), "<stdin>", e))?;
                    req = req.stdin(buf);
                }
                let out = vm.exec(&req).await?;
                if self.json {
                    self.out(json!(out), String::new);
                } else {
                    std::io::stdout().write_all(&out.stdout).ok();
                    std::io::stderr().write_all(&out.stderr).ok();
                    if out.stdout_truncated || out.stderr_truncated {
                        eprintln!(
                            "anyvm: warning: output truncated by the guest agent's capture limit"
                        );
                    }
                }
                return Ok(match (out.exit_code, out.signal) {
                    (Some(code), _) => code.clamp(0, 255) as u8,
                    (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
                    _ => 1,
                });
            }
            Cmd::Cp { src, dst } => {
                let split = |s: &str| -> Option<(String, String)> {
                    let (vm, path) = s.split_once(':')?;
                    (path.starts_with('/') && VmName::new(vm).is_ok())
                        .then(|| (vm.to_string(), path.to_string()))
                };
                let (n, dir) = match (split(&src), split(&dst)) {
                    (Some((vm, g)), None) => {
                        (self.open(&vm).await?.copy_from(&g, &dst).await?, "from")
                    }
                    (None, Some((vm, g))) => (self.open(&vm).await?.copy_to(&src, &g).await?, "to"),
                    _ => {
                        return Err(Error::invalid_arg(
                            "cp",
                            "exactly one side must be VM:/absolute/path",
                        ))
                    }
                };
                self.out(json!({"bytes": n}), || {
                    format!("copied {n} bytes ({dir} guest)")
                });
            }
            Cmd::Forward(ForwardCmd::Add {
                name,
                guest_port,
                host_port,
                label,
                proto,
                host_addr,
            }) => {
                let proto: Protocol = proto.parse()?;
                let hp: HostPort = host_port.parse()?;
                let mut spec = ForwardSpec::new(
                    label.unwrap_or_else(|| format!("{proto}-{guest_port}")),
                    guest_port,
                )
                .host_port(hp)
                .proto(proto);
                spec.host_addr = host_addr;
                let f = self.open(&name).await?.forward_add(&spec).await?;
                self.out(json!(f), || format!("{name}: forward {f}"));
            }
            Cmd::Forward(ForwardCmd::Remove { name, forward }) => {
                let f = self.open(&name).await?.forward_remove(&forward).await?;
                self.out(json!(f), || format!("{name}: removed forward {f}"));
            }
            Cmd::Ports { name, all } => {
                if all || name.is_none() {
                    let leases = c.ports().leases()?;
                    self.out(json!(leases), || {
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
                    let f = self.open(&n).await?.forwards().await?;
                    self.out(json!(f), || {
                        f.iter()
                            .map(|f| f.to_string())
                            .collect::<Vec<_>>()
                            .join("\n")
                    });
                }
            }
            Cmd::Snapshot(s) => match s {
                SnapshotCmd::Take {
                    name,
                    snapshot,
                    description,
                } => {
                    self.open(&name)
                        .await?
                        .snapshot_take(&snapshot, &description)
                        .await?;
                    self.out(json!({"name": name, "snapshot": snapshot}), || {
                        format!("{name}: snapshot {snapshot} taken")
                    });
                }
                SnapshotCmd::Restore { name, snapshot } => {
                    self.open(&name).await?.snapshot_restore(&snapshot).await?;
                    self.out(json!({"name": name, "snapshot": snapshot}), || {
                        format!("{name}: restored {snapshot}")
                    });
                }
                SnapshotCmd::Delete {
                    name,
                    snapshot,
                    with_clones,
                } => {
                    self.open(&name)
                        .await?
                        .snapshot_delete_with(
                            &snapshot,
                            DestroyOptions::default().with_clones(with_clones),
                        )
                        .await?;
                    self.out(json!({"name": name, "snapshot": snapshot}), || {
                        format!("{name}: deleted {snapshot}")
                    });
                }
                SnapshotCmd::List { name } => {
                    let l = self.open(&name).await?.snapshots().await?;
                    self.out(json!(l), || {
                        l.iter()
                            .map(|s| {
                                format!("{}{}", s.name, if s.current { " (current)" } else { "" })
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    });
                }
            },
            Cmd::Clone {
                base,
                new,
                snapshot,
            } => {
                let new_name = VmName::new(new)?;
                let vm = c
                    .vm(&base)
                    .await?
                    .clone_linked(&new_name, snapshot.as_deref())
                    .await?;
                let f = vm.forwards().await?;
                self.out(
                    json!({"name": new_name, "base": base, "forwards": f}),
                    || format!("{new_name}: linked clone of {base}"),
                );
            }
            Cmd::SshConfig {
                name,
                user,
                identity,
                guest_port,
            } => {
                let cred = self.client.config().and_then(|c| c.credentials(&name));
                let opts = SshOptions {
                    user: user.or(cred.as_ref().map(|c| c.user.clone())),
                    identity_file: identity.or(cred.and_then(|c| c.identity_file)),
                    guest_port: Some(guest_port),
                    alias: None,
                };
                let cfg = self.open(&name).await?.ssh_config(&opts).await?;
                self.out(json!(cfg), || cfg.stanza.trim_end().to_string());
            }
            Cmd::Share(ShareCmd::Add {
                name,
                share,
                host_path,
                readonly,
                automount,
            }) => {
                let f = anyvm::SharedFolder {
                    name: share,
                    host_path,
                    readonly,
                    automount,
                    guest_path: None,
                };
                let f = self.open(&name).await?.shared_folder_add(&f).await?;
                self.out(json!(f), || {
                    format!("{name}: sharing {} as {}", f.host_path.display(), f.name)
                });
            }
            Cmd::Share(ShareCmd::Remove { name, share }) => {
                self.open(&name).await?.shared_folder_remove(&share).await?;
                self.out(json!({"name": name, "removed": share}), || {
                    format!("{name}: removed share {share}")
                });
            }
            Cmd::Share(ShareCmd::List { name }) => {
                let l = self.open(&name).await?.shared_folders().await?;
                self.out(json!(l), || {
                    l.iter()
                        .map(|f| format!("{} {}", f.name, f.host_path.display()))
                        .collect::<Vec<_>>()
                        .join("\n")
                });
            }
            Cmd::Console { name } => {
                let p = self.open(&name).await?.console_log().await?;
                self.out(json!({"console_log": p}), || {
                    p.map(|p| p.display().to_string())
                        .unwrap_or_else(|| "(none)".into())
                });
            }
        }
        Ok(0)
    }
}

/// The config file, the backend URI and the client options the command line asks for.
fn settings(cli: &Cli) -> anyvm::Result<(Option<Config>, String, ClientOptions)> {
    let config = match &cli.config {
        Some(p) => Some(Config::load(p)?),
        None if std::path::Path::new("anyvm.toml").exists() => Some(Config::load("anyvm.toml")?),
        None => None,
    };
    let backend = cli
        .backend
        .clone()
        .or_else(|| config.as_ref().map(Config::backend_uri))
        .unwrap_or_else(|| anyvm::DEFAULT_BACKEND.into());
    let opts = config
        .as_ref()
        .map(Config::client_options)
        .unwrap_or_default();
    Ok((config, backend, opts))
}

/// `anyvm doctor`: runs without a working backend (finding out why it does not work is the point).
async fn doctor(cli: &Cli) -> anyvm::Result<u8> {
    let (_, backend, opts) = settings(cli)?;
    let report = anyvm::doctor::run_all(&backend, opts).await;
    if cli.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"status": report.status(), "checks": report.checks})
            )
            .expect("json")
        );
    } else {
        print!("{}", report.render());
    }
    Ok(u8::from(report.failed()))
}

async fn build(cli: &Cli) -> anyvm::Result<App> {
    let (config, backend, opts) = settings(cli)?;
    let client = Client::connect_configured(&backend, opts, config).await?;
    Ok(App {
        client,
        json: cli.json,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ANYVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("anyvm: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let json = cli.json;
    let res = rt.block_on(async move {
        if matches!(cli.cmd, Cmd::Doctor) {
            return doctor(&cli).await;
        }
        let app = build(&cli).await?;
        app.run(cli.cmd).await
    });
    match res {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if json {
                println!(
                    "{}",
                    json!({"error": {"kind": e.kind(), "message": e.to_string()}})
                );
            }
            eprintln!("anyvm: error: {e}");
            ExitCode::from(1)
        }
    }
}
