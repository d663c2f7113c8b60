//! `ssh … status`: the user's VMs (every job in the namespace of each of
//! their repos) and what Nomad says about them, one line per VM.

use std::process::ExitCode;

use crate::config::Config;
use crate::job::TASK;
use crate::names::{RepoName, UserName};
use crate::nomad::{Client, NomadError};
use crate::report::short;

/// The user's repos, by name, sorted.
pub fn repos(config: &Config, user: &UserName) -> Vec<RepoName> {
    let dir = config.repos_root.join(user.as_str());
    let mut list: Vec<RepoName> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".git")).map(str::to_string))
        .filter_map(|n| RepoName::parse(&n).ok())
        .collect();
    list.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    list
}

/// One VM's line.
fn vm_line(nomad: &Client, ns: &str, repo: &RepoName, id: &str) -> Result<String, NomadError> {
    let Some(job) = nomad.job(ns, id)? else { return Ok(format!("{repo}/{id}: gone")) };
    let version = &job["Version"];
    let runner = job["TaskGroups"][0]["Tasks"][0]["Config"]["runner"].as_str().unwrap_or("?");
    let commit = job["Meta"]["gitfront.commit"].as_str().unwrap_or("?");
    if job["Stop"] == true {
        return Ok(format!("{repo}/{id}: stopped (version {version})"));
    }
    let allocs = nomad.allocations(ns, id)?;
    let state = match allocs.iter().find(|a| a.desired_status == "run").or(allocs.first()) {
        None => "no allocation".to_string(),
        Some(a) => {
            let task = a.task(TASK).map(|t| t.state.as_str()).unwrap_or("");
            let what = if a.client_status == "running" && !task.is_empty() && task != "running" {
                format!("{} (task {task})", a.client_status)
            } else {
                a.client_status.clone()
            };
            let node = if a.node_name.is_empty() { String::new() } else { format!(" on {}", a.node_name) };
            format!("{what}{node} (allocation {})", a.short_id())
        }
    };
    Ok(format!("{repo}/{id}: {state}, version {version}, commit {}, runner {runner}", short(commit)))
}

/// Prints the status to stdout.
pub fn print(config: &Config, user: &UserName) -> ExitCode {
    let nomad = match Client::new(&config.nomad) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("gitfront: {}", crate::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let repos = repos(config, user);
    if repos.is_empty() {
        println!("no repos yet: `git push <this host>:<repo> <host-branch>` creates one");
        return ExitCode::SUCCESS;
    }
    let mut failed = false;
    for repo in repos {
        let ns = match config.namespace(user, &repo) {
            Ok(ns) => ns,
            Err(e) => {
                println!("{repo}: {e}");
                continue;
            }
        };
        let result = nomad.jobs(&ns).and_then(|jobs| {
            if jobs.is_empty() {
                println!("{repo}: no VMs");
            }
            for j in jobs {
                println!("{}", vm_line(&nomad, &ns, &repo, &j.id)?);
            }
            Ok(())
        });
        if let Err(e) = result {
            eprintln!("gitfront: {repo}: {}", crate::error_chain(&e));
            failed = true;
        }
    }
    if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
