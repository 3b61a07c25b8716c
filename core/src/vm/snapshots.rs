//! Snapshots, linked clones (fresh ports, clone labels) and appliance export.

use super::*;

impl Vm {
    /// Take a snapshot (with memory when the VM runs, where the backend can).
    pub async fn snapshot_take(&self, name: &str, description: &str) -> Result<()> {
        let args = json!({"snapshot": name});
        self.audited("snapshot_take", args, async move {
            check_snapshot_name(name)?;
            self.backend
                .snapshot_take(&self.name, name, description)
                .await
        })
        .await
    }
    /// Go back to a snapshot; the VM is stopped first when the backend needs it.
    pub async fn snapshot_restore(&self, name: &str) -> Result<()> {
        let args = json!({"snapshot": name});
        self.audited("snapshot_restore", args, async move {
            check_snapshot_name(name)?;
            self.backend.snapshot_restore(&self.name, name).await
        })
        .await
    }
    /// Delete a snapshot. Refuses, changing nothing, while linked clones were made from it; see
    /// [`Vm::snapshot_delete_with`].
    pub async fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.snapshot_delete_with(name, DestroyOptions::default())
            .await
    }

    /// [`Vm::snapshot_delete`]; with [`DestroyOptions::with_clones`] the clones made from the
    /// snapshot (and their clones) are destroyed first.
    pub async fn snapshot_delete_with(&self, name: &str, opts: DestroyOptions) -> Result<()> {
        let args = json!({"snapshot": name, "with_clones": opts.with_clones});
        self.audited("snapshot_delete", args, async move {
            check_snapshot_name(name)?;
            self.remove_dependants(&format!("snapshot delete {name}"), Some(name), opts)
                .await?;
            self.backend.snapshot_delete(&self.name, name).await
        })
        .await
    }

    /// Write this (powered-off) VM as an OVA appliance, the way frozen VMs are shipped
    /// (VirtualBox; other backends say they cannot).
    pub async fn export_appliance(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let args = json!({"path": path});
        self.audited("export", args, async move {
            self.backend.export_appliance(&self.name, path).await
        })
        .await
    }

    /// The VM's snapshots.
    pub async fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        self.backend.snapshot_list(&self.name).await
    }

    /// A copy-on-write clone of this VM (at `snapshot`, or its current disks when it is off).
    /// The clone gets fresh host ports for every forward and console.
    pub async fn clone_linked(&self, new_name: &VmName, snapshot: Option<&str>) -> Result<Vm> {
        self.clone_linked_labeled(new_name, snapshot, Default::default())
            .await
    }

    /// [`Vm::clone_linked`], storing `labels` with the clone (over the base's own labels, minus
    /// the job-ownership ones, which belong to one clone only).
    /// Cancel-safe: a clone whose caller goes away (dropped future, cancelled job) is finished
    /// and then destroyed, so no disks, leases or half-defined VMs are left.
    pub async fn clone_linked_labeled(
        &self,
        new_name: &VmName,
        snapshot: Option<&str>,
        labels: std::collections::BTreeMap<String, String>,
    ) -> Result<Vm> {
        let (base, name, snap) = (self.clone(), new_name.clone(), snapshot.map(str::to_string));
        complete_or_roll_back(async move { base.clone_now(&name, snap.as_deref(), labels).await })
            .await
    }

    /// The spec of a new clone `new_name` of this VM: its own spec renamed, labelled as a clone
    /// (at `snapshot`) with `labels` over the base's own (minus the job-ownership and clone
    /// ones, which belong to one VM only), every host port left for allocation. Refuses a name
    /// already taken and a base anyvm did not define.
    pub(super) async fn clone_spec(
        &self,
        new_name: &VmName,
        snapshot: Option<&str>,
        labels: std::collections::BTreeMap<String, String>,
    ) -> Result<VmSpec> {
        if self.backend.exists(new_name).await? {
            return Err(Error::InvalidState {
                ctx: Ctx::vm("clone", new_name),
                state: "already defined".into(),
                hint: Some("choose another name or destroy the existing VM".into()),
            });
        }
        let ctx = Ctx::vm(format!("clone to {new_name}"), &self.name);
        let mut spec = self
            .required_spec(
                &ctx,
                "only VMs defined through anyvm carry the spec a clone is made from",
            )
            .await?;
        spec.name = new_name.clone();
        spec.labels.retain(|k, _| {
            !k.starts_with(crate::labels::JOB_PREFIX) && !k.starts_with(crate::labels::CLONE_PREFIX)
        });
        spec.labels.extend(labels);
        // The base cannot go while its clones live.
        spec.labels
            .insert(CLONE_BASE_LABEL.into(), self.name.to_string());
        if let Some(s) = snapshot {
            spec.labels
                .insert(CLONE_SNAPSHOT_LABEL.into(), s.to_string());
        }
        spec.validate()?;
        for f in &mut spec.forwards {
            f.host_port = HostPort::Auto;
        }
        if spec.console.vnc.is_some() {
            spec.console.vnc = Some(HostPort::Auto);
        }
        Ok(spec)
    }

    async fn clone_now(
        &self,
        new_name: &VmName,
        snapshot: Option<&str>,
        labels: std::collections::BTreeMap<String, String>,
    ) -> Result<Vm> {
        let args = json!({"clone": new_name.as_str(), "snapshot": snapshot, "labels": labels});
        self.audited("clone_linked", args, async move {
            if let Some(s) = snapshot {
                check_snapshot_name(s)?;
            }
            let spec = self.clone_spec(new_name, snapshot, labels).await?;
            let backend = self.backend.clone();
            let snapshot = snapshot.map(str::to_string);
            let base = self.name.clone();
            with_ports(&self.backend, &self.ports, spec, move |spec| async move {
                backend.clone_linked(&base, snapshot, &spec).await
            })
            .await?;
            self.events
                .vm_changed(new_name.as_str(), VmEventKind::Defined);
            Ok(self.sibling_named(new_name.clone()))
        })
        .await
    }
}
