//! Support for the end-to-end suite: every process a test starts runs in
//! its own process group and is killed on drop; every network namespace is
//! deleted on drop (with whatever still runs inside it); Nomad agents are the
//! real agent built by tests/nomad-peer.

pub mod bins;
pub mod cluster;
pub mod configs;
pub mod gitfront;
pub mod netns;
pub mod nomad;
pub mod plugin;
pub mod procs;
pub mod runner;
pub mod vm;
pub mod wait;

pub use bins::{driver_bin, nomad_bin, repo_root};
pub use netns::Netns;
pub use nomad::{Agent, AgentOpts};
pub use procs::Group;
pub use wait::wait_until;

/// Gives a Nomad agent its own temp dir `<dir>/tmp`: go-plugin's sockets,
/// a `-dev` agent's data and keystore dirs all go there and vanish with the
/// test's dir, even when the agent is killed before it can clean up.
pub fn agent_tmpdir(cmd: &mut std::process::Command, dir: &std::path::Path) {
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).expect("agent temp dir");
    cmd.env("TMPDIR", tmp);
}

/// A temp dir others can traverse (0755): the VMM runs as an unprivileged
/// user and needs to reach its working dir below it.
pub fn open_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix("mvt").tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    dir
}

/// Whether this process may do what the suite needs (netns, taps, root-owned
/// FIFOs). Outside CI a test without root says why it skips; in CI (`CI` set)
/// it fails instead, so a run that could not test anything is never green.
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{test} needs root (network namespaces, taps), and CI must run the whole suite");
    }
    eprintln!("SKIPPED {test}: needs root (network namespaces, taps)");
    false
}
