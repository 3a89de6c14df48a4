//! bind-input ID PORT: see man/bind-input.1.
use fifobind::{cli, input};

fn main() {
    let opts: input::InputOptions = cli::parse("bind-input");
    cli::exit("bind-input", opts.resolve().and_then(input::run));
}
