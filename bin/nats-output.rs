//! nats-output ID SUBJECT: see man/nats-output.1.
use fifobind::cli;
use fifobind::nats::cli::NatsOutput;

fn main() {
    let args: NatsOutput = cli::parse("nats-output");
    cli::exit(
        "nats-output",
        fifobind::nats::cli::output_options(args).and_then(fifobind::nats::output::run),
    );
}
