//! nats-pool PREFIX: see man/nats-pool.1.
use fifobind::cli;
use fifobind::nats::bus::NatsPool;

fn main() {
    let args: NatsPool = cli::parse("nats-pool");
    fifobind::logging::to_stderr("nats-pool");
    cli::exit(
        "nats-pool",
        args.options().and_then(fifobind::nats::pool::run),
    );
}
