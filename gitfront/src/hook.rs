//! git's `update` hook: called once per pushed ref, before the ref moves;
//! a non-zero exit rejects that ref alone and the others go on. That is the
//! whole per-ref contract of the issue, so build, cache copy and Nomad
//! registration all happen here (pre-receive is all-or-nothing, and
//! post-receive runs after the refs moved).
//!
//! Everything the hook acts on comes from its command line, which
//! serve.rs wrote into a hook script the pusher cannot touch: the config
//! file, the user, the repo. git supplies the ref name and the two commits.

use std::path::PathBuf;
use std::time::Duration;

use crate::checkout::{self, CheckoutError};
use crate::config::{Config, NamespaceError};
use crate::deploy::{self, DeployError};
use crate::job::JobSpec;
use crate::names::{Branch, RefError, RepoName, UserName};
use crate::nixbuild::{BuildError, HostBuild};
use crate::nomad::{Client, NomadError};
use crate::report::{Log, short};

/// Time for `git archive` + `tar` of one commit.
const EXPORT_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(transparent)]
    Ref(#[from] RefError),
    #[error("{0:?} is not a commit id")]
    BadCommit(String),
    #[error(transparent)]
    Namespace(#[from] NamespaceError),
    #[error(transparent)]
    Nomad(NomadError),
    #[error(transparent)]
    Checkout(#[from] CheckoutError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("the guest asks for {asked} {what}, over this server's limit of {limit}")]
    Limit { what: &'static str, asked: u32, limit: u32 },
    #[error(transparent)]
    Deploy(#[from] DeployError),
    #[error("cannot make a scratch directory in {}", dir.display())]
    Scratch {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The arguments git passes to `update`.
pub struct RefUpdate<'a> {
    pub refname: &'a str,
    pub old: &'a str,
    pub new: &'a str,
}

fn is_commit_id(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64) && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn is_zero(s: &str) -> bool {
    s.bytes().all(|b| b == b'0')
}

/// Runs the hook for one ref; an error rejects the ref.
pub fn update(config: &Config, user: &UserName, repo: &RepoName, update: &RefUpdate) -> Result<(), HookError> {
    let branch = Branch::from_ref(update.refname)?;
    for id in [update.old, update.new] {
        if !is_commit_id(id) {
            return Err(HookError::BadCommit(id.to_string()));
        }
    }
    let log = Log::new(&branch);
    let namespace = config.namespace(user, repo)?;
    let nomad = Client::new(&config.nomad).map_err(HookError::Nomad)?;
    let out_link = config.roots_dir(user, repo).join(branch.as_str());

    if is_zero(update.new) {
        log.say(format!("branch deleted: stopping job {branch}"));
        deploy::stop(&nomad, &namespace, branch.as_str(), config.nomad.deploy_timeout, &log)
            .map_err(HookError::Nomad)?;
        // The runner is no longer deployed from here: let Nix collect it.
        let _ = std::fs::remove_file(&out_link);
        return Ok(());
    }

    // Fail before a long build when Nomad cannot be reached at all.
    nomad.namespace_exists(&namespace).map_err(HookError::Nomad)?;

    let tmp = config.tmp_dir();
    let scratch = crate::serve::private_dir(&tmp)
        .and_then(|()| tempfile::Builder::new().prefix("build-").tempdir_in(&tmp))
        .map_err(|source| HookError::Scratch { dir: tmp.clone(), source })?;
    let src = HostBuild::source_dir(scratch.path());
    checkout::export(&config.repo_dir(user, repo), update.new, &src, &config.path, EXPORT_LIMIT)?;

    let build = HostBuild::new(config, scratch.path(), &branch);
    log.say(format!("building {} from commit {}", build.runner_attr(), short(update.new)));
    build.check_inputs()?;
    let guest = build.guest()?;
    if guest.vcpu > config.limits.max_vcpu {
        return Err(HookError::Limit { what: "vCPUs", asked: guest.vcpu, limit: config.limits.max_vcpu });
    }
    if guest.mem > config.limits.max_mem {
        return Err(HookError::Limit { what: "MiB of memory", asked: guest.mem, limit: config.limits.max_mem });
    }
    let started = std::time::Instant::now();
    let runner = build.runner(&out_link)?;
    log.say(format!(
        "built {} ({} vCPU, {} MiB) in {}",
        runner.display(),
        guest.vcpu,
        guest.mem,
        crate::duration::secs(started.elapsed())
    ));
    let took = build.copy_to_cache(&runner)?;
    log.say(format!("copied to the binary cache {} in {}", config.binary_cache, crate::duration::secs(took)));
    drop(scratch);

    let spec = JobSpec {
        namespace,
        user: user.clone(),
        repo: repo.clone(),
        branch: branch.clone(),
        commit: update.new.to_string(),
        datacenters: config.nomad.datacenters.clone(),
        runner: runner.to_string_lossy().into_owned(),
        vcpu: guest.vcpu,
        mem: guest.mem,
    };
    deploy::deploy(&nomad, &spec, &config.job, config.nomad.deploy_timeout, &log)?;
    Ok(())
}

/// Prints why a ref was rejected: the error chain, then any command
/// output that explains it (the tail of a failed build).
pub fn report_rejection(config: &Config, refname: &str, e: &HookError) {
    let tag = refname.strip_prefix("refs/heads/").unwrap_or(refname);
    let log = Log::new(tag);
    if let HookError::Build(b) = e {
        let output = b.output();
        if !output.is_empty() {
            let n = config.build.log_tail_lines;
            let tail = &output[output.len().saturating_sub(n)..];
            log.say(format!("last {} line(s) of output:", tail.len()));
            log.quote(tail);
        }
    }
    log.say(format!("REJECTED {refname}: {}", crate::error_chain(e)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_ids_and_deletions() {
        assert!(is_commit_id("0123456789abcdef0123456789abcdef01234567"));
        assert!(is_commit_id(&"a".repeat(64)), "sha256 repos");
        assert!(!is_commit_id("0123456789ABCDEF0123456789abcdef01234567"));
        assert!(!is_commit_id("HEAD"));
        assert!(!is_commit_id("--upload-pack=x"));
        assert!(is_zero(&"0".repeat(40)));
        assert!(!is_zero("0123456789abcdef0123456789abcdef01234567"));
    }

    #[test]
    fn rejections_say_why() {
        let config = crate::config::defaults();
        let user = UserName::parse("alice").unwrap();
        let repo = RepoName::parse("fleet").unwrap();
        let zero = "0".repeat(40);
        let update = RefUpdate { refname: "refs/tags/v1", old: &zero, new: &zero };
        let e = super::update(&config, &user, &repo, &update).unwrap_err();
        assert_eq!(e.to_string(), "refs/tags/v1 is a tag; only branches (refs/heads/<host>) are deployed");
        let update = RefUpdate { refname: "refs/heads/alpha", old: &zero, new: "HEAD" };
        let e = super::update(&config, &user, &repo, &update).unwrap_err();
        assert_eq!(e.to_string(), "\"HEAD\" is not a commit id");
        let e = HookError::Limit { what: "vCPUs", asked: 16, limit: 8 };
        assert_eq!(e.to_string(), "the guest asks for 16 vCPUs, over this server's limit of 8");
    }
}
