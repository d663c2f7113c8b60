//! What a pushed flake may fetch: every input in its lock must come over
//! the network, by one of the operator's allowed input schemes.
//!
//! The flake is evaluated and built as the gitfront account, which can read
//! the Nomad token and every user's repo. An input that Nix fetches from a
//! local path (`path:/run/keys/…`, `git+file:///…/bob/fleet.git`,
//! `tarball+file://…`) would copy such a file into the world-readable store
//! and into the pusher's VM. Nix fetches exactly the nodes of the lock it
//! uses, so checking them is checking what is fetched; the lock nix uses is
//! the committed `flake.lock` only if it locks every input of `flake.nix`,
//! which nixbuild.rs makes sure of (and checks the lock nix computes).
//!
//! A lock node's `locked` and `original` are both checked: `original` is
//! never fetched while it matches flake.nix, but a local one has no business
//! in a pushed flake either.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Input schemes that read local files: never allowed, whatever the config.
pub const LOCAL_SCHEMES: &[&str] = &["path", "git+file", "hg+file", "tarball+file", "file+file"];

/// Input schemes that fetch over the network, in flake-ref URL spelling.
pub const NETWORK_SCHEMES: &[&str] = &[
    "github",
    "gitlab",
    "sourcehut",
    "git+https",
    "git+http",
    "git+ssh",
    "git+git",
    "hg+https",
    "hg+http",
    "hg+ssh",
    "tarball+https",
    "tarball+http",
    "file+https",
    "file+http",
];

/// The default `build.allowed_input_schemes`: the forges, git over https
/// and https tarballs and files. Not ssh (it would use the gitfront
/// account's own keys) nor plain http.
pub const DEFAULT_SCHEMES: &[&str] = &["github", "gitlab", "sourcehut", "git+https", "tarball+https", "file+https"];

/// Why a scheme cannot be in `build.allowed_input_schemes`.
pub fn check_scheme(scheme: &str) -> Result<(), String> {
    if LOCAL_SCHEMES.contains(&scheme) {
        return Err(format!("{scheme} reads local files, which pushed flakes may never do"));
    }
    if !NETWORK_SCHEMES.contains(&scheme) {
        return Err(format!("unknown input scheme {scheme:?} (known: {})", NETWORK_SCHEMES.join(" ")));
    }
    Ok(())
}

/// nix's `allowed-uris` for these schemes: under `restrict-eval`, the
/// `fetchTree` that fetches a locked git, hg, tarball or file input checks
/// its URL against that list (forge inputs are not checked), and so do the
/// eval-time fetchers (`fetchGit`, `fetchTarball`, `fetchurl`).
/// Space-separated URL prefixes, e.g. `https://`.
pub fn allowed_uris(schemes: &[String]) -> String {
    let mut prefixes: Vec<String> = Vec::new();
    for s in schemes {
        if let Some((_, url_scheme)) = s.split_once('+') {
            let prefix = format!("{url_scheme}://");
            if !prefixes.contains(&prefix) {
                prefixes.push(prefix);
            }
        }
    }
    prefixes.join(" ")
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file} is a symlink; it must be a file of the commit")]
    Symlink { file: &'static str },
    #[error("{what} is not valid JSON")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what} is not a flake lock file: {reason}")]
    Shape { what: &'static str, reason: String },
    #[error("{what}: input {input} ({source_ref}) {problem}")]
    Refused { what: &'static str, input: String, source_ref: String, problem: Problem },
}

/// What is wrong with one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A path, or a URL whose scheme is `file`.
    Local,
    NotAllowed {
        scheme: String,
        allowed: String,
    },
    /// A URL input with no host (`git+https:///x`).
    NoHost,
    /// git submodules are fetched from the URLs in the repo's `.gitmodules`,
    /// which nothing here can check.
    Submodules,
    /// Not a source nix can fetch without a registry (an `indirect` lock).
    NotLocked,
    UnknownType(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Local => write!(f, "reads local files; pushed flakes may only fetch inputs over the network"),
            Problem::NotAllowed { scheme, allowed } => {
                write!(f, "uses {scheme}, not one of this server's allowed input schemes ({allowed})")
            }
            Problem::NoHost => write!(f, "names no host"),
            Problem::Submodules => write!(f, "fetches git submodules, whose URLs gitfront cannot check"),
            Problem::NotLocked => write!(f, "is not locked to a source"),
            Problem::UnknownType(t) => write!(f, "has the input type {t:?}, which gitfront does not know"),
        }
    }
}

/// Checks `<dir>/flake.lock` (the committed lock); no lock file is fine
/// here (then flake.nix must declare no inputs, which the lock nix
/// computes shows). Also refuses a symlinked `flake.nix` or `flake.lock`:
/// nix reads the lock without restriction and quotes it in parse errors.
pub fn check_committed(dir: &Path, allowed: &[String]) -> Result<(), LockError> {
    for file in ["flake.nix", "flake.lock"] {
        match std::fs::symlink_metadata(dir.join(file)) {
            Ok(m) if m.file_type().is_symlink() => return Err(LockError::Symlink { file }),
            _ => {}
        }
    }
    let path = dir.join("flake.lock");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(LockError::Read { path, source }),
    };
    let what = "flake.lock";
    let lock: Value = serde_json::from_str(&text).map_err(|source| LockError::Json { what, source })?;
    check(what, &lock, allowed)
}

/// Checks every node of a lock (`flake.lock`'s JSON); `what` names it in
/// messages.
pub fn check(what: &'static str, lock: &Value, allowed: &[String]) -> Result<(), LockError> {
    let shape = |reason: &str| LockError::Shape { what, reason: reason.to_string() };
    let nodes = lock.get("nodes").and_then(Value::as_object).ok_or_else(|| shape("no `nodes` object"))?;
    let root = match lock.get("root") {
        None => "root",
        Some(r) => r.as_str().ok_or_else(|| shape("`root` is not a string"))?,
    };
    let names = input_paths(nodes, root);
    for (key, node) in nodes {
        if key == root {
            continue;
        }
        let input = names.get(key.as_str()).cloned().unwrap_or_else(|| key.clone());
        let node = node.as_object().ok_or_else(|| shape(&format!("node {key:?} is not an object")))?;
        let locked = node
            .get("locked")
            .and_then(Value::as_object)
            .ok_or_else(|| shape(&format!("input {input} has no `locked` source")))?;
        let refuse = |attrs: &Map<String, Value>, problem| LockError::Refused {
            what,
            input: input.clone(),
            source_ref: source_ref(attrs),
            problem,
        };
        check_source(locked, allowed, false).map_err(|p| refuse(locked, p))?;
        if let Some(original) = node.get("original").and_then(Value::as_object) {
            check_source(original, allowed, true).map_err(|p| refuse(original, p))?;
        }
    }
    Ok(())
}

/// Each node's name as an input path from the root (`microvm/nixpkgs`),
/// the shortest one where a node is reached several ways.
fn input_paths<'a>(nodes: &'a Map<String, Value>, root: &'a str) -> BTreeMap<&'a str, String> {
    let mut names = BTreeMap::new();
    let mut queue = VecDeque::from([(root, String::new())]);
    while let Some((key, path)) = queue.pop_front() {
        let Some(inputs) = nodes.get(key).and_then(|n| n.get("inputs")).and_then(Value::as_object) else { continue };
        for (name, target) in inputs {
            // A list is a `follows` path: no node of its own.
            let Some(target) = target.as_str() else { continue };
            if target == root || names.contains_key(target) {
                continue;
            }
            let child = if path.is_empty() { name.clone() } else { format!("{path}/{name}") };
            names.insert(target, child.clone());
            queue.push_back((target, child));
        }
    }
    names
}

fn str_attr<'a>(attrs: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    attrs.get(name).and_then(Value::as_str)
}

/// The flake-ref prefix of an input type that has a `url`.
fn url_prefix(input_type: &str) -> Option<&'static str> {
    match input_type {
        "git" => Some("git"),
        "mercurial" => Some("hg"),
        "tarball" => Some("tarball"),
        "file" => Some("file"),
        _ => None,
    }
}

/// `scheme://host…` → (`scheme`, `host`); a URL without a scheme is a
/// local path to nix (`/srv/repo`, `./x`).
fn split_url(url: &str) -> (String, String) {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            (scheme.to_ascii_lowercase(), host.to_string())
        }
        None => ("file".to_string(), String::new()),
    }
}

/// Whether one `locked` or `original` source may be fetched.
fn check_source(attrs: &Map<String, Value>, allowed: &[String], is_original: bool) -> Result<(), Problem> {
    let input_type = str_attr(attrs, "type").unwrap_or("");
    if attrs.get("submodules").and_then(Value::as_bool) == Some(true) {
        return Err(Problem::Submodules);
    }
    let (scheme, host) = match input_type {
        "path" => return Err(Problem::Local),
        // What the user wrote as `nixpkgs`: resolved on their machine,
        // fetched here only through `locked` (registries are off).
        "indirect" if is_original => return Ok(()),
        "indirect" => return Err(Problem::NotLocked),
        "github" | "gitlab" | "sourcehut" => (input_type.to_string(), None),
        t => match url_prefix(t) {
            Some(prefix) => {
                let (url_scheme, host) = split_url(str_attr(attrs, "url").unwrap_or(""));
                (format!("{prefix}+{url_scheme}"), Some(host))
            }
            None => return Err(Problem::UnknownType(t.to_string())),
        },
    };
    if LOCAL_SCHEMES.contains(&scheme.as_str()) {
        return Err(Problem::Local);
    }
    if !allowed.contains(&scheme) {
        return Err(Problem::NotAllowed { scheme, allowed: allowed.join(", ") });
    }
    if host.is_some_and(|h| h.is_empty()) {
        return Err(Problem::NoHost);
    }
    Ok(())
}

/// A short flake ref for messages: the type and where it points, without
/// the lock's hashes (a `narHash` of a local file says something about it).
fn source_ref(attrs: &Map<String, Value>) -> String {
    let input_type = str_attr(attrs, "type").unwrap_or("?");
    match input_type {
        "path" => format!("path:{}", str_attr(attrs, "path").unwrap_or("")),
        "indirect" => format!("flake:{}", str_attr(attrs, "id").unwrap_or("")),
        "github" | "gitlab" | "sourcehut" => {
            format!("{input_type}:{}/{}", str_attr(attrs, "owner").unwrap_or(""), str_attr(attrs, "repo").unwrap_or(""))
        }
        t => {
            let url = str_attr(attrs, "url").unwrap_or("");
            let url = url.split(['?', '#']).next().unwrap_or("");
            match url_prefix(t) {
                Some(prefix) if url.contains("://") => format!("{prefix}+{url}"),
                Some(prefix) => format!("{prefix}+file://{url}"),
                None => format!("{t}:{url}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn defaults() -> Vec<String> {
        DEFAULT_SCHEMES.iter().map(|s| s.to_string()).collect()
    }

    /// A lock whose root has the one input `x` = `locked` (and `original`).
    fn lock(locked: Value, original: Value) -> Value {
        json!({
            "nodes": { "root": { "inputs": { "x": "x_2" } }, "x_2": { "locked": locked, "original": original } },
            "root": "root",
            "version": 7
        })
    }

    fn refusal(locked: Value, original: Value) -> String {
        check("flake.lock", &lock(locked, original), &defaults()).unwrap_err().to_string()
    }

    const HASH: &str = "sha256-+I+txtYSW7gaqVPQp8rVR5r9K0jXPFnn+EXjSB465Sw=";

    #[test]
    fn network_inputs_of_the_default_schemes_are_allowed() {
        let allowed = [
            json!({ "type": "github", "owner": "NixOS", "repo": "nixpkgs", "rev": "ab", "narHash": HASH }),
            json!({ "type": "gitlab", "owner": "o", "repo": "r", "rev": "ab", "narHash": HASH }),
            json!({ "type": "sourcehut", "owner": "~o", "repo": "r", "rev": "ab", "narHash": HASH }),
            json!({ "type": "git", "url": "https://example.org/r.git", "rev": "ab", "narHash": HASH }),
            json!({ "type": "tarball", "url": "https://example.org/r.tar.gz", "narHash": HASH }),
            json!({ "type": "file", "url": "https://example.org/f", "narHash": HASH }),
        ];
        for locked in allowed {
            check("flake.lock", &lock(locked.clone(), locked.clone()), &defaults()).unwrap();
        }
        // What the user wrote (`inputs.nixpkgs.url = "nixpkgs"`) is only compared, never fetched.
        let locked = json!({ "type": "github", "owner": "NixOS", "repo": "nixpkgs", "rev": "ab", "narHash": HASH });
        check("flake.lock", &lock(locked, json!({ "type": "indirect", "id": "nixpkgs" })), &defaults()).unwrap();
        // An input-less flake's lock.
        check("flake.lock", &json!({ "nodes": { "root": {} }, "root": "root", "version": 7 }), &defaults()).unwrap();
    }

    #[test]
    fn local_inputs_are_refused_naming_the_input_and_its_source() {
        let cases = [
            (json!({ "type": "path", "path": "/run/keys/token", "narHash": HASH }), "(path:/run/keys/token)"),
            (json!({ "type": "path", "path": "./sub", "narHash": HASH }), "(path:./sub)"),
            (
                json!({ "type": "git", "url": "file:///srv/gitfront/repos/bob/fleet.git", "rev": "ab" }),
                "(git+file:///srv/gitfront/repos/bob/fleet.git)",
            ),
            (json!({ "type": "git", "url": "/srv/repo", "rev": "ab" }), "(git+file:///srv/repo)"),
            (json!({ "type": "mercurial", "url": "file:///srv/hg", "rev": "ab" }), "(hg+file:///srv/hg)"),
            (
                json!({ "type": "tarball", "url": "file:///tmp/x.tar.gz", "narHash": HASH }),
                "(tarball+file:///tmp/x.tar.gz)",
            ),
            (json!({ "type": "file", "url": "file:///etc/shadow", "narHash": HASH }), "(file+file:///etc/shadow)"),
            (
                json!({ "type": "tarball", "url": "FILE:///tmp/x.tar.gz?a=b", "narHash": HASH }),
                "(tarball+FILE:///tmp/x.tar.gz)",
            ),
        ];
        for (locked, shown) in cases {
            let e = refusal(locked.clone(), locked.clone());
            assert_eq!(
                e,
                format!(
                    "flake.lock: input x {shown} reads local files; pushed flakes may only fetch inputs over the network"
                ),
            );
        }
        // A local `original` is refused even when `locked` is fine.
        let good = json!({ "type": "github", "owner": "NixOS", "repo": "nixpkgs", "rev": "ab", "narHash": HASH });
        let e = refusal(good, json!({ "type": "path", "path": "/run/keys/token" }));
        assert!(e.starts_with("flake.lock: input x (path:/run/keys/token) reads local files"), "{e}");
    }

    #[test]
    fn other_problems_are_named() {
        let e = refusal(json!({ "type": "git", "url": "ssh://git@example.org/r", "rev": "ab" }), json!({}));
        assert_eq!(
            e,
            "flake.lock: input x (git+ssh://git@example.org/r) uses git+ssh, not one of this server's allowed \
             input schemes (github, gitlab, sourcehut, git+https, tarball+https, file+https)"
        );
        let e = refusal(json!({ "type": "tarball", "url": "http://example.org/x.tar.gz" }), json!({}));
        assert!(e.contains("uses tarball+http, not one of"), "{e}");
        let e = refusal(json!({ "type": "git", "url": "https:///srv/x", "rev": "ab" }), json!({}));
        assert_eq!(e, "flake.lock: input x (git+https:///srv/x) names no host");
        let e = refusal(json!({ "type": "git", "url": "https://u@/x", "rev": "ab" }), json!({}));
        assert!(e.ends_with("names no host"), "{e}");
        let e = refusal(json!({ "type": "git", "url": "https://example.org/r", "submodules": true }), json!({}));
        assert!(e.ends_with("fetches git submodules, whose URLs gitfront cannot check"), "{e}");
        let e = refusal(json!({ "type": "indirect", "id": "nixpkgs" }), json!({}));
        assert_eq!(e, "flake.lock: input x (flake:nixpkgs) is not locked to a source");
        let e = refusal(json!({ "type": "s3", "url": "s3://b/x" }), json!({}));
        assert!(e.ends_with("has the input type \"s3\", which gitfront does not know"), "{e}");
        let e = refusal(json!({ "url": "https://example.org" }), json!({}));
        assert!(e.contains("has the input type \"\""), "{e}");
        // With git+ssh allowed by the operator, the same input passes.
        let mut allowed = defaults();
        allowed.push("git+ssh".into());
        let locked = json!({ "type": "git", "url": "ssh://git@example.org/r", "rev": "ab" });
        check("flake.lock", &lock(locked.clone(), locked), &allowed).unwrap();
    }

    #[test]
    fn nested_inputs_are_named_by_their_path_and_every_node_is_checked() {
        let gh = json!({ "type": "github", "owner": "o", "repo": "r", "rev": "ab", "narHash": HASH });
        let bad = json!({ "type": "path", "path": "/run/keys/token" });
        let lock = json!({
            "nodes": {
                "root": { "inputs": { "microvm": "microvm", "nixpkgs": "nixpkgs" } },
                "microvm": { "inputs": { "nixpkgs": ["nixpkgs"], "spectrum": "spectrum" }, "locked": gh, "original": gh },
                "nixpkgs": { "locked": gh, "original": gh },
                "spectrum": { "locked": bad, "original": bad },
                "orphan": { "locked": gh, "original": gh }
            },
            "root": "root",
            "version": 7
        });
        let e = check("flake.nix", &lock, &defaults()).unwrap_err().to_string();
        assert!(e.starts_with("flake.nix: input microvm/spectrum (path:/run/keys/token) reads local files"), "{e}");
        // A node no input reaches is still checked, under its key.
        let mut unreached = lock.clone();
        unreached["nodes"]["spectrum"] = json!({ "locked": gh, "original": gh });
        unreached["nodes"]["orphan"] = json!({ "locked": bad, "original": bad });
        let e = check("flake.lock", &unreached, &defaults()).unwrap_err().to_string();
        assert!(e.starts_with("flake.lock: input orphan (path:/run/keys/token)"), "{e}");
    }

    #[test]
    fn malformed_locks_are_refused() {
        let cases = [
            (json!([]), "flake.lock is not a flake lock file: no `nodes` object"),
            (json!({ "nodes": {}, "root": 1 }), "flake.lock is not a flake lock file: `root` is not a string"),
            (
                json!({ "nodes": { "root": {}, "x": 1 } }),
                "flake.lock is not a flake lock file: node \"x\" is not an object",
            ),
            (
                json!({ "nodes": { "root": { "inputs": { "a": "x" } }, "x": {} } }),
                "flake.lock is not a flake lock file: input a has no `locked` source",
            ),
        ];
        for (lock, want) in cases {
            assert_eq!(check("flake.lock", &lock, &defaults()).unwrap_err().to_string(), want);
        }
    }

    #[test]
    fn the_committed_lock_is_read_from_the_checkout() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        check_committed(dir, &defaults()).unwrap();
        std::fs::write(dir.join("flake.lock"), "{ not json").unwrap();
        let e = check_committed(dir, &defaults()).unwrap_err();
        assert_eq!(e.to_string(), "flake.lock is not valid JSON");
        let bad = lock(json!({ "type": "path", "path": "/x" }), json!({ "type": "path", "path": "/x" }));
        std::fs::write(dir.join("flake.lock"), bad.to_string()).unwrap();
        let e = check_committed(dir, &defaults()).unwrap_err();
        assert!(e.to_string().starts_with("flake.lock: input x (path:/x) reads local files"), "{e}");
        // nix would read a symlinked lock and quote its target in the parse error.
        std::fs::remove_file(dir.join("flake.lock")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.join("flake.lock")).unwrap();
        let e = check_committed(dir, &defaults()).unwrap_err();
        assert_eq!(e.to_string(), "flake.lock is a symlink; it must be a file of the commit");
        std::fs::remove_file(dir.join("flake.lock")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.join("flake.nix")).unwrap();
        let e = check_committed(dir, &defaults()).unwrap_err();
        assert_eq!(e.to_string(), "flake.nix is a symlink; it must be a file of the commit");
    }

    #[test]
    fn schemes_and_allowed_uris() {
        assert!(check_scheme("github").is_ok());
        assert!(check_scheme("git+ssh").is_ok());
        assert_eq!(
            check_scheme("git+file").unwrap_err(),
            "git+file reads local files, which pushed flakes may never do"
        );
        assert!(check_scheme("path").unwrap_err().contains("reads local files"));
        assert!(check_scheme("s3").unwrap_err().starts_with("unknown input scheme \"s3\" (known: github "));
        assert_eq!(allowed_uris(&defaults()), "https://");
        let s: Vec<String> = ["github", "git+ssh", "tarball+https", "git+https", "hg+http"].map(String::from).into();
        assert_eq!(allowed_uris(&s), "ssh:// https:// http://");
        assert_eq!(allowed_uris(&["github".to_string()]), "");
        for s in DEFAULT_SCHEMES {
            check_scheme(s).unwrap();
        }
    }
}
