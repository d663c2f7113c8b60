//! Exactly the pushed commit, as a directory: `git archive <sha>` of the
//! bare repo, unpacked. Not the working tree (there is none), not the old
//! ref (the hook runs before the ref moves), and not `git+file:` (Nix would
//! resolve a ref, and the ref does not point at the commit yet).
//!
//! Like a checkout, this honours the commit's own `.gitattributes`
//! (`export-ignore`, `eol`): it is the tree as git would check it out.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::exec::{self, ExecError, Stdout, clean_command};

/// Quarantine variables git sets for hooks while pushed objects are not in
/// the repo yet (pre-receive); passed on so `git archive` can see them.
const QUARANTINE_VARS: [&str; 3] = ["GIT_OBJECT_DIRECTORY", "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_QUARANTINE_PATH"];

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("cannot export commit {commit}")]
    Exec {
        commit: String,
        #[source]
        source: ExecError,
    },
    #[error("git archive of commit {commit} failed: {}", last_line(output))]
    Archive { commit: String, output: Vec<String> },
    #[error("unpacking commit {commit} failed: {}", last_line(output))]
    Unpack { commit: String, output: Vec<String> },
    #[error("cannot create {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn last_line(lines: &[String]) -> &str {
    lines.iter().rev().find(|l| !l.trim().is_empty()).map(String::as_str).unwrap_or("(no output)")
}

/// Writes the tree of `commit` in `git_dir` into `dest` (created).
pub fn export(git_dir: &Path, commit: &str, dest: &Path, path_env: &str, limit: Duration) -> Result<(), CheckoutError> {
    std::fs::create_dir_all(dest).map_err(|source| CheckoutError::Dir { path: dest.to_path_buf(), source })?;
    let tar = dest.with_extension("tar");
    let mut archive = clean_command("git", path_env);
    archive.arg("--git-dir").arg(git_dir).args(["archive", "--format=tar", "--output"]).arg(&tar).arg(commit);
    for var in QUARANTINE_VARS {
        if let Some(v) = std::env::var_os(var) {
            archive.env(var, v);
        }
    }
    let exec_err = |source| CheckoutError::Exec { commit: commit.to_string(), source };
    let done = exec::run(archive, Stdout::Merge, limit).map_err(exec_err)?;
    if !done.status.success() {
        return Err(CheckoutError::Archive { commit: commit.to_string(), output: done.output });
    }
    let mut unpack = clean_command("tar", path_env);
    unpack.args(["-x", "--no-same-owner", "-f"]).arg(&tar).arg("-C").arg(dest);
    let done = exec::run(unpack, Stdout::Merge, limit).map_err(exec_err)?;
    let _ = std::fs::remove_file(&tar);
    if !done.status.success() {
        return Err(CheckoutError::Unpack { commit: commit.to_string(), output: done.output });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = clean_command("git", PATH)
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.org")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.org")
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    #[test]
    fn exports_exactly_the_given_commit() {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("work");
        std::fs::create_dir(&work).unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        std::fs::write(work.join("flake.nix"), "first").unwrap();
        git(&work, &["add", "."]);
        git(&work, &["commit", "-q", "-m", "1"]);
        let first = git(&work, &["rev-parse", "HEAD"]);
        std::fs::write(work.join("flake.nix"), "second").unwrap();
        std::fs::write(work.join("extra"), "x").unwrap();
        git(&work, &["add", "."]);
        git(&work, &["commit", "-q", "-m", "2"]);

        let dest = tmp.path().join("out");
        export(&work.join(".git"), &first, &dest, PATH, Duration::from_secs(30)).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("flake.nix")).unwrap(), "first");
        assert!(!dest.join("extra").exists());
        assert!(!tmp.path().join("out.tar").exists(), "the archive is removed");

        let e = export(
            &work.join(".git"),
            "0000000000000000000000000000000000000001",
            &tmp.path().join("bad"),
            PATH,
            Duration::from_secs(30),
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("git archive of commit 0000000000000000000000000000000000000001 failed: "),
            "{e}"
        );
    }
}
