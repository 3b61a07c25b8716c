//! What every subcommand shares: the client (which owns the config) and the output mode.

use std::time::Duration;

use anyvm::{Client, Error, ReadySpec};

pub struct App {
    /// Owns the configuration (`client.config()`), which its handles follow.
    pub client: Client,
    pub json: bool,
}

pub fn secs(s: f64, what: &str) -> anyvm::Result<Duration> {
    anyvm::positive_secs(s, what)
}

impl App {
    pub fn out(&self, value: serde_json::Value, text: impl FnOnce() -> String) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(&value).expect("json"));
        } else {
            let t = text();
            if !t.is_empty() {
                println!("{t}");
            }
        }
    }

    pub fn ready_spec(&self, name: &str) -> ReadySpec {
        self.client
            .config()
            .and_then(|c| c.machines.get(name))
            .map(|m| m.ready.clone())
            .unwrap_or_default()
    }

    /// A handle on an existing VM (it follows the client's config).
    pub async fn open(&self, name: &str) -> anyvm::Result<anyvm::Vm> {
        self.client.vm(name).await
    }

    pub fn machine(&self, name: &str) -> anyvm::Result<&anyvm::MachineConfig> {
        match self.client.config() {
            Some(c) => c.machine(name),
            None => Err(Error::config(
                None,
                format!("machines.{name}"),
                "no configuration file; pass --config or create ./anyvm.toml",
            )),
        }
    }
}
