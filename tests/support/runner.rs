//! Test runners: tests/runner/make-runner.sh makes microvm.nix-layout
//! runners that boot Debian's kernel with a busybox initramfs under qemu.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::repo_root;

/// Runs make-runner.sh with `args` into `out_dir`; returns the runner path
/// (a store path when `--store` is among the args).
pub fn make_runner(out_dir: &Path, args: &[&str]) -> PathBuf {
    let out = Command::new(repo_root().join("tests/runner/make-runner.sh"))
        .arg(out_dir)
        .args(args)
        .output()
        .expect("run make-runner.sh");
    assert!(out.status.success(), "make-runner.sh {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The virtiofsd test runners use (installed by tests/runner/install-virtiofsd.sh).
pub fn virtiofsd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VIRTIOFSD") {
        return PathBuf::from(p);
    }
    let out = Command::new(repo_root().join("tests/runner/install-virtiofsd.sh")).output().expect("install virtiofsd");
    assert!(out.status.success(), "install-virtiofsd.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}
