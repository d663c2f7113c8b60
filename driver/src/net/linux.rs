//! [`LinuxNet`]: the real [`HostNet`], acting in the calling thread's netns.

use super::netlink::{LinkInfo, Rtnl};
use super::{HostNet, MacvtapSpec, NetError, TapSpec, macvtap, tap, validate_ifname};

/// Host networking through `/dev/net/tun` ioctls and rtnetlink. Stateless:
/// every call opens its own netlink socket, so it acts in the network
/// namespace of the calling thread. Needs `CAP_NET_ADMIN` (and root for the
/// `/dev/tapN` chown).
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxNet;

impl LinuxNet {
    pub fn new() -> LinuxNet {
        LinuxNet
    }
}

fn rtnl(op: &'static str, name: &str) -> Result<Rtnl, NetError> {
    Rtnl::open().map_err(|e| NetError::os(op, name, e))
}

fn lookup(rtnl: &mut Rtnl, op: &'static str, name: &str) -> Result<Option<LinkInfo>, NetError> {
    rtnl.get_link(name).map_err(|e| e.into_net(op, name))
}

impl HostNet for LinuxNet {
    fn link_exists(&self, name: &str) -> Result<bool, NetError> {
        validate_ifname(name)?;
        let op = "look up interface";
        Ok(lookup(&mut rtnl(op, name)?, op, name)?.is_some())
    }

    fn is_bridge(&self, name: &str) -> Result<bool, NetError> {
        validate_ifname(name)?;
        let op = "look up interface";
        let link = lookup(&mut rtnl(op, name)?, op, name)?;
        Ok(link.is_some_and(|l| l.kind.as_deref() == Some("bridge")))
    }

    fn create_tap(&self, spec: &TapSpec) -> Result<(), NetError> {
        let name = spec.name.as_str();
        validate_ifname(name)?;
        let mut rtnl = rtnl("open a netlink socket", name)?;
        match tap::create_persistent_tap(spec) {
            Ok(()) => {}
            Err(NetError::AlreadyExists { name, .. }) => {
                let kind = rtnl.get_link(&name).ok().flatten().and_then(|l| l.kind);
                return Err(NetError::AlreadyExists { name, kind });
            }
            Err(err) => return Err(err),
        }
        let mut up = || -> Result<(), NetError> {
            let link = lookup(&mut rtnl, "look up new tap", name)?
                .ok_or_else(|| NetError::NoSuchLink { op: "look up new tap", name: name.to_owned() })?;
            let up = libc::IFF_UP as u32;
            rtnl.set_flags(link.index, up, up).map_err(|e| e.into_net("bring up", name))
        };
        let result = up();
        if result.is_err() {
            // The tap is persistent by now: don't leave it behind.
            if let Err(err) = self.delete_link(name) {
                tracing::warn!(interface = name, error = %err, "could not remove tap after failed setup");
            }
        }
        result
    }

    fn create_macvtap(&self, spec: &MacvtapSpec) -> Result<(), NetError> {
        macvtap::validate(spec)?;
        let mut rtnl = rtnl("open a netlink socket", &spec.name)?;
        macvtap::create(&mut rtnl, spec)
    }

    fn attach_to_bridge(&self, link: &str, bridge: &str) -> Result<(), NetError> {
        validate_ifname(link)?;
        validate_ifname(bridge)?;
        let op = "attach to a bridge";
        let mut rtnl = rtnl("open a netlink socket", link)?;
        let br = lookup(&mut rtnl, "look up bridge", bridge)?
            .ok_or_else(|| NetError::BridgeMissing { link: link.to_owned(), bridge: bridge.to_owned() })?;
        if br.kind.as_deref() != Some("bridge") {
            return Err(NetError::NotABridge { link: link.to_owned(), bridge: bridge.to_owned(), kind: br.kind });
        }
        let port = lookup(&mut rtnl, op, link)?.ok_or_else(|| NetError::NoSuchLink { op, name: link.to_owned() })?;
        if port.master == Some(br.index) {
            return Ok(());
        }
        rtnl.set_master(port.index, br.index).map_err(|e| NetError::Attach {
            link: link.to_owned(),
            bridge: bridge.to_owned(),
            detail: e.msg,
            source: e.source,
        })
    }

    fn delete_link(&self, name: &str) -> Result<(), NetError> {
        validate_ifname(name)?;
        let op = "delete";
        rtnl(op, name)?.del_link(name).map(drop).map_err(|e| e.into_net(op, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_fail_before_any_syscall() {
        let net = LinuxNet::new();
        assert!(matches!(net.link_exists("a/b"), Err(NetError::InvalidName { .. })));
        assert!(matches!(net.delete_link(""), Err(NetError::InvalidName { .. })));
        assert!(matches!(net.attach_to_bridge("tap0", "br%d"), Err(NetError::InvalidName { .. })));
        let spec = TapSpec {
            name: "x234567890123456".into(),
            multi_queue: false,
            vnet_hdr: true,
            owner_uid: 0,
            owner_gid: None,
        };
        assert!(matches!(net.create_tap(&spec), Err(NetError::InvalidName { .. })));
    }
}
