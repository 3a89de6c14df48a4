//! `fifobind completions SHELL`: completion scripts for every command
//! of the package (the NATS ones too when built with them).
//!
//! clap_complete writes what clap knows (subcommands, options, value
//! names); what it cannot know, the names live in the runtime directory,
//! is added by hand: completing the NAME of `fifobind stop` or `fifobind
//! path` asks `fifobind list --names` at the moment of completion.

use std::io::Write;

use clap::CommandFactory;
use clap_complete::{Shell, generate};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum Target {
    Bash,
    Zsh,
    Fish,
}

#[derive(clap::Args, Debug)]
pub(crate) struct CompletionsArgs {
    /// The shell to print the completion script for
    #[arg(value_name = "SHELL", value_enum)]
    pub(crate) shell: Target,
}

/// Live names for `fifobind stop|path NAME`, after clap's own script.
const BASH_LIVE: &str = r#"
_fifobind_live() {
    local cur=${COMP_WORDS[COMP_CWORD]}
    if (( COMP_CWORD > 1 )) && [[ $cur != -* ]]; then
        case ${COMP_WORDS[1]} in
            stop|path)
                COMPREPLY=($(compgen -W "$(fifobind list --names 2>/dev/null)" -- "$cur"))
                return 0;;
        esac
    fi
    _fifobind "$@"
}
complete -F _fifobind_live -o bashdefault -o default fifobind
"#;

const ZSH_LIVE: &str = r#"
_fifobind_live() {
    if (( CURRENT > 2 )) && [[ ${words[2]} == (stop|path) && ${words[CURRENT]} != -* ]]; then
        local -a names
        names=(${(f)"$(fifobind list --names 2>/dev/null)"})
        compadd -a names
        return
    fi
    _fifobind "$@"
}
compdef _fifobind_live fifobind
"#;

const FISH_LIVE: &str = r#"
complete -c fifobind -n '__fish_seen_subcommand_from stop path' -f -a '(fifobind list --names 2>/dev/null)'
"#;

/// The script for `shell`: each command's and `fifobind`'s (whose clap
/// definition lives in its main), then the live names. The zsh one may
/// be sourced or installed as `_fifobind` in `$fpath`.
pub(crate) fn script(shell: Target, fifobind: clap::Command) -> Vec<u8> {
    let (generator, live) = match shell {
        Target::Bash => (Shell::Bash, BASH_LIVE),
        Target::Zsh => (Shell::Zsh, ZSH_LIVE),
        Target::Fish => (Shell::Fish, FISH_LIVE),
    };
    let mut commands = vec![
        ("bind-input", crate::input::InputOptions::command()),
        ("bind-output", crate::output::OutputOptions::command()),
        ("pool", crate::pool::PoolOptions::command()),
        ("master", crate::master::MasterOptions::command()),
    ];
    #[cfg(feature = "nats")]
    commands.extend([
        ("nats-output", crate::nats::cli::NatsOutput::command()),
        ("nats-input", crate::nats::cli::NatsInput::command()),
        ("nats-master", crate::nats::bus::NatsMaster::command()),
        ("nats-pool", crate::nats::bus::NatsPool::command()),
    ]);
    commands.push(("fifobind", fifobind));
    let mut out = Vec::new();
    if let Target::Zsh = shell {
        let names: Vec<&str> = commands.iter().map(|(name, _)| *name).collect();
        out.extend_from_slice(format!("#compdef {}\n", names.join(" ")).as_bytes());
    }
    for (name, mut command) in commands {
        let mut one = Vec::new();
        generate(generator, &mut command, name, &mut one);
        if let Target::Zsh = shell {
            one = zsh_part(&String::from_utf8_lossy(&one), name).into_bytes();
        }
        out.extend_from_slice(&one);
    }
    out.extend_from_slice(live.as_bytes());
    if let Target::Zsh = shell {
        out.extend_from_slice(ZSH_AUTOLOADED.as_bytes());
    }
    out
}

/// Autoloaded from a `_fifobind` file in `$fpath` (as the package installs
/// it) for any of the commands, the script has just defined their
/// functions: it completes the command at hand with its own.
const ZSH_AUTOLOADED: &str = r#"
if [[ $funcstack[1] == _fifobind ]]; then
    case $service in
        fifobind) _fifobind_live "$@" ;;
        *) _$service "$@" ;;
    esac
fi
"#;

/// One command's part of the zsh script, made fit for one file of all
/// commands, sourced or autoloaded: clap writes a file per command (its
/// own `#compdef` line, and a tail that completes at once when autoloaded
/// under its name); here they only register their functions, and
/// [`ZSH_AUTOLOADED`] completes.
fn zsh_part(text: &str, name: &str) -> String {
    let tail = format!(
        "if [ \"$funcstack[1]\" = \"_{name}\" ]; then\n    _{name} \"$@\"\nelse\n    compdef _{name} {name}\nfi\n"
    );
    let body = text
        .strip_prefix(&format!("#compdef {name}\n"))
        .unwrap_or(text);
    body.replace(&tail, &format!("compdef _{name} {name}\n"))
}

pub(crate) fn run(args: CompletionsArgs, fifobind: clap::Command) -> Result<()> {
    let text = script(args.shell, fifobind);
    match std::io::stdout().lock().write_all(&text) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::io("cannot write the completion script", &e))
        }
        _ => Ok(()),
    }
}
