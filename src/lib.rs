//! fifobind: join TCP sockets to named pipes, for shell scripts.
//!
//! The five commands in `bin/` are thin mains over this library; each
//! module below owns one concern.

mod activation;
mod args;
mod background;
mod binding;
mod claim;
pub mod cli;
mod completions;
pub mod ctl;
mod ctl_list;
mod ctl_stop;
mod daemons;
mod door;
pub mod error;
mod fifo;
mod framer;
pub mod input;
pub mod logging;
pub mod master;
/// The NATS commands' code (tokio, async-nats): only in their binaries.
#[cfg(feature = "nats")]
pub mod nats;
mod net;
mod notify;
pub mod output;
mod penalty;
mod poll;
pub mod pool;
mod process;
pub mod protocol;
mod registry;
mod runtime_dir;
pub mod secure;
mod signals;
mod spool;
mod status;
mod stream;
mod supervise;
mod sweep;
