//! Host networking for VMs: tap devices, bridge attachment and macvtaps.
//!
//! Everything here is synchronous and goes through the [`HostNet`] trait so the
//! driver logic can be tested without root against [`RecordingNet`], while
//! [`LinuxNet`] does the real work:
//!
//! * taps are created with ioctls on `/dev/net/tun` (the kernel refuses tun/tap
//!   creation over rtnetlink): `TUNSETIFF` → `TUNSETOWNER` (→ `TUNSETGROUP`) →
//!   `TUNSETPERSIST 1` → close, then brought up over rtnetlink;
//! * macvtaps, bridge attachment, link state, lookups and deletion use a
//!   minimal rtnetlink client (`netlink.rs`);
//! * nothing shells out to `ip`.
//!
//! Creation is strict: an interface that already exists under the requested
//! name is an error ([`NetError::AlreadyExists`]), never silently replaced —
//! a caller that wants microvm.nix's "delete stale, then create" calls
//! [`HostNet::delete_link`] first, knowing the name is its own.

mod error;
mod fake;
mod linux;
mod macvtap;
mod netlink;
mod tap;

#[cfg(test)]
mod root_tests;

pub use error::NetError;
pub use fake::{FakeLinkKind, NetCall, NetCallKind, RecordingNet};
pub use linux::LinuxNet;
pub use macvtap::{MacvtapMode, parse_mac};

/// A persistent tap device to create, as microvm.nix's `tap-up` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapSpec {
    /// Interface name (1..=15 bytes, see [`validate_ifname`]).
    pub name: String,
    /// `IFF_MULTI_QUEUE`: must match what the VMM requests when it reopens the
    /// tap by name (microvm.nix's `tap-flags` contains `multi_queue`).
    pub multi_queue: bool,
    /// `IFF_VNET_HDR` (microvm.nix always sets it).
    pub vnet_hdr: bool,
    /// The uid allowed to attach to the tap (the VMM's user).
    pub owner_uid: u32,
    /// Optionally also a gid allowed to attach.
    pub owner_gid: Option<u32>,
}

/// A macvtap to create on a lower link, as microvm.nix's `macvtap-up` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MacvtapSpec {
    /// Interface name of the macvtap itself.
    pub name: String,
    /// Guest MAC address, `aa:bb:cc:dd:ee:ff` (unicast, not all zero).
    pub mac: String,
    /// The lower (host) link the macvtap sits on.
    pub link: String,
    /// `private`, `vepa`, `bridge`, `passthru` or `source`.
    pub mode: String,
    /// Owner of `/dev/tap<ifindex>` (the VMM's user).
    pub owner_uid: u32,
    /// Group of `/dev/tap<ifindex>`.
    pub owner_gid: u32,
}

/// Host network operations the driver needs. All methods validate interface
/// names with [`validate_ifname`] before touching the kernel.
pub trait HostNet: Send + Sync {
    /// Whether an interface with this name exists (in the caller's netns).
    fn link_exists(&self, name: &str) -> Result<bool, NetError>;
    /// Whether `name` exists and is a bridge. A missing link is `Ok(false)`.
    fn is_bridge(&self, name: &str) -> Result<bool, NetError>;
    /// Creates a persistent tap owned by `spec.owner_uid` and brings it up.
    /// Fails with [`NetError::AlreadyExists`] if the name is taken.
    fn create_tap(&self, spec: &TapSpec) -> Result<(), NetError>;
    /// Creates a macvtap on `spec.link` with the given MAC and mode, turns on
    /// allmulticast, disables IPv6 on it (if IPv6 is available), brings it up
    /// and chowns `/dev/tap<ifindex>` to the owner. Removed again if a later
    /// step fails.
    fn create_macvtap(&self, spec: &MacvtapSpec) -> Result<(), NetError>;
    /// Makes `bridge` the master of `link`. Errors if `bridge` is missing or
    /// is not a bridge, or if `link` is missing.
    fn attach_to_bridge(&self, link: &str, bridge: &str) -> Result<(), NetError>;
    /// Deletes the interface. Deleting a missing interface is `Ok`.
    fn delete_link(&self, name: &str) -> Result<(), NetError>;
}

/// The longest interface name the kernel accepts (`IFNAMSIZ - 1`).
pub const MAX_IFNAME_LEN: usize = 15;

/// Checks an interface name the way the kernel's `dev_valid_name` does, plus
/// `%` (which the kernel would treat as a `%d` name template and replace):
/// 1..=15 bytes, not `.` or `..`, no `/`, `:`, `%`, NUL or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), NetError> {
    let bad = |reason: &'static str| Err(NetError::InvalidName { name: name.to_owned(), reason });
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_IFNAME_LEN {
        return bad("longer than 15 bytes");
    }
    if name == "." || name == ".." {
        return bad("reserved name");
    }
    for b in name.bytes() {
        match b {
            b'/' => return bad("contains '/'"),
            b':' => return bad("contains ':'"),
            b'%' => return bad("contains '%'"),
            0 => return bad("contains NUL"),
            // The kernel's isspace(): space, \t \n \v \f \r.
            b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' => return bad("contains whitespace"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_ifname_accepts_ordinary_names() {
        for name in ["tap0", "vm-web-1", "a", "eth0.100", "br_lan", "x23456789012345", "é"] {
            assert!(validate_ifname(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn validate_ifname_rejects_bad_names() {
        for name in
            ["", "x234567890123456", ".", "..", "a/b", "a:b", "tap%d", "a\0b", "a b", "a\tb", "a\nb", "ééééééééé"]
        {
            let err = validate_ifname(name).unwrap_err();
            assert!(matches!(err, NetError::InvalidName { .. }), "{name:?}: {err}");
            assert!(err.to_string().starts_with("invalid interface name"), "{err}");
        }
    }

    #[test]
    fn host_net_is_object_safe() {
        let nets: Vec<Box<dyn HostNet>> = vec![Box::new(LinuxNet::new()), Box::new(RecordingNet::new())];
        assert_eq!(nets.len(), 2);
    }
}
