//! [`RecordingNet`]: an in-memory [`HostNet`] for logic tests without root.
//!
//! It records every call, keeps a small model of the links (so create/delete/
//! attach behave like [`LinuxNet`](super::LinuxNet): duplicates, missing
//! bridges and non-bridges are errors, deleting a missing link is `Ok`), and
//! can be told to fail the next call of a kind.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Mutex, MutexGuard};

use super::{HostNet, MacvtapSpec, NetError, TapSpec, macvtap, validate_ifname};

/// One recorded [`HostNet`] call, with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetCall {
    LinkExists(String),
    IsBridge(String),
    CreateTap(TapSpec),
    CreateMacvtap(MacvtapSpec),
    AttachToBridge { link: String, bridge: String },
    DeleteLink(String),
}

/// The kind of a [`NetCall`], for [`RecordingNet::fail_next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NetCallKind {
    LinkExists,
    IsBridge,
    CreateTap,
    CreateMacvtap,
    AttachToBridge,
    DeleteLink,
}

impl NetCall {
    pub fn kind(&self) -> NetCallKind {
        match self {
            NetCall::LinkExists(_) => NetCallKind::LinkExists,
            NetCall::IsBridge(_) => NetCallKind::IsBridge,
            NetCall::CreateTap(_) => NetCallKind::CreateTap,
            NetCall::CreateMacvtap(_) => NetCallKind::CreateMacvtap,
            NetCall::AttachToBridge { .. } => NetCallKind::AttachToBridge,
            NetCall::DeleteLink(_) => NetCallKind::DeleteLink,
        }
    }
}

/// What kind of link the fake holds under a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeLinkKind {
    Tap,
    Macvtap,
    Bridge,
    /// Anything else (a NIC, a dummy…).
    Other,
}

#[derive(Debug, Clone)]
struct FakeLink {
    kind: FakeLinkKind,
    master: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<NetCall>,
    links: BTreeMap<String, FakeLink>,
    fail: Vec<NetCallKind>,
}

/// A recording fake of [`HostNet`]. Thread-safe; share it with `Arc`.
#[derive(Debug, Default)]
pub struct RecordingNet {
    state: Mutex<State>,
}

impl RecordingNet {
    pub fn new() -> RecordingNet {
        RecordingNet::default()
    }

    /// Builder form of [`add_link`](Self::add_link) with [`FakeLinkKind::Other`].
    pub fn with_link(self, name: &str) -> RecordingNet {
        self.add_link(name, FakeLinkKind::Other);
        self
    }

    /// Builder form of [`add_link`](Self::add_link) with [`FakeLinkKind::Bridge`].
    pub fn with_bridge(self, name: &str) -> RecordingNet {
        self.add_link(name, FakeLinkKind::Bridge);
        self
    }

    /// Pretends a link of `kind` exists (replacing any of that name).
    pub fn add_link(&self, name: &str, kind: FakeLinkKind) {
        let link = FakeLink { kind, master: None };
        self.lock().links.insert(name.to_owned(), link);
    }

    /// Makes the next call of `kind` fail with an injected [`NetError::Os`]
    /// (after recording it, without changing the model). Queues up: calling
    /// this twice fails the next two such calls.
    pub fn fail_next(&self, kind: NetCallKind) {
        self.lock().fail.push(kind);
    }

    /// All calls so far, oldest first.
    pub fn calls(&self) -> Vec<NetCall> {
        self.lock().calls.clone()
    }

    /// Returns and forgets the calls so far.
    pub fn take_calls(&self) -> Vec<NetCall> {
        std::mem::take(&mut self.lock().calls)
    }

    /// Names of the links the fake currently holds, sorted.
    pub fn links(&self) -> Vec<String> {
        self.lock().links.keys().cloned().collect()
    }

    pub fn link_kind(&self, name: &str) -> Option<FakeLinkKind> {
        self.lock().links.get(name).map(|l| l.kind)
    }

    /// The bridge `name` was attached to, if any.
    pub fn master_of(&self, name: &str) -> Option<String> {
        self.lock().links.get(name).and_then(|l| l.master.clone())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the state from the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `call`, then returns the guarded state unless a failure was
    /// injected for its kind.
    fn enter(&self, call: NetCall, name: &str) -> Result<MutexGuard<'_, State>, NetError> {
        let kind = call.kind();
        let mut state = self.lock();
        state.calls.push(call);
        if let Some(pos) = state.fail.iter().position(|k| *k == kind) {
            state.fail.remove(pos);
            return Err(NetError::Os {
                op: "complete the operation",
                name: name.to_owned(),
                detail: Some(format!("failure injected into {kind:?} by RecordingNet")),
                source: io::Error::from_raw_os_error(libc::EIO),
            });
        }
        Ok(state)
    }
}

impl HostNet for RecordingNet {
    fn link_exists(&self, name: &str) -> Result<bool, NetError> {
        let state = self.enter(NetCall::LinkExists(name.to_owned()), name)?;
        validate_ifname(name)?;
        Ok(state.links.contains_key(name))
    }

    fn is_bridge(&self, name: &str) -> Result<bool, NetError> {
        let state = self.enter(NetCall::IsBridge(name.to_owned()), name)?;
        validate_ifname(name)?;
        Ok(state.links.get(name).is_some_and(|l| l.kind == FakeLinkKind::Bridge))
    }

    fn create_tap(&self, spec: &TapSpec) -> Result<(), NetError> {
        let mut state = self.enter(NetCall::CreateTap(spec.clone()), &spec.name)?;
        validate_ifname(&spec.name)?;
        create(&mut state, &spec.name, FakeLinkKind::Tap)
    }

    fn create_macvtap(&self, spec: &MacvtapSpec) -> Result<(), NetError> {
        let mut state = self.enter(NetCall::CreateMacvtap(spec.clone()), &spec.name)?;
        macvtap::validate(spec)?;
        if !state.links.contains_key(&spec.link) {
            return Err(NetError::LowerLinkMissing { name: spec.name.clone(), link: spec.link.clone() });
        }
        create(&mut state, &spec.name, FakeLinkKind::Macvtap)
    }

    fn attach_to_bridge(&self, link: &str, bridge: &str) -> Result<(), NetError> {
        let call = NetCall::AttachToBridge { link: link.to_owned(), bridge: bridge.to_owned() };
        let mut state = self.enter(call, link)?;
        validate_ifname(link)?;
        validate_ifname(bridge)?;
        match state.links.get(bridge).map(|l| l.kind) {
            None => {
                return Err(NetError::BridgeMissing { link: link.to_owned(), bridge: bridge.to_owned() });
            }
            Some(FakeLinkKind::Bridge) => {}
            Some(_) => {
                return Err(NetError::NotABridge { link: link.to_owned(), bridge: bridge.to_owned(), kind: None });
            }
        }
        let port = state
            .links
            .get_mut(link)
            .ok_or_else(|| NetError::NoSuchLink { op: "attach to a bridge", name: link.to_owned() })?;
        port.master = Some(bridge.to_owned());
        Ok(())
    }

    fn delete_link(&self, name: &str) -> Result<(), NetError> {
        let mut state = self.enter(NetCall::DeleteLink(name.to_owned()), name)?;
        validate_ifname(name)?;
        if state.links.remove(name).is_some() {
            // Like the kernel: ports of a deleted bridge are released.
            for link in state.links.values_mut() {
                if link.master.as_deref() == Some(name) {
                    link.master = None;
                }
            }
        }
        Ok(())
    }
}

fn create(state: &mut State, name: &str, kind: FakeLinkKind) -> Result<(), NetError> {
    if state.links.contains_key(name) {
        return Err(NetError::AlreadyExists { name: name.to_owned(), kind: None });
    }
    let link = FakeLink { kind, master: None };
    state.links.insert(name.to_owned(), link);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn tap(name: &str) -> TapSpec {
        TapSpec { name: name.into(), multi_queue: false, vnet_hdr: true, owner_uid: 1000, owner_gid: None }
    }

    fn macvtap(name: &str, link: &str) -> MacvtapSpec {
        MacvtapSpec {
            name: name.into(),
            mac: "02:00:00:00:00:01".into(),
            link: link.into(),
            mode: "bridge".into(),
            owner_uid: 1000,
            owner_gid: 100,
        }
    }

    #[test]
    fn records_calls_in_order_and_models_links() {
        let net = RecordingNet::new().with_bridge("br0").with_link("eth0");
        assert!(net.is_bridge("br0").unwrap());
        assert!(!net.is_bridge("eth0").unwrap());
        assert!(!net.link_exists("tap0").unwrap());
        net.create_tap(&tap("tap0")).unwrap();
        assert!(net.link_exists("tap0").unwrap());
        assert_eq!(net.link_kind("tap0"), Some(FakeLinkKind::Tap));
        net.attach_to_bridge("tap0", "br0").unwrap();
        assert_eq!(net.master_of("tap0").as_deref(), Some("br0"));
        net.create_macvtap(&macvtap("mv0", "eth0")).unwrap();
        net.delete_link("tap0").unwrap();
        net.delete_link("tap0").unwrap();
        assert_eq!(net.links(), ["br0", "eth0", "mv0"]);
        let kinds: Vec<_> = net.calls().iter().map(NetCall::kind).collect();
        use NetCallKind::*;
        assert_eq!(
            kinds,
            [
                IsBridge,
                IsBridge,
                LinkExists,
                CreateTap,
                LinkExists,
                AttachToBridge,
                CreateMacvtap,
                DeleteLink,
                DeleteLink
            ]
        );
        assert_eq!(net.calls()[3], NetCall::CreateTap(tap("tap0")));
        assert_eq!(net.take_calls().len(), 9);
        assert!(net.calls().is_empty());
    }

    #[test]
    fn mirrors_linux_errors() {
        let net = RecordingNet::new().with_link("eth0").with_bridge("br0");
        net.create_tap(&tap("tap0")).unwrap();
        assert!(matches!(net.create_tap(&tap("tap0")), Err(NetError::AlreadyExists { .. })));
        assert!(matches!(net.create_tap(&tap("eth0")), Err(NetError::AlreadyExists { .. })));
        assert!(matches!(net.attach_to_bridge("tap0", "nobr"), Err(NetError::BridgeMissing { .. })));
        assert!(matches!(net.attach_to_bridge("tap0", "eth0"), Err(NetError::NotABridge { .. })));
        assert!(matches!(net.attach_to_bridge("tap9", "br0"), Err(NetError::NoSuchLink { .. })));
        assert!(matches!(net.create_macvtap(&macvtap("mv0", "eth9")), Err(NetError::LowerLinkMissing { .. })));
        let mut bad = macvtap("mv0", "eth0");
        bad.mode = "nat".into();
        assert!(matches!(net.create_macvtap(&bad), Err(NetError::InvalidMode { .. })));
        assert!(matches!(net.create_tap(&tap("bad name")), Err(NetError::InvalidName { .. })));
        assert_eq!(net.calls().len(), 9, "failed calls are recorded too");
    }

    #[test]
    fn deleting_a_bridge_releases_its_ports() {
        let net = RecordingNet::new().with_bridge("br0");
        net.create_tap(&tap("tap0")).unwrap();
        net.attach_to_bridge("tap0", "br0").unwrap();
        net.delete_link("br0").unwrap();
        assert_eq!(net.master_of("tap0"), None);
    }

    #[test]
    fn injected_failures_hit_only_the_next_call_of_that_kind() {
        let net = RecordingNet::new().with_bridge("br0");
        net.fail_next(NetCallKind::CreateTap);
        net.fail_next(NetCallKind::CreateTap);
        assert!(net.link_exists("tap0").is_ok());
        let err = net.create_tap(&tap("tap0")).unwrap_err();
        assert!(err.to_string().starts_with("tap0: failed to"), "{err}");
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert!(net.create_tap(&tap("tap0")).is_err());
        assert!(!net.link_exists("tap0").unwrap(), "failed call changed nothing");
        net.create_tap(&tap("tap0")).unwrap();
        net.fail_next(NetCallKind::DeleteLink);
        assert!(net.delete_link("tap0").is_err());
        assert!(net.link_exists("tap0").unwrap());
        assert_eq!(net.calls().len(), 7);
    }

    #[test]
    fn usable_as_shared_trait_object() {
        let fake = Arc::new(RecordingNet::new().with_bridge("br0"));
        let net: Arc<dyn HostNet> = fake.clone();
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let net = net.clone();
                std::thread::spawn(move || net.create_tap(&tap(&format!("tap{i}"))))
            })
            .collect();
        for h in handles {
            h.join().unwrap().unwrap();
        }
        assert_eq!(fake.links().len(), 5);
        assert_eq!(fake.calls().len(), 4);
    }
}
