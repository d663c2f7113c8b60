//! Property-based fuzzing of what a pusher controls: the ssh command line
//! and the names of refs. Nothing may panic; whatever is accepted must be
//! safe to use as a path component, a Nix attribute and a Nomad job ID.
//! `scripts/fuzz.sh` runs this longer (PROPTEST_CASES=…).

use gitfront::command::SshCommand;
use gitfront::names::Branch;
use proptest::prelude::*;

fn cases(default: u32) -> ProptestConfig {
    let n = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    ProptestConfig { cases: n, failure_persistence: None, ..ProptestConfig::default() }
}

fn safe_component(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 100
        && name != "."
        && name != ".."
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

proptest! {
    #![proptest_config(cases(2048))]

    #[test]
    fn ssh_commands_never_panic_and_accept_only_safe_repos(
        text in prop_oneof![
            "\\PC{0,80}",
            "(git-receive-pack|git-upload-pack|git-upload-archive|status|scp|sh) ?'?[^\\n]{0,40}'?( [^\\n]{0,10})?",
            "git-(receive|upload)-pack '[a-zA-Z0-9._/~ $;`-]{0,30}'",
        ]
    ) {
        match SshCommand::parse(Some(&text)) {
            Ok(SshCommand::ReceivePack(repo)) | Ok(SshCommand::UploadPack(repo)) => {
                prop_assert!(safe_component(repo.as_str()), "accepted {:?} from {:?}", repo.as_str(), text);
                prop_assert!(text.starts_with("git-receive-pack '") || text.starts_with("git-upload-pack '"));
            }
            Ok(SshCommand::Status) => prop_assert_eq!(text.trim(), "status"),
            Err(refusal) => prop_assert!(!refusal.to_string().is_empty() && !refusal.to_string().contains('\n')),
        }
    }

    #[test]
    fn refs_become_safe_job_names_or_are_refused(refname in prop_oneof![
        "refs/(heads|tags|notes)/\\PC{0,40}",
        "refs/heads/[a-zA-Z0-9._/-]{0,30}",
        "\\PC{0,40}",
    ]) {
        if let Ok(branch) = Branch::from_ref(&refname) {
            let name = branch.as_str();
            prop_assert!(refname.starts_with("refs/heads/"));
            // a Nix attribute name and a Nomad job ID: an identifier, no dots or slashes
            prop_assert!(!name.is_empty() && !name.contains('/') && !name.contains('.'), "{name}");
            prop_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{name}");
            prop_assert!(!name.starts_with('-') && !name.as_bytes()[0].is_ascii_digit(), "{name}");
        }
    }
}
