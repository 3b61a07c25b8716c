//! The guest's screen: `controlvm VM screenshotpng FILE` (VirtualBox writes the PNG itself).

use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::Screenshot;
use crate::util::image;

use super::*;

pub(super) async fn screenshot(be: &VirtualBoxBackend, vm: &VmName) -> Result<Screenshot> {
    let ctx = Ctx::vm("screenshot", vm);
    let dir = &be.opts.console_dir;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(ctx.clone(), dir, e))?;
    // VirtualBox writes the file; a fresh name per call keeps callers apart.
    let file = tempfile::Builder::new()
        .prefix(&format!("{vm}.screenshot."))
        .suffix(".png")
        .tempfile_in(dir)
        .map_err(|e| Error::io(ctx.clone(), dir, e))?
        .into_temp_path();
    let mut args = os(&["controlvm", vm.as_str(), "screenshotpng"]);
    args.push(file.to_path_buf().into_os_string());
    be.vbox(&ctx, args).await?;
    let data = std::fs::read(&file).map_err(|e| Error::io(ctx.clone(), &file, e))?;
    image::check_png(data)
        .map_err(|m| Error::backend(ctx, "VBoxManage", format!("screenshotpng: {m}")))
}
