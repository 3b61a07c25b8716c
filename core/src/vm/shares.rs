//! Shared folders: offered under the policy's share roots, mounted from inside the guest.

use super::*;

impl Vm {
    /// Offer a host folder to the guest. The host path must exist; symlinks are resolved first.
    pub async fn shared_folder_add(&self, folder: &SharedFolder) -> Result<SharedFolder> {
        let args = json!({"folder": folder});
        self.audited("shared_folder_add", args, async move {
            folder.validate()?;
            let ctx = self.ctx(&format!("shared folder add {}", folder.name));
            if let Some(p) = &self.policy {
                p.check_share(&ctx, &folder.host_path)?;
            }
            let host_path = std::fs::canonicalize(&folder.host_path)
                .map_err(|e| Error::io(ctx.clone(), &folder.host_path, e))?;
            let f = SharedFolder {
                host_path,
                ..folder.clone()
            };
            self.backend.shared_folder_add(&self.name, &f).await?;
            Ok(f)
        })
        .await
    }
    /// Mount a share inside the guest at its `guest_path` (as root through the guest channel;
    /// nothing happens when something is already mounted there).
    pub async fn shared_folder_mount(&self, share: &SharedFolder) -> Result<()> {
        let ctx = self.ctx(&format!("mount share {}", share.name));
        let Some(gp) = share.guest_path.clone() else {
            return Err(Error::invalid_arg(
                format!("shared folder {:?}", share.name),
                "has no guest_path to mount at",
            ));
        };
        share.validate()?;
        let argv = self.backend.share_mount_argv(share, &gp);
        // Mount only when nothing is mounted there yet; argv goes through "$@", never a string.
        let script = "p=$1; shift; mkdir -p \"$p\" && { awk -v p=\"$p\" '$2 == p { f = 1 } END { exit !f }' /proc/mounts || \"$@\"; }";
        let req = ExecRequest::new("/bin/sh")
            .args(
                ["-c", script, "anyvm-mount", gp.as_str()]
                    .into_iter()
                    .map(String::from)
                    .chain(argv),
            )
            .timeout(Duration::from_secs(60));
        let out = self.exec_internal("shared_folder_mount", &req).await?;
        if out.success() {
            return Ok(());
        }
        Err(Error::GuestCommand {
            ctx,
            program: "mount".into(),
            exit_code: out.exit_code,
            reason: out.stderr_str().trim().to_string(),
            stderr: out.stderr.into_boxed_slice(),
        })
    }

    /// Stop offering the share `name`.
    pub async fn shared_folder_remove(&self, name: &str) -> Result<()> {
        let args = json!({"folder": name});
        self.audited("shared_folder_remove", args, async move {
            self.backend.shared_folder_remove(&self.name, name).await
        })
        .await
    }
    /// The shares offered to the guest.
    pub async fn shared_folders(&self) -> Result<Vec<SharedFolder>> {
        self.backend.shared_folders(&self.name).await
    }
}
