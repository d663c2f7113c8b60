//! Macvtaps, following microvm.nix's `macvtap-up`: create on the lower link
//! with the guest MAC and mode, allmulticast on, IPv6 off (if the sysctl
//! exists), up, and chown `/dev/tap<ifindex>` to the VMM's user.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::netlink::{NlError, Rtnl};
use super::{MacvtapSpec, NetError, validate_ifname};

/// macvlan/macvtap modes (`enum macvlan_mode` in `<linux/if_link.h>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacvtapMode {
    Private,
    Vepa,
    Bridge,
    Passthru,
    Source,
}

impl MacvtapMode {
    /// The `IFLA_MACVLAN_MODE` value.
    pub fn to_kernel(self) -> u32 {
        match self {
            MacvtapMode::Private => 1,
            MacvtapMode::Vepa => 2,
            MacvtapMode::Bridge => 4,
            MacvtapMode::Passthru => 8,
            MacvtapMode::Source => 16,
        }
    }
}

impl FromStr for MacvtapMode {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        Ok(match s {
            "private" => MacvtapMode::Private,
            "vepa" => MacvtapMode::Vepa,
            "bridge" => MacvtapMode::Bridge,
            "passthru" => MacvtapMode::Passthru,
            "source" => MacvtapMode::Source,
            _ => return Err(()),
        })
    }
}

/// Parses `aa:bb:cc:dd:ee:ff` (hex digits, either case) into bytes. Returns
/// `None` unless it is a valid unicast, non-zero Ethernet address (what the
/// kernel accepts for a macvtap).
pub fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in &mut out {
        let part = parts.next()?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    let unicast = out[0] & 1 == 0;
    (parts.next().is_none() && unicast && out != [0; 6]).then_some(out)
}

/// Checks everything about `spec` that can be checked without the kernel.
pub(crate) fn validate(spec: &MacvtapSpec) -> Result<([u8; 6], MacvtapMode), NetError> {
    validate_ifname(&spec.name)?;
    validate_ifname(&spec.link)?;
    let mac =
        parse_mac(&spec.mac).ok_or_else(|| NetError::InvalidMac { name: spec.name.clone(), mac: spec.mac.clone() })?;
    let mode =
        spec.mode.parse().map_err(|()| NetError::InvalidMode { name: spec.name.clone(), mode: spec.mode.clone() })?;
    Ok((mac, mode))
}

/// Creates the macvtap; on failure after creation it is deleted again.
pub(crate) fn create(rtnl: &mut Rtnl, spec: &MacvtapSpec) -> Result<(), NetError> {
    let (mac, mode) = validate(spec)?;
    let name = spec.name.as_str();
    let lower = rtnl
        .get_link(&spec.link)
        .map_err(|e| e.into_net("look up lower link", name))?
        .ok_or_else(|| NetError::LowerLinkMissing { name: name.to_owned(), link: spec.link.clone() })?;
    let allmulti = libc::IFF_ALLMULTI as u32;
    if let Err(err) = rtnl.new_macvtap(name, lower.index, mac, mode.to_kernel(), allmulti) {
        return Err(match err.errno() {
            Some(libc::EEXIST) => NetError::AlreadyExists {
                name: name.to_owned(),
                kind: rtnl.get_link(name).ok().flatten().and_then(|l| l.kind),
            },
            _ => err.into_net("create macvtap", name),
        });
    }
    let result = configure(rtnl, spec);
    if result.is_err()
        && let Err(err) = rtnl.del_link(name)
    {
        tracing::warn!(interface = name, error = %err.source, "could not remove half-configured macvtap");
    }
    result
}

fn configure(rtnl: &mut Rtnl, spec: &MacvtapSpec) -> Result<(), NetError> {
    let name = spec.name.as_str();
    let link = rtnl
        .get_link(name)
        .map_err(|e| e.into_net("look up new macvtap", name))?
        .ok_or_else(|| NetError::NoSuchLink { op: "look up new macvtap", name: name.to_owned() })?;
    disable_ipv6(name)?;
    let up = libc::IFF_UP as u32;
    rtnl.set_flags(link.index, up, up).map_err(|e: NlError| e.into_net("bring up", name))?;
    let node = device_node(name, link.index)?;
    std::os::unix::fs::chown(&node, Some(spec.owner_uid), Some(spec.owner_gid))
        .map_err(|e| NetError::os("chown its /dev/tap device node", name, e))?;
    Ok(())
}

/// Writes 1 to `/proc/sys/net/ipv6/conf/<name>/disable_ipv6` if it exists
/// (it does not when IPv6 is disabled on the host). `/proc/sys/net` shows the
/// calling thread's netns.
fn disable_ipv6(name: &str) -> Result<(), NetError> {
    // sysctl paths spell '.' in interface names as '/'.
    let path = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", name.replace('.', "/"));
    match fs::write(&path, "1") {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other.map_err(|e| NetError::os("disable IPv6", name, e)),
    }
}

/// `/dev/tap<ifindex>`, checked to be a character device and — when
/// `/sys/dev/char` can tell — really the node of this macvtap. Device nodes
/// are host-global while ifindexes are per netns, so a macvtap in another
/// netns can own the same `/dev/tapN`; chowning that one would hand another
/// VM's traffic to our VMM user.
fn device_node(name: &str, ifindex: u32) -> Result<PathBuf, NetError> {
    let node = PathBuf::from(format!("/dev/tap{ifindex}"));
    let meta = fs::metadata(&node).map_err(|e| NetError::os("find its /dev/tap device node", name, e))?;
    let mismatch = || NetError::DeviceNodeMismatch { name: name.to_owned(), path: node.clone() };
    if !meta.file_type().is_char_device() {
        return Err(mismatch());
    }
    let rdev = meta.rdev();
    let sys = format!("/sys/dev/char/{}:{}", libc::major(rdev), libc::minor(rdev));
    match fs::read_link(Path::new(&sys)) {
        Ok(target) => {
            let expected = format!("/net/{name}/macvtap/tap{ifindex}");
            if target.to_string_lossy().ends_with(&expected) { Ok(node) } else { Err(mismatch()) }
        }
        Err(err) => {
            tracing::debug!(interface = name, error = %err, "cannot verify macvtap device node via sysfs");
            Ok(node)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_macs() {
        assert_eq!(parse_mac("02:00:5e:Aa:bB:01"), Some([0x02, 0x00, 0x5e, 0xaa, 0xbb, 0x01]));
        for bad in [
            "",
            "02:00:5e:aa:bb",
            "02:00:5e:aa:bb:01:02",
            "02-00-5e-aa-bb-01",
            "2:00:5e:aa:bb:01",
            "02:00:5e:aa:bb:0g",
            "+2:00:5e:aa:bb:01",
            "01:00:5e:00:00:01", // multicast
            "00:00:00:00:00:00",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn modes_map_to_kernel_values() {
        let modes = ["private", "vepa", "bridge", "passthru", "source"];
        let values: Vec<u32> = modes.iter().map(|m| m.parse::<MacvtapMode>().unwrap().to_kernel()).collect();
        assert_eq!(values, [1, 2, 4, 8, 16]);
        assert!("Bridge".parse::<MacvtapMode>().is_err());
    }

    #[test]
    fn validate_names_the_bad_field() {
        let mut spec = MacvtapSpec {
            name: "mv0".into(),
            mac: "02:00:00:00:00:01".into(),
            link: "eth0".into(),
            mode: "bridge".into(),
            owner_uid: 1,
            owner_gid: 1,
        };
        assert!(validate(&spec).is_ok());
        spec.mode = "nat".into();
        assert!(matches!(validate(&spec), Err(NetError::InvalidMode { .. })));
        spec.mac = "zz".into();
        let err = validate(&spec).unwrap_err();
        assert_eq!(err.to_string(), "invalid MAC address \"zz\" for mv0");
        spec.link = "bad/link".into();
        assert!(matches!(validate(&spec), Err(NetError::InvalidName { .. })));
    }
}
