//! A minimal synchronous rtnetlink client: just the link requests `LinuxNet`
//! needs (get by name, set flags/master, create macvtap, delete by name).
//!
//! Messages are built by hand; the layouts are the stable kernel ABI from
//! `<linux/netlink.h>` and `<linux/rtnetlink.h>`. One socket per operation
//! keeps `LinuxNet` stateless; the socket lives in the netns of the thread
//! that opened it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, send, setsockopt, socket, sockopt,
};

use super::NetError;

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const NLA_HDRLEN: usize = 4;

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
// Flags of an NLMSG_ERROR message.
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;

const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_EXT_MASK: u16 = 29;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_MACVLAN_MODE: u16 = 1;
const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;

/// A failed netlink request: the errno and the kernel's extended-ack text.
#[derive(Debug)]
pub(crate) struct NlError {
    pub source: io::Error,
    pub msg: Option<String>,
}

impl NlError {
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    pub fn into_net(self, op: &'static str, name: &str) -> NetError {
        NetError::Os { op, name: name.to_owned(), detail: self.msg, source: self.source }
    }
}

impl From<io::Error> for NlError {
    fn from(source: io::Error) -> Self {
        NlError { source, msg: None }
    }
}

impl From<nix::Error> for NlError {
    fn from(errno: nix::Error) -> Self {
        io::Error::from(errno).into()
    }
}

pub(crate) type NlResult<T> = Result<T, NlError>;

/// What `get_link` reports about an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinkInfo {
    pub index: u32,
    pub flags: u32,
    /// `IFLA_INFO_KIND` (`bridge`, `tun`, `macvtap`, `dummy`…); `None` for
    /// devices without rtnl link ops (physical NICs, loopback).
    pub kind: Option<String>,
    pub master: Option<u32>,
}

/// An rtnetlink socket.
pub(crate) struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> io::Result<Rtnl> {
        let fd = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute)?;
        // The kernel always answers a request; the timeout only guards
        // against a bug leaving us blocked forever.
        setsockopt(&fd, sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(10, 0))?;
        // Best effort: extended acks give error text; capped acks keep
        // errors small. Both exist since Linux 4.12 / 4.2.
        for opt in [NETLINK_EXT_ACK, NETLINK_CAP_ACK] {
            let one: libc::c_int = 1;
            // SAFETY: `fd` is an open netlink socket; the option value points
            // to a live c_int and the length passed is its size.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    SOL_NETLINK,
                    opt,
                    (&raw const one).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        Ok(Rtnl { fd, seq: 0 })
    }

    /// Looks an interface up by name; `Ok(None)` if there is none.
    pub fn get_link(&mut self, name: &str) -> NlResult<Option<LinkInfo>> {
        let mut msg = Msg::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK);
        msg.ifinfo(0, 0, 0);
        msg.attr_str(IFLA_IFNAME, name);
        msg.attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS);
        match self.transact(msg) {
            Ok(replies) => {
                let reply = replies
                    .iter()
                    .find(|(ty, _)| *ty == RTM_NEWLINK)
                    .ok_or_else(|| io::Error::from_raw_os_error(libc::EPROTO))?;
                Ok(Some(parse_link(&reply.1)?))
            }
            Err(err) if err.errno() == Some(libc::ENODEV) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Changes the `change` bits of the link's flags to those in `flags`.
    pub fn set_flags(&mut self, index: u32, flags: u32, change: u32) -> NlResult<()> {
        let mut msg = Msg::new(RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK);
        msg.ifinfo(index as i32, flags, change);
        self.transact(msg).map(drop)
    }

    /// Enslaves the link to `master` (a bridge).
    pub fn set_master(&mut self, index: u32, master: u32) -> NlResult<()> {
        let mut msg = Msg::new(RTM_SETLINK, NLM_F_REQUEST | NLM_F_ACK);
        msg.ifinfo(index as i32, 0, 0);
        msg.attr_u32(IFLA_MASTER, master);
        self.transact(msg).map(drop)
    }

    /// Creates a macvtap (down) on `lower`; `flags` are set at creation.
    pub fn new_macvtap(&mut self, name: &str, lower: u32, mac: [u8; 6], mode: u32, flags: u32) -> NlResult<()> {
        let mut msg = Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        msg.ifinfo(0, flags, flags);
        msg.attr_str(IFLA_IFNAME, name);
        msg.attr_u32(IFLA_LINK, lower);
        msg.attr(IFLA_ADDRESS, &mac);
        let info = msg.begin_nest(IFLA_LINKINFO);
        msg.attr_str(IFLA_INFO_KIND, "macvtap");
        let data = msg.begin_nest(IFLA_INFO_DATA);
        msg.attr_u32(IFLA_MACVLAN_MODE, mode);
        msg.end_nest(data);
        msg.end_nest(info);
        self.transact(msg).map(drop)
    }

    /// Deletes a link by name; `Ok(false)` if it did not exist.
    pub fn del_link(&mut self, name: &str) -> NlResult<bool> {
        let mut msg = Msg::new(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK);
        msg.ifinfo(0, 0, 0);
        msg.attr_str(IFLA_IFNAME, name);
        match self.transact(msg) {
            Ok(_) => Ok(true),
            Err(err) if err.errno() == Some(libc::ENODEV) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Sends one request and collects the replies up to its ack.
    fn transact(&mut self, msg: Msg) -> NlResult<Vec<(u16, Vec<u8>)>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = msg.finish(seq);
        let sent = send(self.fd.as_raw_fd(), &bytes, MsgFlags::empty())?;
        if sent != bytes.len() {
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE).into());
        }
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            // Peek for the datagram's full size so nothing is truncated.
            let size = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC)?;
            if size > buf.len() {
                buf.resize(size, 0);
            }
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            let mut off = 0;
            while off + NLMSG_HDRLEN <= n {
                let len = read_u32(&buf, off) as usize;
                if len < NLMSG_HDRLEN || off + len > n {
                    return Err(io::Error::from_raw_os_error(libc::EPROTO).into());
                }
                let ty = read_u16(&buf, off + 4);
                let flags = read_u16(&buf, off + 6);
                let mseq = read_u32(&buf, off + 8);
                let payload = &buf[off + NLMSG_HDRLEN..off + len];
                off += align4(len);
                if mseq != seq {
                    continue; // stray message from an earlier request
                }
                match ty {
                    NLMSG_ERROR => return parse_ack(payload, flags).map(|()| replies),
                    NLMSG_DONE => return Ok(replies),
                    _ => replies.push((ty, payload.to_vec())),
                }
            }
        }
    }
}

/// Parses an NLMSG_ERROR payload: `Ok` for an ack, else the errno and the
/// extended-ack message.
fn parse_ack(payload: &[u8], flags: u16) -> NlResult<()> {
    if payload.len() < 4 {
        return Err(io::Error::from_raw_os_error(libc::EPROTO).into());
    }
    let error = read_u32(payload, 0) as i32;
    if error == 0 {
        return Ok(());
    }
    let mut msg = None;
    if flags & NLM_F_ACK_TLVS != 0 && payload.len() >= 4 + NLMSG_HDRLEN {
        let orig_len = if flags & NLM_F_CAPPED != 0 { NLMSG_HDRLEN } else { read_u32(payload, 4) as usize };
        if let Some(tlvs) = payload.get(4 + align4(orig_len)..) {
            msg = attrs(tlvs).find(|(ty, _)| *ty == NLMSGERR_ATTR_MSG).map(|(_, data)| c_string(data));
        }
    }
    Err(NlError { source: io::Error::from_raw_os_error(-error), msg })
}

fn parse_link(payload: &[u8]) -> io::Result<LinkInfo> {
    if payload.len() < IFINFOMSG_LEN {
        return Err(io::Error::from_raw_os_error(libc::EPROTO));
    }
    let mut info = LinkInfo { index: read_u32(payload, 4), flags: read_u32(payload, 8), kind: None, master: None };
    for (ty, data) in attrs(&payload[IFINFOMSG_LEN..]) {
        match ty {
            IFLA_MASTER if data.len() >= 4 => info.master = Some(read_u32(data, 0)),
            IFLA_LINKINFO => {
                info.kind = attrs(data).find(|(ty, _)| *ty == IFLA_INFO_KIND).map(|(_, kind)| c_string(kind));
            }
            _ => {}
        }
    }
    Ok(info)
}

/// Iterates over the attributes in `buf`: (type without flag bits, data).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < NLA_HDRLEN {
            return None;
        }
        let len = read_u16(buf, 0) as usize;
        let ty = read_u16(buf, 2) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > buf.len() {
            return None;
        }
        let data = &buf[NLA_HDRLEN..len];
        buf = buf.get(align4(len)..).unwrap_or(&[]);
        Some((ty, data))
    })
}

fn c_string(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

fn read_u16(buf: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([buf[off], buf[off + 1]])
}

fn read_u32(buf: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]])
}

/// A request being built: nlmsghdr, ifinfomsg, attributes.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(ty: u16, flags: u16) -> Msg {
        let mut buf = vec![0u8; NLMSG_HDRLEN];
        buf[4..6].copy_from_slice(&ty.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        Msg { buf }
    }

    /// Appends a `struct ifinfomsg` (family AF_UNSPEC).
    fn ifinfo(&mut self, index: i32, flags: u32, change: u32) {
        self.buf.extend_from_slice(&[0, 0, 0, 0]); // family, pad, type
        self.buf.extend_from_slice(&index.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&change.to_ne_bytes());
    }

    fn attr(&mut self, ty: u16, data: &[u8]) {
        let len = (NLA_HDRLEN + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn attr_u32(&mut self, ty: u16, value: u32) {
        self.attr(ty, &value.to_ne_bytes());
    }

    /// A NUL-terminated string attribute.
    fn attr_str(&mut self, ty: u16, value: &str) {
        let mut data = Vec::with_capacity(value.len() + 1);
        data.extend_from_slice(value.as_bytes());
        data.push(0);
        self.attr(ty, &data);
    }

    fn begin_nest(&mut self, ty: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        start
    }

    fn end_nest(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        self.buf.resize(align4(self.buf.len()), 0);
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_nested_attributes_with_padding() {
        let mut msg = Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK);
        msg.ifinfo(7, 1, 1);
        msg.attr_str(IFLA_IFNAME, "mv0"); // 4 + 4 = 8, no padding
        let nest = msg.begin_nest(IFLA_LINKINFO);
        msg.attr_str(IFLA_INFO_KIND, "macvtap"); // 4 + 8 = 12
        msg.end_nest(nest);
        let bytes = msg.finish(42);
        assert_eq!(bytes.len(), 16 + 16 + 8 + 4 + 12);
        assert_eq!(read_u32(&bytes, 0) as usize, bytes.len());
        assert_eq!(read_u16(&bytes, 4), RTM_NEWLINK);
        assert_eq!(read_u32(&bytes, 8), 42);
        assert_eq!(read_u32(&bytes, 20), 7);
        let top: Vec<_> = attrs(&bytes[32..]).collect();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0], (IFLA_IFNAME, &b"mv0\0"[..]));
        assert_eq!(top[1].0, IFLA_LINKINFO);
        let inner: Vec<_> = attrs(top[1].1).collect();
        assert_eq!(inner, vec![(IFLA_INFO_KIND, &b"macvtap\0"[..])]);
    }

    #[test]
    fn parses_error_ack_with_extended_message() {
        let mut payload = Vec::new();
        payload.extend_from_slice(&(-libc::EINVAL).to_ne_bytes());
        payload.extend_from_slice(&[0u8; NLMSG_HDRLEN]); // capped original header
        let text = b"unknown mode\0";
        payload.extend_from_slice(&((NLA_HDRLEN + text.len()) as u16).to_ne_bytes());
        payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend_from_slice(text);
        let err = parse_ack(&payload, NLM_F_CAPPED | NLM_F_ACK_TLVS).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EINVAL));
        assert_eq!(err.msg.as_deref(), Some("unknown mode"));
        assert!(parse_ack(&0i32.to_ne_bytes(), 0).is_ok());
    }

    #[test]
    fn truncated_attributes_end_iteration() {
        assert_eq!(attrs(&[8, 0, 1, 0, 1]).count(), 0);
        assert_eq!(attrs(&[2, 0, 1, 0]).count(), 0);
    }
}
