//! Authorizing a user's key: an `authorized_keys` line whose forced command
//! carries the identity (`serve --user <name>`) and whose `restrict` turns
//! off everything else (port, agent and X11 forwarding, pty, ~/.ssh/rc).
//! Whoever holds the key can then only do what `serve` allows, as that
//! user — the key never chooses who it is.

use std::path::Path;

use crate::names::UserName;
use crate::serve::shell_quote;

/// Key types OpenSSH accepts in `authorized_keys`.
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("expected one public key line (`<type> <base64> [comment]`), got {0} lines")]
    Lines(usize),
    #[error("{0:?} is not a public key type OpenSSH knows (the line may already carry options)")]
    Type(String),
    #[error("the key data is missing or not base64")]
    Data,
    #[error("the key comment contains a control character or a double quote")]
    Comment,
    #[error("{0} must be an absolute path without quotes, backslashes or control characters")]
    Path(String),
}

fn check_path(p: &Path) -> Result<String, KeyError> {
    let s = p.to_string_lossy();
    if !p.is_absolute() || s.chars().any(|c| c.is_control() || c == '"' || c == '\\') {
        return Err(KeyError::Path(s.into_owned()));
    }
    Ok(s.into_owned())
}

/// The `authorized_keys` line for `key` (an OpenSSH public key line, as in
/// `id_ed25519.pub`) that logs in as `user` through `gitfront`.
pub fn authorized_line(gitfront: &Path, config: &Path, user: &UserName, key: &str) -> Result<String, KeyError> {
    let lines: Vec<&str> = key.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let [line] = lines.as_slice() else { return Err(KeyError::Lines(lines.len())) };
    let mut parts = line.splitn(3, char::is_whitespace);
    let kind = parts.next().unwrap_or("");
    if !KEY_TYPES.contains(&kind) {
        return Err(KeyError::Type(kind.to_string()));
    }
    let data = parts.next().unwrap_or("");
    if data.is_empty() || !data.bytes().all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)) {
        return Err(KeyError::Data);
    }
    let comment = parts.next().unwrap_or("").trim();
    if comment.chars().any(|c| c.is_control() || c == '"') {
        return Err(KeyError::Comment);
    }
    let command = format!(
        "{} serve --config {} --user {}",
        shell_quote(&check_path(gitfront)?),
        shell_quote(&check_path(config)?),
        user.as_str()
    );
    let mut out = format!("command=\"{command}\",restrict {kind} {data}");
    if !comment.is_empty() {
        out.push(' ');
        out.push_str(comment);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop\n";

    #[test]
    fn makes_a_restricted_forced_command_line() {
        let user = UserName::parse("alice").unwrap();
        let line =
            authorized_line(Path::new("/usr/bin/gitfront"), Path::new("/etc/gitfront.toml"), &user, KEY).unwrap();
        assert_eq!(
            line,
            "command=\"'/usr/bin/gitfront' serve --config '/etc/gitfront.toml' --user alice\",restrict \
             ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl alice@laptop"
        );
    }

    #[test]
    fn refuses_what_it_cannot_vouch_for() {
        let user = UserName::parse("alice").unwrap();
        let bin = Path::new("/usr/bin/gitfront");
        let cfg = Path::new("/etc/gitfront.toml");
        let with_options = format!("no-pty {KEY}");
        assert!(matches!(authorized_line(bin, cfg, &user, &with_options), Err(KeyError::Type(_))));
        assert_eq!(authorized_line(bin, cfg, &user, ""), Err(KeyError::Lines(0)));
        assert_eq!(authorized_line(bin, cfg, &user, &format!("{KEY}{KEY}")), Err(KeyError::Lines(2)));
        assert_eq!(authorized_line(bin, cfg, &user, "ssh-ed25519 not;base64"), Err(KeyError::Data));
        assert_eq!(authorized_line(bin, cfg, &user, "ssh-ed25519 AAAA a\"b"), Err(KeyError::Comment));
        assert!(matches!(authorized_line(Path::new("gitfront"), cfg, &user, KEY), Err(KeyError::Path(_))));
        assert!(matches!(authorized_line(bin, Path::new("/etc/a\"b"), &user, KEY), Err(KeyError::Path(_))));
    }
}
