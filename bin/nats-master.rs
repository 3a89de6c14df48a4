//! nats-master PREFIX DDIR: see man/nats-master.1.
use fifobind::cli;
use fifobind::nats::bus::NatsMaster;

fn main() {
    let args: NatsMaster = cli::parse("nats-master");
    fifobind::logging::to_stderr("nats-master");
    cli::exit(
        "nats-master",
        args.options().and_then(fifobind::nats::master::run),
    );
}
