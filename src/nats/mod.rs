//! NATS: bindings whose far end is a NATS subject instead of a TCP peer.
//!
//! `nats-output ID SUBJECT` publishes each whole line written into its
//! FIFO as one message; `nats-input ID SUBJECT` writes each message it
//! receives as one line into its FIFO. `nats-master PREFIX DDIR` and
//! `nats-pool PREFIX` are master and pool with those two as children and
//! subjects `PREFIX.HOST.DAEMON` between them ([`bus`]). Under JetStream both are exactly
//! once: acknowledged publishes carrying message IDs the server
//! de-duplicates, and a durable consumer acknowledged only once the line
//! is in the FIFO.
//!
//! The client is the official `async-nats`, which brings tokio. Both stay
//! in these modules and their binaries (cargo feature `nats`): the four
//! plain commands link neither. What a binding is — its claim, FIFO,
//! runtime directory, daemonizing and readiness, signals — is the
//! library's ([`crate::binding`]), used as is; only the data path is new.

pub mod bus;
pub(crate) mod child;
pub mod cli;
pub(crate) mod connect;
pub(crate) mod events;
pub mod input;
pub mod master;
pub mod output;
pub mod pool;
pub(crate) mod position;
