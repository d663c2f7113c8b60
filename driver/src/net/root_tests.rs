//! Tests that really create devices. Each runs in a thread that unshares a
//! fresh network namespace (and a mount namespace with its own sysfs, so
//! `/sys/class/net` shows that netns); everything in it disappears when the
//! thread exits. Nothing here touches the host namespace.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};

use super::*;

const UID: u32 = 4242;
const GID: u32 = 4343;

fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        true
    } else {
        // Straight to the stderr handle: libtest's capture only swallows
        // print!/eprint!, so the notice shows even though the test passes.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipping: needs root ({})",
            std::thread::current().name().unwrap_or("root test")
        );
        false
    }
}

/// Runs `f` in a thread living in a new, private netns + mount ns.
fn in_netns(f: impl FnOnce() + Send + 'static) {
    let host_ns = fs::read_link("/proc/self/ns/net").expect("read host netns");
    let result = std::thread::spawn(move || {
        unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS).expect("unshare netns+mntns");
        // Stop our mounts from propagating to the host before mounting.
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
            .expect("make / private");
        mount(Some("sysfs"), "/sys", Some("sysfs"), MsFlags::empty(), None::<&str>)
            .expect("mount sysfs for the new netns");
        let ns = fs::read_link("/proc/thread-self/ns/net").expect("read thread netns");
        assert_ne!(ns, host_ns, "not in a new netns");
        assert_eq!(sys_links(), ["lo"], "fresh netns should only have lo");
        f();
    })
    .join();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn sys_links() -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir("/sys/class/net")
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

/// Adds a plain link to hang things off: a dummy, or a veth pair
/// (`<name>` + `<name>p`) on kernels built without CONFIG_DUMMY. Returns the
/// kind the kernel reports for it.
fn add_plain_link(name: &str) -> &'static str {
    let dummy = Command::new("ip")
        .args(["link", "add", name, "type", "dummy"])
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run ip");
    if dummy.success() {
        return "dummy";
    }
    let peer = format!("{name}p");
    ip(&["link", "add", name, "type", "veth", "peer", "name", &peer]);
    "veth"
}

fn sys(name: &str, attr: &str) -> String {
    let path = format!("/sys/class/net/{name}/{attr}");
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}")).trim().to_owned()
}

fn sys_hex(name: &str, attr: &str) -> u32 {
    let text = sys(name, attr);
    u32::from_str_radix(text.trim_start_matches("0x"), 16).unwrap()
}

fn tap(name: &str, multi_queue: bool, gid: Option<u32>) -> TapSpec {
    TapSpec { name: name.into(), multi_queue, vnet_hdr: true, owner_uid: UID, owner_gid: gid }
}

/// Reopens an existing tap by name the way a VMM does (no IFF_TUN_EXCL).
fn reopen(name: &str, flags: libc::c_int) -> std::io::Result<fs::File> {
    use std::os::fd::AsRawFd;
    let file = fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    // SAFETY: an all-zero ifreq is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: valid tun fd and a live ifreq.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &raw mut ifr) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// [`reopen`], waiting out EBUSY: a single-queue tap takes one fd at a time,
/// and a process another test forks in this moment holds a copy of ours
/// (close-on-exec closes it only at its exec).
fn reopen_settled(name: &str, flags: libc::c_int) -> std::io::Result<fs::File> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match reopen(name, flags) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

#[test]
fn tap_single_queue_with_vnet_hdr() {
    if !require_root() {
        return;
    }
    in_netns(|| {
        let net = LinuxNet::new();
        assert!(!net.link_exists("vmtap0").unwrap());
        net.create_tap(&tap("vmtap0", false, Some(GID))).unwrap();
        assert!(net.link_exists("vmtap0").unwrap());
        assert!(!net.is_bridge("vmtap0").unwrap());

        let tun_flags = sys_hex("vmtap0", "tun_flags");
        assert_ne!(tun_flags & libc::IFF_TAP as u32, 0, "{tun_flags:#x}");
        assert_ne!(tun_flags & libc::IFF_NO_PI as u32, 0, "{tun_flags:#x}");
        assert_ne!(tun_flags & libc::IFF_VNET_HDR as u32, 0, "{tun_flags:#x}");
        assert_eq!(tun_flags & libc::IFF_MULTI_QUEUE as u32, 0, "{tun_flags:#x}");
        assert_eq!(sys("vmtap0", "owner"), UID.to_string());
        assert_eq!(sys("vmtap0", "group"), GID.to_string());
        assert_ne!(sys_hex("vmtap0", "flags") & libc::IFF_UP as u32, 0);

        // What the VMM does: reopen by name with the same queue mode.
        let vnet = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        drop(reopen_settled("vmtap0", vnet).expect("reopen single-queue tap"));
        let err = reopen_settled("vmtap0", vnet | libc::IFF_MULTI_QUEUE).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));

        let err = net.create_tap(&tap("vmtap0", false, None)).unwrap_err();
        assert!(matches!(&err, NetError::AlreadyExists { kind: Some(k), .. } if k == "tun"), "{err:?}");
        net.delete_link("vmtap0").unwrap();
    });
}

#[test]
fn tap_multi_queue() {
    if !require_root() {
        return;
    }
    in_netns(|| {
        let net = LinuxNet::new();
        net.create_tap(&tap("vmtapmq", true, None)).unwrap();
        let tun_flags = sys_hex("vmtapmq", "tun_flags");
        assert_ne!(tun_flags & 0x100, 0, "IFF_MULTI_QUEUE missing: {tun_flags:#x}");
        assert_ne!(tun_flags & libc::IFF_VNET_HDR as u32, 0, "{tun_flags:#x}");
        assert_eq!(sys("vmtapmq", "owner"), UID.to_string());
        assert_eq!(sys("vmtapmq", "group"), "-1");
        let mq = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE;
        let q1 = reopen("vmtapmq", mq).expect("first queue");
        let q2 = reopen("vmtapmq", mq).expect("second queue");
        drop((q1, q2));
        net.delete_link("vmtapmq").unwrap();
        assert!(!net.link_exists("vmtapmq").unwrap());
    });
}

#[test]
fn bridge_attach_and_errors() {
    if !require_root() {
        return;
    }
    in_netns(|| {
        let net = LinuxNet::new();
        ip(&["link", "add", "br0", "type", "bridge"]);
        let plain = add_plain_link("d0");
        assert!(net.is_bridge("br0").unwrap());
        assert!(!net.is_bridge("d0").unwrap());
        assert!(!net.is_bridge("nothere").unwrap());

        net.create_tap(&tap("vmtapbr", false, None)).unwrap();
        net.attach_to_bridge("vmtapbr", "br0").unwrap();
        let master = fs::read_link("/sys/class/net/vmtapbr/master").unwrap();
        assert_eq!(master.file_name().unwrap(), "br0");
        net.attach_to_bridge("vmtapbr", "br0").unwrap(); // idempotent

        let err = net.attach_to_bridge("vmtapbr", "d0").unwrap_err();
        assert!(matches!(&err, NetError::NotABridge { kind: Some(k), .. } if k == plain), "{err:?}");
        assert_eq!(err.to_string(), format!("cannot attach vmtapbr to bridge d0: d0 is not a bridge (kind {plain})"));
        let err = net.attach_to_bridge("vmtapbr", "br9").unwrap_err();
        assert!(matches!(err, NetError::BridgeMissing { .. }), "{err:?}");
        let err = net.attach_to_bridge("nothere", "br0").unwrap_err();
        assert!(matches!(err, NetError::NoSuchLink { .. }), "{err:?}");
        // The kernel's own refusal comes back with its extended-ack text.
        ip(&["link", "add", "br1", "type", "bridge"]);
        let err = net.attach_to_bridge("br1", "br0").unwrap_err();
        eprintln!("bridge into bridge: {err}");
        assert!(matches!(&err, NetError::Attach { detail: Some(d), .. } if d.contains("bridge")), "{err:?}");
        assert!(err.to_string().starts_with("cannot attach br1 to bridge br0"), "{err}");
        net.delete_link("br1").unwrap();
        // Still attached to br0 after the failed attempts.
        let master = fs::read_link("/sys/class/net/vmtapbr/master").unwrap();
        assert_eq!(master.file_name().unwrap(), "br0");

        net.delete_link("vmtapbr").unwrap();
        assert!(!Path::new("/sys/class/net/vmtapbr").exists());
        assert!(!net.link_exists("vmtapbr").unwrap());
        net.delete_link("vmtapbr").unwrap(); // missing is fine
        net.delete_link("br0").unwrap();
        net.delete_link("d0").unwrap();
        assert_eq!(sys_links(), ["lo"]);
    });
}

#[test]
fn tap_name_taken_by_non_tap() {
    if !require_root() {
        return;
    }
    in_netns(|| {
        let net = LinuxNet::new();
        let plain = add_plain_link("d1");
        let err = net.create_tap(&tap("d1", false, None)).unwrap_err();
        assert!(matches!(&err, NetError::AlreadyExists { kind: Some(k), .. } if k == plain), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("cannot create d1: an interface with that name already exists (kind {plain})")
        );
        assert!(net.link_exists("d1").unwrap(), "the dummy must survive");
        let err = net.create_tap(&tap("lo", false, None)).unwrap_err();
        assert!(matches!(err, NetError::AlreadyExists { kind: None, .. }), "{err:?}");
    });
}

#[test]
fn macvtap_on_dummy() {
    if !require_root() {
        return;
    }
    in_netns(|| {
        let net = LinuxNet::new();
        add_plain_link("d0");
        ip(&["link", "set", "d0", "up"]);
        let spec = MacvtapSpec {
            name: "vmmv0".into(),
            mac: "02:11:22:33:44:55".into(),
            link: "d0".into(),
            mode: "bridge".into(),
            owner_uid: UID,
            owner_gid: GID,
        };
        net.create_macvtap(&spec).unwrap();
        assert_eq!(sys("vmmv0", "address"), "02:11:22:33:44:55");
        let flags = sys_hex("vmmv0", "flags");
        assert_ne!(flags & libc::IFF_UP as u32, 0, "{flags:#x}");
        assert_ne!(flags & libc::IFF_ALLMULTI as u32, 0, "{flags:#x}");
        let ifindex = sys("vmmv0", "ifindex");
        let node = format!("/dev/tap{ifindex}");
        let meta = fs::metadata(&node).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (UID, GID), "{node}");
        // The node really is this macvtap's (what create_macvtap verifies).
        let rdev = meta.rdev();
        let sysdev = format!("/sys/dev/char/{}:{}", libc::major(rdev), libc::minor(rdev));
        let target = fs::read_link(&sysdev).unwrap();
        let expected = format!("/net/vmmv0/macvtap/tap{ifindex}");
        assert!(target.to_string_lossy().ends_with(&expected), "{target:?}");
        if Path::new("/proc/sys/net/ipv6").exists() {
            let v = fs::read_to_string("/proc/sys/net/ipv6/conf/vmmv0/disable_ipv6").unwrap();
            assert_eq!(v.trim(), "1");
        }
        let details = Command::new("ip").args(["-d", "link", "show", "vmmv0"]).output().unwrap();
        let details = String::from_utf8_lossy(&details.stdout);
        assert!(details.contains("macvtap mode bridge"), "{details}");

        let err = net.create_macvtap(&spec).unwrap_err();
        assert!(matches!(&err, NetError::AlreadyExists { kind: Some(k), .. } if k == "macvtap"), "{err:?}");
        let missing = MacvtapSpec { name: "vmmv1".into(), link: "d9".into(), ..spec.clone() };
        let err = net.create_macvtap(&missing).unwrap_err();
        assert!(matches!(err, NetError::LowerLinkMissing { .. }), "{err:?}");
        let multicast = MacvtapSpec { name: "vmmv1".into(), mac: "01:00:5e:00:00:01".into(), ..spec.clone() };
        assert!(matches!(net.create_macvtap(&multicast), Err(NetError::InvalidMac { .. })));
        assert!(!net.link_exists("vmmv1").unwrap());

        net.delete_link("vmmv0").unwrap();
        assert!(!net.link_exists("vmmv0").unwrap());
        assert!(!Path::new(&node).exists(), "{node} left behind");
        net.delete_link("d0").unwrap();
    });
}

#[test]
fn kernel_rejects_what_validation_misses() {
    if !require_root() {
        return;
    }
    in_netns(|| {
        let net = LinuxNet::new();
        add_plain_link("d0");
        // passthru on a lower device that already has a macvlan is refused by
        // the kernel; the error names the interface and keeps the errno.
        let spec = |name: &str, mode: &str, mac: &str| MacvtapSpec {
            name: name.into(),
            mac: mac.into(),
            link: "d0".into(),
            mode: mode.into(),
            owner_uid: UID,
            owner_gid: GID,
        };
        net.create_macvtap(&spec("vmmva", "bridge", "02:00:00:00:00:0a")).unwrap();
        let err = net.create_macvtap(&spec("vmmvb", "passthru", "02:00:00:00:00:0b")).unwrap_err();
        eprintln!("passthru on a busy lower link: {err}");
        assert!(matches!(err, NetError::Os { .. }), "{err:?}");
        assert!(err.to_string().starts_with("vmmvb: failed to create macvtap"), "{err}");
        assert!(err.raw_os_error().is_some());
        assert!(!net.link_exists("vmmvb").unwrap());
        net.delete_link("vmmva").unwrap();
        net.delete_link("d0").unwrap();
    });
}

#[test]
fn nothing_leaks_into_the_host_namespace() {
    if !require_root() {
        return;
    }
    in_netns(|| {
        let net = LinuxNet::new();
        net.create_tap(&tap("vmleak0", false, None)).unwrap();
        // Left behind on purpose: the netns teardown removes it.
    });
    let net = LinuxNet::new();
    assert!(!net.link_exists("vmleak0").unwrap());
    assert!(!Path::new("/sys/class/net/vmleak0").exists());
}
