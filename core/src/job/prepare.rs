//! From names to a runnable job: the template's handle (defined from the config when it is not
//! yet) and a [`JobSpec`] carrying the config's readiness and, optionally, a profile's checks.
//! The CLI and the bindings all start here, so they resolve names the same way.

use crate::client::Client;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::name::VmName;
use crate::vm::Vm;

use super::JobSpec;

/// Resolve `template` and/or `profile` (at least one) against the client's configuration.
pub async fn prepare<S: AsRef<str>>(
    client: &Client,
    template: Option<&str>,
    profile: Option<&str>,
    argv: &[S],
) -> Result<(Vm, JobSpec)> {
    let config: Option<&Config> = client.config();
    let profile = match profile {
        Some(p) => {
            let cfg = config
                .ok_or_else(|| Error::invalid_arg("profile", "profiles come from a config file"))?;
            Some(cfg.profile(p)?.clone())
        }
        None => None,
    };
    let template = match (template, &profile) {
        (Some(t), Some(p)) if t != p.machine => {
            return Err(Error::invalid_arg(
                "template",
                format!(
                    "profile {} runs on machine {}, not {t}; name only the profile, or the profile of {t}",
                    p.name, p.machine
                ),
            ))
        }
        (Some(t), _) => t.to_string(),
        (None, Some(p)) => p.machine.clone(),
        (None, None) => {
            return Err(Error::invalid_arg(
                "job",
                "name the template VM or a profile",
            ))
        }
    };
    let name = VmName::new(&template)?;
    let machine = config.and_then(|c| c.machines.get(&template));
    if !client.backend().exists(&name).await? {
        if let Some(m) = machine {
            client.define(m.spec.clone()).await?;
        }
    }
    let vm = client.vm(&template).await?;
    let mut spec = JobSpec::new(&template, argv)?;
    if let Some(m) = machine {
        spec.ready = m.ready.clone();
    }
    spec.profile = profile;
    Ok((vm, spec))
}
