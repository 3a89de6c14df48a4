//! The test harness, one module per concern, all re-exported here so that
//! a test says `use crate::util::*;` and finds every helper.

mod binding;
mod env;
#[cfg(feature = "nats")]
mod nats;
mod net;
mod pool;
mod procs;
mod read;
mod skip;
mod spawned;
mod wire;

pub use binding::*;
pub use env::*;
#[cfg(feature = "nats")]
pub use nats::*;
pub use net::*;
pub use pool::*;
pub use procs::*;
pub use read::*;
pub use skip::*;
pub use spawned::*;
pub use wire::*;
