//! [`NetError`]: what went wrong, naming the interface and the operation.

use std::io;
use std::path::PathBuf;

/// A host-networking failure. Messages name the interface and the operation;
/// the OS error is the [`source`](std::error::Error::source), not repeated in
/// the message.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("invalid interface name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },

    #[error("invalid MAC address {mac:?} for {name}")]
    InvalidMac { name: String, mac: String },

    #[error("invalid macvtap mode {mode:?} for {name} (expected private, vepa, bridge, passthru or source)")]
    InvalidMode { name: String, mode: String },

    #[error("cannot create {name}: an interface with that name already exists{}", kind_suffix(.kind))]
    AlreadyExists { name: String, kind: Option<String> },

    #[error("{name}: cannot {op}: no such interface")]
    NoSuchLink { op: &'static str, name: String },

    #[error("cannot create macvtap {name}: lower link {link} does not exist")]
    LowerLinkMissing { name: String, link: String },

    #[error("cannot attach {link} to bridge {bridge}: {bridge} does not exist")]
    BridgeMissing { link: String, bridge: String },

    #[error("cannot attach {link} to bridge {bridge}: {bridge} is not a bridge{}", kind_suffix(.kind))]
    NotABridge { link: String, bridge: String, kind: Option<String> },

    #[error("cannot chown the device node of macvtap {name}: {} belongs to another device", .path.display())]
    DeviceNodeMismatch { name: String, path: PathBuf },

    #[error("cannot attach {link} to bridge {bridge}{}", detail_suffix(.detail))]
    Attach {
        link: String,
        bridge: String,
        detail: Option<String>,
        #[source]
        source: io::Error,
    },

    #[error("{name}: failed to {op}{}", detail_suffix(.detail))]
    Os {
        op: &'static str,
        name: String,
        /// The kernel's extended-ack message, when netlink supplied one.
        detail: Option<String>,
        #[source]
        source: io::Error,
    },
}

impl NetError {
    /// An OS-level failure of `op` on `name`.
    pub(crate) fn os(op: &'static str, name: &str, source: io::Error) -> Self {
        NetError::Os { op, name: name.to_owned(), detail: None, source }
    }

    /// The errno behind an [`NetError::Os`], if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetError::Os { source, .. } | NetError::Attach { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

fn kind_suffix(kind: &Option<String>) -> String {
    match kind {
        Some(kind) => format!(" (kind {kind})"),
        None => String::new(),
    }
}

fn detail_suffix(detail: &Option<String>) -> String {
    match detail {
        Some(detail) => format!(" (kernel: {detail})"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn os_error_names_op_and_interface_without_repeating_source() {
        let err = NetError::os("bring up", "tap0", io::Error::from_raw_os_error(libc::EPERM));
        let msg = err.to_string();
        assert_eq!(msg, "tap0: failed to bring up");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        assert!(err.source().is_some());
    }

    #[test]
    fn messages_name_interfaces() {
        let err = NetError::NotABridge { link: "tap0".into(), bridge: "d0".into(), kind: Some("dummy".into()) };
        assert_eq!(err.to_string(), "cannot attach tap0 to bridge d0: d0 is not a bridge (kind dummy)");
        let err = NetError::AlreadyExists { name: "eth0".into(), kind: None };
        assert_eq!(err.to_string(), "cannot create eth0: an interface with that name already exists");
    }
}
