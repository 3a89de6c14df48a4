//! master KEY HOST PORT DDIR: see man/master.1.
use fifobind::cli;

fn main() {
    let args: cli::Master = cli::parse("master");
    // Logging first, so that resolving the key can warn.
    fifobind::logging::to_stderr("master");
    cli::exit("master", args.options().and_then(fifobind::master::run));
}
