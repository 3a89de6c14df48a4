//! What nats-master and nats-pool share: master's daemons and pool's
//! FIFOs with a NATS JetStream stream between them instead of a TCP
//! session. Each daemon's lines go to subject `PREFIX.HOST.DAEMON`, one
//! stream holds `PREFIX.>`, and the receiver finds the daemons there.
//!
//! Both sides create the stream if it is missing, under the same default
//! name (made from PREFIX), so either may start first and no line is
//! published where no stream keeps it.

use std::path::PathBuf;

use async_nats::jetstream;
use clap::Parser;

use crate::args::Id;
use crate::error::{Error, ExitStatus, Result};
use crate::nats::cli::{ConnectArgs, Subject};
use crate::nats::connect::{Settings, js_error};

/// Run every executable of DDIR as a daemon whose standard output is
/// published, one message per line, on the NATS subject
/// PREFIX.HOST.DAEMON (through a JetStream stream holding PREFIX.>).
#[derive(Parser, Debug)]
#[command(name = "nats-master", version)]
pub struct NatsMaster {
    /// The subjects' first tokens: each daemon publishes on
    /// PREFIX.HOST.DAEMON (no wildcards)
    #[arg(value_name = "PREFIX")]
    pub(crate) prefix: Subject,

    /// The directory of daemons: every executable file in it is run
    #[arg(value_name = "DDIR")]
    pub(crate) ddir: PathBuf,

    /// The HOST token of the subjects: up to 24 of A-Z a-z 0-9 _ -
    /// (default: the short host name, other characters made '-')
    #[arg(short = 'n', long, value_name = "NAME", value_parser = crate::protocol::parse_name)]
    pub(crate) name: Option<Id>,

    #[command(flatten)]
    pub(crate) bus: BusArgs,
}

/// Expose one FIFO per daemon that publishes under PREFIX (subjects
/// PREFIX.HOST.DAEMON, as nats-master sends them), printing `NAME FIFO`
/// for each; NAME is HOST.DAEMON.
#[derive(Parser, Debug)]
#[command(name = "nats-pool", version)]
pub struct NatsPool {
    /// The subjects' first tokens: daemons are found on PREFIX.> (no
    /// wildcards)
    #[arg(value_name = "PREFIX")]
    pub(crate) prefix: Subject,

    /// The durable consumers' names start with NAME-: another receiver of
    /// another NAME gets every line again, one of the same NAME resumes
    #[arg(long, value_name = "NAME", default_value = "fifobind")]
    pub(crate) durable: String,

    #[command(flatten)]
    pub(crate) bus: BusArgs,
}

/// The stream and the server, for both sides.
#[derive(clap::Args, Debug)]
pub(crate) struct BusArgs {
    /// The JetStream stream holding PREFIX.>, created if missing
    /// (default: PREFIX, each character other than A-Z a-z 0-9 _ - made _)
    #[arg(long, value_name = "NAME")]
    pub(crate) stream: Option<String>,

    #[command(flatten)]
    pub(crate) connect: ConnectArgs,
}

/// The options of either side, its secrets read.
pub struct BusOptions {
    pub(crate) prefix: Subject,
    pub(crate) stream: String,
    /// For the children, which read the secrets' files themselves.
    pub(crate) connect: ConnectArgs,
    pub(crate) settings: Settings,
}

impl BusArgs {
    /// Checks PREFIX and reads the secrets (call before any thread).
    fn options(self, prefix: Subject) -> Result<BusOptions> {
        if prefix.has_wildcard() {
            return Err(Error::usage(format!(
                "PREFIX '{prefix}': no wildcards (the daemons are found on PREFIX.>)"
            )));
        }
        if prefix.0.starts_with('-') || prefix.0.len() > 128 {
            return Err(Error::usage(format!(
                "PREFIX '{prefix}': at most 128 characters, not starting with '-'"
            )));
        }
        let stream = match self.stream {
            Some(s)
                if s.is_empty() || s.chars().any(|c| c.is_whitespace() || ".*>/\\".contains(c)) =>
            {
                return Err(Error::usage(format!(
                    "--stream '{s}': a stream name has no spaces, dots, *, >, / or \\"
                )));
            }
            Some(s) => s,
            None => prefix
                .0
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "_-".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect(),
        };
        Ok(BusOptions {
            prefix,
            stream,
            settings: Settings::read(self.connect.clone())?,
            connect: self.connect,
        })
    }
}

pub struct NatsMasterOptions {
    pub(crate) bus: BusOptions,
    pub(crate) ddir: PathBuf,
    pub(crate) name: Id,
}

impl NatsMaster {
    /// Also takes NOTIFY_SOCKET for itself: call it before any thread.
    pub fn options(self) -> Result<NatsMasterOptions> {
        crate::notify::init(None, true)?;
        Ok(NatsMasterOptions {
            bus: self.bus.options(self.prefix)?,
            ddir: self.ddir,
            name: self.name.unwrap_or_else(crate::cli::host_name),
        })
    }
}

pub struct NatsPoolOptions {
    pub(crate) bus: BusOptions,
    pub(crate) durable: String,
}

impl NatsPool {
    /// Call it before any thread.
    pub fn options(self) -> Result<NatsPoolOptions> {
        crate::notify::init(None, true)?;
        if self.durable.is_empty()
            || self.durable.len() > 32
            || !self
                .durable
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
        {
            return Err(Error::usage(format!(
                "--durable '{}': 1 to 32 of A-Z a-z 0-9 _ -",
                self.durable
            )));
        }
        Ok(NatsPoolOptions {
            bus: self.bus.options(self.prefix)?,
            durable: self.durable,
        })
    }
}

impl BusOptions {
    /// The subjects the stream holds: PREFIX.>.
    pub(crate) fn wildcard(&self) -> String {
        format!("{}.>", self.prefix)
    }

    /// Connects as `who` and makes sure the stream holds PREFIX.>:
    /// created if missing; one of that name holding other subjects is
    /// refused (publishing there would lose the lines).
    pub(crate) async fn stream(
        &self,
        who: &str,
    ) -> Result<(async_nats::Client, jetstream::stream::Stream)> {
        let client = self.settings.connect(who).await?;
        let js = jetstream::new(client.clone());
        let wildcard = self.wildcard();
        let mut stream = js
            .get_or_create_stream(jetstream::stream::Config {
                name: self.stream.clone(),
                subjects: vec![wildcard.clone()],
                ..Default::default()
            })
            .await
            .map_err(|e| {
                js_error(
                    format!("cannot use the JetStream stream {}", self.stream),
                    e,
                )
            })?;
        let info = stream.info().await.map_err(|e| {
            js_error(
                format!("cannot read the JetStream stream {}", self.stream),
                e,
            )
        })?;
        let holds = &info.config.subjects;
        if !holds.iter().any(|s| s == &wildcard || s == ">") {
            return Err(Error::new(
                ExitStatus::Unavailable,
                format!(
                    "the JetStream stream {} holds {}, not {wildcard}: give another --stream",
                    self.stream,
                    holds.join(" ")
                ),
            ));
        }
        Ok((client, stream))
    }
}
