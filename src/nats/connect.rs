//! Connecting to NATS: the options of [`ConnectArgs`] turned into
//! async-nats' `ConnectOptions`, and its errors into our exit statuses.
//!
//! Secrets are read from their files in the foreground, before anything
//! else runs, into zeroized memory; the process becomes undumpable while
//! it holds them. Nothing secret is ever in an argument or a variable of
//! the environment, so nothing can leak to a process list or a child.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::error::{Error, ExitStatus, Result};
use crate::nats::cli::ConnectArgs;

/// Longest credentials file read (a JWT and a seed are a few KiB).
const MAX_CREDS: u64 = 64 * 1024;
/// Messages a core subscription buffers for a slow reader before the
/// client drops them (core NATS is at most once).
pub(crate) const SUBSCRIPTION_CAPACITY: usize = 8192;

/// What to connect with, secrets included, read once.
pub(crate) struct Settings {
    args: ConnectArgs,
    secret: Secret,
}

enum Secret {
    None,
    Password(String, Zeroizing<String>),
    Token(Zeroizing<String>),
    Creds(Zeroizing<String>),
    Nkey(Zeroizing<String>),
}

fn first_line(path: &Path) -> Result<Zeroizing<String>> {
    let bytes = Zeroizing::new(crate::cli::read_key_file(path)?);
    std::str::from_utf8(&bytes)
        .map(|s| Zeroizing::new(s.trim().to_string()))
        .map_err(|_| Error::usage(format!("{}: not UTF-8 text", path.display())))
}

fn whole_file(path: &Path) -> Result<Zeroizing<String>> {
    let cant = |e: &std::io::Error| {
        let mut err = Error::io(
            format!("cannot read credentials file {}", path.display()),
            e,
        );
        if err.status == ExitStatus::CantCreate {
            err.status = ExitStatus::NoInput;
        }
        err
    };
    let f = std::fs::File::open(path).map_err(|e| cant(&e))?;
    let mut text = Zeroizing::new(String::new());
    f.take(MAX_CREDS)
        .read_to_string(&mut text)
        .map_err(|e| cant(&e))?;
    Ok(text)
}

impl Settings {
    /// Reads the secrets the arguments name. Call from the main, before
    /// any thread starts.
    pub(crate) fn read(args: ConnectArgs) -> Result<Settings> {
        args.check()?;
        let secret = if let (Some(user), Some(file)) = (&args.user, &args.password_file) {
            Secret::Password(user.clone(), first_line(file)?)
        } else if let Some(file) = &args.token_file {
            Secret::Token(first_line(file)?)
        } else if let Some(file) = &args.creds {
            Secret::Creds(whole_file(file)?)
        } else if let Some(file) = &args.nkey {
            Secret::Nkey(first_line(file)?)
        } else {
            Secret::None
        };
        if !matches!(secret, Secret::None)
            && let Err(e) = nix::sys::prctl::set_dumpable(false)
        {
            log::warn!("cannot make the process undumpable: {}", e.desc());
        }
        Ok(Settings { args, secret })
    }

    /// The servers, as the user gave them (for messages).
    pub(crate) fn servers(&self) -> String {
        self.args.server.join(",")
    }

    /// Connects; `name` is how the server lists this client.
    pub(crate) async fn connect(&self, name: &str) -> Result<async_nats::Client> {
        let mut options = async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(self.args.connect_timeout)
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => log::warn!("NATS: disconnected"),
                    async_nats::Event::Connected => log::info!("NATS: connected"),
                    other => log::info!("NATS: {other}"),
                }
            })
            // A reconnect every 0.1 s at first, backing off to 2 s: an
            // outage of the server holds the writers, it does not end us.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(2000))
            });
        options = match &self.secret {
            Secret::None => options,
            Secret::Password(user, pass) => {
                options.user_and_password(user.clone(), pass.to_string())
            }
            Secret::Token(token) => options.token(token.to_string()),
            Secret::Nkey(seed) => options.nkey(seed.to_string()),
            Secret::Creds(text) => options.credentials(text).map_err(|e| {
                Error::usage(format!(
                    "credentials file {}: {e}",
                    self.args
                        .creds
                        .as_deref()
                        .unwrap_or(Path::new(""))
                        .display()
                ))
            })?,
        };
        if self.args.tls || self.args.server.iter().any(|s| s.starts_with("tls://")) {
            options = options.require_tls(true);
        }
        if let Some(ca) = &self.args.tls_ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&self.args.tls_cert, &self.args.tls_key) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        let servers: Vec<async_nats::ServerAddr> = self
            .args
            .server
            .iter()
            .map(|s| {
                s.parse().map_err(|e| {
                    Error::usage(format!("--server '{s}': not a NATS server address ({e})"))
                })
            })
            .collect::<Result<_>>()?;
        let connecting = options.connect(servers);
        // The client's own timeout is per attempt; ours is the whole.
        match tokio::time::timeout(self.args.connect_timeout, connecting).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(connect_error(&self.servers(), &e)),
            Err(_) => Err(Error::new(
                ExitStatus::TempFail,
                format!(
                    "cannot connect to NATS at {}: timed out after {:?}",
                    self.servers(),
                    self.args.connect_timeout
                ),
            )),
        }
    }
}

fn connect_error(servers: &str, e: &async_nats::ConnectError) -> Error {
    use async_nats::ConnectErrorKind as K;
    let status = match e.kind() {
        K::Authentication | K::AuthorizationViolation => ExitStatus::NoPerm,
        K::Dns => ExitStatus::NoHost,
        K::ServerParse => ExitStatus::Usage,
        K::TimedOut => ExitStatus::TempFail,
        K::Tls | K::Io | K::MaxReconnects => ExitStatus::Unavailable,
    };
    let why = match e.kind() {
        K::Authentication | K::AuthorizationViolation => {
            "the server refused the credentials (authorization violation)".to_string()
        }
        _ => e.to_string(),
    };
    Error::new(
        status,
        format!("cannot connect to NATS at {servers}: {why}"),
    )
}

/// A JetStream request failed: what, on what, why.
pub(crate) fn js_error(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Error {
    Error::new(ExitStatus::Unavailable, format!("{what}: {e}"))
}
