//! What a client may ask for through `SSH_ORIGINAL_COMMAND`.
//!
//! A hand-written grammar rather than a shell-words split: exactly the three
//! forms below are accepted, byte for byte as git sends them (`git push`
//! runs `git-receive-pack '<path>'`, `git fetch`/`clone` run
//! `git-upload-pack '<path>'`), and everything else is refused with one line
//! saying why. The repo path must be a bare repo name (see
//! [`RepoName`]): no directories, so one user can never name another's repo.

use crate::names::{NameError, RepoName};

/// An accepted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshCommand {
    /// `git-receive-pack '<repo>'`: a push.
    ReceivePack(RepoName),
    /// `git-upload-pack '<repo>'`: a fetch or clone of one's own repo.
    UploadPack(RepoName),
    /// `status`: the user's VMs and their Nomad state.
    Status,
}

/// Why a request was refused (one line, shown to the client).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no shell here: use `git push`, `git clone`/`fetch`, or `ssh … status`")]
    Interactive,
    #[error("the command contains a control character or NUL")]
    ControlChar,
    #[error("the command contains non-ASCII bytes")]
    NonAscii,
    #[error("{0:?} is not allowed: only git-receive-pack, git-upload-pack and status are")]
    NotAllowed(String),
    #[error("{verb} wants exactly one argument, the repo name in single quotes ('name')")]
    BadArgument { verb: &'static str },
    #[error("{verb}: bad repo name")]
    BadRepo {
        verb: &'static str,
        #[source]
        source: NameError,
    },
}

const RECEIVE_PACK: &str = "git-receive-pack";
const UPLOAD_PACK: &str = "git-upload-pack";

impl SshCommand {
    /// Parses `SSH_ORIGINAL_COMMAND` (`None` when the client asked for a
    /// shell).
    pub fn parse(original: Option<&str>) -> Result<SshCommand, Refusal> {
        let Some(cmd) = original else { return Err(Refusal::Interactive) };
        if cmd.trim().is_empty() {
            return Err(Refusal::Interactive);
        }
        if cmd.chars().any(|c| c.is_ascii_control()) {
            return Err(Refusal::ControlChar);
        }
        if !cmd.is_ascii() {
            return Err(Refusal::NonAscii);
        }
        if cmd == "status" {
            return Ok(SshCommand::Status);
        }
        let (verb, rest) = cmd.split_once(' ').unwrap_or((cmd, ""));
        let verb = match verb {
            RECEIVE_PACK => RECEIVE_PACK,
            UPLOAD_PACK => UPLOAD_PACK,
            other => return Err(Refusal::NotAllowed(other.to_string())),
        };
        // Exactly `'<name>'`: one single-quoted word and nothing after it. A
        // name with a quote in it would arrive as `'a'\''b'`, and is refused
        // here because repo names cannot contain quotes anyway.
        let name = rest
            .strip_prefix('\'')
            .and_then(|r| r.strip_suffix('\''))
            .filter(|inner| !inner.contains('\''))
            .ok_or(Refusal::BadArgument { verb })?;
        let repo = RepoName::parse(name).map_err(|source| Refusal::BadRepo { verb, source })?;
        Ok(if verb == RECEIVE_PACK { SshCommand::ReceivePack(repo) } else { SshCommand::UploadPack(repo) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(name: &str) -> RepoName {
        RepoName::parse(name).unwrap()
    }

    #[test]
    fn accepts_exactly_the_git_forms_and_status() {
        let ok = [
            ("git-receive-pack 'fleet'", SshCommand::ReceivePack(repo("fleet"))),
            ("git-receive-pack 'fleet.git'", SshCommand::ReceivePack(repo("fleet"))),
            ("git-upload-pack 'fleet'", SshCommand::UploadPack(repo("fleet"))),
            ("git-upload-pack 'fleet.git'", SshCommand::UploadPack(repo("fleet"))),
            ("status", SshCommand::Status),
        ];
        for (cmd, want) in ok {
            assert_eq!(SshCommand::parse(Some(cmd)), Ok(want), "{cmd}");
        }
    }

    #[test]
    fn refuses_everything_else_with_a_reason() {
        let cases: &[(Option<&str>, &str)] = &[
            (None, "no shell here"),
            (Some(""), "no shell here"),
            (Some("   "), "no shell here"),
            (Some("ls"), "\"ls\" is not allowed"),
            (Some("ls -la /"), "\"ls\" is not allowed"),
            (Some("bash"), "\"bash\" is not allowed"),
            (Some("scp -t /tmp"), "\"scp\" is not allowed"),
            (Some("scp -f fleet"), "\"scp\" is not allowed"),
            (Some("sftp-server"), "\"sftp-server\" is not allowed"),
            (Some("internal-sftp"), "\"internal-sftp\" is not allowed"),
            (Some("git-upload-archive 'fleet'"), "\"git-upload-archive\" is not allowed"),
            (Some("git receive-pack 'fleet'"), "\"git\" is not allowed"),
            (Some("status --all"), "\"status\" is not allowed"),
            (Some(" status"), "\"\" is not allowed"),
            (Some("git-receive-pack fleet"), "exactly one argument"),
            (Some("git-receive-pack"), "exactly one argument"),
            (Some("git-receive-pack ''"), "repo name is empty"),
            (Some("git-receive-pack 'fleet' 'other'"), "exactly one argument"),
            (Some("git-receive-pack 'fleet' --foo"), "exactly one argument"),
            (Some("git-receive-pack  'fleet'"), "exactly one argument"),
            (Some("git-receive-pack \"fleet\""), "exactly one argument"),
            (Some("git-receive-pack 'a'\\''b'"), "exactly one argument"),
            (Some("git-upload-pack '--upload-pack=touch /tmp/pwned'"), "bad repo name"),
            (Some("git-upload-pack --upload-pack=touch 'fleet'"), "exactly one argument"),
            (Some("git-upload-pack '../bob/fleet'"), "bad repo name"),
            (Some("git-upload-pack 'bob/fleet'"), "bad repo name"),
            (Some("git-upload-pack '/srv/git/bob/fleet.git'"), "bad repo name"),
            (Some("git-upload-pack '~bob/fleet'"), "bad repo name"),
            (Some("git-receive-pack 'a b'"), "bad repo name"),
            (Some("git-receive-pack 'a;reboot'"), "bad repo name"),
            (Some("git-receive-pack 'fleet'; rm -rf /"), "exactly one argument"),
            (Some("git-receive-pack 'fleet'\nls"), "control character"),
            (Some("git-receive-pack 'fleet'\rls"), "control character"),
            (Some("git-receive-pack 'fl\0eet'"), "control character"),
            (Some("git-receive-pack 'fleet\t'"), "control character"),
            (Some("git-receive-pack 'flëet'"), "non-ASCII"),
        ];
        for (cmd, want) in cases {
            let e = SshCommand::parse(*cmd).unwrap_err();
            let text = crate::error_chain(&e);
            assert!(text.contains(want), "{cmd:?}: {text:?} lacks {want:?}");
            assert!(!text.contains('\n'), "{cmd:?}: one line: {text:?}");
        }
        let long = format!("git-receive-pack '{}'", "a".repeat(101));
        let text = crate::error_chain(&SshCommand::parse(Some(&long)).unwrap_err());
        assert!(text.contains("over the limit of 100"), "{text}");
    }
}
