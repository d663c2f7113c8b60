//! Where the binaries under test are.

use std::path::PathBuf;
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root").to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"))
}

fn built(name: &str) -> PathBuf {
    let path = target_dir().join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The driver plugin binary (debug build).
pub fn driver_bin() -> PathBuf {
    built("nomad-driver-microvm")
}

pub fn gitfront_bin() -> PathBuf {
    built("gitfront")
}

/// The real Nomad agent: `$NOMAD_BIN`, else tests/nomad-peer/build.sh's
/// cached build (seconds when warm).
pub fn nomad_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("NOMAD_BIN") {
            return PathBuf::from(bin);
        }
        let out = std::process::Command::new(repo_root().join("tests/nomad-peer/build.sh"))
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run tests/nomad-peer/build.sh");
        assert!(out.status.success(), "tests/nomad-peer/build.sh failed");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}
