//! gitfront: an ssh forced command that turns `git push` of a flake into
//! microVMs on Nomad. Each pushed branch names a host; its
//! `nixosConfigurations.<branch>.config.microvm.declaredRunner` is built from
//! exactly the pushed commit, copied to a binary cache and run as a Nomad job
//! (`driver = "microvm"`), and the push output is the deploy log.
//!
//! Module map: the forced command ([`serve`]) parses what the client asked
//! for ([`command`], [`names`]) and runs git with a per-push `update` hook
//! ([`hook`]), which exports the commit ([`checkout`]), checks what its
//! flake may fetch ([`flakelock`]), builds it ([`nixbuild`], confined by
//! [`confine`]) and deploys
//! it ([`deploy`], [`job`], [`nomad`]); [`status`] lists a user's VMs;
//! [`keys`] makes the `authorized_keys` lines; [`config`] is the
//! operator's TOML; [`exec`] runs every external program.

pub mod checkout;
pub mod cli;
pub mod command;
pub mod config;
pub mod confine;
pub mod deploy;
pub mod duration;
pub mod exec;
pub mod flakelock;
pub mod hook;
pub mod job;
pub mod keys;
pub mod names;
pub mod nixbuild;
pub mod nomad;
pub mod report;
pub mod serve;
pub mod status;

/// An error and its sources on one line, `outer: inner: innermost`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        // A transparent wrapper repeats its source's message: say it once.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text.replace('\n', " ")
}
