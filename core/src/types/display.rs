//! The guest's screen: screenshots and the remote display (VNC, VirtualBox's VRDE) a person
//! connects to.

use serde::Serialize;

/// A picture of the guest's screen, as PNG on every backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Screenshot {
    /// The PNG file's bytes.
    pub png: Vec<u8>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl Screenshot {
    /// Whether the picture shows nothing: every pixel alike (or it cannot be decoded).
    pub fn is_blank(&self) -> bool {
        crate::util::image::is_blank(self).unwrap_or(true)
    }
}

/// Where a viewer reaches the guest's screen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoteDisplay {
    /// `vnc` (libvirt, VMware) or `rdp` (VirtualBox's VRDE).
    pub protocol: String,
    /// The host it listens on.
    pub host: String,
    /// Its port, distinct per VM (leased like forwards).
    pub port: u16,
    /// `vnc://127.0.0.1:5901`, for a viewer.
    pub url: String,
}

impl RemoteDisplay {
    /// A display at `host:port`.
    pub fn new(protocol: &str, host: &str, port: u16) -> Self {
        let h = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        RemoteDisplay {
            protocol: protocol.into(),
            host: host.into(),
            port,
            url: format!("{protocol}://{h}:{port}"),
        }
    }
}
