//! master KEY HOST PORT DDIR: see man/master.1.
use fifobind::cli;

fn main() {
    let args: cli::Master = cli::parse("master");
    cli::exit(
        "master",
        args.options().and_then(|o| {
            fifobind::logging::to_stderr("master");
            fifobind::master::run(o)
        }),
    );
}
