//! pool KEY PORT: see man/pool.1.
use fifobind::{cli, pool};

fn main() {
    let opts: pool::PoolOptions = cli::parse("pool");
    // Logging first, so that resolving the key can warn.
    fifobind::logging::to_stderr("pool");
    cli::exit("pool", opts.resolve().and_then(pool::run));
}
