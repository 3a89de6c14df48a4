//! pool KEY PORT: see man/pool.1.
use fifobind::cli;

fn main() {
    let args: cli::Pool = cli::parse("pool");
    cli::exit(
        "pool",
        args.options().and_then(|o| {
            fifobind::logging::to_stderr("pool");
            fifobind::pool::run(o)
        }),
    );
}
