//! Port forwards: protocols, host ports (fixed or allocated) and forwards in effect.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, PartialOrd, Ord,
)]
/// A transport protocol.
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl std::str::FromStr for Protocol {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => Err(Error::invalid_arg(
                "protocol",
                format!("{s:?} is not tcp or udp"),
            )),
        }
    }
}

/// A requested host port: a fixed number or one allocated by anyvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostPort {
    /// Allocated by anyvm from the client's port range.
    #[default]
    Auto,
    /// This port.
    Fixed(u16),
}

impl Serialize for HostPort {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            HostPort::Auto => s.serialize_str("auto"),
            HostPort::Fixed(p) => s.serialize_u16(*p),
        }
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u16),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(0) => Err(serde::de::Error::custom(
                "port 0 is not valid; use \"auto\"",
            )),
            Raw::N(p) => Ok(HostPort::Fixed(p)),
            Raw::S(s) if s == "auto" => Ok(HostPort::Auto),
            Raw::S(s) => s
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .map(HostPort::Fixed)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!("{s:?} is not a port number or \"auto\""))
                }),
        }
    }
}

impl std::str::FromStr for HostPort {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "auto" {
            return Ok(HostPort::Auto);
        }
        match s.parse::<u16>() {
            Ok(p) if p != 0 => Ok(HostPort::Fixed(p)),
            _ => Err(Error::invalid_arg(
                "host port",
                format!("{s:?} is not a port number (1-65535) or 'auto'"),
            )),
        }
    }
}

/// A forward as requested (host port may be `Auto`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardSpec {
    /// A label unique within the VM, e.g. "ssh".
    pub name: String,
    /// TCP or UDP.
    #[serde(default)]
    pub proto: Protocol,
    /// The host address it listens on.
    #[serde(default = "default_host_addr")]
    pub host_addr: String,
    /// The host port, fixed or `auto`.
    #[serde(default)]
    pub host_port: HostPort,
    /// The guest port.
    pub guest_port: u16,
}

/// Forwards listen on loopback unless told otherwise.
pub fn default_host_addr() -> String {
    "127.0.0.1".into()
}

impl ForwardSpec {
    /// A TCP forward called `name` from an allocated host port to `guest_port`.
    pub fn new(name: impl Into<String>, guest_port: u16) -> Self {
        ForwardSpec {
            name: name.into(),
            proto: Protocol::Tcp,
            host_addr: default_host_addr(),
            host_port: HostPort::Auto,
            guest_port,
        }
    }
    /// Use this host port.
    pub fn host_port(mut self, p: HostPort) -> Self {
        self.host_port = p;
        self
    }
    /// Use this protocol.
    pub fn proto(mut self, p: Protocol) -> Self {
        self.proto = p;
        self
    }

    /// Check the forward: a name, a guest port, a host address.
    pub fn validate(&self) -> Result<()> {
        let what = format!("forward {:?}", self.name);
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Error::invalid_arg(
                what,
                "name must be non-empty letters, digits, '-' or '_'",
            ));
        }
        if self.guest_port == 0 {
            return Err(Error::invalid_arg(what, "guest port must be 1-65535"));
        }
        if self.host_addr.parse::<std::net::IpAddr>().is_err() {
            return Err(Error::invalid_arg(
                what,
                format!("host address {:?} is not an IP address", self.host_addr),
            ));
        }
        Ok(())
    }
}

/// A forward in effect: the host port is known.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PortForward {
    /// Its name.
    pub name: String,
    /// TCP or UDP.
    pub proto: Protocol,
    /// The host address it listens on.
    pub host_addr: String,
    /// The host port.
    pub host_port: u16,
    /// The guest port.
    pub guest_port: u16,
}

impl PortForward {
    /// The address and port a client on the host connects to (a forward listening on every
    /// address is reached on loopback).
    pub fn connect_addr(&self) -> (String, u16) {
        let addr = if self.host_addr == "0.0.0.0" {
            "127.0.0.1".to_string()
        } else {
            self.host_addr.clone()
        };
        (addr, self.host_port)
    }

    /// [`PortForward::connect_addr`] for a forward that listens on `remote` (a remote
    /// hypervisor host) rather than here: a wildcard address names that host; a loopback one
    /// cannot be reached from here, which the error says how to fix.
    pub fn connect_addr_via(
        &self,
        remote: Option<&str>,
    ) -> std::result::Result<(String, u16), String> {
        let Some(r) = remote else {
            return Ok(self.connect_addr());
        };
        if self.host_addr == "0.0.0.0" || self.host_addr == "::" {
            return Ok((r.to_string(), self.host_port));
        }
        if self.host_addr.starts_with("127.") || self.host_addr == "::1" {
            return Err(format!(
                "forward {:?} listens on the loopback address of the libvirt host {r}, which this machine cannot reach; give it host_addr = \"0.0.0.0\" (or an address of {r})",
                self.name
            ));
        }
        Ok((self.host_addr.clone(), self.host_port))
    }
}

impl From<&PortForward> for ForwardSpec {
    fn from(f: &PortForward) -> Self {
        ForwardSpec {
            name: f.name.clone(),
            proto: f.proto,
            host_addr: f.host_addr.clone(),
            host_port: HostPort::Fixed(f.host_port),
            guest_port: f.guest_port,
        }
    }
}

impl ForwardSpec {
    /// The forward in effect, once its host port is known.
    pub fn resolved(&self) -> Option<PortForward> {
        match self.host_port {
            HostPort::Fixed(p) => Some(PortForward {
                name: self.name.clone(),
                proto: self.proto,
                host_addr: self.host_addr.clone(),
                host_port: p,
                guest_port: self.guest_port,
            }),
            HostPort::Auto => None,
        }
    }
}

impl fmt::Display for PortForward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}:{}:{} -> {}",
            self.name, self.proto, self.host_addr, self.host_port, self.guest_port
        )
    }
}

#[cfg(test)]
mod forward_tests {
    use super::*;

    #[test]
    fn connect_address_here_and_on_a_remote_host() {
        let mut f = PortForward {
            name: "ssh".into(),
            proto: Protocol::Tcp,
            host_addr: "0.0.0.0".into(),
            host_port: 40022,
            guest_port: 22,
        };
        assert_eq!(f.connect_addr(), ("127.0.0.1".into(), 40022));
        assert_eq!(f.connect_addr_via(None), Ok(("127.0.0.1".into(), 40022)));
        assert_eq!(f.connect_addr_via(Some("hv1")), Ok(("hv1".into(), 40022)));
        f.host_addr = "127.0.0.1".into();
        assert_eq!(f.connect_addr(), ("127.0.0.1".into(), 40022));
        let e = f.connect_addr_via(Some("hv1")).unwrap_err();
        assert!(e.contains("loopback") && e.contains("0.0.0.0"), "{e}");
        f.host_addr = "10.0.0.5".into();
        assert_eq!(
            f.connect_addr_via(Some("hv1")),
            Ok(("10.0.0.5".into(), 40022))
        );
    }
}
