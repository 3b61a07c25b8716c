//! The guest's screen: virDomainScreenshot (QEMU's PPM, converted to PNG), through libvirt's
//! stream so it works on a remote host too.

use virt::stream::Stream;

use super::*;
use crate::types::Screenshot;
use crate::util::image;

/// No screen is this big; a stream that goes on is not a screenshot.
const MAX_SCREENSHOT: usize = 256 << 20;

pub(super) async fn screenshot(be: &LibvirtBackend, vm: &VmName) -> Result<Screenshot> {
    let ctx = Ctx::vm("screenshot", vm);
    let running = be.state(vm).await?;
    if !running.is_running() {
        return Err(Error::InvalidState {
            ctx,
            state: running.to_string(),
            hint: Some("start it first: only a running guest has a screen".into()),
        });
    }
    let name = vm.to_string();
    let c = ctx.clone();
    let (mime, data) = be
        .call(&ctx, be.opts.call_timeout, move |conn| {
            let d = conn
                .lookup_domain_by_name(&name)
                .map_err(|e| map_err(&c, e))?;
            let st = Stream::new(conn, 0).map_err(|e| map_err(&c, e))?;
            let mime = d.screenshot(&st, 0, 0).map_err(|e| no_screen(&c, e))?;
            let mut out = Vec::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = st.recv(&mut buf).map_err(|e| map_err(&c, e))?;
                if n <= 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n as usize]);
                if out.len() > MAX_SCREENSHOT {
                    let _ = st.abort();
                    return Err(Error::backend(
                        c.clone(),
                        "libvirt",
                        "the screenshot stream went past 256 MiB",
                    ));
                }
            }
            st.finish().map_err(|e| map_err(&c, e))?;
            Ok((mime, out))
        })
        .await?;
    let shot = if mime == "image/png" {
        image::check_png(data)
    } else {
        image::ppm_to_png(&data)
    };
    shot.map_err(|m| Error::backend(ctx, "libvirt", format!("screenshot ({mime}): {m}")))
}

/// A domain without a display says so in libvirt's words; anyvm says what to do.
fn no_screen(ctx: &Ctx, e: virt::error::Error) -> Error {
    let text = e.message().to_string();
    if text.contains("screen") || text.contains("QemuConsole") {
        return Error::InvalidState {
            ctx: ctx.clone(),
            state: format!("it has no display ({text})"),
            hint: Some("give it one: console = { vnc = \"auto\" } in its anyvm.toml machine (VmSpec console.vnc), then define it again".into()),
        };
    }
    map_err(ctx, e)
}
