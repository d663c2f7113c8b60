//! The names gitfront accepts from outside: user names (from the forced
//! command, i.e. the operator), repo names (from the pusher) and branch names
//! (from the pusher). Each ends up in a path, a Nix attribute path, a Nomad
//! namespace or job ID and a URL, so each is checked once, here, against the
//! strictest of those grammars, and is then a type that cannot hold anything
//! else.

use std::fmt;

/// Longest repo name, in bytes, without a `.git` suffix.
pub const MAX_REPO_LEN: usize = 100;
/// Longest user name (like most Unix account tools).
pub const MAX_USER_LEN: usize = 32;
/// Longest branch name: a DNS label, since it is the VM's host name.
pub const MAX_BRANCH_LEN: usize = 63;

/// Why a name was refused; the message says what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} is empty")]
    Empty { what: &'static str },
    #[error("{what} {name:?} is {len} bytes, over the limit of {max}")]
    TooLong { what: &'static str, name: String, len: usize, max: usize },
    #[error("{what} {name:?} contains {found}; {allowed}")]
    BadChar { what: &'static str, name: String, found: String, allowed: &'static str },
    #[error("{what} {name:?} must start with {allowed}")]
    BadStart { what: &'static str, name: String, allowed: &'static str },
}

/// Describes the offending character for a message: the character itself
/// when printable, else its code (control characters, NUL).
fn describe(c: char) -> String {
    match c {
        ' ' => "a space".to_string(),
        '\'' | '"' | '`' => format!("a quote ({c})"),
        c if c.is_ascii_graphic() => format!("'{c}'"),
        c => format!("the character U+{:04X}", c as u32),
    }
}

/// Checks `name` against: not empty, at most `max` bytes, first character
/// from `first`, the rest from `rest`.
fn check(
    what: &'static str,
    name: &str,
    max: usize,
    first: fn(char) -> bool,
    first_desc: &'static str,
    rest: fn(char) -> bool,
    rest_desc: &'static str,
) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { what });
    }
    if name.len() > max {
        return Err(NameError::TooLong { what, name: name.to_string(), len: name.len(), max });
    }
    if name.contains("..") {
        return Err(NameError::BadChar { what, name: name.to_string(), found: "'..'".into(), allowed: rest_desc });
    }
    if let Some(bad) = name.chars().find(|&c| !rest(c) && !first(c)) {
        return Err(NameError::BadChar { what, name: name.to_string(), found: describe(bad), allowed: rest_desc });
    }
    let c = name.chars().next().unwrap_or(' ');
    if !first(c) {
        return Err(NameError::BadStart { what, name: name.to_string(), allowed: first_desc });
    }
    Ok(())
}

fn alnum(c: char) -> bool {
    c.is_ascii_alphanumeric()
}

fn lower_alnum(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// A tenant: the `--user` of the forced command. Lower-case letters, digits
/// and '-', starting with a letter, so that it fits a Nomad namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserName(String);

impl UserName {
    pub fn parse(name: &str) -> Result<UserName, NameError> {
        check(
            "user name",
            name,
            MAX_USER_LEN,
            |c| c.is_ascii_lowercase(),
            "a lower-case letter",
            |c| lower_alnum(c) || c == '-',
            "user names are lower-case letters, digits and '-'",
        )?;
        Ok(UserName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A repo of one user. Letters, digits and '-', starting with a letter or
/// digit, at most [`MAX_REPO_LEN`] bytes: it is a directory name and part of
/// a Nomad namespace (`[a-zA-Z0-9-]`), and no `..`, `/`, quote or shell
/// metacharacter can get through.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoName(String);

impl RepoName {
    /// `name` as the client sent it: a trailing `.git` is dropped (`git
    /// clone host:fleet.git` and `host:fleet` are the same repo).
    pub fn parse(name: &str) -> Result<RepoName, NameError> {
        let bare = name.strip_suffix(".git").unwrap_or(name);
        check(
            "repo name",
            bare,
            MAX_REPO_LEN,
            alnum,
            "a letter or digit",
            |c| alnum(c) || c == '-',
            "repo names are letters, digits and '-' (one flat name per user, no paths)",
        )?;
        Ok(RepoName(bare.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The bare repo's directory name.
    pub fn dir_name(&self) -> String {
        format!("{}.git", self.0)
    }
}

/// A branch that names a host: the `nixosConfigurations` attribute built and
/// the Nomad job ID. A Nix identifier that needs no quoting
/// (`[A-Za-z_][A-Za-z0-9_-]*`) and a valid job ID (no '/', no space).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Branch(String);

impl Branch {
    pub fn parse(name: &str) -> Result<Branch, NameError> {
        check(
            "branch name",
            name,
            MAX_BRANCH_LEN,
            |c| c.is_ascii_alphabetic() || c == '_',
            "a letter or '_' (it is a Nix attribute name)",
            |c| alnum(c) || c == '_' || c == '-',
            "a branch names a host: letters, digits, '_' and '-'",
        )?;
        Ok(Branch(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What a pushed ref name means to gitfront.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefError {
    #[error("{0} is a tag; only branches (refs/heads/<host>) are deployed")]
    Tag(String),
    #[error("{0} is not a branch; only branches (refs/heads/<host>) are deployed")]
    NotBranch(String),
    #[error("{refname} cannot be deployed")]
    BadBranch {
        refname: String,
        #[source]
        source: NameError,
    },
}

impl Branch {
    /// The branch a full ref name (`refs/heads/<name>`) updates.
    pub fn from_ref(refname: &str) -> Result<Branch, RefError> {
        if refname.starts_with("refs/tags/") {
            return Err(RefError::Tag(refname.to_string()));
        }
        let Some(name) = refname.strip_prefix("refs/heads/") else {
            return Err(RefError::NotBranch(refname.to_string()));
        };
        Branch::parse(name).map_err(|source| RefError::BadBranch { refname: refname.to_string(), source })
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    )*};
}
display_as_str!(UserName, RepoName, Branch);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_names() {
        assert_eq!(RepoName::parse("fleet").unwrap().as_str(), "fleet");
        assert_eq!(RepoName::parse("fleet.git").unwrap().as_str(), "fleet");
        assert_eq!(RepoName::parse("Fleet-2").unwrap().dir_name(), "Fleet-2.git");
        assert_eq!(RepoName::parse(&"a".repeat(100)).unwrap().as_str().len(), 100);
        let refused = [
            "",
            ".git",
            "..",
            "../bob/fleet",
            "a..b",
            "/srv/repos/bob/fleet",
            "bob/fleet",
            "~bob/fleet",
            "with space",
            "it's",
            "say\"hi\"",
            "a;b",
            "a|b",
            "a$b",
            "a`b`",
            "a&b",
            "a>b",
            "a\nb",
            "a\0b",
            "-flag",
            "--upload-pack=touch",
            ".hidden",
            "under_score",
            "dotted.name",
            "é",
        ];
        for name in refused {
            assert!(RepoName::parse(name).is_err(), "{name:?} was accepted");
        }
        let long = "a".repeat(101);
        let e = RepoName::parse(&long).unwrap_err();
        assert!(e.to_string().contains("101 bytes, over the limit of 100"), "{e}");
        let e = RepoName::parse("bob/fleet").unwrap_err().to_string();
        assert!(e.contains("'/'"), "{e}");
        let e = RepoName::parse("a..b").unwrap_err().to_string();
        assert!(e.contains("'..'"), "{e}");
        let e = RepoName::parse("-x").unwrap_err().to_string();
        assert!(e.contains("must start with a letter or digit"), "{e}");
    }

    #[test]
    fn user_names() {
        assert!(UserName::parse("alice").is_ok());
        assert!(UserName::parse("a-1").is_ok());
        for bad in ["", "Alice", "1a", "-a", "a_b", "a b", "a/b", &"a".repeat(33)] {
            assert!(UserName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refs_to_branches() {
        assert_eq!(Branch::from_ref("refs/heads/alpha").unwrap().as_str(), "alpha");
        assert_eq!(Branch::from_ref("refs/heads/web_1-b").unwrap().as_str(), "web_1-b");
        assert_eq!(Branch::from_ref("refs/heads/_x").unwrap().as_str(), "_x");
        let e = Branch::from_ref("refs/tags/v1").unwrap_err();
        assert_eq!(e.to_string(), "refs/tags/v1 is a tag; only branches (refs/heads/<host>) are deployed");
        let e = Branch::from_ref("refs/notes/commits").unwrap_err();
        assert!(matches!(e, RefError::NotBranch(_)), "{e}");
        for bad in ["refs/heads/a/b", "refs/heads/1abc", "refs/heads/a.b", "refs/heads/-a", "refs/heads/"] {
            let e = Branch::from_ref(bad).unwrap_err();
            assert!(matches!(e, RefError::BadBranch { .. }), "{bad}: {e}");
        }
        let e = Branch::from_ref(&format!("refs/heads/{}", "h".repeat(64))).unwrap_err();
        assert!(std::error::Error::source(&e).unwrap().to_string().contains("over the limit of 63"));
    }
}
