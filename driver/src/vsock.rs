//! The way into a guest for `nomad alloc exec` commands: ssh over vsock, as
//! microvm.nix's `microvm -s` does.
//!
//! - qemu, crosvm, kvmtool and alioth give the guest a kernel vsock CID
//!   (`share/microvm/vsock-cid`) that the host reaches with `AF_VSOCK`.
//! - cloud-hypervisor and firecracker multiplex vsock over a unix socket in
//!   the VM's working dir (`notify.vsock`): a host-side connection starts
//!   with `CONNECT <port>\n`, the VMM answers `OK <host port>\n`, and the
//!   rest of the stream is the guest's.
//!
//! `nomad-driver-microvm vsock-proxy` is the `ProxyCommand` ssh runs: it
//! connects and then copies its stdin and stdout to and from the guest.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::runner::{Hypervisor, Runner};

/// The port sshd listens on in the guest (`microvm.vsock.ssh.enable`).
pub const SSH_PORT: u32 = 22;

/// cloud-hypervisor's and firecracker's vsock socket, in the working dir.
pub const MUX_SOCKET: &str = "notify.vsock";

/// Where a guest's vsock is reached from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestAddress {
    Kernel { cid: u32 },
    Mux { socket: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("this host has no vsock support (load the vhost_vsock kernel module)")]
    NoVsock(#[source] nix::Error),
    #[error("cannot connect to port {port} of vsock CID {cid}")]
    Connect {
        cid: u32,
        port: u32,
        #[source]
        source: nix::Error,
    },
    #[error("cannot connect to the VM's vsock socket {}", socket.display())]
    MuxConnect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the VM's vsock socket {} answered {answer:?} to CONNECT {port}: nothing listens on that port in the guest", socket.display())]
    MuxRefused { socket: PathBuf, port: u32, answer: String },
    #[error("cannot relay between ssh and the guest")]
    Relay(#[source] io::Error),
    #[error("usage: vsock-proxy (--cid CID | --mux SOCKET) PORT")]
    Usage,
}

impl GuestAddress {
    /// The guest's vsock address, when its runner has one and its
    /// hypervisor gives vsock to the guest.
    pub fn of(runner: &Runner, work_dir: &Path) -> Option<GuestAddress> {
        GuestAddress::for_hypervisor(runner.hypervisor, runner.vsock_cid, work_dir)
    }

    fn for_hypervisor(hypervisor: Hypervisor, vsock_cid: Option<u32>, work_dir: &Path) -> Option<GuestAddress> {
        let cid = vsock_cid?;
        match hypervisor {
            Hypervisor::CloudHypervisor | Hypervisor::Firecracker => {
                Some(GuestAddress::Mux { socket: work_dir.join(MUX_SOCKET) })
            }
            hv if hv.kernel_vsock() => Some(GuestAddress::Kernel { cid }),
            _ => None,
        }
    }

    /// For messages: "vsock CID 5", "vsock socket /…/notify.vsock".
    pub fn describe(&self) -> String {
        match self {
            GuestAddress::Kernel { cid } => format!("vsock CID {cid}"),
            GuestAddress::Mux { socket } => format!("vsock socket {}", socket.display()),
        }
    }

    /// The arguments of `nomad-driver-microvm` that proxy to `port`.
    pub fn proxy_args(&self, port: u32) -> Vec<String> {
        let mut args = vec!["vsock-proxy".to_string()];
        match self {
            GuestAddress::Kernel { cid } => args.extend(["--cid".into(), cid.to_string()]),
            GuestAddress::Mux { socket } => args.extend(["--mux".into(), socket.display().to_string()]),
        }
        args.push(port.to_string());
        args
    }

    /// Parses what [`GuestAddress::proxy_args`] wrote (after `vsock-proxy`).
    pub fn from_proxy_args(args: &[&str]) -> Result<(GuestAddress, u32), VsockError> {
        let [flag, value, port] = args else { return Err(VsockError::Usage) };
        let port = port.parse().map_err(|_| VsockError::Usage)?;
        let address = match *flag {
            "--cid" => GuestAddress::Kernel { cid: value.parse().map_err(|_| VsockError::Usage)? },
            "--mux" => GuestAddress::Mux { socket: PathBuf::from(value) },
            _ => return Err(VsockError::Usage),
        };
        Ok((address, port))
    }

    /// A stream to `port` in the guest.
    pub fn connect(&self, port: u32) -> Result<std::fs::File, VsockError> {
        match self {
            GuestAddress::Kernel { cid } => connect_kernel(*cid, port).map(std::fs::File::from),
            GuestAddress::Mux { socket } => connect_mux(socket, port).map(|s| std::fs::File::from(OwnedFd::from(s))),
        }
    }
}

fn connect_kernel(cid: u32, port: u32) -> Result<OwnedFd, VsockError> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, VsockAddr, connect, socket};
    let fd =
        socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(VsockError::NoVsock)?;
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &VsockAddr::new(cid, port))
        .map_err(|source| VsockError::Connect { cid, port, source })?;
    Ok(fd)
}

fn connect_mux(socket: &Path, port: u32) -> Result<UnixStream, VsockError> {
    let io_error = |source| VsockError::MuxConnect { socket: socket.to_path_buf(), source };
    let mut stream = UnixStream::connect(socket).map_err(io_error)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(io_error)?;
    // One byte at a time: whatever follows the answer line is the guest's.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while answer.len() < 64 {
        match stream.read(&mut byte).map_err(io_error)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => answer.push(byte[0]),
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    if answer.starts_with("OK ") {
        Ok(stream)
    } else {
        Err(VsockError::MuxRefused { socket: socket.to_path_buf(), port, answer })
    }
}

/// `vsock-proxy`: connects, then copies stdin to the guest and the guest to
/// stdout. It returns when the guest's side ends: ssh keeps the proxy's stdin
/// open until the proxy exits, so waiting for stdin too would never end.
pub fn proxy(address: &GuestAddress, port: u32) -> Result<(), VsockError> {
    use std::os::fd::AsFd;
    let mut from_guest = address.connect(port)?;
    // Unbuffered copies of fds 0 and 1: Rust's stdout buffers up to each
    // newline, which would hold back ssh's binary packets.
    let raw = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().map(std::fs::File::from);
    let mut stdin = raw(io::stdin().as_fd()).map_err(VsockError::Relay)?;
    let mut stdout = raw(io::stdout().as_fd()).map_err(VsockError::Relay)?;
    let mut to_guest = from_guest.try_clone().map_err(VsockError::Relay)?;
    let typing = std::thread::spawn(move || {
        pump(&mut stdin, &mut to_guest);
        // The guest sees EOF once ssh is done sending.
        let _ =
            nix::sys::socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(&to_guest), nix::sys::socket::Shutdown::Write);
    });
    pump(&mut from_guest, &mut stdout);
    drop(typing);
    Ok(())
}

/// How the driver logs into a guest: `ssh root@<guest> -- <command>` with
/// `nomad-driver-microvm vsock-proxy` as its ProxyCommand.
#[derive(Debug, Clone)]
pub struct SshLogin {
    /// The driver binary, which serves `vsock-proxy`.
    pub proxy_exe: PathBuf,
    /// The private key to log in with (plugin key `exec_ssh_key_file`); none:
    /// whatever ssh finds for the user the agent runs as.
    pub key: Option<PathBuf>,
}

impl SshLogin {
    /// The guest's host key is not known ahead (it is made at its first
    /// boot); the vsock address itself is what identifies the guest.
    /// `tty`: force a guest-side pty even though stdin is a pipe.
    pub fn command(&self, address: &GuestAddress, command: &[String], tty: bool) -> std::process::Command {
        let proxy = std::iter::once(self.proxy_exe.display().to_string())
            .chain(address.proxy_args(SSH_PORT))
            .map(|a| shell_quote(&a))
            .collect::<Vec<_>>()
            .join(" ");
        let mut ssh = std::process::Command::new("ssh");
        ssh.arg("-o")
            .arg(format!("ProxyCommand={proxy}"))
            .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"])
            .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]);
        if let Some(key) = &self.key {
            // Only this key: an agent's or the user's other keys are not tried.
            ssh.args(["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-i"]).arg(key);
        }
        if tty {
            ssh.arg("-tt");
        }
        ssh.args(["root@microvm", "--"]).args(command);
        ssh
    }
}

/// `'text'` for sh, which runs ssh's ProxyCommand.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// Copies until EOF or an error, a read at a time. Not `io::copy`: between
/// two Files it splices, and a splice between a socket and ssh's pipes
/// was seen to stall the session here.
fn pump(from: &mut impl Read, to: &mut impl Write) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    #[test]
    fn ssh_goes_through_the_proxy_quoted_for_sh() {
        assert_eq!(shell_quote("/a b/it's"), "'/a b/it'\\''s'");
        let address = GuestAddress::Mux { socket: "/var/lib/x y/notify.vsock".into() };
        let args = |login: &SshLogin, tty: bool| -> Vec<String> {
            let ssh = login.command(&address, &["uname".into(), "-a".into()], tty);
            ssh.get_args().map(|a| a.to_string_lossy().into_owned()).collect()
        };
        let mut login = SshLogin { proxy_exe: "/opt/nomad plugins/nomad-driver-microvm".into(), key: None };
        let plain = args(&login, true);
        assert_eq!(
            plain[1],
            "ProxyCommand='/opt/nomad plugins/nomad-driver-microvm' 'vsock-proxy' '--mux' '/var/lib/x y/notify.vsock' '22'"
        );
        assert!(plain.contains(&"-tt".to_string()));
        assert!(!plain.iter().any(|a| a == "-i" || a.starts_with("IdentitiesOnly")), "{plain:?}");
        assert_eq!(&plain[plain.len() - 3..], ["--", "uname", "-a"]);

        login.key = Some("/etc/nomad-microvm/exec_key".into());
        let keyed = args(&login, false);
        let i = keyed.iter().position(|a| a == "-i").expect("-i");
        assert_eq!(keyed[i + 1], "/etc/nomad-microvm/exec_key");
        assert!(keyed.contains(&"IdentitiesOnly=yes".to_string()), "{keyed:?}");
        assert!(!keyed.contains(&"-tt".to_string()));
    }

    #[test]
    fn address_follows_the_hypervisor() {
        let work = Path::new("/var/lib/nomad-microvm/vms/w");
        for hv in [Hypervisor::Qemu, Hypervisor::Crosvm, Hypervisor::Kvmtool, Hypervisor::Alioth] {
            assert_eq!(GuestAddress::for_hypervisor(hv, Some(7), work), Some(GuestAddress::Kernel { cid: 7 }), "{hv}");
        }
        for hv in [Hypervisor::CloudHypervisor, Hypervisor::Firecracker] {
            assert_eq!(
                GuestAddress::for_hypervisor(hv, Some(7), work),
                Some(GuestAddress::Mux { socket: work.join("notify.vsock") }),
                "{hv}"
            );
        }
        assert_eq!(GuestAddress::for_hypervisor(Hypervisor::Stratovirt, Some(7), work), None);
        assert_eq!(GuestAddress::for_hypervisor(Hypervisor::Qemu, None, work), None);
    }

    #[test]
    fn proxy_args_round_trip() {
        for a in [GuestAddress::Kernel { cid: 42 }, GuestAddress::Mux { socket: "/v/w/notify.vsock".into() }] {
            let args = a.proxy_args(22);
            assert_eq!(args[0], "vsock-proxy");
            let rest: Vec<&str> = args[1..].iter().map(String::as_str).collect();
            assert_eq!(GuestAddress::from_proxy_args(&rest).unwrap(), (a, 22));
        }
        assert!(GuestAddress::from_proxy_args(&["--cid", "x", "22"]).is_err());
        assert!(GuestAddress::from_proxy_args(&["--tcp", "1", "22"]).is_err());
    }

    /// A peer speaking cloud-hypervisor's side of the vsock socket: answers
    /// `CONNECT 22` with `OK <n>` and echoes what follows in upper case;
    /// closes other ports without an answer, as the VMM does when nothing
    /// listens in the guest.
    fn mux_peer(dir: &Path) -> (PathBuf, std::thread::JoinHandle<()>) {
        let socket = dir.join("notify.vsock");
        let listener = UnixListener::bind(&socket).unwrap();
        let peer = std::thread::spawn(move || {
            for _ in 0..2 {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = io::BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line != "CONNECT 22\n" {
                    continue;
                }
                let mut w = stream;
                w.write_all(b"OK 1073741824\n").unwrap();
                let mut rest = String::new();
                reader.read_to_string(&mut rest).unwrap();
                w.write_all(rest.to_uppercase().as_bytes()).unwrap();
            }
        });
        (socket, peer)
    }

    #[test]
    fn mux_handshake_then_the_guests_stream() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, peer) = mux_peer(dir.path());
        let address = GuestAddress::Mux { socket: socket.clone() };
        let err = address.connect(23).unwrap_err();
        assert!(matches!(err, VsockError::MuxRefused { port: 23, .. }), "{err}");
        assert!(err.to_string().contains("nothing listens on that port"), "{err}");
        let mut stream = address.connect(SSH_PORT).unwrap();
        stream.write_all(b"ssh-2.0 hello").unwrap();
        nix::sys::socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(&stream), nix::sys::socket::Shutdown::Write)
            .unwrap();
        let mut back = String::new();
        stream.read_to_string(&mut back).unwrap();
        assert_eq!(back, "SSH-2.0 HELLO", "the answer line is not part of the stream");
        peer.join().unwrap();
    }

    #[test]
    fn errors_name_what_was_unreachable() {
        let missing = GuestAddress::Mux { socket: "/nonexistent/notify.vsock".into() };
        let err = missing.connect(SSH_PORT).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/notify.vsock"), "{err}");
        // No guest has CID 4294967290 here: the error names the CID, or says
        // the host has no vsock at all.
        let err = GuestAddress::Kernel { cid: 4_294_967_290 }.connect(SSH_PORT).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("CID 4294967290") || text.contains("no vsock support"), "{text}");
    }
}
