//! `gitfront serve`: the ssh forced command. The identity is the `--user`
//! the operator wrote into the key's `command=`; what the client asked for
//! is `SSH_ORIGINAL_COMMAND`, parsed by command.rs before anything is
//! touched — a refused command creates nothing on disk.
//!
//! A push runs `git receive-pack` on the user's bare repo (created on the
//! first push) with:
//! * hooks from `core.hooksPath`, a directory gitfront writes for this push
//!   alone, so the repo's own `hooks/` and `config` never matter and nothing
//!   the pusher sends can become a hook;
//! * every other setting passed with `-c`, and no global/system git config
//!   (exec.rs);
//! * push options not advertised (`git push -o` cannot reach the hook);
//! * `receive.maxInputSize` from `limits.max_push_bytes`;
//! * the repo locked (flock) for the whole push, so two pushes to one repo
//!   build and deploy one after the other.

use std::fs::DirBuilder;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::command::SshCommand;
use crate::config::Config;
use crate::exec::clean_command;
use crate::names::{RepoName, UserName};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("no repo {repo} yet: push to it first")]
    NoRepo { repo: RepoName },
    #[error("cannot create {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("git init of {} failed: {message}", path.display())]
    Init { path: PathBuf, message: String },
    #[error("cannot lock {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot run git")]
    Git(#[source] std::io::Error),
    #[error("refused: {} is a symlink; repos are plain directories under repos_root", path.display())]
    Symlink { path: PathBuf },
}

/// A symlinked user dir or repo could lead a push or fetch into another
/// user's repo or anywhere else on disk: refuse rather than follow it.
fn refuse_symlinks(config: &Config, user: &UserName, repo: &RepoName) -> Result<(), ServeError> {
    let user_dir = config.repos_root.join(user.as_str());
    for path in [user_dir.clone(), config.repo_dir(user, repo)] {
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(ServeError::Symlink { path });
        }
    }
    Ok(())
}

/// Creates `dir` (and parents) readable by its owner only, if missing.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Runs the request in `SSH_ORIGINAL_COMMAND` for `user`.
pub fn serve(config_path: &Path, user: &str) -> ExitCode {
    let user = match UserName::parse(user) {
        Ok(u) => u,
        Err(e) => return fail(&format!("--user: {}", crate::error_chain(&e))),
    };
    let original = std::env::var_os("SSH_ORIGINAL_COMMAND");
    let command = match original.as_deref().map(|c| c.to_str()) {
        None => SshCommand::parse(None),
        Some(None) => Err(crate::command::Refusal::NonAscii),
        Some(Some(text)) => SshCommand::parse(Some(text)),
    };
    let command = match command {
        Ok(c) => c,
        Err(refusal) => return fail(&format!("refused: {}", crate::error_chain(&refusal))),
    };
    let config = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => return fail(&crate::error_chain(&e)),
    };
    let result = match command {
        SshCommand::Status => return crate::status::print(&config, &user),
        SshCommand::UploadPack(repo) => upload_pack(&config, &user, &repo),
        SshCommand::ReceivePack(repo) => receive_pack(&config, &user, &repo),
    };
    match result {
        Ok(code) => code,
        Err(e) => fail(&crate::error_chain(&e)),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("gitfront: {message}");
    ExitCode::FAILURE
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(c.clamp(1, 255) as u8),
        None => ExitCode::FAILURE,
    }
}

fn is_repo(dir: &Path) -> bool {
    dir.join("HEAD").is_file() && dir.join("objects").is_dir()
}

fn upload_pack(config: &Config, user: &UserName, repo: &RepoName) -> Result<ExitCode, ServeError> {
    refuse_symlinks(config, user, repo)?;
    let dir = config.repo_dir(user, repo);
    if !is_repo(&dir) {
        return Err(ServeError::NoRepo { repo: repo.clone() });
    }
    let status = clean_command("git", &config.path)
        .args(["-c", "uploadpack.allowAnySHA1InWant=false", "upload-pack", "--strict"])
        .arg(&dir)
        .status()
        .map_err(ServeError::Git)?;
    Ok(exit_code(status))
}

/// The bare repo, created on first use: initialised under a temporary name
/// and renamed into place, so a concurrent first push never sees half a repo.
fn ensure_repo(config: &Config, user: &UserName, repo: &RepoName) -> Result<PathBuf, ServeError> {
    refuse_symlinks(config, user, repo)?;
    let dir = config.repo_dir(user, repo);
    if is_repo(&dir) {
        return Ok(dir);
    }
    let user_dir = dir.parent().unwrap_or(&config.repos_root).to_path_buf();
    private_dir(&user_dir).map_err(|source| ServeError::Create { path: user_dir.clone(), source })?;
    let tmp = user_dir.join(format!(".new-{}-{}", repo.as_str(), std::process::id()));
    let out = clean_command("git", &config.path)
        .args(["init", "--quiet", "--bare", "--initial-branch=main"])
        .arg(&tmp)
        .output()
        .map_err(ServeError::Git)?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(ServeError::Init { path: dir, message: String::from_utf8_lossy(&out.stderr).trim().to_string() });
    }
    // The sample hooks are noise: gitfront's hooks come from core.hooksPath.
    let _ = std::fs::remove_dir_all(tmp.join("hooks"));
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        Err(e) if matches!(e.kind(), ErrorKind::AlreadyExists | ErrorKind::DirectoryNotEmpty) && is_repo(&dir) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(source) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(ServeError::Create { path: dir, source })
        }
    }
}

/// An exclusive lock on the repo for the whole push.
struct RepoLock {
    _dir: std::fs::File,
}

fn lock_repo(dir: &Path, repo: &RepoName) -> Result<RepoLock, ServeError> {
    use rustix::fs::{FlockOperation, flock};
    let lock_err = |source: std::io::Error| ServeError::Lock { path: dir.to_path_buf(), source };
    let file = std::fs::File::open(dir).map_err(lock_err)?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            eprintln!("gitfront: another push to {repo} is running; waiting for it to finish");
            flock(&file, FlockOperation::LockExclusive).map_err(|e| lock_err(e.into()))?;
        }
        Err(e) => return Err(lock_err(e.into())),
    }
    Ok(RepoLock { _dir: file })
}

/// Single-quotes `s` for sh.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Writes `<dir>/update`, which runs this binary's hook for `user`/`repo`.
fn write_hooks(dir: &Path, config: &Config, user: &UserName, repo: &RepoName) -> std::io::Result<()> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let config_file = std::path::absolute(&config.file)?;
    let script = format!(
        "#!/bin/sh\n# Written by gitfront serve for one push.\nexec {} hook update --config {} --user {} --repo {} \"$@\"\n",
        shell_quote(&exe.to_string_lossy()),
        shell_quote(&config_file.to_string_lossy()),
        shell_quote(user.as_str()),
        shell_quote(repo.as_str()),
    );
    let hook = dir.join("update");
    std::fs::write(&hook, script)?;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o500))
}

fn receive_pack(config: &Config, user: &UserName, repo: &RepoName) -> Result<ExitCode, ServeError> {
    let dir = ensure_repo(config, user, repo)?;
    let _lock = lock_repo(&dir, repo)?;
    let tmp = config.tmp_dir();
    let hooks = private_dir(&tmp)
        .and_then(|()| tempfile::Builder::new().prefix("hooks-").tempdir_in(&tmp))
        .map_err(|source| ServeError::Create { path: tmp.clone(), source })?;
    write_hooks(hooks.path(), config, user, repo)
        .map_err(|source| ServeError::Create { path: hooks.path().to_path_buf(), source })?;
    let status = clean_command("git", &config.path)
        .arg("-c")
        .arg(format!("core.hooksPath={}", hooks.path().display()))
        .args(["-c", "receive.advertisePushOptions=false"])
        .args(["-c", "receive.fsckObjects=true"])
        .arg("-c")
        .arg(format!("receive.maxInputSize={}", config.limits.max_push_bytes))
        // Branches are hosts: deleting one (even HEAD's) stops its VM, and
        // force pushes are the user's call in their own repo.
        .args(["-c", "receive.denyDeletes=false", "-c", "receive.denyDeleteCurrent=false"])
        .args(["-c", "receive.denyNonFastForwards=false"])
        .args(["-c", "receive.updateServerInfo=false", "-c", "core.fsmonitor=false"])
        .arg("receive-pack")
        .arg(&dir)
        .status()
        .map_err(ServeError::Git)?;
    Ok(exit_code(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_for_sh() {
        assert_eq!(shell_quote("/usr/bin/gitfront"), "'/usr/bin/gitfront'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn symlinked_repos_and_user_dirs_are_refused_and_create_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let text = format!("repos_root = \"{}\"\npath = \"/usr/local/bin:/usr/bin:/bin\"", tmp.path().display());
        let config = Config::parse(Path::new("/t.toml"), &text).unwrap();
        let alice = UserName::parse("alice").unwrap();
        let mallory = UserName::parse("mallory").unwrap();
        let fleet = RepoName::parse("fleet").unwrap();
        let alice_repo = ensure_repo(&config, &alice, &fleet).unwrap();
        // mallory's repo is a link to alice's; bob's whole dir is a link to alice's.
        std::fs::create_dir_all(tmp.path().join("mallory")).unwrap();
        std::os::unix::fs::symlink(&alice_repo, tmp.path().join("mallory/fleet.git")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("alice"), tmp.path().join("bob")).unwrap();
        let bob = UserName::parse("bob").unwrap();
        for (user, what) in [(&mallory, "mallory/fleet.git"), (&bob, "bob")] {
            let err = ensure_repo(&config, user, &fleet).unwrap_err().to_string();
            assert!(err.starts_with("refused: ") && err.contains(what) && err.contains("symlink"), "{err}");
            let err = upload_pack(&config, user, &fleet).unwrap_err().to_string();
            assert!(err.contains("symlink"), "{err}");
        }
        let other = RepoName::parse("other").unwrap();
        assert!(ensure_repo(&config, &bob, &other).is_err());
        assert!(!tmp.path().join("alice/other.git").exists(), "nothing created through the link");
    }

    #[test]
    fn first_push_creates_one_bare_repo() {
        let tmp = tempfile::tempdir().unwrap();
        let text = format!("repos_root = \"{}\"\npath = \"/usr/local/bin:/usr/bin:/bin\"", tmp.path().display());
        let config = Config::parse(Path::new("/t.toml"), &text).unwrap();
        let user = UserName::parse("alice").unwrap();
        let repo = RepoName::parse("fleet").unwrap();
        let dir = ensure_repo(&config, &user, &repo).unwrap();
        assert_eq!(dir, tmp.path().join("alice/fleet.git"));
        assert!(is_repo(&dir));
        assert!(!dir.join("hooks").exists());
        assert_eq!(ensure_repo(&config, &user, &repo).unwrap(), dir, "idempotent");
        let names: Vec<_> =
            std::fs::read_dir(tmp.path().join("alice")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["fleet.git"], "no temporary left behind");
        let mode = std::fs::metadata(tmp.path().join("alice")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let _lock = lock_repo(&dir, &repo).unwrap();
    }

    #[test]
    fn pushes_to_one_repo_take_turns() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = RepoName::parse("fleet").unwrap();
        let dir = tmp.path().to_path_buf();
        let first = lock_repo(&dir, &repo).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let (dir, repo) = (dir.clone(), repo.clone());
            std::thread::spawn(move || {
                let _second = lock_repo(&dir, &repo).unwrap();
                tx.send(()).unwrap();
            })
        };
        assert!(rx.recv_timeout(std::time::Duration::from_millis(300)).is_err(), "second push must wait");
        drop(first);
        rx.recv_timeout(std::time::Duration::from_secs(5)).expect("second push goes on");
        waiter.join().unwrap();
    }
}
