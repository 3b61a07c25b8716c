//! The guest's screen: screenshots and where a viewer connects.

use super::*;
use crate::types::{HostPort, RemoteDisplay, Screenshot};

impl Vm {
    /// A PNG of the running guest's screen, on every backend (libvirt needs a display:
    /// `console.vnc` in the spec).
    pub async fn screenshot(&self) -> Result<Screenshot> {
        self.audited("screenshot", json!({}), async move {
            self.backend
                .screenshot(&self.name, self.credentials.clone())
                .await
        })
        .await
    }

    /// [`Vm::screenshot`] written to `path`.
    pub async fn screenshot_to(&self, path: impl AsRef<Path>) -> Result<Screenshot> {
        let path = path.as_ref();
        let shot = self.screenshot().await?;
        let ctx = self.ctx("screenshot");
        crate::util::replace::replace_file(path, &path.with_extension("png.tmp"), &shot.png)
            .map_err(|e| Error::io(ctx, path, e))?;
        Ok(shot)
    }

    /// The remote display a viewer connects to (VNC; RDP on VirtualBox), with the port
    /// allocated to this VM; `None` when its spec asks for none.
    pub async fn remote_display(&self) -> Result<Option<RemoteDisplay>> {
        let Some(spec) = self.spec().await? else {
            return Ok(None);
        };
        Ok(match spec.console.vnc {
            Some(HostPort::Fixed(port)) => {
                let host = self
                    .backend
                    .forward_host()
                    .unwrap_or_else(|| "127.0.0.1".into());
                Some(RemoteDisplay::new(
                    self.backend.remote_display_protocol(),
                    &host,
                    port,
                ))
            }
            _ => None,
        })
    }
}
