//! fifobind: join TCP sockets to named pipes, for shell scripts.
//!
//! The five commands in `bin/` are thin mains over this library; each
//! module below owns one concern.

pub mod activation;
pub mod args;
pub mod binding;
pub mod claim;
pub mod cli;
pub mod completions;
pub mod ctl;
pub mod ctl_list;
pub mod ctl_stop;
pub mod daemon;
pub mod error;
pub mod fifo;
pub mod framer;
pub mod input;
pub mod logging;
pub mod master;
pub mod net;
pub mod notify;
pub mod output;
pub mod penalty;
pub mod pool;
pub mod process;
pub mod protocol;
pub mod registry;
pub mod runtime_dir;
pub mod secure;
pub mod signals;
pub mod spool;
pub mod status;
pub mod stream;
pub mod supervise;
pub mod sweep;
