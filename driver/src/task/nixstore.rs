//! The runner's store path on this node: fetching it from the configured
//! binary caches when missing, and GC roots while a VM uses it.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("runner {path} is not on this node and no substituters are configured to fetch it from")]
    NoSubstituters { path: PathBuf },
    #[error("cannot fetch runner {path} from {tried}: {last_error}")]
    Fetch { path: PathBuf, tried: String, last_error: String },
    #[error("cannot create GC root {root}")]
    GcRoot {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `nix copy --from <substituter> <path>` for each substituter in turn.
pub async fn fetch(
    nix: &Path,
    substituters: &[String],
    trusted_public_keys: &[String],
    path: &Path,
) -> Result<String, StoreError> {
    if substituters.is_empty() {
        return Err(StoreError::NoSubstituters { path: path.to_path_buf() });
    }
    let mut last_error = String::new();
    for from in substituters {
        let mut cmd = tokio::process::Command::new(nix);
        cmd.args(["--extra-experimental-features", "nix-command", "copy", "--from", from])
            // Only the cache we name: never wait on unreachable defaults.
            .args(["--option", "substituters", ""]);
        if trusted_public_keys.is_empty() {
            cmd.arg("--no-check-sigs");
        } else {
            cmd.args(["--option", "trusted-public-keys", &trusted_public_keys.join(" ")]);
        }
        cmd.arg(path).stdin(std::process::Stdio::null()).kill_on_drop(true);
        match cmd.output().await {
            Ok(out) if out.status.success() && path.exists() => return Ok(from.clone()),
            Ok(out) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                last_error = stderr.lines().last().unwrap_or("nix copy failed").trim().to_string();
            }
            Err(e) => last_error = format!("cannot run {}: {e}", nix.display()),
        }
    }
    Err(StoreError::Fetch { path: path.to_path_buf(), tried: substituters.join(", "), last_error })
}

/// An indirect GC root `<gcroots_dir>/<name>` → `target` (the work dir's
/// `booted` link), like microvm.nix's `gcroots/microvm/booted-<name>`.
/// `Ok(None)` when this node has no Nix (no gcroots parent dir).
pub fn add_root(gcroots_dir: &Path, name: &str, target: &Path) -> Result<Option<PathBuf>, StoreError> {
    let parent_exists = gcroots_dir.parent().map(Path::is_dir).unwrap_or(false);
    if !parent_exists {
        return Ok(None);
    }
    let root = gcroots_dir.join(name);
    let err = |source| StoreError::GcRoot { root: root.clone(), source };
    std::fs::create_dir_all(gcroots_dir).map_err(err)?;
    let _ = std::fs::remove_file(&root);
    std::os::unix::fs::symlink(target, &root).map_err(err)?;
    Ok(Some(root))
}

/// Replaces `link` with a symlink to `target` (atomically, via rename).
pub fn relink(link: &Path, target: &Path) -> std::io::Result<()> {
    let tmp = link.with_extension("new-link");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gc_root_is_indirect_and_skipped_without_nix() {
        let tmp = tempfile::tempdir().unwrap();
        let none = add_root(&tmp.path().join("no/such/gcroots"), "vm", Path::new("/x")).unwrap();
        assert_eq!(none, None);
        let dir = tmp.path().join("gcroots/nomad-microvm");
        std::fs::create_dir_all(tmp.path().join("gcroots")).unwrap();
        let root = add_root(&dir, "vm", Path::new("/w/booted")).unwrap().unwrap();
        assert_eq!(std::fs::read_link(&root).unwrap(), PathBuf::from("/w/booted"));
        // replacing an existing root works
        add_root(&dir, "vm", Path::new("/w2/booted")).unwrap();
        assert_eq!(std::fs::read_link(&root).unwrap(), PathBuf::from("/w2/booted"));
    }

    #[test]
    fn relink_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("current");
        relink(&link, Path::new("/a")).unwrap();
        relink(&link, Path::new("/b")).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), PathBuf::from("/b"));
    }

    #[tokio::test]
    async fn fetch_needs_substituters() {
        let e = fetch(Path::new("nix"), &[], &[], Path::new("/nix/store/x")).await.unwrap_err();
        assert!(e.to_string().contains("no substituters"), "{e}");
    }
}
