//! # anyvm
//!
//! Drive virtual machines on any hypervisor a lab has, through one async API:
//! lifecycle, guest exec, file copy, port forwarding, readiness, snapshots and linked clones.
//!
//! ```no_run
//! # async fn demo() -> anyvm::Result<()> {
//! use anyvm::{Client, ExecRequest, ReadySpec};
//! let client = Client::connect("libvirt:qemu:///system").await?;
//! let vm = client.vm("build1").await?;
//! vm.start().await?;
//! vm.wait_ready(&ReadySpec::default()).await?;
//! let out = vm.exec(&ExecRequest::new("uname").arg("-a")).await?;
//! println!("{}", out.stdout_str());
//! vm.stop(Default::default()).await?;
//! # Ok(()) }
//! ```
//!
//! Layout: [`backend`] holds one module per hypervisor behind the [`Backend`] trait;
//! [`readiness`] the probes; [`job`] transient jobs (clone, run, tear down) and their pool; [`config`] the `anyvm.toml` model; [`Vm`] the facade callers use.

#![warn(missing_docs)]

pub mod backend;
pub mod check;
pub mod client;
pub mod config;
pub mod credentials;
pub mod doctor;
pub mod error;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod job;
pub mod labels;
pub mod name;
pub mod owner;
pub mod paths;
pub mod policy;
pub mod ports;
pub mod profile;
pub mod readiness;
pub mod ssh;
pub mod types;
pub(crate) mod util;
pub mod vm;

pub use backend::{Backend, BackendUri, VmEvent, VmEventKind, DEFAULT_BACKEND};
pub use check::{CheckReport, ResourceReport};
pub use client::{Client, ClientOptions};
pub use config::{Config, MachineConfig};
pub use credentials::{Credentials, Secret, SecretSource};
pub use doctor::{Check, CheckStatus, DoctorReport};
pub use error::{Ctx, Error, ErrorKind, Result};
pub use events::{
    CopyDirection, CopyEvent, CopyProgress, Event, EventStream, JobEvent, ProgressFn,
};
pub use job::{run_job, run_job_with, Cancel, JobReport, JobSpec, PhaseFn};
pub use name::VmName;
pub use policy::Policy;
pub use profile::{Profile, Resource};
pub use readiness::{Mode as ReadyMode, Probe, ReadyReport, ReadySpec};
pub use ssh::{SshConfig, SshOptions};
pub use types::*;
pub use util::cleanup::wait_for_cleanups;
pub use vm::{ExecCanceller, ExecStream, Vm};
