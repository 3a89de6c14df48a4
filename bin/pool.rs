//! pool KEY PORT: see man/pool.1.
use fifobind::cli;

fn main() {
    let args: cli::Pool = cli::parse("pool");
    // Logging first, so that resolving the key can warn.
    fifobind::logging::to_stderr("pool");
    cli::exit("pool", args.options().and_then(fifobind::pool::run));
}
