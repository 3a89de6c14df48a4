//! The man pages against the code, so the two never drift apart: every
//! long option clap knows is documented in its command's page, every page
//! has the fixed sections in the fixed order, and mandoc finds nothing to
//! complain about.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use clap::CommandFactory;

/// How to get a command's clap definition.
type Definition = fn() -> clap::Command;

/// Each command with its clap definition; its page is `man/<name>.1`.
const COMMANDS: &[(&str, Definition)] = &[
    ("bind-input", fifobind::cli::BindInput::command),
    ("bind-output", fifobind::cli::BindOutput::command),
    ("pool", fifobind::cli::Pool::command),
    ("master", fifobind::cli::Master::command),
];

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

/// Not merely named somewhere: each option is the tag of an item of
/// OPTIONS (`.TP` then `.BR \-b ", " \-\-bind " \fIADDR\fR"`).
#[test]
fn every_long_option_has_an_item_in_the_options_section_of_its_page() {
    let mut missing = Vec::new();
    for (name, command) in COMMANDS {
        let mut cmd = command();
        // Building adds what clap generates: --help and --version.
        cmd.build();
        let tags = item_tags(section(&page(name), "OPTIONS"));
        let longs: Vec<String> = cmd
            .get_arguments()
            .filter_map(|arg| arg.get_long())
            .map(|long| format!("--{long}"))
            .collect();
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
    for (name, _) in COMMANDS {
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

#[test]
fn bind_input_page_shows_the_seed_loop_as_written() {
    let seed = "\
pid=$(bind-input in1 9999)
fifo=${FIFOBIND_DIR:-$XDG_RUNTIME_DIR/fifobind}/in1
while true; do
    read -t 1 line < \"$fifo\"
    [ -z \"$line\" ] && continue      # nothing received this second
    [ \"$line\" = END ] && break
    echo \"got: $line\"
done
kill \"$pid\"
";
    let examples = plain(section(&page("bind-input"), "EXAMPLES"));
    assert!(
        examples.contains(seed),
        "the EXAMPLES of man/bind-input.1 lack the seed's loop, as written:\n{seed}"
    );
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
            eprintln!(
                "SKIPPED mandoc_finds_nothing_to_say_about_any_page: mandoc is not installed \
                 (apt-get install mandoc)"
            );
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
