//! Warm starts: a template booted once to ready and saved, clones started from that state
//! instead of booting. The backend keeps the states ([`crate::Backend::warm_save`]); here the
//! key that tells a changed template, the one preparation at a time, and the clone's ports.

use std::collections::BTreeMap;
use std::io::Write;

use super::*;
use crate::backend::WarmInfo;
use crate::readiness::ReadySpec;

/// What a warm state is made from: the template's definition and its disks as they are now
/// (path, size, modification time, inode): any change makes another state.
fn warm_key(spec: &VmSpec) -> String {
    // FNV-1a: stable across builds (the key names a directory that outlives this process).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for x in b {
            h ^= u64::from(*x);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(env!("CARGO_PKG_VERSION").as_bytes());
    eat(serde_json::to_string(spec).unwrap_or_default().as_bytes());
    for d in &spec.disks {
        if let Ok(m) = std::fs::metadata(&d.path) {
            use std::os::unix::fs::MetadataExt;
            eat(&m.len().to_le_bytes());
            eat(&m.mtime().to_le_bytes());
            eat(&m.mtime_nsec().to_le_bytes());
            eat(&m.ino().to_le_bytes());
        }
    }
    format!("{h:016x}")
}

/// How long a preparation waits for another one of the same template.
const PREPARE_WAIT: Duration = Duration::from_secs(900);

impl Vm {
    /// This template's warm state, made now if there is none for its current definition and
    /// disks: a linked clone is booted, waited for with `ready`, saved and removed. Older
    /// states nothing uses any more are removed. Errors say why a backend cannot.
    pub async fn warm(&self, ready: &ReadySpec) -> Result<WarmInfo> {
        let ctx = self.ctx("prepare the warm state");
        let spec = self
            .required_spec(
                &ctx,
                "only VMs defined through anyvm carry the spec a warm state is made from",
            )
            .await?;
        if let Some(why) = self.backend.warm_unsupported(&spec) {
            return Err(Error::InvalidState {
                ctx,
                state: format!("no warm start: {why}"),
                hint: Some("clone and boot it cold instead".into()),
            });
        }
        let key = warm_key(&spec);
        if let Some(info) = self.backend.warm_find(&self.name, &key).await? {
            return Ok(info);
        }
        // The preparation runs to its end on its own task, so a caller that goes away (a
        // dropped future, Ctrl-C in Python) leaves no helper VM running behind it.
        let (me, ready) = (self.clone(), ready.clone());
        tokio::spawn(async move { me.prepare_warm(ctx, spec, key, &ready).await })
            .await
            .unwrap_or_else(|e| {
                Err(Error::backend(
                    self.ctx("prepare the warm state"),
                    "anyvm",
                    format!("the preparation task ended without a result: {e}"),
                ))
            })
    }

    async fn prepare_warm(
        &self,
        ctx: Ctx,
        spec: VmSpec,
        key: String,
        ready: &ReadySpec,
    ) -> Result<WarmInfo> {
        // One preparation per template at a time; the others wait and find it made.
        let lock_path = self.state_dir.join(format!("warm-{}.lock", self.name));
        let Some(mut lock) =
            crate::util::file_lock::lock_within(&ctx, &lock_path, false, PREPARE_WAIT).await?
        else {
            return Err(Error::Busy {
                ctx,
                reason: format!(
                    "{} stayed locked for 15 min (another preparation?)",
                    lock_path.display()
                ),
            });
        };
        let _ = writeln!(lock, "{}", std::process::id());
        if let Some(info) = self.backend.warm_find(&self.name, &key).await? {
            return Ok(info);
        }
        if self.state().await? != VmState::ShutOff {
            return Err(Error::InvalidState {
                ctx,
                state: self.state().await?.to_string(),
                hint: Some(
                    "stop the template: its warm state is made from its stopped disks".into(),
                ),
            });
        }
        let helper = VmName::new(format!("{}-warm{}", self.name, std::process::id()))?;
        if let Ok(old) = self.sibling(helper.as_str()) {
            if self.backend.exists(&helper).await.unwrap_or(false) {
                let _ = old.destroy().await;
            }
        }
        // Owned like a job clone: gc removes it if this process dies while it boots.
        let mut labels = crate::owner::Owner::current().labels();
        labels.insert(crate::owner::LABEL_TEMPLATE.into(), self.name.to_string());
        tracing::debug!(vm = %self.name, phase = "warm-prepare", "warm");
        let vm = self.clone_linked_labeled(&helper, None, labels).await?;
        let saved: Result<WarmInfo> = async {
            vm.start().await?;
            vm.wait_ready(ready).await?;
            let hspec = self.backend.spec(&helper).await?.unwrap_or(spec.clone());
            self.backend
                .warm_save(&helper, &self.name, &key, &hspec)
                .await
        }
        .await;
        let _ = vm.destroy().await;
        drop(lock);
        let info = saved?;
        self.backend
            .warm_discard(&self.name, Some(key.clone()))
            .await;
        tracing::info!(vm = %self.name, key = %key, memory = info.memory_bytes, "warm state saved");
        Ok(info)
    }

    /// A new VM started from this template's warm state (made first if needed), running and
    /// ready by `ready`. It is its own machine: its own forwards, generation ID, fresh
    /// entropy and the host's clock.
    pub async fn clone_warm(&self, new_name: &VmName, ready: &ReadySpec) -> Result<Vm> {
        self.clone_warm_labeled(new_name, ready, BTreeMap::new())
            .await
    }

    /// [`Vm::clone_warm`] storing `labels` with the clone. Cancel-safe like a linked clone.
    pub async fn clone_warm_labeled(
        &self,
        new_name: &VmName,
        ready: &ReadySpec,
        labels: BTreeMap<String, String>,
    ) -> Result<Vm> {
        let info = self.warm(ready).await?;
        let vm = self.clone_from_warm(&info, new_name, labels).await?;
        vm.wait_ready(ready).await?;
        vm.refresh_warm_identity().await;
        Ok(vm)
    }

    /// For a ready clone resumed from a warm state on a backend without a VM generation ID or
    /// an agent of its own (VirtualBox): host entropy into the guest's pool through guest
    /// exec, so clones of one state do not draw the same random numbers. (The clock is the
    /// Guest Additions' own business: VBoxService sets it on restore.) Best effort: a guest
    /// that refuses says so in the log. Elsewhere the backend did it at the resume.
    pub async fn refresh_warm_identity(&self) {
        if !self.backend.warm_identity_in_guest() {
            return;
        }
        let mut seed = [0u8; 64];
        if let Err(e) = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        {
            tracing::warn!(vm = %self.name, error = %e, "no host entropy for the warm clone");
            return;
        }
        let req = ExecRequest::new("/bin/dd")
            .args(["of=/dev/urandom", "bs=64", "count=1"])
            .stdin(seed.to_vec())
            .timeout(Duration::from_secs(30));
        match self.exec(&req).await {
            Ok(out) if out.success() => {}
            Ok(out) => tracing::warn!(
                vm = %self.name,
                code = ?out.exit_code,
                stderr = %String::from_utf8_lossy(&out.stderr),
                "could not feed the warm clone's entropy pool"
            ),
            Err(e) => {
                tracing::warn!(vm = %self.name, error = %e, "could not feed the warm clone's entropy pool")
            }
        }
    }

    /// A clone started from the warm state `info` of this template, running (not yet waited
    /// for). Cancel-safe like a linked clone.
    pub async fn clone_from_warm(
        &self,
        info: &WarmInfo,
        new_name: &VmName,
        labels: BTreeMap<String, String>,
    ) -> Result<Vm> {
        let info = info.clone();
        let (base, name) = (self.clone(), new_name.clone());
        complete_or_roll_back(async move {
            let spec = base.clone_spec(&name, None, labels).await?;
            let backend = base.backend.clone();
            let (template, key) = (base.name.clone(), info.key.clone());
            with_ports(&base.backend, &base.ports, spec, move |spec| async move {
                backend.warm_start(&template, &key, &spec).await
            })
            .await?;
            base.events.vm_changed(name.as_str(), VmEventKind::Defined);
            base.events.vm_changed(name.as_str(), VmEventKind::Started);
            Ok(base.sibling_named(name))
        })
        .await
    }
}
