//! The guest's screen: `vmrun captureScreen VMX FILE`, a guest operation (it needs the guest
//! account, as VMware documents).

use crate::credentials::Credentials;
use crate::error::{Ctx, Error, Result};
use crate::name::VmName;
use crate::types::Screenshot;
use crate::util::image;

use super::*;

pub(super) async fn screenshot(
    be: &VmwareBackend,
    vm: &VmName,
    creds: Option<Credentials>,
) -> Result<Screenshot> {
    let ctx = Ctx::vm("screenshot", vm);
    let creds = VmwareBackend::need_creds(&ctx, creds.as_ref())?;
    let e = be.entry(&ctx, vm)?;
    let dir = e.vmx.parent().unwrap_or(std::path::Path::new("."));
    let file = tempfile::Builder::new()
        .prefix("anyvm-screenshot.")
        .suffix(".png")
        .tempfile_in(dir)
        .map_err(|err| Error::io(ctx.clone(), dir, err))?
        .into_temp_path();
    let args = vec![e.vmx.clone().into(), file.to_path_buf().into_os_string()];
    be.vmrun_auth(&ctx, "captureScreen", args, None, Some(&creds), false)
        .await?;
    let data = std::fs::read(&file).map_err(|err| Error::io(ctx.clone(), &file, err))?;
    image::check_png(data).map_err(|m| Error::backend(ctx, "vmrun", format!("captureScreen: {m}")))
}
