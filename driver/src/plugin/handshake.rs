//! go-plugin's process contract as Nomad uses it: the magic cookie in the
//! environment, the protocol version, and the one handshake line on stdout.

use std::path::{Path, PathBuf};

/// Nomad's go-plugin handshake cookie (plugins/base/plugin.go).
pub const MAGIC_COOKIE_KEY: &str = "NOMAD_PLUGIN_MAGIC_COOKIE";
pub const MAGIC_COOKIE_VALUE: &str = "e4327c2e01eabfd75a8a67adb114fb34a757d57eee7728d857a8cec6e91a7255";
/// go-plugin's own protocol version (first field of the handshake line).
pub const CORE_PROTOCOL_VERSION: u32 = 1;
/// Nomad's plugin API protocol version (second field).
pub const APP_PROTOCOL_VERSION: u32 = 2;

/// Environment variables go-plugin hands to a plugin; children we start must
/// not inherit them (a VMM has no business with Nomad's cookie).
pub const PLUGIN_ENV_VARS: &[&str] = &[
    MAGIC_COOKIE_KEY,
    "PLUGIN_MIN_PORT",
    "PLUGIN_MAX_PORT",
    "PLUGIN_PROTOCOL_VERSIONS",
    "PLUGIN_CLIENT_CERT",
    "PLUGIN_UNIX_SOCKET_DIR",
    "PLUGIN_UNIX_SOCKET_GROUP",
    "PLUGIN_MULTIPLEX_GRPC",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error(
        "this binary is a Nomad task driver plugin and is started by a Nomad agent; \
         put it in the agent's plugin_dir and add a `plugin \"nomad-driver-microvm\" {{}}` block \
         (run it with --help for the other modes)"
    )]
    NotStartedByNomad,
    #[error(
        "the Nomad agent accepts plugin protocol versions [{offered}], this plugin speaks version {APP_PROTOCOL_VERSION}"
    )]
    UnsupportedProtocol { offered: String },
}

/// Checks that a Nomad agent started us: the cookie must match exactly and
/// the host must accept protocol version 2 (absent means 2, as in go-plugin).
pub fn check_env(env: impl Fn(&str) -> Option<String>) -> Result<(), HandshakeError> {
    if env(MAGIC_COOKIE_KEY).as_deref() != Some(MAGIC_COOKIE_VALUE) {
        return Err(HandshakeError::NotStartedByNomad);
    }
    match env("PLUGIN_PROTOCOL_VERSIONS") {
        None => Ok(()),
        Some(offered) => {
            let wanted = APP_PROTOCOL_VERSION.to_string();
            if offered.split(',').any(|v| v.trim() == wanted) {
                Ok(())
            } else {
                Err(HandshakeError::UnsupportedProtocol { offered })
            }
        }
    }
}

/// The exact line go-plugin's client parses:
/// `CORE|APP|NETWORK|ADDRESS|PROTOCOL|SERVERCERT`. The certificate field stays
/// empty: Nomad never enables AutoMTLS, and a certificate there crashes it.
pub fn handshake_line(socket: &Path) -> String {
    format!("{CORE_PROTOCOL_VERSION}|{APP_PROTOCOL_VERSION}|unix|{}|grpc|\n", socket.display())
}

/// Where to put the plugin's socket: `$PLUGIN_UNIX_SOCKET_DIR`, else `$TMPDIR`,
/// else `/tmp`, with a unique `plugin<digits>` name like go-plugin's.
pub fn socket_path(env: impl Fn(&str) -> Option<String>, unique: u64) -> PathBuf {
    let dir = env("PLUGIN_UNIX_SOCKET_DIR")
        .filter(|d| !d.is_empty())
        .or_else(|| env("TMPDIR").filter(|d| !d.is_empty()))
        .unwrap_or_else(|| "/tmp".to_string());
    Path::new(&dir).join(format!("plugin{unique}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn handshake_line_is_exact() {
        assert_eq!(handshake_line(Path::new("/tmp/plugin42")), "1|2|unix|/tmp/plugin42|grpc|\n");
    }

    #[test]
    fn cookie_is_required_and_exact() {
        assert_eq!(check_env(env_of(&[])), Err(HandshakeError::NotStartedByNomad));
        assert_eq!(check_env(env_of(&[(MAGIC_COOKIE_KEY, "nope")])), Err(HandshakeError::NotStartedByNomad));
        assert_eq!(check_env(env_of(&[(MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE)])), Ok(()));
    }

    #[test]
    fn protocol_versions_must_include_two() {
        let ok = env_of(&[(MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE), ("PLUGIN_PROTOCOL_VERSIONS", "1, 2")]);
        assert_eq!(check_env(ok), Ok(()));
        let bad = env_of(&[(MAGIC_COOKIE_KEY, MAGIC_COOKIE_VALUE), ("PLUGIN_PROTOCOL_VERSIONS", "3,4")]);
        assert_eq!(check_env(bad), Err(HandshakeError::UnsupportedProtocol { offered: "3,4".into() }));
    }

    #[test]
    fn socket_dir_precedence() {
        let p = socket_path(env_of(&[("PLUGIN_UNIX_SOCKET_DIR", "/run/x"), ("TMPDIR", "/t")]), 7);
        assert_eq!(p, PathBuf::from("/run/x/plugin7"));
        let p = socket_path(env_of(&[("TMPDIR", "/t")]), 7);
        assert_eq!(p, PathBuf::from("/t/plugin7"));
        let p = socket_path(env_of(&[]), 7);
        assert_eq!(p, PathBuf::from("/tmp/plugin7"));
    }

    #[test]
    fn messages_tell_a_human_what_to_do() {
        let msg = HandshakeError::NotStartedByNomad.to_string();
        assert!(msg.contains("plugin_dir"), "{msg}");
    }
}
