//! One module per group of subcommands; each subcommand's arguments are a struct with its
//! own `run`.

use clap::Subcommand;

pub mod guest;
pub mod job;
pub mod lifecycle;
pub mod network;
pub mod snapshots;

use crate::app::App;

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// List VMs.
    List,
    /// State, forwards and snapshots of one VM.
    Status(lifecycle::StatusArgs),
    /// Define (from the config) if needed, start, and wait until ready; no name: every machine
    /// of the config, at once.
    Up(lifecycle::UpArgs),
    /// Define a VM from the config without starting it.
    Define(lifecycle::DefineArgs),
    Start(lifecycle::StartArgs),
    /// Graceful shutdown with a deadline, then power off.
    Stop(lifecycle::StopArgs),
    Pause(lifecycle::PauseArgs),
    Resume(lifecycle::ResumeArgs),
    /// Hardware reset: restart the guest at once, without a shutdown.
    Reset(lifecycle::ResetArgs),
    /// Save memory to disk and stop; the next start resumes.
    Save(lifecycle::SaveArgs),
    /// Power off and remove the VM, its snapshots, clone disks and port leases. Refuses while
    /// linked clones depend on it, naming them, unless --with-clones.
    Destroy(lifecycle::DestroyArgs),
    /// Write a powered-off VM as an OVA appliance (VirtualBox).
    Export(lifecycle::ExportArgs),
    /// Check this host for every backend: tools and versions, drivers, KVM, state dir, ports.
    /// Exit code 1 when a check fails.
    Doctor,
    /// Wait until the VM passes its readiness probes (from the config, or the guest agent).
    WaitReady(lifecycle::WaitReadyArgs),
    /// Verify from inside the running guest that every resource a profile declares is usable
    /// (mounting its shares first). Exit code 1 when any fails.
    Check(lifecycle::CheckArgs),
    /// Run a program in the guest; its exit code becomes anyvm's.
    Exec(guest::ExecArgs),
    /// Copy a file: `anyvm cp VM:/guest/path host/path` or `anyvm cp host/path VM:/guest/path`.
    Cp(guest::CpArgs),
    /// Port forwards.
    #[command(subcommand)]
    Forward(network::ForwardCmd),
    /// List a VM's forwards (or every lease with --all).
    Ports(network::PortsArgs),
    #[command(subcommand)]
    Snapshot(snapshots::SnapshotCmd),
    /// Linked (copy-on-write) clone.
    Clone(snapshots::CloneArgs),
    /// Boot a template once, wait until ready and save that state: warm clones start from it.
    Warm(snapshots::WarmArgs),
    /// Log in to the guest with OpenSSH (host key pinned, connection shared between calls), or
    /// run `-- PROGRAM ARGS...` / `-c 'SHELL TEXT'`; the exit code is the session's.
    Ssh(guest::SshArgs),
    /// Print an OpenSSH config block with the guest's host key pinned.
    SshConfig(guest::SshConfigArgs),
    /// The serial console: its log's path, the log followed live (--follow), or where a
    /// viewer reaches the screen (--remote).
    Console(guest::ConsoleArgs),
    /// Save a PNG of the guest's screen.
    Screenshot(guest::ScreenshotArgs),
    /// Host folders shared with the guest.
    #[command(subcommand)]
    Share(network::ShareCmd),
    /// Transient jobs: one command in a throwaway clone of a template VM.
    #[command(subcommand)]
    Job(job::JobCmd),
    /// Remove job clones whose owning process is gone (killed, crashed, rebooted) and port
    /// leases of VMs that no longer exist.
    Gc(job::GcArgs),
}

impl Cmd {
    pub async fn run(self, app: &App) -> anyvm::Result<u8> {
        match self {
            Cmd::List => lifecycle::list(app).await,
            Cmd::Status(a) => a.run(app).await,
            Cmd::Up(a) => a.run(app).await,
            Cmd::Define(a) => a.run(app).await,
            Cmd::Start(a) => a.run(app).await,
            Cmd::Stop(a) => a.run(app).await,
            Cmd::Pause(a) => a.run(app).await,
            Cmd::Resume(a) => a.run(app).await,
            Cmd::Reset(a) => a.run(app).await,
            Cmd::Save(a) => a.run(app).await,
            Cmd::Destroy(a) => a.run(app).await,
            Cmd::Export(a) => a.run(app).await,
            Cmd::Doctor => unreachable!("doctor runs before a backend is opened"),
            Cmd::WaitReady(a) => a.run(app).await,
            Cmd::Check(a) => a.run(app).await,
            Cmd::Exec(a) => a.run(app).await,
            Cmd::Cp(a) => a.run(app).await,
            Cmd::Forward(c) => c.run(app).await,
            Cmd::Ports(a) => a.run(app).await,
            Cmd::Snapshot(c) => c.run(app).await,
            Cmd::Clone(a) => a.run(app).await,
            Cmd::Warm(a) => a.run(app).await,
            Cmd::Ssh(a) => a.run(app).await,
            Cmd::SshConfig(a) => a.run(app).await,
            Cmd::Console(a) => a.run(app).await,
            Cmd::Screenshot(a) => a.run(app).await,
            Cmd::Share(c) => c.run(app).await,
            Cmd::Job(j) => app.job(j).await,
            Cmd::Gc(a) => app.gc(a.dry_run).await,
        }
    }
}
