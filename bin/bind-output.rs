//! bind-output ID HOST PORT: see man/bind-output.1.
use fifobind::cli;

fn main() {
    let args: cli::BindOutput = cli::parse("bind-output");
    cli::exit(
        "bind-output",
        args.options().and_then(fifobind::output::run),
    );
}
