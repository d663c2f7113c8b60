//! `gitfront`: see `gitfront --help` and gitfront/README.md.

use clap::Parser;

fn main() -> std::process::ExitCode {
    gitfront::cli::run(gitfront::cli::Cli::parse())
}
