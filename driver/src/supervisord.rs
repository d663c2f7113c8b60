//! Reading the supervisord configuration that a runner's `bin/virtiofsd-run`
//! starts supervisord with, to get one virtiofsd command per share.
//!
//! microvm.nix records per-share virtiofsd flags (`--readonly`, `--cache`,
//! `--posix-acl`, `--tag` for crosvm, extra arguments) nowhere but in this INI:
//! each `[program:virtiofsd-<tag>]` has a `command=` that is a store-path
//! script exec'ing virtiofsd with all of them. The driver runs those commands
//! itself instead of supervisord, whose only readiness signal is a
//! `systemd-notify` call that goes nowhere outside systemd and which does not
//! restart virtiofsd after the VMM disconnects.
//!
//! The parser follows supervisord's reading (Python's `RawConfigParser` with
//! inline comments, then `shlex.split` for `command`) closely enough for the
//! files `lib.generators.toINI` writes and for hand-written ones; other
//! sections are checked for syntax only.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Sections of this form describe one virtiofsd each; the rest is the tag.
const PROGRAM_PREFIX: &str = "program:virtiofsd-";

/// One `[program:virtiofsd-<tag>]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtiofsdProgram {
    /// The share's tag, as in `share/microvm/virtiofs/<tag>`.
    pub tag: String,
    /// The `command=` value split into argv the way supervisord splits it.
    pub command: Vec<String>,
    /// `environment=` pairs in file order; empty without that key.
    pub environment: Vec<(String, String)>,
}

/// Why the text is not a usable supervisord configuration.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("line {line}: `{text}` comes before any [section]")]
    OutsideSection { line: usize, text: String },
    #[error("line {line}: expected `key = value` or `[section]`, found `{text}`")]
    Malformed { line: usize, text: String },
    #[error("line {line}: [{PROGRAM_PREFIX}] has no share tag")]
    EmptyTag { line: usize },
    #[error("line {line}: [{PROGRAM_PREFIX}{tag}] appears a second time")]
    DuplicateTag { line: usize, tag: String },
    #[error("[{section}] has no command")]
    MissingCommand { section: String },
    #[error("[{section}] has an unusable `{key}`")]
    BadValue {
        section: String,
        key: &'static str,
        #[source]
        source: ValueError,
    },
}

/// What is wrong inside a `command=` or `environment=` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("a `{0}` quote is never closed")]
    UnclosedQuote(char),
    #[error("it ends in a lone backslash")]
    TrailingBackslash,
    #[error("it uses supervisord's `%` expansion, which is not supported (write `%%` for `%`)")]
    Expansion,
    #[error("`{0}` is not KEY=value")]
    NotKeyValue(String),
}

/// Why a supervisord configuration file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SupervisordError {
    #[error("cannot read supervisord configuration {}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("supervisord configuration {} is invalid", .path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: ParseError,
    },
}

/// Reads the file at `path` (usually a store path) and parses it.
pub fn read(path: &Path) -> Result<Vec<VirtiofsdProgram>, SupervisordError> {
    let text = fs::read_to_string(path).map_err(|source| SupervisordError::Read { path: path.into(), source })?;
    parse(&text).map_err(|source| SupervisordError::Parse { path: path.into(), source })
}

/// The virtiofsd programs of a supervisord configuration, in file order.
pub fn parse(text: &str) -> Result<Vec<VirtiofsdProgram>, ParseError> {
    let mut programs = Vec::new();
    let mut tags = HashSet::new();
    for section in parse_ini(text)? {
        let Some(tag) = section.name.strip_prefix(PROGRAM_PREFIX) else {
            continue;
        };
        if tag.is_empty() {
            return Err(ParseError::EmptyTag { line: section.line });
        }
        // supervisord would merge the two sections; for us that is a
        // configuration mistake, as two virtiofsd would serve one tag.
        if !tags.insert(tag.to_owned()) {
            return Err(ParseError::DuplicateTag { line: section.line, tag: tag.into() });
        }
        programs.push(program(&section, tag)?);
    }
    Ok(programs)
}

fn program(section: &Section, tag: &str) -> Result<VirtiofsdProgram, ParseError> {
    let bad_value = |key, source| ParseError::BadValue { section: section.name.clone(), key, source };
    let command = match section.get("command") {
        Some(text) => {
            expand_percent(&text).and_then(|text| split_command(&text)).map_err(|err| bad_value("command", err))?
        }
        None => Vec::new(),
    };
    if command.is_empty() {
        return Err(ParseError::MissingCommand { section: section.name.clone() });
    }
    let environment = match section.get("environment") {
        Some(text) => expand_percent(&text)
            .and_then(|text| parse_environment(&text))
            .map_err(|err| bad_value("environment", err))?,
        None => Vec::new(),
    };
    Ok(VirtiofsdProgram { tag: tag.into(), command, environment })
}

/// One `[name]` with its options as (lowercased key, value lines).
struct Section {
    name: String,
    /// Where the header is, for error messages.
    line: usize,
    /// Later duplicates win, as in Python's parser.
    options: Vec<(String, Vec<String>)>,
}

impl Section {
    /// The value of `key`, continuation lines joined by `\n`.
    fn get(&self, key: &str) -> Option<String> {
        let (_, lines) = self.options.iter().rev().find(|(k, _)| k == key)?;
        Some(lines.join("\n").trim_end().to_owned())
    }
}

/// Splits INI text into sections like Python's `RawConfigParser` with
/// `inline_comment_prefixes=(';', '#')`, as supervisord configures it.
fn parse_ini(text: &str) -> Result<Vec<Section>, ParseError> {
    let mut sections: Vec<Section> = Vec::new();
    // Indentation of the line that started the current option; deeper
    // indented lines continue its value. `None` right after a header.
    let mut option_indent: Option<usize> = None;
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let (content, had_comment) = strip_comment(raw);
        let value = content.trim();
        let current = sections.last_mut();
        if value.is_empty() {
            // Blank lines belong to a value being continued (trailing ones
            // are trimmed when it is read); comment lines do not.
            if let (Some(section), Some(_), false) = (current, option_indent, had_comment)
                && let Some((_, lines)) = section.options.last_mut()
            {
                lines.push(String::new());
            }
            continue;
        }
        let indent = raw.len() - raw.trim_start().len();
        if let (Some(section), Some(level)) = (current, option_indent)
            && indent > level
        {
            if let Some((_, lines)) = section.options.last_mut() {
                lines.push(value.to_owned());
            }
            continue;
        }
        if let Some(name) = section_header(value) {
            sections.push(Section { name: name.into(), line, options: Vec::new() });
            option_indent = None;
            continue;
        }
        let Some(section) = sections.last_mut() else {
            return Err(ParseError::OutsideSection { line, text: value.into() });
        };
        let (key, first) = split_option(value).ok_or_else(|| ParseError::Malformed { line, text: value.into() })?;
        section.options.push((key, vec![first.into()]));
        option_indent = Some(indent);
    }
    Ok(sections)
}

/// Cuts an inline or full-line comment: `;` or `#` at the start of the line
/// or after whitespace. Returns the rest and whether a comment was cut.
fn strip_comment(line: &str) -> (&str, bool) {
    let mut previous_is_space = true;
    for (index, c) in line.char_indices() {
        if (c == ';' || c == '#') && previous_is_space {
            return (&line[..index], true);
        }
        previous_is_space = c.is_whitespace();
    }
    (line, false)
}

/// `[name]` → `name` (up to the last `]`, like Python's `SECTCRE`).
fn section_header(value: &str) -> Option<&str> {
    let inner = value.strip_prefix('[')?;
    let end = inner.rfind(']')?;
    (end > 0).then(|| &inner[..end])
}

/// `key = value` or `key: value`, split at the first delimiter.
fn split_option(value: &str) -> Option<(String, &str)> {
    let at = value.find(['=', ':'])?;
    let key = value[..at].trim();
    if key.is_empty() {
        return None;
    }
    Some((key.to_lowercase(), value[at + 1..].trim()))
}

/// supervisord formats `command` and `environment` with Python's `%`
/// operator; we support only the `%%` escape, and reject the rest rather
/// than run something that differs from what supervisord would run.
fn expand_percent(text: &str) -> Result<String, ValueError> {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
        } else if chars.next() == Some('%') {
            out.push('%');
        } else {
            return Err(ValueError::Expansion);
        }
    }
    Ok(out)
}

/// Splits a command line like Python's `shlex.split` (POSIX mode), which
/// supervisord uses: whitespace separates words, `'…'` is literal, `"…"`
/// honours `\"` and `\\`, and a backslash outside quotes escapes any character.
fn split_command(text: &str) -> Result<Vec<String>, ValueError> {
    let mut words = Vec::new();
    // `Some` once a word has started, so that `''` yields an empty argument.
    let mut word: Option<String> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => words.extend(word.take()),
            '\'' => {
                let word = word.get_or_insert_default();
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err(ValueError::UnclosedQuote('\'')),
                    }
                }
            }
            '"' => read_double_quoted(&mut chars, word.get_or_insert_default())?,
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_default().push(c),
                None => return Err(ValueError::TrailingBackslash),
            },
            c => word.get_or_insert_default().push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

/// The rest of a `"…"` word, after its opening quote.
fn read_double_quoted(chars: &mut std::str::Chars<'_>, word: &mut String) -> Result<(), ValueError> {
    loop {
        match chars.next() {
            Some('"') => return Ok(()),
            Some('\\') => match chars.next() {
                Some(c @ ('"' | '\\')) => word.push(c),
                Some(c) => {
                    word.push('\\');
                    word.push(c);
                }
                None => return Err(ValueError::UnclosedQuote('"')),
            },
            Some(c) => word.push(c),
            None => return Err(ValueError::UnclosedQuote('"')),
        }
    }
}

/// `KEY="val",KEY2=val2`: a simplified reading of supervisord's
/// `dict_of_key_value_pairs` — commas inside quotes do not separate pairs,
/// and one pair of quotes around a value is dropped.
fn parse_environment(text: &str) -> Result<Vec<(String, String)>, ValueError> {
    let mut pairs = Vec::new();
    for item in split_outside_quotes(text, ',')? {
        let item = item.trim();
        // supervisord accepts a trailing comma.
        if item.is_empty() {
            continue;
        }
        let Some((key, value)) = item.split_once('=') else {
            return Err(ValueError::NotKeyValue(item.into()));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(ValueError::NotKeyValue(item.into()));
        }
        pairs.push((key.to_owned(), unquote(value.trim()).to_owned()));
    }
    Ok(pairs)
}

fn split_outside_quotes(text: &str, separator: char) -> Result<Vec<&str>, ValueError> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quote: Option<char> = None;
    for (index, c) in text.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == separator => {
                parts.push(&text[start..index]);
                start = index + c.len_utf8();
            }
            None => {}
        }
    }
    if let Some(q) = quote {
        return Err(ValueError::UnclosedQuote(q));
    }
    parts.push(&text[start..]);
    Ok(parts)
}

fn unquote(value: &str) -> &str {
    ['"', '\''].into_iter().find_map(|q| value.strip_prefix(q)?.strip_suffix(q)).unwrap_or(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `lib.generators.toINI` writes for two shares (sections sorted).
    const MICROVM_NIX: &str = "\
[eventlistener:notify]
buffer_size=48
command=/nix/store/1x2y3z-supervisord-event-handler
events=PROCESS_STATE

[program:virtiofsd-ro-store]
command=/nix/store/aaaa-virtiofsd-ro-store
stderr_syslog=true
stdout_syslog=true

[program:virtiofsd-var-lib]
command=/nix/store/bbbb-virtiofsd-var-lib
stderr_syslog=true
stdout_syslog=true

[supervisord]
nodaemon=true
user=root
";

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    fn only_program(text: &str) -> VirtiofsdProgram {
        let mut programs = parse(text).expect("valid configuration");
        assert_eq!(programs.len(), 1, "{programs:?}");
        programs.remove(0)
    }

    #[test]
    fn microvm_nix_configuration() {
        let programs = parse(MICROVM_NIX).expect("valid configuration");
        assert_eq!(
            programs,
            [
                VirtiofsdProgram {
                    tag: "ro-store".into(),
                    command: args(&["/nix/store/aaaa-virtiofsd-ro-store"]),
                    environment: Vec::new(),
                },
                VirtiofsdProgram {
                    tag: "var-lib".into(),
                    command: args(&["/nix/store/bbbb-virtiofsd-var-lib"]),
                    environment: Vec::new(),
                },
            ]
        );
    }

    #[test]
    fn ignores_other_programs() {
        let text = "[program:other]\ncommand=/bin/other\n[program:virtiofsd-x]\ncommand=/bin/x\n";
        assert_eq!(only_program(text).tag, "x");
    }

    #[test]
    fn spaces_delimiters_and_key_case() {
        let text = "[program:virtiofsd-home]\n  Command =  /bin/virtiofsd --shared-dir=/home  \n";
        assert_eq!(only_program(text).command, args(&["/bin/virtiofsd", "--shared-dir=/home"]));
        let text = "[program:virtiofsd-home]\ncommand: /bin/virtiofsd --cache=auto\n";
        assert_eq!(only_program(text).command, args(&["/bin/virtiofsd", "--cache=auto"]));
    }

    #[test]
    fn quoting() {
        let text = r#"[program:virtiofsd-data]
command=/bin/virtiofsd --shared-dir='/srv/my data' "--socket-path=a \"b\" c\d" x\ y '' --tag=data
"#;
        assert_eq!(
            only_program(text).command,
            args(&[
                "/bin/virtiofsd",
                "--shared-dir=/srv/my data",
                r#"--socket-path=a "b" c\d"#,
                "x y",
                "",
                "--tag=data",
            ])
        );
    }

    #[test]
    fn bad_quoting() {
        let cases = [
            ("command=/bin/v 'open", ValueError::UnclosedQuote('\'')),
            ("command=/bin/v \"open", ValueError::UnclosedQuote('"')),
            ("command=/bin/v \\", ValueError::TrailingBackslash),
            ("command=/bin/v %(ENV_HOME)s", ValueError::Expansion),
        ];
        for (line, expected) in cases {
            let err = parse(&format!("[program:virtiofsd-a]\n{line}\n")).unwrap_err();
            match &err {
                ParseError::BadValue { section, key: "command", source } => {
                    assert_eq!(section, "program:virtiofsd-a");
                    assert_eq!(source, &expected);
                }
                other => panic!("{line}: unexpected {other:?}"),
            }
        }
        let text = "[program:virtiofsd-a]\ncommand=/bin/v --opt=100%%\n";
        assert_eq!(only_program(text).command, args(&["/bin/v", "--opt=100%"]));
    }

    #[test]
    fn continuation_lines() {
        let text = "\
[program:virtiofsd-store]
command = /bin/virtiofsd
    --socket-path=store.sock

  ; a comment between continuation lines
\t--shared-dir=/nix/store
stdout_syslog=true
";
        assert_eq!(
            only_program(text).command,
            args(&["/bin/virtiofsd", "--socket-path=store.sock", "--shared-dir=/nix/store"])
        );
        // A value may start on the next line.
        let text = "[program:virtiofsd-store]\ncommand=\n  /bin/virtiofsd\n";
        assert_eq!(only_program(text).command, args(&["/bin/virtiofsd"]));
    }

    #[test]
    fn comments() {
        let text = "\
; leading comment
# another
[program:virtiofsd-a] ; trailing comment on a header
command=/bin/v --x=a;b --y=c#d ; inline comment
  # indented comment
environment=A=1 # comment
";
        let program = only_program(text);
        assert_eq!(program.command, args(&["/bin/v", "--x=a;b", "--y=c#d"]));
        assert_eq!(program.environment, [("A".to_owned(), "1".to_owned())]);
    }

    #[test]
    fn environment() {
        let text = "[program:virtiofsd-a]\ncommand=/bin/v\nenvironment=PATH=\"/bin:/usr/bin\", LANG='C,UTF-8',X=y,\n";
        assert_eq!(
            only_program(text).environment,
            [
                ("PATH".to_owned(), "/bin:/usr/bin".to_owned()),
                ("LANG".to_owned(), "C,UTF-8".to_owned()),
                ("X".to_owned(), "y".to_owned()),
            ]
        );
        let err = parse("[program:virtiofsd-a]\ncommand=/bin/v\nenvironment=A=1,B\n").unwrap_err();
        assert!(
            matches!(&err, ParseError::BadValue { key: "environment", source: ValueError::NotKeyValue(item), .. } if item == "B"),
            "{err:?}"
        );
    }

    #[test]
    fn missing_command() {
        for text in ["[program:virtiofsd-a]\nstdout_syslog=true\n", "[program:virtiofsd-a]\ncommand=\n"] {
            let err = parse(text).unwrap_err();
            assert!(
                matches!(&err, ParseError::MissingCommand { section } if section == "program:virtiofsd-a"),
                "{err:?}"
            );
            assert_eq!(err.to_string(), "[program:virtiofsd-a] has no command");
        }
    }

    #[test]
    fn duplicate_tag() {
        let text = "[program:virtiofsd-a]\ncommand=/bin/a\n\n[program:virtiofsd-a]\ncommand=/bin/b\n";
        let err = parse(text).unwrap_err();
        assert!(matches!(&err, ParseError::DuplicateTag { line: 4, tag } if tag == "a"), "{err:?}");
        assert_eq!(err.to_string(), "line 4: [program:virtiofsd-a] appears a second time");
    }

    #[test]
    fn empty_tag() {
        let err = parse("[program:virtiofsd-]\ncommand=/bin/a\n").unwrap_err();
        assert!(matches!(err, ParseError::EmptyTag { line: 1 }), "{err:?}");
    }

    #[test]
    fn syntax_errors() {
        let err = parse("command=/bin/a\n").unwrap_err();
        assert!(matches!(err, ParseError::OutsideSection { line: 1, .. }), "{err:?}");
        let err = parse("[supervisord]\nnodaemon=true\njust words\n").unwrap_err();
        assert!(matches!(&err, ParseError::Malformed { line: 3, text } if text == "just words"), "{err:?}");
        let err = parse("[supervisord]\n= value\n").unwrap_err();
        assert!(matches!(err, ParseError::Malformed { line: 2, .. }), "{err:?}");
    }

    #[test]
    fn no_programs() {
        assert_eq!(parse("").expect("empty is valid"), []);
        assert_eq!(parse("[supervisord]\nnodaemon=true\n").expect("valid"), []);
    }

    #[test]
    fn read_names_the_file() {
        let dir = tempfile::TempDir::new().expect("temp dir");
        let path = dir.path().join("vm-virtiofsd-supervisord.conf");
        let err = read(&path).unwrap_err();
        assert!(matches!(err, SupervisordError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("vm-virtiofsd-supervisord.conf"), "{err}");

        fs::write(&path, MICROVM_NIX).expect("write");
        let programs = read(&path).expect("valid file");
        assert_eq!(programs.len(), 2);

        fs::write(&path, "[program:virtiofsd-a]\n").expect("write");
        let err = read(&path).unwrap_err();
        assert!(matches!(&err, SupervisordError::Parse { source: ParseError::MissingCommand { .. }, .. }), "{err:?}");
        assert_eq!(err.to_string(), format!("supervisord configuration {} is invalid", path.display()));
    }
}
