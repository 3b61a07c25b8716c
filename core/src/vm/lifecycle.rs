//! Lifecycle: state, start, the graceful-then-forced stop, reset, pause, save, destroy with
//! the clone graph, readiness, console.

use super::*;
use crate::readiness::Probe;
use crate::types::UpStep;

/// How long `up` waits for a VM another process is starting, saving or snapshotting.
const UP_SETTLE: Duration = Duration::from_secs(60);

impl Vm {
    /// The VM's power state.
    pub async fn state(&self) -> Result<VmState> {
        self.backend.state(&self.name).await
    }

    /// The spec anyvm stored when it defined the VM, if it did.
    pub async fn spec(&self) -> Result<Option<VmSpec>> {
        self.backend.spec(&self.name).await
    }

    /// [`Vm::spec`] where one is needed: a VM anyvm did not define is refused for `ctx`, with
    /// `hint` saying what needed it.
    pub(crate) async fn required_spec(&self, ctx: &Ctx, hint: &str) -> Result<VmSpec> {
        self.spec().await?.ok_or_else(|| Error::InvalidState {
            ctx: ctx.clone(),
            state: "not defined by anyvm".into(),
            hint: Some(hint.into()),
        })
    }

    /// Start the VM (headless). Starting a running VM does nothing.
    pub async fn start(&self) -> Result<()> {
        let args = json!({});
        self.audited("start", args, async move {
            match self.state().await? {
                VmState::Running => Ok(()),
                VmState::Paused => Err(Error::InvalidState {
                    ctx: self.ctx("start"),
                    state: "paused".into(),
                    hint: Some(format!("resume it instead (anyvm resume {})", self.name)),
                }),
                _ => self.backend.start(&self.name).await,
            }
        })
        .await
    }

    /// Graceful shutdown with a deadline, then power off. Returns which of the two happened.
    pub async fn stop(&self, opts: StopOptions) -> Result<StopOutcome> {
        let args = json!({"force": opts.force, "timeout_s": opts.timeout.as_secs_f64()});
        self.audited("stop", args, async move {
            let out = self.stop_inner(opts).await;
            self.close_tunnels().await;
            out
        })
        .await
    }

    pub(super) async fn stop_inner(&self, opts: StopOptions) -> Result<StopOutcome> {
        let state = self.state().await?;
        if matches!(state, VmState::ShutOff | VmState::Saved) {
            return Ok(StopOutcome::AlreadyOff);
        }
        if opts.force || state == VmState::Crashed {
            self.backend.power_off(&self.name).await?;
            return Ok(StopOutcome::Forced);
        }
        if state == VmState::Paused {
            // A paused guest cannot see a shutdown request.
            self.backend.resume(&self.name).await?;
        }
        let deadline = Instant::now() + opts.timeout;
        let events = self.backend.subscribe();
        match self.backend.request_shutdown(&self.name).await {
            Ok(()) => {
                if self.wait_off(deadline, events).await? {
                    return Ok(StopOutcome::Graceful);
                }
                tracing::warn!(vm = %self.name, timeout = ?opts.timeout, "graceful shutdown timed out; powering off");
            }
            Err(e) => {
                tracing::warn!(vm = %self.name, error = %e, "shutdown request failed; powering off")
            }
        }
        match self.backend.power_off(&self.name).await {
            Ok(()) => Ok(StopOutcome::Forced),
            // It may have gone down between the deadline and the power-off.
            Err(e) if self.state().await.ok() == Some(VmState::ShutOff) => {
                tracing::debug!(vm = %self.name, error = %e, "power off raced with shutdown");
                Ok(StopOutcome::Graceful)
            }
            Err(e) => Err(e),
        }
    }

    /// Wait until the VM is off or the deadline passes; true if it went off.
    pub(super) async fn wait_off(
        &self,
        deadline: Instant,
        mut events: Option<tokio::sync::broadcast::Receiver<crate::backend::VmEvent>>,
    ) -> Result<bool> {
        let mut poll = Duration::from_millis(50);
        loop {
            if matches!(self.state().await?, VmState::ShutOff | VmState::Saved) {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            let wait = poll.min(deadline - now);
            poll = (poll * 2).min(Duration::from_secs(1));
            match events.as_mut() {
                Some(rx) => {
                    let stopped = async {
                        loop {
                            match rx.recv().await {
                                Ok(ev)
                                    if ev.vm == self.name.as_str()
                                        && ev.kind == VmEventKind::Stopped =>
                                {
                                    return
                                }
                                Ok(_) => {}
                                Err(_) => futures::future::pending::<()>().await,
                            }
                        }
                    };
                    tokio::select! { _ = stopped => {}, _ = tokio::time::sleep(wait) => {} }
                }
                None => tokio::time::sleep(wait).await,
            }
        }
    }

    /// Cut the power at once.
    pub async fn power_off(&self) -> Result<()> {
        let args = json!({});
        self.audited("power_off", args, async move {
            let out = self.backend.power_off(&self.name).await;
            self.close_tunnels().await;
            out
        })
        .await
    }
    /// Hardware reset: the guest restarts at once (ssh tunnels reopen at the next `wait_ready`).
    pub async fn reset(&self) -> Result<()> {
        let args = json!({});
        self.audited("reset", args, async move {
            self.backend.reset(&self.name).await?;
            self.close_tunnels().await;
            Ok(())
        })
        .await
    }
    /// Freeze the guest's CPUs.
    pub async fn pause(&self) -> Result<()> {
        let args = json!({});
        self.audited("pause", args, async move {
            self.backend.pause(&self.name).await
        })
        .await
    }
    /// Unfreeze a paused guest.
    pub async fn resume(&self) -> Result<()> {
        let args = json!({});
        self.audited("resume", args, async move {
            self.backend.resume(&self.name).await
        })
        .await
    }
    /// Save memory to disk and stop; the next start restores it.
    pub async fn save_state(&self) -> Result<()> {
        let args = json!({});
        self.audited("save_state", args, async move {
            self.backend.save_state(&self.name).await?;
            self.close_tunnels().await;
            Ok(())
        })
        .await
    }

    /// Power off if needed, remove the definition, its snapshots, the disks anyvm created for it,
    /// its port leases and its known_hosts file. Refuses, changing nothing, while linked clones
    /// depend on the VM; see [`Vm::destroy_with`].
    pub async fn destroy(&self) -> Result<()> {
        self.destroy_with(DestroyOptions::default())
            .await
            .map(|_| ())
    }

    /// [`Vm::destroy`]; with [`DestroyOptions::with_clones`] the dependent clones (and their
    /// clones) are destroyed first, deepest first. Returns the clones it destroyed.
    pub async fn destroy_with(&self, opts: DestroyOptions) -> Result<Vec<String>> {
        let args = json!({"with_clones": opts.with_clones});
        self.audited("destroy", args, async move {
            let removed = self.remove_dependants("destroy", None, opts).await?;
            self.destroy_one().await?;
            // Its warm states go with it (those clones still run on stay until they are gone).
            self.backend.warm_discard(&self.name, None).await;
            Ok(removed)
        })
        .await
    }

    /// The one place the clone rule is applied: refuse (changing nothing) while clones depend on
    /// this VM or its `snapshot`, or, with `with_clones`, destroy them deepest first.
    pub(super) async fn remove_dependants(
        &self,
        op: &str,
        snapshot: Option<&str>,
        opts: DestroyOptions,
    ) -> Result<Vec<String>> {
        let deps = self.dependants(snapshot).await?;
        if !deps.is_empty() && !opts.with_clones {
            return Err(self.has_clones(op, snapshot, &deps));
        }
        for d in &deps {
            self.sibling(d)?.destroy_one().await?;
        }
        Ok(deps)
    }

    pub(super) async fn destroy_one(&self) -> Result<()> {
        self.close_tunnels().await;
        let was_on = !matches!(self.state().await?, VmState::ShutOff | VmState::Saved);
        if was_on {
            self.backend.power_off(&self.name).await?;
            self.events
                .vm_changed(self.name.as_str(), VmEventKind::Stopped);
        }
        match self.backend.undefine(&self.name).await {
            // A transient domain (a discard cut short between its undefine and its kill) is
            // gone once powered off: nothing is left to undefine.
            Err(Error::NotFound { .. }) if was_on => {}
            r => r?,
        }
        self.forget()
    }

    /// [`Vm::destroy`] for a transient clone nobody keeps anything of (a job's): its
    /// hypervisor process is killed outright instead of being asked to wind down (local
    /// libvirt), then it is removed as destroy removes it. Refuses while clones depend on it.
    pub async fn discard(&self) -> Result<()> {
        self.audited("discard", json!({}), async move {
            self.remove_dependants("discard", None, DestroyOptions::default())
                .await?;
            self.close_tunnels().await;
            let was_on = !matches!(self.state().await?, VmState::ShutOff | VmState::Saved);
            self.backend.discard(&self.name).await?;
            if was_on {
                self.events
                    .vm_changed(self.name.as_str(), VmEventKind::Stopped);
            }
            self.forget()
        })
        .await
    }

    /// What anyvm keeps of a VM that is gone: its leases and known_hosts files.
    fn forget(&self) -> Result<()> {
        self.events
            .vm_changed(self.name.as_str(), VmEventKind::Undefined);
        self.ports
            .release(&self.backend.uri(), self.name.as_str(), None)?;
        let kh = self
            .state_dir
            .join("ssh")
            .read_dir()
            .into_iter()
            .flatten()
            .flatten()
            .map(|d| d.path().join(format!("{}.known_hosts", self.name)));
        for p in kh {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }

    /// Linked clones that depend on this VM (on `snapshot` of it, when given), transitively,
    /// deepest first: the order in which they can be removed.
    pub async fn dependants(&self, snapshot: Option<&str>) -> Result<Vec<String>> {
        let links = self.backend.clone_links().await?;
        Ok(dependants_of(&links, self.name.as_str(), snapshot))
    }

    pub(super) fn has_clones(&self, op: &str, snapshot: Option<&str>, deps: &[String]) -> Error {
        let what = match snapshot {
            Some(s) => format!("snapshot '{s}' is the base of linked clones"),
            None => "has linked clones".to_string(),
        };
        Error::InvalidState {
            ctx: self.ctx(op),
            state: format!("{what}: {}", deps.join(", ")),
            hint: Some("destroy those clones first, or ask for them to be removed too (anyvm: --with-clones; Rust: DestroyOptions::with_clones; Python: with_clones=True; C: ANYVM_WITH_CLONES)".into()),
        }
    }

    /// Start if not running (resume if paused; a start in progress elsewhere is waited for),
    /// then wait until ready: [`crate::Client::up`] for a VM that exists.
    pub async fn up(&self, ready: &ReadySpec) -> Result<ReadyReport> {
        self.up_steps(ready, None).await
    }

    /// [`Vm::up`], telling `on_step` what it is doing as each step begins.
    pub async fn up_with(
        &self,
        ready: &ReadySpec,
        on_step: impl Fn(UpStep) + Send + Sync,
    ) -> Result<ReadyReport> {
        self.up_steps(ready, Some(&on_step)).await
    }

    /// The steps are described only for someone who listens (the description costs a call).
    pub(crate) async fn up_steps(
        &self,
        ready: &ReadySpec,
        listener: Option<&(dyn Fn(UpStep) + Send + Sync)>,
    ) -> Result<ReadyReport> {
        let on_step = |s: UpStep| {
            if let Some(f) = listener {
                f(s);
            }
        };
        ready.validate()?;
        // Another process may be starting it (or was killed while it did): let that settle.
        let settle = Instant::now() + UP_SETTLE;
        let mut state = self.state().await?;
        if state == VmState::Busy {
            on_step(UpStep::Settling);
        }
        while state == VmState::Busy && Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(200)).await;
            state = self.state().await?;
        }
        match state {
            VmState::Running => {}
            VmState::Paused => {
                tracing::debug!(vm = %self.name, phase = "resume", "up");
                on_step(UpStep::Resuming);
                self.resume().await?;
            }
            _ => {
                tracing::debug!(vm = %self.name, phase = "start", "up");
                on_step(UpStep::Booting);
                self.start().await?;
            }
        }
        tracing::debug!(vm = %self.name, phase = "ready", "up");
        if listener.is_some() {
            on_step(UpStep::Waiting(self.describe_probes(ready).await));
        }
        self.wait_ready(ready).await
    }

    /// The probes as a person would name them, with the host ports forwards put them on.
    async fn describe_probes(&self, ready: &ReadySpec) -> String {
        let forwards = self.forwards().await.unwrap_or_default();
        let on = |guest: u16| {
            forwards
                .iter()
                .find(|f| f.guest_port == guest && f.proto == crate::types::Protocol::Tcp)
                .map_or(format!("guest port {guest}"), |f| {
                    format!(":{}", f.host_port)
                })
        };
        let parts: Vec<String> = ready
            .probes
            .iter()
            .map(|p| match p {
                Probe::Agent => "the guest agent".to_string(),
                Probe::Tcp { guest_port } => format!("tcp on {}", on(*guest_port)),
                Probe::SshBanner { guest_port } => format!("ssh on {}", on(*guest_port)),
                other => other.to_string(),
            })
            .collect();
        let sep = if ready.mode == crate::readiness::Mode::Any {
            " or "
        } else {
            ", "
        };
        parts.join(sep)
    }

    /// Wait until the guest passes `spec`'s probes, or fail with the probe still failing.
    /// Where anyvm carries forwards as ssh tunnels, they are (re)opened once the probes pass.
    pub async fn wait_ready(&self, spec: &ReadySpec) -> Result<ReadyReport> {
        let deadline = Instant::now() + spec.timeout;
        let this = self.clone();
        let exec: readiness::GuestExec = Arc::new(move |req| {
            let vm = this.clone();
            Box::pin(async move { vm.exec(&req).await })
        });
        let report =
            readiness::wait_ready_with(self.backend.clone(), &self.name, spec, Some(exec)).await?;
        self.open_tunnels(deadline).await?;
        Ok(report)
    }

    /// State, forwards and snapshots, in as few hypervisor calls as the backend allows.
    pub async fn status(&self) -> Result<VmStatus> {
        self.backend.status(&self.name).await
    }

    /// The last `limit` bytes of the serial console log, read where the hypervisor keeps it.
    pub async fn console_tail(&self, limit: usize) -> Result<Vec<u8>> {
        self.backend.console_tail(&self.name, limit).await
    }

    /// Path of the serial console log on the host, where the backend keeps one.
    pub async fn console_log(&self) -> Result<Option<PathBuf>> {
        self.backend.console_log(&self.name).await
    }
}
