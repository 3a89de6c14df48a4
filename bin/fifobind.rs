//! fifobind list|stop|completions: see man/fifobind.1.
use clap::{CommandFactory, Parser, Subcommand};
use fifobind::{cli, completions, ctl_list, ctl_stop};

/// What runs in the runtime directory: list it, stop it, complete it.
#[derive(Parser, Debug)]
#[command(name = "fifobind", version)]
struct Fifobind {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List every live binding, pool and master, with its figures
    #[command(visible_alias = "ls")]
    List(ctl_list::ListArgs),
    /// Stop bindings, pools and masters by name, and wait until they are gone
    Stop(ctl_stop::StopArgs),
    /// Print the completion script of the five commands for a shell
    Completions(completions::CompletionsArgs),
}

fn main() {
    let args: Fifobind = cli::parse("fifobind");
    let result = match args.command {
        Command::List(a) => ctl_list::run(a),
        Command::Stop(a) => ctl_stop::run(a),
        Command::Completions(a) => completions::run(a, Fifobind::command()),
    };
    cli::exit("fifobind", result);
}
