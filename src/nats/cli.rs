//! Command lines of nats-output and nats-input: `ID SUBJECT` first, as
//! bind-output's `ID HOST PORT`, then the connection options every NATS
//! tool knows (`--server`, `--creds`, ...). Secrets come from files only,
//! never from arguments, so they never show in a process list.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::args::Id;
use crate::binding::BindingOptions;
use crate::error::{Error, Result};

/// A NATS subject: dot-separated tokens, no white space.
#[derive(Clone, Debug)]
pub(crate) struct Subject(pub String);

impl std::str::FromStr for Subject {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Subject, String> {
        let bad = s.is_empty()
            || s.len() > 1024
            || s.split('.').any(str::is_empty)
            || s.chars().any(|c| c.is_whitespace() || c.is_control());
        if bad {
            return Err(format!(
                "'{s}' is not a NATS subject (tokens separated by dots, no spaces)"
            ));
        }
        Ok(Subject(s.to_string()))
    }
}

impl Subject {
    pub(crate) fn has_wildcard(&self) -> bool {
        self.0.split('.').any(|t| t == "*" || t == ">")
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn seconds(s: &str) -> std::result::Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 && n <= 86400.0 => Ok(Duration::from_secs_f64(n)),
        _ => Err("a duration is a number of seconds, more than 0 and at most 86400".into()),
    }
}

/// How to reach the NATS servers, and as whom.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct ConnectArgs {
    /// The NATS server(s): nats://HOST:PORT, tls://HOST:PORT or HOST:PORT;
    /// repeat the option or separate with commas for a cluster
    #[arg(
        short = 's',
        long,
        value_name = "URL",
        value_delimiter = ',',
        default_value = "nats://127.0.0.1:4222"
    )]
    pub(crate) server: Vec<String>,

    /// The user name, with --password-file
    #[arg(long, value_name = "NAME", requires = "password_file")]
    pub(crate) user: Option<String>,

    /// Read the user's password from FILE (its first line)
    #[arg(long, value_name = "FILE", requires = "user")]
    pub(crate) password_file: Option<PathBuf>,

    /// Read the authentication token from FILE (its first line)
    #[arg(long, value_name = "FILE", conflicts_with_all = ["user", "creds", "nkey"])]
    pub(crate) token_file: Option<PathBuf>,

    /// Authenticate with this credentials file (a JWT and its nkey seed,
    /// as `nsc` writes them)
    #[arg(long, value_name = "FILE", conflicts_with_all = ["user", "nkey"])]
    pub(crate) creds: Option<PathBuf>,

    /// Authenticate with the nkey seed in FILE (its first line)
    #[arg(long, value_name = "FILE", conflicts_with = "user")]
    pub(crate) nkey: Option<PathBuf>,

    /// Require TLS to the server (a tls:// URL requires it too)
    #[arg(long)]
    pub(crate) tls: bool,

    /// Trust the certificate authorities in FILE (PEM) for the server's
    /// certificate, beside the system's
    #[arg(long, value_name = "FILE")]
    pub(crate) tls_ca: Option<PathBuf>,

    /// Present this client certificate (PEM), with --tls-key
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,

    /// The client certificate's private key (PEM), with --tls-cert
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,

    /// Give up connecting after SECS seconds (status 75)
    #[arg(short = 't', long, value_name = "SECS", value_parser = seconds, default_value = "10")]
    pub(crate) connect_timeout: Duration,
}

impl ConnectArgs {
    /// Refuses a URL with a password in it: it would show in the process
    /// list. (A user name alone is fine.)
    pub(crate) fn check(&self) -> Result<()> {
        for url in &self.server {
            let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
            let authority = rest.split('/').next().unwrap_or("");
            if let Some((userinfo, _)) = authority.rsplit_once('@')
                && userinfo.contains(':')
            {
                return Err(Error::usage(
                    "--server: a password in a URL shows in the process list; \
                     use --user and --password-file (or --token-file)",
                ));
            }
            if authority.is_empty() {
                return Err(Error::usage(format!("--server '{url}': no host")));
            }
        }
        Ok(())
    }
}

/// JetStream or core NATS: the same choice on both sides.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct Via {
    /// Use the JetStream stream NAME, creating it (for SUBJECT) if it
    /// does not exist; without it, JetStream is used when a stream holds
    /// SUBJECT, core NATS otherwise
    #[arg(long, value_name = "NAME", conflicts_with = "core")]
    pub(crate) stream: Option<String>,

    /// Use core NATS even if a stream holds SUBJECT: no acknowledgement,
    /// no resume; lines may be lost when the server goes away or the
    /// reader is slow
    #[arg(long)]
    pub(crate) core: bool,
}

/// What both NATS bindings take beside their arguments.
#[derive(clap::Args, Debug)]
pub(crate) struct NatsArgs {
    #[command(flatten)]
    pub(crate) via: Via,

    #[command(flatten)]
    pub(crate) connect: ConnectArgs,

    #[command(flatten)]
    pub(crate) common: BindingOptions,
}

/// Publish every whole line written into the named pipe <runtime dir>/ID
/// as one NATS message on SUBJECT. Prints the PID of the background
/// binding once connected.
#[derive(Parser, Debug)]
#[command(name = "nats-output", version)]
pub struct NatsOutput {
    /// The binding's name: 1-64 characters of A-Z a-z 0-9 . _ -
    #[arg(value_name = "ID")]
    pub(crate) id: Id,

    /// The subject to publish on (no wildcards)
    #[arg(value_name = "SUBJECT")]
    pub(crate) subject: Subject,

    #[command(flatten)]
    pub(crate) nats: NatsArgs,
}

/// Where a new consumer starts in its stream.
#[derive(Clone, Debug)]
pub(crate) enum Deliver {
    New,
    All,
    Last,
    Since(time::OffsetDateTime),
}

impl std::str::FromStr for Deliver {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Deliver, String> {
        match s {
            "new" => Ok(Deliver::New),
            "all" => Ok(Deliver::All),
            "last" => Ok(Deliver::Last),
            _ => {
                let when = if let Some(secs) = s.strip_prefix('@') {
                    secs.parse::<i64>()
                        .ok()
                        .and_then(|n| time::OffsetDateTime::from_unix_timestamp(n).ok())
                } else {
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                        .ok()
                };
                when.map(Deliver::Since).ok_or_else(|| {
                    format!(
                        "'{s}': say new, all, last, a time as 2026-12-01T10:00:00Z, \
                         or @SECONDS since the epoch"
                    )
                })
            }
        }
    }
}

/// Write every message received on SUBJECT as one line into the named
/// pipe <runtime dir>/ID. Prints the PID of the background binding once
/// subscribed.
#[derive(Parser, Debug)]
#[command(name = "nats-input", version)]
pub struct NatsInput {
    /// The binding's name: 1-64 characters of A-Z a-z 0-9 . _ -
    #[arg(value_name = "ID")]
    pub(crate) id: Id,

    /// The subject to receive from; wildcards (* and >) allowed
    #[arg(value_name = "SUBJECT")]
    pub(crate) subject: Subject,

    /// Consume through the durable JetStream consumer NAME: the server
    /// remembers what was acknowledged, so a restarted binding resumes
    /// where it stopped; bindings sharing NAME share the messages
    #[arg(long, value_name = "NAME", conflicts_with = "core")]
    pub(crate) durable: Option<String>,

    /// Share the messages with the other bindings of GROUP: each message
    /// goes to one of them (under JetStream, the durable consumer GROUP)
    #[arg(long, value_name = "GROUP")]
    pub(crate) queue: Option<String>,

    /// Where a new consumer starts: new, all, last, or a time (RFC 3339,
    /// or @SECONDS since the epoch); an existing durable consumer keeps
    /// its place
    #[arg(
        long,
        value_name = "WHERE",
        default_value = "new",
        conflicts_with = "core"
    )]
    pub(crate) deliver: Deliver,

    #[command(flatten)]
    pub(crate) nats: NatsArgs,
}

/// nats-output's options, its secrets read (call before any thread).
pub fn output_options(a: NatsOutput) -> Result<crate::nats::output::OutputOptions> {
    Ok(crate::nats::output::OutputOptions {
        id: a.id,
        subject: a.subject,
        stream: a.nats.via.stream,
        core: a.nats.via.core,
        settings: crate::nats::connect::Settings::read(a.nats.connect)?,
        common: a.nats.common,
    })
}

/// nats-input's options, its secrets read (call before any thread).
pub fn input_options(a: NatsInput) -> Result<crate::nats::input::InputOptions> {
    Ok(crate::nats::input::InputOptions {
        id: a.id,
        subject: a.subject,
        durable: a.durable,
        queue: a.queue,
        deliver: a.deliver,
        stream: a.nats.via.stream,
        core: a.nats.via.core,
        settings: crate::nats::connect::Settings::read(a.nats.connect)?,
        common: a.nats.common,
    })
}
