//! fifobind SUBCOMMAND: see man/fifobind.1.
use fifobind::{cli, ctl};

fn main() {
    let args: ctl::Fifobind = cli::parse("fifobind");
    cli::exit("fifobind", ctl::run(args));
}
