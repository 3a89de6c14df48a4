//! The man pages against the code, so the two never drift apart: every
//! long option clap knows is documented in its command's page, every page
//! has the fixed sections in the fixed order, and mandoc finds nothing to
//! complain about.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;

use crate::util::{SEED_LOOP, skip_or_fail};

/// How to get a command's clap definition.
type Definition = fn() -> clap::Command;

/// Each command with its clap definition; its page is `man/<name>.1`.
const COMMANDS: &[(&str, Definition)] = &[
    ("bind-input", fifobind::input::InputOptions::command),
    ("bind-output", fifobind::output::OutputOptions::command),
    ("pool", fifobind::pool::PoolOptions::command),
    ("master", fifobind::master::MasterOptions::command),
    ("fifobind", fifobind::ctl::Fifobind::command),
];

/// The NATS commands, when built (cargo feature `nats`).
#[cfg(feature = "nats")]
const NATS_COMMANDS: &[(&str, Definition)] = &[
    ("nats-output", fifobind::nats::cli::NatsOutput::command),
    ("nats-input", fifobind::nats::cli::NatsInput::command),
    ("nats-master", fifobind::nats::bus::NatsMaster::command),
    ("nats-pool", fifobind::nats::bus::NatsPool::command),
];
#[cfg(not(feature = "nats"))]
const NATS_COMMANDS: &[(&str, Definition)] = &[];

/// The sections every page has, in this order; others (NOTES, BUGS) may
/// come between them.
pub(crate) const SECTIONS: &[&str] = &[
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "OPTIONS",
    "EXIT STATUS",
    "SIGNALS",
    "FILES",
    "ENVIRONMENT",
    "EXAMPLES",
    "SEE ALSO",
];

fn man_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("man")
}

pub(crate) fn page(command: &str) -> String {
    let path = man_dir().join(format!("{command}.1"));
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Roff source as a reader sees the words: font changes dropped, escaped
/// characters turned into the characters they print. Macro names stay,
/// which does not matter for searching.
fn plain(roff: &str) -> String {
    let mut out = String::with_capacity(roff.len());
    let mut chars = roff.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            // \fB \fI \fR \fP, \f(CW, \f[...]
            Some('f') => match chars.next() {
                Some('(') => {
                    chars.next();
                    chars.next();
                }
                Some('[') => {
                    for c in chars.by_ref() {
                        if c == ']' {
                            break;
                        }
                    }
                }
                _ => {}
            },
            // \(xx special characters
            Some('(') => {
                let name: String = chars.by_ref().take(2).collect();
                out.push_str(match name.as_str() {
                    "aq" => "'",
                    "dq" => "\"",
                    "ga" => "`",
                    "lq" | "rq" => "\"",
                    "hy" | "mi" => "-",
                    "ti" => "~",
                    "ha" => "^",
                    _ => "",
                });
            }
            Some('-') => out.push('-'),
            Some('e') | Some('\\') => out.push('\\'),
            Some('~') | Some(' ') => out.push(' '),
            // \& \% \c \| \^: zero width
            Some('&') | Some('%') | Some('c') | Some('|') | Some('^') => {}
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// The section headings of a page, as written after `.SH`.
pub(crate) fn headings(roff: &str) -> Vec<String> {
    roff.lines()
        .filter_map(|l| l.strip_prefix(".SH"))
        .map(|rest| plain(rest).trim().trim_matches('"').to_string())
        .collect()
}

/// The text of section `name` (up to the next `.SH`).
pub(crate) fn section<'a>(roff: &'a str, name: &str) -> &'a str {
    let mut start = None;
    let mut offset = 0;
    for line in roff.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix(".SH") {
            if let Some(start) = start {
                return &roff[start..offset];
            }
            if plain(rest).trim().trim_matches('"') == name {
                start = Some(offset + line.len());
            }
        }
        offset += line.len();
    }
    match start {
        Some(s) => &roff[s..],
        None => "",
    }
}

/// The tags of the items of a section: the line after each `.TP` or
/// `.TQ`, and the argument of each `.IP`, as printed.
pub(crate) fn item_tags(section: &str) -> Vec<String> {
    let mut tags = Vec::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        let macro_name = line.split_whitespace().next().unwrap_or("");
        match macro_name {
            ".TP" | ".TQ" => {
                if let Some(tag) = lines.next() {
                    tags.push(plain(tag));
                }
            }
            ".IP" => tags.push(plain(&line[3..])),
            _ => {}
        }
    }
    tags
}

/// Whether `text` holds `option` as a whole word: `--once` but not the
/// start of `--once-more`.
pub(crate) fn mentions(text: &str, option: &str) -> bool {
    text.match_indices(option).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + option.len()..].chars().next();
        let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-');
        !word(before) && !word(after)
    })
}

/// The long options of `cmd` and of its subcommands, as `--name`.
fn long_options(cmd: &clap::Command, into: &mut Vec<String>) {
    // A hidden option (`fifobind list --names`, for completion) is no
    // user's interface, so no page's.
    let shown = cmd.get_arguments().filter(|arg| !arg.is_hide_set());
    for long in shown.filter_map(|arg| arg.get_long()) {
        let long = format!("--{long}");
        if !into.contains(&long) {
            into.push(long);
        }
    }
    for sub in cmd.get_subcommands() {
        long_options(sub, into);
    }
}

/// A command with subcommands (fifobind) has each of them as the tag of an
/// item of its COMMANDS section, as `.BI path " ID"` prints it.
#[test]
fn every_subcommand_has_an_item_in_the_commands_section_of_its_page() {
    let mut missing = Vec::new();
    for (name, command) in COMMANDS.iter().chain(NATS_COMMANDS) {
        let mut cmd = command();
        cmd.build();
        let tags = item_tags(section(&page(name), "COMMANDS"));
        for sub in cmd.get_subcommands() {
            let sub = sub.get_name();
            if !tags.iter().any(|tag| {
                plain(tag)
                    .split_whitespace()
                    .map(|w| w.trim_matches('"'))
                    .any(|w| w == sub)
            }) {
                missing.push(format!("{name} {sub}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "subcommands without an item (.TP tag) in the COMMANDS section of their man page:\n  {}",
        missing.join("\n  ")
    );
}

/// Not merely named somewhere: each option is the tag of an item of
/// OPTIONS (`.TP` then `.BR \-b ", " \-\-bind " \fIADDR\fR"`).
#[test]
fn every_long_option_has_an_item_in_the_options_section_of_its_page() {
    let mut missing = Vec::new();
    for (name, command) in COMMANDS.iter().chain(NATS_COMMANDS) {
        let mut cmd = command();
        // Building adds what clap generates: --help and --version.
        cmd.build();
        let tags = item_tags(section(&page(name), "OPTIONS"));
        let mut longs: Vec<String> = Vec::new();
        long_options(&cmd, &mut longs);
        assert!(
            longs.iter().any(|l| l == "--help") && longs.iter().any(|l| l == "--version"),
            "{name}: clap's own --help and --version not seen: {longs:?}"
        );
        for long in longs {
            if !tags.iter().any(|tag| mentions(tag, &long)) {
                missing.push(format!("{name}: {long}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "options without an item (.TP tag) in the OPTIONS section of their man page:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn every_page_has_the_fixed_sections_in_order() {
    for (name, _) in COMMANDS.iter().chain(NATS_COMMANDS) {
        let found = headings(&page(name));
        let mut rest = found.iter();
        for wanted in SECTIONS {
            assert!(
                rest.any(|h| h == wanted),
                "man/{name}.1: section {wanted} missing or out of order; headings: {found:?}"
            );
        }
    }
}

/// The pages show the reading loop that times out between lines only (see
/// tests/it/seed.rs, which runs it), not the naive one that splits lines.
#[test]
fn pages_show_the_documented_reading_loop() {
    for (page_name, path) in [
        ("bind-input(1) EXAMPLES", man_dir().join("bind-input.1")),
        ("fifobind(7) EXAMPLES", man_dir().join("fifobind.7")),
    ] {
        let roff = fs::read_to_string(&path).unwrap();
        let examples = plain(section(&roff, "EXAMPLES"));
        assert!(
            examples.contains(SEED_LOOP),
            "{page_name} lacks the documented loop, as written:\n{SEED_LOOP}"
        );
    }
    // The pages (and parts) this holds for; the others' examples follow.
    let read = |name: &str| fs::read_to_string(man_dir().join(name)).unwrap();
    let bind_input = read("bind-input.1");
    let texts = [
        ("fifobind.7", plain(&read("fifobind.7"))),
        ("fifobind.1", plain(&read("fifobind.1"))),
        (
            "bind-input.1 EXAMPLES",
            plain(section(&bind_input, "EXAMPLES")),
        ),
        ("bind-input.1 NOTES", plain(section(&bind_input, "NOTES"))),
    ];
    for (name, text) in texts {
        assert!(
            !text.contains("read -t 1 line <"),
            "{name} still shows the naive `read -t 1 line`, which splits lines"
        );
        assert!(
            !text.contains("${FIFOBIND_DIR:-$XDG_RUNTIME_DIR/fifobind}"),
            "{name} still spells the FIFO path as ${{FIFOBIND_DIR:-$XDG_RUNTIME_DIR/fifobind}}, \
             wrong when neither is set: use $(fifobind path ID)"
        );
    }
}

/// Every page in man/ (a section digit after the last dot).
fn all_pages() -> Vec<PathBuf> {
    let mut pages: Vec<PathBuf> = fs::read_dir(man_dir())
        .expect("man/ exists")
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.len() == 1 && e.as_bytes()[0].is_ascii_digit())
        })
        .collect();
    pages.sort();
    pages
}

#[test]
fn mandoc_finds_nothing_to_say_about_any_page() {
    let pages = all_pages();
    assert!(!pages.is_empty(), "no man page in {}", man_dir().display());
    let out = match Command::new("mandoc")
        .args(["-Tlint", "-Wwarning"])
        .args(&pages)
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            skip_or_fail("mandoc is not installed (apt-get install mandoc)");
            return;
        }
        Err(e) => panic!("cannot run mandoc: {e}"),
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.is_empty(),
        "mandoc -Tlint -Wwarning {pages:?} ({}):\n{said}",
        out.status
    );
}

#[test]
fn plain_reads_roff_as_printed() {
    assert_eq!(plain(r"\fB\-\-once\fR"), "--once");
    assert_eq!(plain(r".BR \-b , \-\-bind"), ".BR -b , --bind");
    assert_eq!(plain(r"\(aqa\en\(aq \e \&."), r"'a\n' \ .");
    assert_eq!(plain(r"\f(CWx\fP \f[B]y\f[]"), "x y");
    assert!(mentions("--once.", "--once"));
    assert!(!mentions("--once-more", "--once"));
    assert!(!mentions("x--once", "--once"));
    let options = r#".SH OPTIONS
Text naming \-\-help.
.TP
.BR \-b ", " \-\-bind " \fIADDR\fR"
Listen.
.IP "\-\-once"
"#;
    assert_eq!(
        item_tags(section(options, "OPTIONS")),
        [r#".BR -b ", " --bind " ADDR""#, r#" "--once""#]
    );
}
