//! nats-input ID SUBJECT: see man/nats-input.1.
use fifobind::cli;
use fifobind::nats::cli::NatsInput;

fn main() {
    let args: NatsInput = cli::parse("nats-input");
    cli::exit(
        "nats-input",
        fifobind::nats::cli::input_options(args).and_then(fifobind::nats::input::run),
    );
}
