//! What the pusher reads. Hook output reaches `git push` as `remote:` lines,
//! so every line is tagged with the branch it is about: with several refs in
//! one push, the deploy logs follow each other and stay readable.

use std::fmt::Display;

pub struct Log {
    tag: String,
}

impl Log {
    pub fn new(tag: impl Display) -> Log {
        Log { tag: tag.to_string() }
    }

    /// One line.
    pub fn say(&self, msg: impl Display) {
        eprintln!("[{}] {msg}", self.tag);
    }

    /// Command output, indented under the line that introduced it.
    pub fn quote(&self, lines: &[String]) {
        for line in lines {
            eprintln!("[{}]   | {line}", self.tag);
        }
    }
}

/// The short form of a commit or Nomad ID.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}
