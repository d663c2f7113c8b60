//! `nomad-driver-microvm vsock-proxy` as ssh's ProxyCommand, against a real
//! sshd behind a cloud-hypervisor-style vsock socket.
//!
//! No guest can have vsock on these machines (no /dev/vhost-vsock, and
//! cloud-hypervisor is not packaged), so the VMM's side of `notify.vsock` is
//! played by the test: it answers `CONNECT 22` with `OK <n>` as
//! cloud-hypervisor does and hands the rest of the connection to
//! `sshd -i`, the guest's sshd in inetd mode. Everything on the host side
//! is what `nomad alloc exec` runs.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};

use microvm_driver::vsock::{GuestAddress, SSH_PORT};

const SSHD: &str = "/usr/sbin/sshd";

fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen");
    assert!(ok.success());
}

/// Reads the `CONNECT <port>\n` line byte by byte, so nothing of the ssh
/// stream behind it is consumed.
fn read_line(stream: &mut impl Read) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

#[test]
fn ssh_through_the_vsock_proxy_runs_a_command_in_the_guest() {
    if !nix::unistd::geteuid().is_root() || !Path::new(SSHD).exists() {
        assert!(std::env::var_os("CI").is_none(), "CI runs this as root with openssh-server installed");
        eprintln!("SKIPPED: needs root and {SSHD}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    keygen(&d.join("host_key"));
    keygen(&d.join("client_key"));
    std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
    let config = d.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "HostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n",
            d = d.display()
        ),
    )
    .unwrap();

    let socket = d.join("notify.vsock");
    let listener = UnixListener::bind(&socket).unwrap();
    let sshd_config = config.clone();
    let vmm = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let request = read_line(&mut stream);
        assert_eq!(request, format!("CONNECT {SSH_PORT}"));
        stream.write_all(b"OK 1073741825\n").unwrap();
        let fd = OwnedFd::from(stream);
        // sshd -i exits 255 when the client disconnects: its status says nothing.
        let _ = Command::new(SSHD)
            .args(["-i", "-e", "-f"])
            .arg(&sshd_config)
            .stdin(Stdio::from(fd.try_clone().unwrap()))
            .stdout(Stdio::from(fd))
            .status()
            .expect("sshd -i");
    });

    let address = GuestAddress::Mux { socket };
    let proxy = std::iter::once(env!("CARGO_BIN_EXE_nomad-driver-microvm").to_string())
        .chain(address.proxy_args(SSH_PORT))
        .collect::<Vec<_>>()
        .join(" ");
    // timeout(1): a stalled relay must fail the test, not hang it.
    let out = Command::new("timeout")
        .args(["60", "ssh", "-o"])
        .arg(format!("ProxyCommand={proxy}"))
        .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
        .args(["-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes", "-i"])
        .arg(d.join("client_key"))
        .args(["root@microvm", "--", "echo", "guest-says-$((6*7))"])
        .stdin(Stdio::null())
        .output()
        .expect("ssh");
    assert!(out.status.success(), "ssh: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "guest-says-42\n");
    vmm.join().unwrap();
}

#[test]
fn the_proxy_says_why_it_cannot_connect() {
    let out = Command::new(env!("CARGO_BIN_EXE_nomad-driver-microvm"))
        .args(["vsock-proxy", "--mux", "/nonexistent/notify.vsock", "22"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to the VM's vsock socket /nonexistent/notify.vsock"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_nomad-driver-microvm")).args(["vsock-proxy", "22"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: vsock-proxy"));
}
