//! The integration tests: the real binaries, real sockets, FIFOs and bash.

mod util;

mod bind_input;
mod bind_output;
mod hardening;
mod keys;
mod limits;
mod man;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "nats")]
mod nats_pool;
mod operate;
mod pool_master;
mod protocol2;
mod seed;
mod streams;
