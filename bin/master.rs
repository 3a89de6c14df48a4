//! master KEY HOST PORT DDIR: see man/master.1.
use fifobind::{cli, master};

fn main() {
    let opts: master::MasterOptions = cli::parse("master");
    // Logging first, so that resolving the key can warn.
    fifobind::logging::to_stderr("master");
    cli::exit("master", opts.resolve().and_then(master::run));
}
