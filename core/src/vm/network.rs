//! How the host reaches the guest: forwards (hypervisor or ssh tunnels), ssh endpoints and
//! the pinned ssh config.

use super::*;

impl Vm {
    /// Where the host reaches the guest's `guest_port`: a hypervisor forward to it, else the
    /// guest's own address where the backend can tell it.
    pub async fn ssh_endpoint(&self, guest_port: u16) -> Result<(String, u16)> {
        if self.backend.forward_transport() == ForwardTransport::Hypervisor {
            if let Some(f) = self
                .forwards()
                .await?
                .into_iter()
                .find(|f| f.guest_port == guest_port && f.proto == crate::types::Protocol::Tcp)
            {
                return f
                    .connect_addr_via(self.backend.forward_host().as_deref())
                    .map_err(|reason| Error::InvalidState {
                        ctx: self.ctx("ssh"),
                        state: reason,
                        hint: None,
                    });
            }
        }
        match self.backend.guest_address(&self.name).await? {
            Some(ip) => Ok((ip, guest_port)),
            None => Err(Error::InvalidState {
                ctx: self.ctx("ssh"),
                state: format!("no forward to guest port {guest_port}"),
                hint: Some(format!(
                    "add one: anyvm forward add {} --guest-port {guest_port}",
                    self.name
                )),
            }),
        }
    }

    /// How anyvm itself logs in to the guest over ssh (key from the credentials, host key pinned
    /// in anyvm's per-VM known_hosts).
    pub async fn ssh_target(&self, guest_port: u16) -> Result<SshTarget> {
        self.ssh_target_for(guest_port, self.credentials.as_ref())
            .await
    }

    pub(super) async fn ssh_target_for(
        &self,
        guest_port: u16,
        creds: Option<&Credentials>,
    ) -> Result<SshTarget> {
        let ctx = self.ctx("ssh");
        let creds = crate::backend::require_credentials(&ctx, creds, "ssh to the guest")?;
        let identity_file = creds.identity_file.clone().ok_or_else(|| Error::Auth {
            ctx: ctx.clone(),
            reason: format!(
                "ssh logins use keys only; give user {:?} an identity_file",
                creds.user
            ),
        })?;
        let (host, port) = self.ssh_endpoint(guest_port).await?;
        Ok(SshTarget {
            vm: self.name.to_string(),
            host,
            port,
            user: creds.user.clone(),
            identity_file,
            known_hosts: ssh::known_hosts_path(
                &self.state_dir,
                &self.backend.uri(),
                self.name.as_str(),
            ),
            host_key_alias: ssh::host_key_alias(self.name.as_str()),
            connect_timeout: Duration::from_secs(15),
        })
    }

    /// Tunnels for this VM's forwards, when anyvm carries them (see [`crate::ssh::tunnel`]).
    pub(super) fn tunnels(&self) -> Option<Tunnels> {
        (self.backend.forward_transport() == ForwardTransport::SshTunnel)
            .then(|| Tunnels::new(&self.state_dir, &self.backend.uri(), self.name.as_str()))
    }

    /// (Re)open the ssh tunnel of every forward; retries while the guest's sshd is not up yet.
    pub(super) async fn open_tunnels(&self, deadline: Instant) -> Result<()> {
        let Some(t) = self.tunnels() else {
            return Ok(());
        };
        let forwards = self.backend.forwards(&self.name).await?;
        if forwards.is_empty() {
            return Ok(());
        }
        let target = self.ssh_target(self.ssh_port()).await?;
        for f in &forwards {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match t.open(&target, f, left.max(Duration::from_secs(5))).await {
                    Ok(()) => break,
                    Err(e @ Error::Backend { .. }) if Instant::now() + TUNNEL_RETRY < deadline => {
                        tracing::debug!(vm = %self.name, error = %e, "guest sshd not reachable yet");
                        tokio::time::sleep(TUNNEL_RETRY).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Ends the VM's ssh tunnels and the operator's shared ssh connections (`anyvm ssh`).
    pub(super) async fn close_tunnels(&self) {
        if let Some(t) = self.tunnels() {
            if let Ok(f) = self.backend.forwards(&self.name).await {
                t.close_all(&f).await;
            }
        }
        self.logins().close_all().await;
    }

    fn logins(&self) -> ssh::Logins {
        ssh::Logins::new(&self.state_dir, &self.backend.uri(), self.name.as_str())
    }

    /// What the operator's own `ssh` needs to log in (`anyvm ssh`): a config file with the
    /// guest's host key pinned (read through the agent or tools channel) and connection sharing,
    /// so the next login reuses the connection and asks nothing else. Ended by stop/destroy.
    ///
    /// ```no_run
    /// # async fn f(vm: anyvm::Vm) -> Result<(), Box<dyn std::error::Error>> {
    /// let login = vm.ssh_login(&anyvm::ssh::SshOptions::default()).await?;
    /// let argv = login.argv(Some("uname -a"), None)?;
    /// std::process::Command::new(&argv[0]).args(&argv[1..]).status()?;
    /// # Ok(()) }
    /// ```
    pub async fn ssh_login(&self, opts: &SshOptions) -> Result<ssh::SshLogin> {
        let port = opts.guest_port.unwrap_or(22);
        let user = opts.user.clone().unwrap_or_else(|| "root".into());
        let logins = self.logins();
        if let Some(l) = logins.live(&user, port).await {
            return Ok(l);
        }
        let cfg = self.ssh_config(opts).await?;
        logins.write(&self.ctx("ssh"), &cfg, port)
    }

    /// The forwards in effect.
    pub async fn forwards(&self) -> Result<Vec<PortForward>> {
        self.backend.forwards(&self.name).await
    }

    /// Add a forward (works on running and stopped VMs). `Auto` host ports are allocated safely.
    pub async fn forward_add(&self, spec: &ForwardSpec) -> Result<PortForward> {
        let args = json!({"spec": spec});
        self.audited("forward_add", args, async move {
            spec.validate()?;
            let ctx = self.ctx("forward add");
            let existing = self.forwards().await?;
            if existing.iter().any(|f| f.name == spec.name) {
                return Err(Error::invalid_arg(
                    format!("forward {:?}", spec.name),
                    format!(
                        "vm '{}' already has a forward with that name; remove it first",
                        self.name
                    ),
                ));
            }
            let uri = self.backend.uri();
            let purpose = format!("forward:{}", spec.name);
            let port = match spec.host_port {
                HostPort::Auto => self.ports.allocate(
                    &uri,
                    self.name.as_str(),
                    &purpose,
                    &spec.host_addr,
                    spec.proto,
                )?,
                HostPort::Fixed(p) => {
                    if let Some(f) = existing
                        .iter()
                        .find(|f| f.host_port == p && f.proto == spec.proto)
                    {
                        return Err(Error::PortInUse {
                            ctx,
                            port: p,
                            reason: format!("already forwarded by '{}'", f.name),
                        });
                    }
                    self.ports.reserve(
                        &uri,
                        self.name.as_str(),
                        &purpose,
                        &spec.host_addr,
                        spec.proto,
                        p,
                    )?;
                    p
                }
            };
            let fwd = PortForward {
                name: spec.name.clone(),
                proto: spec.proto,
                host_addr: spec.host_addr.clone(),
                host_port: port,
                guest_port: spec.guest_port,
            };
            if let Err(e) = self.backend.forward_add(&self.name, &fwd).await {
                let _ = self.ports.release(&uri, self.name.as_str(), Some(&purpose));
                return Err(e);
            }
            if let Some(t) = self.tunnels() {
                let opened = async {
                    if self.state().await? != VmState::Running {
                        return Ok(());
                    }
                    let target = self.ssh_target(self.ssh_port()).await?;
                    t.open(&target, &fwd, Duration::from_secs(60)).await
                };
                if let Err(e) = opened.await {
                    let _ = self.backend.forward_remove(&self.name, &fwd).await;
                    let _ = self.ports.release(&uri, self.name.as_str(), Some(&purpose));
                    return Err(e);
                }
            }
            Ok(fwd)
        })
        .await
    }

    /// Remove a forward by its name (or its host port, given as a number).
    pub async fn forward_remove(&self, name_or_port: &str) -> Result<PortForward> {
        let args = json!({"forward": name_or_port});
        self.audited("forward_remove", args, async move {
            let fwd = self
                .forwards()
                .await?
                .into_iter()
                .find(|f| f.name == name_or_port || f.host_port.to_string() == name_or_port)
                .ok_or_else(|| Error::NotFound {
                    ctx: self.ctx("forward remove"),
                    what: format!("forward {name_or_port:?}"),
                })?;
            if let Some(t) = self.tunnels() {
                t.close(&fwd.name).await;
            }
            self.backend.forward_remove(&self.name, &fwd).await?;
            self.ports.release(
                &self.backend.uri(),
                self.name.as_str(),
                Some(&format!("forward:{}", fwd.name)),
            )?;
            Ok(fwd)
        })
        .await
    }

    /// An OpenSSH config block for this guest with its host keys (read from inside the guest)
    /// pinned in a per-VM known_hosts file; strict host key checking stays on.
    pub async fn ssh_config(&self, opts: &SshOptions) -> Result<SshConfig> {
        let ctx = self.ctx("ssh_config");
        let (host_name, port) = self.ssh_endpoint(opts.guest_port.unwrap_or(22)).await?;
        let keys = self.guest_host_keys(&ctx).await?;
        let uri = self.backend.uri();
        let target = ssh::PinTarget {
            vm: self.name.as_str(),
            backend_uri: &uri,
            state_dir: &self.state_dir,
        };
        ssh::build_config(&ctx, &target, host_name, port, &keys, opts)
    }

    /// The guest's public host keys, read from inside it (agent, tools or ssh channel).
    pub(super) async fn guest_host_keys(&self, ctx: &Ctx) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut last_err = None;
        for path in ssh::HOST_KEY_PATHS {
            match self.read_guest_file(path, 16 * 1024).await {
                Ok(bytes) => {
                    let text = String::from_utf8_lossy(&bytes);
                    keys.extend(text.lines().filter_map(ssh::parse_public_key));
                }
                Err(e) if e.kind() == crate::ErrorKind::NotFound => {}
                Err(e) => last_err = Some(e),
            }
        }
        if keys.is_empty() {
            return Err(match last_err {
                Some(e) => e,
                None => Error::NotFound {
                    ctx: ctx.clone(),
                    what: format!(
                        "no SSH host public key in the guest (looked at {})",
                        ssh::HOST_KEY_PATHS.join(", ")
                    ),
                },
            });
        }
        Ok(keys)
    }
}
