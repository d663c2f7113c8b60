//! What the pusher reads. Hook output reaches `git push` as `remote:` lines,
//! so every line is tagged with the branch it is about: with several refs in
//! one push, the deploy logs follow each other and stay readable.

use std::fmt::Display;
use std::io::Write;

pub struct Log {
    tag: String,
}

impl Log {
    pub fn new(tag: impl Display) -> Log {
        Log { tag: tag.to_string() }
    }

    /// One line. A pusher who hung up must not make the hook fail half way
    /// (e.g. between registering a job and recording it): write errors are
    /// ignored, where `eprintln!` would panic.
    pub fn say(&self, msg: impl Display) {
        let _ = writeln!(std::io::stderr(), "[{}] {msg}", self.tag);
    }

    /// Command output, indented under the line that introduced it.
    pub fn quote(&self, lines: &[String]) {
        let mut err = std::io::stderr().lock();
        for line in lines {
            let _ = writeln!(err, "[{}]   | {line}", self.tag);
        }
    }
}

/// The short form of a commit or Nomad ID.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}
