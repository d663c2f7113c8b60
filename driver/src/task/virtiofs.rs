//! Building each share's virtiofsd command line.
//!
//! virtiofsd runs as root, so the driver — not the runner — decides what it
//! runs and what it shares: the binary is the plugin's `virtiofsd`, the shared
//! dir is the share's checked source, and from the runner's per-share script
//! (named by its supervisord config) we take only the per-share flags
//! microvm.nix puts there (readonly, cache, ACLs, …). Without such a script
//! microvm.nix's defaults apply.

use std::path::Path;

/// Per-share settings as microvm.nix expresses them in virtiofsd flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareFlags {
    pub readonly: bool,
    pub cache: String,
    pub posix_acl: bool,
    pub xattr: bool,
    pub inode_file_handles: String,
    /// crosvm needs `--tag`.
    pub tag: Option<String>,
    /// Harmless extra flags we pass on.
    pub extra: Vec<String>,
    /// Flags from the runner we refused to pass on.
    pub ignored: Vec<String>,
}

impl Default for ShareFlags {
    /// microvm.nix's defaults (`posixAcl = true`, `cache = "auto"`,
    /// `inodeFileHandles = "prefer"`).
    fn default() -> Self {
        ShareFlags {
            readonly: false,
            cache: "auto".into(),
            posix_acl: true,
            xattr: true,
            inode_file_handles: "prefer".into(),
            tag: None,
            extra: Vec::new(),
            ignored: Vec::new(),
        }
    }
}

/// Flags that only tune performance or behaviour inside the share.
const PASSED_ON: &[&str] = &[
    "--allow-direct-io",
    "--writeback",
    "--announce-submounts",
    "--no-announce-submounts",
    "--killpriv-v2",
    "--no-killpriv-v2",
    "--security-label",
    "--preserve-noatime",
    "--allow-mmap",
    "--log-level",
];

/// Flags we always set ourselves.
const OURS: &[&str] =
    &["--socket-path", "--socket-group", "--shared-dir", "--thread-pool-size", "--rlimit-nofile", "--fd"];

/// Reads the flags from a runner's per-share script (or a command line): the
/// words after the virtiofsd binary on the line that runs it.
pub fn flags_from_script(text: &str) -> ShareFlags {
    let joined = text.replace("\\\n", " ");
    let words: Vec<&str> = joined
        .lines()
        .find_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words.iter().position(|w| {
                let w = w.trim_matches(|c| c == '\'' || c == '"');
                w == "virtiofsd" || w.ends_with("/virtiofsd")
            })?;
            Some(words[at + 1..].to_vec())
        })
        .unwrap_or_default();
    let mut flags = ShareFlags { posix_acl: false, xattr: false, ..ShareFlags::default() };
    let mut i = 0;
    while i < words.len() {
        let word = words[i].trim_matches(|c| c == '\'' || c == '"');
        let (name, inline) = match word.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (word, None),
        };
        let takes_value = matches!(
            name,
            "--cache"
                | "--inode-file-handles"
                | "--tag"
                | "--log-level"
                | "--socket-path"
                | "--socket-group"
                | "--shared-dir"
                | "--thread-pool-size"
                | "--rlimit-nofile"
                | "--fd"
                | "--sandbox"
                | "--seccomp"
                | "--translate-uid"
                | "--translate-gid"
                | "--uid-map"
                | "--gid-map"
        );
        let value = if takes_value && inline.is_none() {
            i += 1;
            words.get(i).map(|v| v.to_string())
        } else {
            inline
        };
        match name {
            "--readonly" => flags.readonly = true,
            "--posix-acl" => flags.posix_acl = true,
            "--xattr" => flags.xattr = true,
            "--cache" => flags.cache = value.unwrap_or_else(|| "auto".into()),
            "--inode-file-handles" => flags.inode_file_handles = value.unwrap_or_else(|| "prefer".into()),
            "--tag" => flags.tag = value,
            "\"$@\"" | "$@" => {}
            n if OURS.contains(&n) => {}
            n if PASSED_ON.contains(&n) => flags.extra.push(match value {
                Some(v) => format!("{n}={v}"),
                None => n.to_string(),
            }),
            n if n.starts_with('-') => flags.ignored.push(match value {
                Some(v) => format!("{n}={v}"),
                None => n.to_string(),
            }),
            _ => {}
        }
        i += 1;
    }
    flags
}

/// The argv for one share, microvm.nix-style.
pub fn argv(
    virtiofsd: &Path,
    socket: &Path,
    source: &Path,
    socket_group: &str,
    flags: &ShareFlags,
    threads: usize,
    nofile: u64,
) -> Vec<String> {
    let mut argv = vec![
        virtiofsd.display().to_string(),
        format!("--socket-path={}", socket.display()),
        format!("--socket-group={socket_group}"),
        format!("--shared-dir={}", source.display()),
        format!("--rlimit-nofile={nofile}"),
        format!("--thread-pool-size={threads}"),
    ];
    if flags.posix_acl {
        argv.push("--posix-acl".into());
    }
    if flags.xattr {
        argv.push("--xattr".into());
    }
    argv.push(format!("--cache={}", flags.cache));
    argv.push(format!("--inode-file-handles={}", flags.inode_file_handles));
    if let Some(tag) = &flags.tag {
        argv.push(format!("--tag={tag}"));
    }
    if flags.readonly {
        argv.push("--readonly".into());
    }
    argv.extend(flags.extra.iter().cloned());
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    const MICROVM_SCRIPT: &str = "#!/nix/store/x-bash/bin/bash\nexec /nix/store/y-virtiofsd-1.13/bin/virtiofsd \\\n  --socket-path=web-virtiofs-data.sock --socket-group=kvm --shared-dir=/var/lib/data \\\n  --rlimit-nofile 1048576 --thread-pool-size $(nproc) --posix-acl --xattr --cache=never \\\n  --inode-file-handles=mandatory --readonly --allow-direct-io --sandbox=none\n";

    #[test]
    fn reads_microvm_nix_script_flags() {
        let f = flags_from_script(MICROVM_SCRIPT);
        assert!(f.readonly && f.posix_acl && f.xattr);
        assert_eq!(f.cache, "never");
        assert_eq!(f.inode_file_handles, "mandatory");
        assert_eq!(f.extra, vec!["--allow-direct-io"]);
        assert_eq!(f.ignored, vec!["--sandbox=none"], "weakening the sandbox is not passed on");
    }

    #[test]
    fn minimal_script_and_space_separated_values() {
        let f = flags_from_script("exec virtiofsd --socket-path s --shared-dir d --cache always --tag ro-store");
        assert!(!f.readonly && !f.posix_acl);
        assert_eq!(f.cache, "always");
        assert_eq!(f.tag.as_deref(), Some("ro-store"));
        assert!(f.ignored.is_empty());
        assert_eq!(
            flags_from_script("#!/bin/sh\necho nothing here\n"),
            ShareFlags { posix_acl: false, xattr: false, ..ShareFlags::default() }
        );
    }

    #[test]
    fn argv_uses_our_binary_and_source() {
        let f = flags_from_script(MICROVM_SCRIPT);
        let a =
            argv(Path::new("/usr/bin/virtiofsd"), Path::new("/w/s.sock"), Path::new("/w/data"), "kvm", &f, 4, 1048576);
        assert_eq!(a[0], "/usr/bin/virtiofsd");
        assert!(a.contains(&"--shared-dir=/w/data".to_string()), "the script's --shared-dir is not used");
        assert!(a.contains(&"--socket-path=/w/s.sock".to_string()));
        assert!(a.contains(&"--readonly".to_string()));
        assert!(a.contains(&"--thread-pool-size=4".to_string()));
        assert!(a.contains(&"--rlimit-nofile=1048576".to_string()));
        assert!(!a.iter().any(|w| w.contains("sandbox")));
        let d = argv(Path::new("v"), Path::new("s"), Path::new("d"), "kvm", &ShareFlags::default(), 1, 20000);
        assert!(d.contains(&"--posix-acl".to_string()) && d.contains(&"--cache=auto".to_string()));
        assert!(!d.contains(&"--readonly".to_string()));
    }
}
