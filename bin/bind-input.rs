//! bind-input ID PORT: see man/bind-input.1.
use fifobind::cli;

fn main() {
    let args: cli::BindInput = cli::parse("bind-input");
    cli::exit("bind-input", args.options().and_then(fifobind::input::run));
}
