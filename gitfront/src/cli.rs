//! The command line: `serve` (the forced command), `authorized-key`,
//! `check-config`, and the hidden `hook` that git runs during a push.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::hook::{self, RefUpdate};
use crate::names::{RepoName, UserName};

#[derive(Debug, Parser)]
#[command(
    name = "gitfront",
    version,
    about = "ssh forced command: `git push` of a flake becomes microVMs on Nomad",
    long_about = "ssh forced command: `git push` of a flake becomes microVMs on Nomad.\n\n\
        Each pushed branch <host> is built (nixosConfigurations.<host>.config.microvm.declaredRunner), \
        copied to the binary cache and run as the Nomad job <host> in the namespace of the user's repo. \
        See gitfront/README.md."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve one ssh session as USER (the key's forced command; reads SSH_ORIGINAL_COMMAND).
    ///
    /// Allows `git-receive-pack '<repo>'` (push), `git-upload-pack '<repo>'` (fetch, clone) of USER's
    /// own repos, and `status`; refuses anything else with a one-line reason.
    Serve {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long, value_name = "USER")]
        user: String,
    },
    /// Print the authorized_keys line that lets a public key push as USER.
    AuthorizedKey {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long, value_name = "USER")]
        user: String,
        /// The public key file (`id_ed25519.pub`); `-` reads stdin.
        #[arg(long, value_name = "FILE", default_value = "-")]
        key_file: PathBuf,
        /// The gitfront binary the line runs (default: this one).
        #[arg(long, value_name = "PATH")]
        gitfront: Option<PathBuf>,
    },
    /// Check a config file; print it with every default filled in.
    CheckConfig { file: PathBuf },
    /// git hooks; `serve` installs them for each push.
    #[command(hide = true)]
    Hook {
        #[command(subcommand)]
        hook: HookCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum HookCommand {
    /// git's `update` hook: REF OLD NEW.
    Update {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        user: String,
        #[arg(long)]
        repo: String,
        refname: String,
        old: String,
        new: String,
    },
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("gitfront: {message}");
    ExitCode::FAILURE
}

pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve { config, user } => crate::serve::serve(&config, &user),
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(c) => {
                print!("{}", c.to_toml());
                ExitCode::SUCCESS
            }
            Err(e) => fail(crate::error_chain(&e)),
        },
        Command::AuthorizedKey { config, user, key_file, gitfront } => {
            authorized_key(config, &user, key_file, gitfront)
        }
        Command::Hook { hook: HookCommand::Update { config, user, repo, refname, old, new } } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return fail(crate::error_chain(&e)),
            };
            let (user, repo) = match (UserName::parse(&user), RepoName::parse(&repo)) {
                (Ok(u), Ok(r)) => (u, r),
                (Err(e), _) | (_, Err(e)) => return fail(e),
            };
            match hook::update(&config, &user, &repo, &RefUpdate { refname: &refname, old: &old, new: &new }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    hook::report_rejection(&config, &refname, &e);
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn authorized_key(config: PathBuf, user: &str, key_file: PathBuf, gitfront: Option<PathBuf>) -> ExitCode {
    let user = match UserName::parse(user) {
        Ok(u) => u,
        Err(e) => return fail(format!("--user: {e}")),
    };
    // The line must name a config that works, or every login would fail.
    if let Err(e) = Config::load(&config) {
        return fail(crate::error_chain(&e));
    }
    let mut key = String::new();
    let read = if key_file.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut key).map(|_| ())
    } else {
        std::fs::read_to_string(&key_file).map(|k| key = k)
    };
    if let Err(e) = read {
        return fail(format!("cannot read {}: {e}", key_file.display()));
    }
    let gitfront = match gitfront.map(Ok).unwrap_or_else(|| std::fs::read_link("/proc/self/exe")) {
        Ok(p) => p,
        Err(e) => return fail(format!("cannot tell where this binary is: {e}")),
    };
    let config = match std::path::absolute(&config) {
        Ok(p) => p,
        Err(e) => return fail(format!("{}: {e}", config.display())),
    };
    match crate::keys::authorized_line(&gitfront, &config, &user, &key) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("{}: {e}", key_file.display())),
    }
}
