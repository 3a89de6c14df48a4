//! bind-output ID HOST PORT: see man/bind-output.1.
use fifobind::{cli, output};

fn main() {
    let opts: output::OutputOptions = cli::parse("bind-output");
    cli::exit("bind-output", opts.resolve().and_then(output::run));
}
