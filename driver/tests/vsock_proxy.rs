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

use microvm_driver::vsock::{GuestAddress, SSH_PORT, SshLogin};

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
    keygen(&d.join("stranger_key"));
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
    // One connection per ssh run below.
    let vmm = std::thread::spawn(move || {
        for _ in 0..2 {
            serve_one(&listener, &config);
        }
    });

    // The driver's own ssh command line, with `exec_ssh_key_file` set.
    let address = GuestAddress::Mux { socket };
    let ssh = |key: &str| {
        let login = SshLogin { proxy_exe: env!("CARGO_BIN_EXE_nomad-driver-microvm").into(), key: Some(d.join(key)) };
        let ssh = login.command(&address, &["echo".into(), "guest-says-$((6*7))".into()], false);
        // timeout(1): a stalled relay must fail the test, not hang it.
        Command::new("timeout")
            .arg("60")
            .arg(ssh.get_program())
            .args(ssh.get_args())
            .stdin(Stdio::null())
            .output()
            .expect("ssh")
    };
    let out = ssh("client_key");
    assert!(out.status.success(), "ssh: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "guest-says-42\n");
    // A key the guest does not authorize is refused: the login really uses
    // `exec_ssh_key_file`, not some key of root's.
    let out = ssh("stranger_key");
    assert_eq!(out.status.code(), Some(255), "ssh with an unauthorized key: {out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");
    vmm.join().unwrap();
}

/// Plays the VMM's side of one `notify.vsock` connection: answers
/// `CONNECT 22` and hands the stream to `sshd -i`.
fn serve_one(listener: &UnixListener, sshd_config: &Path) {
    let (mut stream, _) = listener.accept().unwrap();
    let request = read_line(&mut stream);
    assert_eq!(request, format!("CONNECT {SSH_PORT}"));
    stream.write_all(b"OK 1073741825\n").unwrap();
    let fd = OwnedFd::from(stream);
    // sshd -i exits 255 when the client disconnects: its status says nothing.
    let _ = Command::new(SSHD)
        .args(["-i", "-e", "-f"])
        .arg(sshd_config)
        .stdin(Stdio::from(fd.try_clone().unwrap()))
        .stdout(Stdio::from(fd))
        .status()
        .expect("sshd -i");
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
