//! Command lines: the clap definitions of the four commands, and the
//! shared way a main turns a parse error or a result into an exit status.
//!
//! The `///` comment on each field is its `--help` text; the man pages in
//! `man/` say the same at length (a test checks every option is there).

use std::io::Write;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::time::Duration;

use clap::Parser;

use std::path::PathBuf;

use crate::args::{Host, Id, Key, Port};
use crate::binding::BindingOptions;
use crate::error::{Error, ExitStatus, Result};
use crate::input::InputOptions;
use crate::master::MasterOptions;
use crate::output::OutputOptions;
use crate::pool::PoolOptions;

/// Parses the command line; a bad one is one line on stderr and exit 2,
/// `--help` and `--version` print to stdout and exit 0.
pub fn parse<T: Parser>(program: &str) -> T {
    match T::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            use clap::error::ErrorKind as K;
            if matches!(err.kind(), K::DisplayHelp | K::DisplayVersion) {
                let _ = err.print();
                std::process::exit(0);
            }
            eprintln!("{program}: {} (see '{program} --help')", one_line(&err));
            std::process::exit(ExitStatus::Usage.code());
        }
    }
}

/// clap's message without its usage block, on one line.
fn one_line(err: &clap::Error) -> String {
    let text = err.render().to_string();
    let first_block = text.split("\n\n").next().unwrap_or("");
    let joined: Vec<&str> = first_block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let line = joined.join(" ");
    line.strip_prefix("error: ").unwrap_or(&line).to_string()
}

/// Ends the process with `result`'s status, printing an error once.
pub fn exit(program: &str, result: Result<()>) -> ! {
    match result {
        Ok(()) => {
            let _ = std::io::stdout().flush();
            std::process::exit(0)
        }
        Err(err) => {
            // A stop by signal was logged already; it is not an error.
            if !err.message.is_empty() {
                eprintln!("{program}: {err}");
            }
            std::process::exit(err.status.code())
        }
    }
}

fn seconds(s: &str) -> std::result::Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 && n <= 86400.0 => Ok(Duration::from_secs_f64(n)),
        _ => Err("a duration is a number of seconds, more than 0 and at most 86400".into()),
    }
}

/// Like [`seconds`], and 0 too (which the option's text says means none).
fn seconds_or_zero(s: &str) -> std::result::Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(0.0) => Ok(Duration::ZERO),
        _ => seconds(s).map_err(|_| "a duration is a number of seconds from 0 to 86400".into()),
    }
}

/// Options shared by the two binding commands.
#[derive(clap::Args, Debug)]
pub(crate) struct CommonArgs {
    /// Stay in the foreground: print the PID once ready, keep running, log
    /// to stderr (for supervisors such as systemd, a pool or a master)
    #[arg(short = 'f', long)]
    pub(crate) foreground: bool,

    /// Close properly when this inherited descriptor (a pipe's read end)
    /// reaches end-of-file, i.e. when the process holding its write end dies
    #[arg(long, value_name = "FD")]
    pub(crate) watchdog_fd: Option<RawFd>,

    /// With --foreground: write a newline to this inherited descriptor once
    /// ready, then close it (s6's notification-fd)
    #[arg(long, value_name = "FD", requires = "foreground")]
    pub(crate) ready_fd: Option<RawFd>,
}

/// The key options of the two binding commands: with one, the binding
/// speaks the authenticated, resumable stream protocol (see stream.rs).
#[derive(clap::Args, Debug)]
pub(crate) struct StreamKeyArgs {
    /// Speak the authenticated, encrypted, resumable stream protocol with
    /// this shared key (KEY `-`: from --key-file, else FIFOBIND_KEY)
    #[arg(long, value_name = "KEY", conflicts_with = "key_fd")]
    pub(crate) key: Option<String>,

    /// With --key -: read the key from FILE (its first line)
    #[arg(long, value_name = "FILE", requires = "key")]
    pub(crate) key_file: Option<PathBuf>,

    /// Read the stream's secret from this inherited descriptor (to
    /// end-of-file, at most 128 bytes), then close it
    #[arg(long, value_name = "FD")]
    pub(crate) key_fd: Option<RawFd>,
}

impl StreamKeyArgs {
    /// The key, if any: through [`KeyArgs::resolve`] (environment wiped,
    /// process undumpable, key file bounded), or from `--key-fd`.
    pub(crate) fn resolve(&self) -> Result<Option<Key>> {
        if let Some(fd) = self.key_fd {
            return crate::stream::read_key_fd(fd).map(Some);
        }
        let Some(key) = &self.key else {
            return Ok(None);
        };
        let args = KeyArgs {
            key: key.clone(),
            key_file: self.key_file.clone(),
            timeout: Duration::ZERO,
        };
        args.resolve().map(Some)
    }

    /// A child's command line gets the descriptor, never a key itself
    /// unless the parent was given one on its own (`-` stays `-`).
    fn push_args(&self, a: &mut Args) {
        a.value("--key", self.key.as_ref());
        a.value("--key-file", self.key_file.as_ref().map(|p| p.display()));
        a.value("--key-fd", self.key_fd);
    }
}

impl From<CommonArgs> for BindingOptions {
    fn from(a: CommonArgs) -> BindingOptions {
        BindingOptions {
            foreground: a.foreground,
            watchdog_fd: a.watchdog_fd,
            ready_fd: a.ready_fd,
        }
    }
}

/// Listen on a TCP port; what arrives is readable, line by line, from the
/// named pipe <runtime dir>/ID. Prints the PID of the background binding.
#[derive(Parser, Debug)]
#[command(name = "bind-input", version)]
pub struct BindInput {
    /// The binding's name: 1-64 characters of A-Z a-z 0-9 . _ -
    #[arg(value_name = "ID")]
    pub(crate) id: Id,

    /// The TCP port to listen on, 1024-49151
    #[arg(value_name = "PORT")]
    pub(crate) port: Port,

    /// Listen on this local address only (default: every address, IPv4 and
    /// IPv6)
    #[arg(short, long, value_name = "ADDR")]
    pub(crate) bind: Option<IpAddr>,

    /// Serve a single connection; once it has ended and the FIFO has been
    /// read empty, remove the FIFO and exit
    #[arg(long)]
    pub(crate) once: bool,

    /// Accept connections from these addresses only (ADDR or ADDR/PREFIX;
    /// repeat the option or separate with commas); others are closed at once
    #[arg(long, value_name = "ADDR[/PREFIX]", value_delimiter = ',')]
    pub(crate) allow: Vec<crate::net::Allow>,

    /// Serve at most N connections at once; further ones wait in the
    /// listen backlog (0: no limit)
    #[arg(long, value_name = "N", default_value = "128")]
    pub(crate) max_conns: usize,

    /// Serve at most N connections from one address at once; further ones
    /// from it are closed at once (0: no limit)
    #[arg(long, value_name = "N", default_value = "0")]
    pub(crate) max_conns_per_addr: usize,

    /// Close a connection that has sent nothing within SECS seconds of
    /// connecting (0: never; default 60, never with --once)
    #[arg(long, value_name = "SECS", value_parser = seconds_or_zero)]
    pub(crate) idle_timeout: Option<Duration>,

    /// Let a connection hold the FIFO in the middle of a line for SECS
    /// seconds of waiting for its rest; then complete the line and close
    /// the connection (0: no limit; default 10, none with --once)
    #[arg(long, value_name = "SECS", value_parser = seconds_or_zero)]
    pub(crate) line_timeout: Option<Duration>,

    /// With --once: exit (status 75) if nobody connected within SECS seconds
    #[arg(long, value_name = "SECS", value_parser = seconds, requires = "once")]
    pub(crate) accept_timeout: Option<Duration>,

    #[command(flatten)]
    pub(crate) key: StreamKeyArgs,

    #[command(flatten)]
    pub(crate) common: CommonArgs,
}

impl BindInput {
    /// The binding's options, the key resolved: call it before any thread.
    pub fn options(self) -> Result<InputOptions> {
        let key = self.key.resolve()?;
        let a = self;
        Ok(InputOptions {
            key,
            id: a.id,
            port: a.port,
            bind: a.bind,
            once: a.once,
            allow: a.allow,
            accept_timeout: a.accept_timeout,
            max_conns: a.max_conns,
            max_conns_per_addr: a.max_conns_per_addr,
            idle_timeout: match a.idle_timeout {
                Some(t) => (!t.is_zero()).then_some(t),
                None if a.once => None,
                None => Some(crate::input::IDLE_TIMEOUT),
            },
            line_timeout: match a.line_timeout {
                Some(t) => (!t.is_zero()).then_some(t),
                None if a.once => None,
                None => Some(crate::input::LINE_TIMEOUT),
            },
            common: a.common.into(),
        })
    }
}

/// Connect to HOST:PORT; whatever is written into the named pipe
/// <runtime dir>/ID is sent there. Prints the PID of the background binding.
#[derive(Parser, Debug)]
#[command(name = "bind-output", version)]
pub struct BindOutput {
    /// The binding's name: 1-64 characters of A-Z a-z 0-9 . _ -
    #[arg(value_name = "ID")]
    pub(crate) id: Id,

    /// The host to connect to: a name, an IPv4 or an IPv6 address
    #[arg(value_name = "HOST")]
    pub(crate) host: Host,

    /// The remote TCP port, 1024-49151
    #[arg(value_name = "PORT")]
    pub(crate) port: Port,

    /// Give up connecting after SECS seconds (status 75)
    #[arg(short = 't', long, value_name = "SECS", value_parser = seconds, default_value = "10")]
    pub(crate) connect_timeout: Duration,

    #[command(flatten)]
    pub(crate) key: StreamKeyArgs,

    /// Without a key: when the connection breaks, connect again (with
    /// backoff) instead of exiting; what was in flight may be lost
    #[arg(long, conflicts_with_all = ["key", "key_fd"])]
    pub(crate) reconnect: bool,

    /// With a key: hold at most SIZE bytes not yet acknowledged by the
    /// receiver (K, M, G suffixes)
    #[arg(long, value_name = "SIZE", value_parser = crate::stream::parse_size, default_value = "8M")]
    pub(crate) spool: usize,

    /// With a key, when the spool is full: block (stop reading the FIFO, so
    /// writers wait) or drop-oldest (drop the oldest unsent lines, counted
    /// in the log)
    #[arg(long, value_name = "POLICY", value_parser = ["block", "drop-oldest"], default_value = "block")]
    pub(crate) spool_full: String,

    /// The longest wait between two attempts to reconnect (the delay starts
    /// at 0.1 s and doubles, with jitter)
    #[arg(long, value_name = "SECS", value_parser = seconds, default_value = "5")]
    pub(crate) backoff_max: Duration,

    /// Keep trying to reconnect for SECS seconds after a break, then exit
    /// (status 69); 0: exit at the first break (default: forever)
    #[arg(long, value_name = "SECS", value_parser = seconds_or_zero)]
    pub(crate) retry_for: Option<Duration>,

    /// With a key: a receiver silent for SECS seconds (it acknowledges
    /// every second) is taken for gone, and the binding reconnects
    #[arg(long, value_name = "SECS", value_parser = seconds, default_value = "10")]
    pub(crate) peer_timeout: Duration,

    #[command(flatten)]
    pub(crate) common: CommonArgs,
}

impl BindOutput {
    /// The binding's options, the key resolved: call it before any thread.
    pub fn options(self) -> Result<OutputOptions> {
        let key = self.key.resolve()?;
        let a = self;
        Ok(OutputOptions {
            id: a.id,
            host: a.host,
            port: a.port,
            connect_timeout: a.connect_timeout,
            key,
            reconnect: a.reconnect,
            spool: a.spool,
            spool_full: if a.spool_full == "drop-oldest" {
                crate::spool::Full::DropOldest
            } else {
                crate::spool::Full::Block
            },
            backoff_max: a.backoff_max,
            retry_for: a.retry_for,
            peer_timeout: a.peer_timeout,
            common: a.common.into(),
        })
    }
}

/// A binding a pool or master starts as its child, held as the clap type
/// its command line parses into: a renamed or removed flag then breaks the
/// build or the round-trip test below, never a pool at run time.
pub(crate) enum ChildBinding {
    Input(BindInput),
    Output(BindOutput),
    /// nats-master's and nats-pool's children (src/nats/child.rs).
    #[cfg(feature = "nats")]
    NatsInput(Box<crate::nats::cli::NatsInput>),
    #[cfg(feature = "nats")]
    NatsOutput(Box<crate::nats::cli::NatsOutput>),
}

impl ChildBinding {
    /// `bind-input ID PORT` with every option at its default.
    pub(crate) fn input(id: &Id, port: Port) -> BindInput {
        BindInput::try_parse_from(["bind-input", id.as_str(), &port.to_string()])
            .expect("a valid ID and port parse")
    }

    /// `bind-output ID HOST PORT` with every option at its default.
    pub(crate) fn output(id: &Id, host: &Host, port: Port) -> BindOutput {
        BindOutput::try_parse_from(["bind-output", id.as_str(), host.as_str(), &port.to_string()])
            .expect("a valid ID, host and port parse")
    }

    pub(crate) fn program(&self) -> &'static str {
        match self {
            ChildBinding::Input(_) => "bind-input",
            ChildBinding::Output(_) => "bind-output",
            #[cfg(feature = "nats")]
            ChildBinding::NatsInput(_) => "nats-input",
            #[cfg(feature = "nats")]
            ChildBinding::NatsOutput(_) => "nats-output",
        }
    }

    pub(crate) fn common_mut(&mut self) -> &mut CommonArgs {
        match self {
            ChildBinding::Input(b) => &mut b.common,
            ChildBinding::Output(b) => &mut b.common,
            #[cfg(feature = "nats")]
            ChildBinding::NatsInput(b) => &mut b.nats.common,
            #[cfg(feature = "nats")]
            ChildBinding::NatsOutput(b) => &mut b.nats.common,
        }
    }

    /// Makes it read its stream's secret from descriptor `fd`.
    pub(crate) fn set_key_fd(&mut self, fd: RawFd) {
        match self {
            ChildBinding::Input(b) => b.key.key_fd = Some(fd),
            ChildBinding::Output(b) => b.key.key_fd = Some(fd),
            // A NATS child has no stream key: the server's credentials
            // protect its stream.
            #[cfg(feature = "nats")]
            ChildBinding::NatsInput(_) | ChildBinding::NatsOutput(_) => {
                let _ = fd;
            }
        }
    }

    pub(crate) fn to_args(&self) -> Vec<String> {
        match self {
            ChildBinding::Input(b) => b.to_args(),
            ChildBinding::Output(b) => b.to_args(),
            #[cfg(feature = "nats")]
            ChildBinding::NatsInput(b) => b.to_args(),
            #[cfg(feature = "nats")]
            ChildBinding::NatsOutput(b) => b.to_args(),
        }
    }
}

/// Builds an argument list, flag by flag.
#[derive(Default)]
pub(crate) struct Args(pub(crate) Vec<String>);

impl Args {
    pub(crate) fn flag(&mut self, name: &str, on: bool) {
        if on {
            self.0.push(name.to_string());
        }
    }

    pub(crate) fn value(&mut self, name: &str, value: Option<impl std::fmt::Display>) {
        if let Some(v) = value {
            self.0.extend([name.to_string(), v.to_string()]);
        }
    }

    pub(crate) fn secs(&mut self, name: &str, value: Option<Duration>) {
        self.value(name, value.map(|d| d.as_secs_f64()));
    }
}

impl CommonArgs {
    pub(crate) fn push_args(&self, a: &mut Args) {
        a.flag("--foreground", self.foreground);
        a.value("--watchdog-fd", self.watchdog_fd);
        a.value("--ready-fd", self.ready_fd);
    }
}

impl BindInput {
    /// The command line (without the program's name) that parses back
    /// into this.
    pub(crate) fn to_args(&self) -> Vec<String> {
        let mut a = Args::default();
        a.value("--bind", self.bind);
        a.flag("--once", self.once);
        for allow in &self.allow {
            a.value("--allow", Some(allow));
        }
        a.value("--max-conns", Some(self.max_conns));
        a.value("--max-conns-per-addr", Some(self.max_conns_per_addr));
        a.secs("--idle-timeout", self.idle_timeout);
        a.secs("--line-timeout", self.line_timeout);
        a.secs("--accept-timeout", self.accept_timeout);
        self.key.push_args(&mut a);
        self.common.push_args(&mut a);
        a.0.extend([self.id.to_string(), self.port.to_string()]);
        a.0
    }
}

impl BindOutput {
    /// The command line (without the program's name) that parses back
    /// into this.
    pub(crate) fn to_args(&self) -> Vec<String> {
        let mut a = Args::default();
        a.secs("--connect-timeout", Some(self.connect_timeout));
        self.key.push_args(&mut a);
        a.flag("--reconnect", self.reconnect);
        a.value("--spool", Some(self.spool));
        a.value("--spool-full", Some(&self.spool_full));
        a.secs("--backoff-max", Some(self.backoff_max));
        a.secs("--retry-for", self.retry_for);
        a.secs("--peer-timeout", Some(self.peer_timeout));
        self.common.push_args(&mut a);
        a.0.extend([
            self.id.to_string(),
            self.host.to_string(),
            self.port.to_string(),
        ]);
        a.0
    }
}

/// The environment variable a KEY of `-` is read from.
pub(crate) const ENV_KEY: &str = "FIFOBIND_KEY";

/// Options for the shared key, common to pool and master.
#[derive(clap::Args, Debug)]
pub(crate) struct KeyArgs {
    /// The shared key. `-` takes it from --key-file, else from the
    /// FIFOBIND_KEY environment variable, so that it never shows in the
    /// process list
    #[arg(value_name = "KEY")]
    pub(crate) key: String,

    /// With KEY `-`: read the key from FILE (its first line)
    #[arg(long, value_name = "FILE")]
    pub(crate) key_file: Option<PathBuf>,

    /// Seconds allowed for each step of the protocol exchange
    #[arg(long, value_name = "SECS", value_parser = seconds, default_value = "10")]
    pub(crate) timeout: Duration,
}

/// The longest first line a key file may have: a key is a password, not
/// a file to load whole (`--key-file /dev/zero` must not fill memory).
pub(crate) const MAX_KEY_LINE: usize = 4096;

impl KeyArgs {
    /// The key, from where the arguments say it is. Holding the key, the
    /// process becomes undumpable (no core file, no ptrace by other
    /// processes of the user) and `FIFOBIND_KEY` leaves its environment,
    /// so that no binding, daemon or daemon's child inherits it. Called
    /// from a main before any thread is started.
    pub(crate) fn resolve(&self) -> Result<Key> {
        let bytes = match (self.key.as_str(), &self.key_file) {
            ("-", Some(file)) => read_key_file(file)?,
            ("-", None) => match std::env::var_os(ENV_KEY) {
                Some(v) => std::os::unix::ffi::OsStrExt::as_bytes(v.as_os_str()).to_vec(),
                None => {
                    return Err(Error::usage(format!(
                        "KEY is '-' but neither --key-file nor {ENV_KEY} gives a key"
                    )));
                }
            },
            (_, Some(_)) => {
                return Err(Error::usage("--key-file goes with a KEY of '-'"));
            }
            (key, None) => key.as_bytes().to_vec(),
        };
        forget_env_key();
        if let Err(e) = nix::sys::prctl::set_dumpable(false) {
            log::warn!("cannot make the process undumpable: {}", e.desc());
        }
        Key::new(bytes).map_err(|e| Error::usage(format!("invalid KEY: {e}")))
    }
}

/// Wipes `FIFOBIND_KEY` from the environment: its bytes first, in place,
/// because `/proc/PID/environ` shows the environment block as the
/// process started with it (and a forked guardian shares that block), and
/// then the variable, so that nothing started later inherits it.
fn forget_env_key() {
    let name = std::ffi::CString::new(ENV_KEY).expect("no NUL in the name");
    // SAFETY: mains call this before they start any thread, so nothing
    // reads or changes the environment concurrently; getenv's pointer is
    // to the live, writable value of the variable, `strlen` bytes long.
    unsafe {
        let value = libc::getenv(name.as_ptr());
        if !value.is_null() {
            std::ptr::write_bytes(value, 0, libc::strlen(value));
        }
        std::env::remove_var(ENV_KEY);
    }
}

/// The first line of a key file, read through a bounded buffer; a file
/// that others may read is used, with a warning.
pub(crate) fn read_key_file(file: &std::path::Path) -> Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let cant = |e: &std::io::Error| {
        let mut err = Error::io(format!("cannot read key file {}", file.display()), e);
        if err.status == ExitStatus::CantCreate {
            err.status = ExitStatus::NoInput;
        }
        err
    };
    let f = std::fs::File::open(file).map_err(|e| cant(&e))?;
    if let Ok(meta) = f.metadata()
        && meta.is_file()
        && meta.mode() & 0o077 != 0
    {
        log::warn!(
            "key file {} is readable by other users (mode {:04o}): chmod 600 it",
            file.display(),
            meta.mode() & 0o7777
        );
    }
    let mut text = zeroize::Zeroizing::new(Vec::with_capacity(128));
    f.take(MAX_KEY_LINE as u64 + 1)
        .read_to_end(&mut text)
        .map_err(|e| cant(&e))?;
    let Some(end) = text.iter().position(|&b| b == b'\n') else {
        if text.len() > MAX_KEY_LINE {
            return Err(Error::usage(format!(
                "key file {}: its first line is longer than {MAX_KEY_LINE} bytes",
                file.display()
            )));
        }
        return Ok(text.to_vec());
    };
    let line = &text[..end];
    Ok(line.strip_suffix(b"\r").unwrap_or(line).to_vec())
}

fn port_range(s: &str) -> std::result::Result<(u16, u16), String> {
    let (low, high) = s
        .split_once('-')
        .ok_or_else(|| "a port range is LOW-HIGH, e.g. 20000-32767".to_string())?;
    let low: Port = low.parse()?;
    let high: Port = high.parse()?;
    if low > high {
        return Err("a port range is LOW-HIGH with LOW <= HIGH".into());
    }
    Ok((low.0, high.0))
}

/// Wait for a master on PORT; for each daemon it announces, start a
/// bind-input on a free port and print "NAME PORT FIFO" on stdout.
#[derive(Parser, Debug)]
#[command(name = "pool", version)]
pub struct Pool {
    #[command(flatten)]
    pub(crate) key: KeyArgs,

    /// The TCP port to wait for a master on, 1024-49151
    #[arg(value_name = "PORT")]
    pub(crate) port: Port,

    /// Listen (and bind the daemons' ports) on this local address only
    #[arg(short, long, value_name = "ADDR")]
    pub(crate) bind: Option<IpAddr>,

    /// The ports the daemons' bindings are chosen from (the default stays
    /// below the kernel's ephemeral range, 32768 and up)
    #[arg(long, value_name = "LOW-HIGH", value_parser = port_range, default_value = "20000-32767")]
    pub(crate) ports: (u16, u16),

    /// Seconds a daemon's binding waits for the master's connection
    #[arg(long, value_name = "SECS", value_parser = seconds, default_value = "30")]
    pub(crate) accept_timeout: Duration,

    /// Write a newline to this inherited descriptor once listening, then
    /// close it (s6's notification-fd)
    #[arg(long, value_name = "FD")]
    pub(crate) ready_fd: Option<RawFd>,

    /// Serve one master's session only: then stop listening, and exit once
    /// its bindings have ended (without it, serve masters until stopped)
    #[arg(long)]
    pub(crate) once: bool,
}

impl Pool {
    /// The pool's options; also adopts what a service manager passed
    /// (readiness descriptor, socket): call it before any thread starts.
    pub fn options(self) -> Result<PoolOptions> {
        crate::notify::init(self.ready_fd, true)?;
        crate::activation::adopt()?;
        Ok(PoolOptions {
            key: self.key.resolve()?,
            port: self.port,
            bind: self.bind,
            ports: self.ports,
            accept_timeout: self.accept_timeout,
            step_timeout: self.key.timeout,
            once: self.once,
        })
    }
}

/// Run every executable of DDIR as a daemon whose standard output flows,
/// through a bind-output, to the pool at HOST:PORT.
#[derive(Parser, Debug)]
#[command(name = "master", version)]
pub struct Master {
    #[command(flatten)]
    pub(crate) key: KeyArgs,

    /// The host the pool runs on: a name, an IPv4 or an IPv6 address
    #[arg(value_name = "HOST")]
    pub(crate) host: Host,

    /// The pool's TCP port, 1024-49151
    #[arg(value_name = "PORT")]
    pub(crate) port: Port,

    /// The directory of daemons: every executable file in it is run
    #[arg(value_name = "DDIR")]
    pub(crate) ddir: PathBuf,

    /// Give up connecting (to the pool, and to each daemon's port) after
    /// SECS seconds
    #[arg(short = 't', long, value_name = "SECS", value_parser = seconds, default_value = "10")]
    pub(crate) connect_timeout: Duration,

    /// The session name asked of the pool (its daemons' streams are
    /// NAME.DAEMON): up to 24 of A-Z a-z 0-9 _ - (default: the short host
    /// name, other characters made '-')
    #[arg(short = 'n', long, value_name = "NAME", value_parser = crate::protocol::parse_name)]
    pub(crate) name: Option<Id>,
}

/// The short host name (up to its first dot), made a session name.
pub(crate) fn host_name() -> Id {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most the length given.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let raw = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).to_string()
    } else {
        String::new()
    };
    crate::protocol::name_of(raw.split('.').next().unwrap_or(""))
}

impl Master {
    /// The master's options; also takes NOTIFY_SOCKET for itself (so its
    /// daemons and bindings never inherit it): call it before any thread.
    pub fn options(self) -> Result<MasterOptions> {
        crate::notify::init(None, true)?;
        Ok(MasterOptions {
            key: self.key.resolve()?,
            host: self.host,
            port: self.port,
            ddir: self.ddir,
            name: self.name.unwrap_or_else(host_name),
            connect_timeout: self.connect_timeout,
            step_timeout: self.key.timeout,
        })
    }
}

#[cfg(test)]
mod to_args_tests {
    use super::*;

    /// What a pool or master builds parses back to the same thing.
    #[test]
    fn child_command_lines_round_trip() {
        let inputs: [&[&str]; 6] = [
            &["in1", "9999"],
            &["--once", "--key-fd", "5", "p.d", "20001"],
            &["--key", "-", "--key-file", "/k", "in1", "9999"],
            &[
                "--once",
                "--allow",
                "127.0.0.1",
                "--allow",
                "10.0.0.0/8",
                "--accept-timeout",
                "2.5",
                "d",
                "20001",
            ],
            &[
                "-b",
                "::1",
                "--max-conns",
                "5",
                "--max-conns-per-addr",
                "2",
                "--idle-timeout",
                "0",
                "--line-timeout",
                "0.25",
                "x",
                "1024",
            ],
            &[
                "-f",
                "--watchdog-fd",
                "7",
                "--ready-fd",
                "9",
                "y.z",
                "49151",
            ],
        ];
        for args in inputs {
            let first = BindInput::try_parse_from(
                std::iter::once("bind-input").chain(args.iter().copied()),
            )
            .unwrap();
            let again = BindInput::try_parse_from(
                std::iter::once("bind-input".to_string()).chain(first.to_args()),
            )
            .unwrap();
            assert_eq!(format!("{first:?}"), format!("{again:?}"), "{args:?}");
        }
        let outputs: [&[&str]; 4] = [
            &["out1", "localhost", "9999"],
            &["-t", "0.5", "-f", "--watchdog-fd", "3", "o", "::1", "20000"],
            &[
                "--key-fd",
                "4",
                "--spool",
                "64K",
                "--spool-full",
                "drop-oldest",
                "--backoff-max",
                "0.5",
                "--retry-for",
                "0",
                "--peer-timeout",
                "3",
                "o",
                "::1",
                "20000",
            ],
            &["--reconnect", "--retry-for", "30", "o", "h", "20000"],
        ];
        for args in outputs {
            let first = BindOutput::try_parse_from(
                std::iter::once("bind-output").chain(args.iter().copied()),
            )
            .unwrap();
            let again = BindOutput::try_parse_from(
                std::iter::once("bind-output".to_string()).chain(first.to_args()),
            )
            .unwrap();
            assert_eq!(format!("{first:?}"), format!("{again:?}"), "{args:?}");
        }
    }
}
