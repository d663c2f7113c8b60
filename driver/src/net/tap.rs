//! Persistent tap devices via ioctls on `/dev/net/tun`.
//!
//! The kernel refuses tun/tap creation over rtnetlink, so: open the clone
//! device, `TUNSETIFF` (`IFF_TAP | IFF_NO_PI [| IFF_VNET_HDR] [| IFF_MULTI_QUEUE]
//! | IFF_TUN_EXCL`), `TUNSETOWNER`, optionally `TUNSETGROUP`, `TUNSETPERSIST 1`,
//! close. If any step before `TUNSETPERSIST` fails, closing the fd destroys the
//! half-made device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;

use super::{NetError, TapSpec};

const TUN_PATH: &str = "/dev/net/tun";

/// The `TUNSETIFF` flags for `spec` (without `IFF_TUN_EXCL`).
pub(crate) fn tap_flags(spec: &TapSpec) -> libc::c_int {
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if spec.vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    if spec.multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    flags
}

/// Creates the persistent tap described by `spec` (left down).
///
/// `EBUSY` from `TUNSETIFF` (because of `IFF_TUN_EXCL`) means the name is
/// taken; it is returned as [`NetError::AlreadyExists`] with `kind: None`,
/// for the caller to fill in.
pub(crate) fn create_persistent_tap(spec: &TapSpec) -> Result<(), NetError> {
    let name = spec.name.as_str();
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_PATH)
        .map_err(|e| NetError::os("open /dev/net/tun", name, e))?;

    let flags = tap_flags(spec) | libc::IFF_TUN_EXCL;
    // SAFETY: an all-zero ifreq is a valid value (zeroed name and union).
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // validate_ifname guarantees <= 15 bytes, so the name stays NUL-terminated.
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // IFF_TUN_EXCL is 0x8000: reinterpret the u16 bit pattern as the short.
    ifr.ifr_ifru.ifru_flags = flags as u16 as libc::c_short;

    // SAFETY: `tun` is an open /dev/net/tun fd and `ifr` is a live, properly
    // sized ifreq that TUNSETIFF reads (and writes the final name back to).
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &raw mut ifr) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EBUSY) {
            return Err(NetError::AlreadyExists { name: name.to_owned(), kind: None });
        }
        return Err(NetError::os("create tap (TUNSETIFF)", name, err));
    }

    int_ioctl(&tun, libc::TUNSETOWNER, spec.owner_uid)
        .map_err(|e| NetError::os("set tap owner (TUNSETOWNER)", name, e))?;
    if let Some(gid) = spec.owner_gid {
        int_ioctl(&tun, libc::TUNSETGROUP, gid).map_err(|e| NetError::os("set tap group (TUNSETGROUP)", name, e))?;
    }
    int_ioctl(&tun, libc::TUNSETPERSIST, 1)
        .map_err(|e| NetError::os("make tap persistent (TUNSETPERSIST)", name, e))?;
    drop(tun);
    Ok(())
}

/// An ioctl whose argument is an integer passed by value.
fn int_ioctl(file: &File, request: libc::Ioctl, value: u32) -> io::Result<()> {
    // SAFETY: `file` is an open /dev/net/tun fd; the TUNSET{OWNER,GROUP,PERSIST}
    // ioctls take their argument by value, no memory is passed.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, libc::c_ulong::from(value)) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(multi_queue: bool, vnet_hdr: bool) -> TapSpec {
        TapSpec { name: "t".into(), multi_queue, vnet_hdr, owner_uid: 0, owner_gid: None }
    }

    #[test]
    fn flags_follow_spec() {
        assert_eq!(tap_flags(&spec(false, false)), 0x0002 | 0x1000);
        assert_eq!(tap_flags(&spec(false, true)), 0x0002 | 0x1000 | 0x4000);
        assert_eq!(tap_flags(&spec(true, true)), 0x0002 | 0x1000 | 0x4000 | 0x0100);
    }
}
