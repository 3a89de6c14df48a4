//! Command lines: what the commands' clap definitions share (value
//! parsers, the key options), the shared way a main turns a parse error or
//! a result into an exit status, and the command lines a pool or master
//! gives the bindings it starts.
//!
//! Each command's options are one clap type in the module that runs it
//! (`InputOptions` in input.rs, ...); the `///` comment on each field is
//! its `--help` text, and the man pages in `man/` say the same at length
//! (a test checks every option is there).

use std::io::Write;
use std::os::fd::RawFd;
use std::time::Duration;

use clap::Parser;

use std::path::PathBuf;

use crate::args::{Host, Id, Key, Port};
use crate::binding::BindingOptions;
use crate::error::{Error, ExitStatus, Result};
use crate::input::InputOptions;
use crate::output::OutputOptions;

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
            say(&format!(
                "{program}: {} (see '{program} --help')",
                one_line(&err)
            ));
            std::process::exit(ExitStatus::Usage.code());
        }
    }
}

/// Writes `line` and a newline to stderr in one write(2): `eprintln!`
/// writes its pieces one by one, and a shell writing to the same stderr
/// at that moment cut the line ("bind-inputbash: ...: cannot open ...").
fn say(line: &str) {
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
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
                say(&format!("{program}: {err}"));
            }
            std::process::exit(err.status.code())
        }
    }
}

pub(crate) fn seconds(s: &str) -> std::result::Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 && n <= 86400.0 => Ok(Duration::from_secs_f64(n)),
        _ => Err("a duration is a number of seconds, more than 0 and at most 86400".into()),
    }
}

/// Like [`seconds`], and 0 too (which the option's text says means none).
pub(crate) fn seconds_or_zero(s: &str) -> std::result::Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(0.0) => Ok(Duration::ZERO),
        _ => seconds(s).map_err(|_| "a duration is a number of seconds from 0 to 86400".into()),
    }
}

/// Like [`seconds_or_zero`], 0 made `None`: for a limit that 0 turns off.
pub(crate) fn seconds_or_none(s: &str) -> std::result::Result<Option<Duration>, String> {
    seconds_or_zero(s).map(|d| (!d.is_zero()).then_some(d))
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
    /// The key, if any: through [`read_key`] (environment wiped, process
    /// undumpable, key file bounded), or from `--key-fd`.
    pub(crate) fn resolve(&self) -> Result<Option<Key>> {
        if let Some(fd) = self.key_fd {
            return crate::stream::read_key_fd(fd).map(Some);
        }
        self.key
            .as_deref()
            .map(|key| read_key(key, self.key_file.as_deref()))
            .transpose()
    }

    /// A child's command line gets the descriptor, never a key itself
    /// unless the parent was given one on its own (`-` stays `-`).
    fn push_args(&self, a: &mut Args) {
        a.value("--key", self.key.as_ref());
        a.value("--key-file", self.key_file.as_ref().map(|p| p.display()));
        a.value("--key-fd", self.key_fd);
    }
}

/// A binding a pool or master starts as its child, held as the clap type
/// its command line parses into: a renamed or removed flag then breaks the
/// build or the round-trip test below, never a pool at run time.
pub(crate) enum ChildBinding {
    Input(InputOptions),
    Output(OutputOptions),
    /// nats-master's and nats-pool's children (src/nats/child.rs).
    #[cfg(feature = "nats")]
    NatsInput(Box<crate::nats::cli::NatsInput>),
    #[cfg(feature = "nats")]
    NatsOutput(Box<crate::nats::cli::NatsOutput>),
}

impl ChildBinding {
    /// `bind-input FLAGS... ID PORT`, every other option at its default
    /// (which may depend on the flags, as `--once` turns timeouts off).
    pub(crate) fn input(flags: &[&str], id: &Id, port: Port) -> InputOptions {
        let port = port.to_string();
        let positional = [id.as_str(), &port];
        let args = std::iter::once("bind-input").chain(flags.iter().copied());
        InputOptions::try_parse_from(args.chain(positional))
            .expect("valid flags, ID and port parse")
    }

    /// `bind-output ID HOST PORT` with every option at its default.
    pub(crate) fn output(id: &Id, host: &Host, port: Port) -> OutputOptions {
        let args = ["bind-output", id.as_str(), host.as_str(), &port.to_string()];
        OutputOptions::try_parse_from(args).expect("a valid ID, host and port parse")
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

    pub(crate) fn common_mut(&mut self) -> &mut BindingOptions {
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
            ChildBinding::Input(b) => b.key_args.key_fd = Some(fd),
            ChildBinding::Output(b) => b.key_args.key_fd = Some(fd),
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

    /// A limit that `None` turns off, said as 0: always given, because
    /// its default is not 0.
    fn secs_or_zero(&mut self, name: &str, value: Option<Duration>) {
        self.secs(name, Some(value.unwrap_or(Duration::ZERO)));
    }
}

impl BindingOptions {
    pub(crate) fn push_args(&self, a: &mut Args) {
        a.flag("--foreground", self.foreground);
        a.value("--watchdog-fd", self.watchdog_fd);
        a.value("--ready-fd", self.ready_fd);
    }
}

impl InputOptions {
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
        a.secs_or_zero("--idle-timeout", self.idle_timeout);
        a.secs_or_zero("--line-timeout", self.line_timeout);
        a.secs("--accept-timeout", self.accept_timeout);
        self.key_args.push_args(&mut a);
        self.common.push_args(&mut a);
        a.0.extend([self.id.to_string(), self.port.to_string()]);
        a.0
    }
}

impl OutputOptions {
    /// The command line (without the program's name) that parses back
    /// into this.
    pub(crate) fn to_args(&self) -> Vec<String> {
        let mut a = Args::default();
        a.secs("--connect-timeout", Some(self.connect_timeout));
        self.key_args.push_args(&mut a);
        a.flag("--reconnect", self.reconnect);
        a.value("--spool", Some(self.spool));
        let full = clap::ValueEnum::to_possible_value(&self.spool_full);
        a.value("--spool-full", full.as_ref().map(|v| v.get_name()));
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
}

/// The longest first line a key file may have: a key is a password, not
/// a file to load whole (`--key-file /dev/zero` must not fill memory).
pub(crate) const MAX_KEY_LINE: usize = 4096;

impl KeyArgs {
    /// The key, through [`read_key`].
    pub(crate) fn resolve(&self) -> Result<Key> {
        read_key(&self.key, self.key_file.as_deref())
    }
}

/// The key, from where the arguments say it is (KEY, or with KEY `-`,
/// `key_file` or `FIFOBIND_KEY`). Holding the key, the process becomes
/// undumpable (no core file, no ptrace by other processes of the user)
/// and `FIFOBIND_KEY` leaves its environment, so that no binding, daemon
/// or daemon's child inherits it. Called from a main before any thread
/// is started.
fn read_key(key: &str, key_file: Option<&std::path::Path>) -> Result<Key> {
    let bytes = match (key, key_file) {
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

pub(crate) fn port_range(s: &str) -> std::result::Result<(u16, u16), String> {
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

#[cfg(test)]
mod to_args_tests {
    use super::*;

    /// The timeouts that `--once` turns off are on without it, and 0 or a
    /// value given says what it says either way.
    #[test]
    fn idle_and_line_timeouts_default_by_once() {
        let parse = |args: &[&str]| {
            let opts = InputOptions::try_parse_from(
                ["bind-input"].iter().chain(args).chain(&["in1", "9999"]),
            )
            .unwrap();
            (opts.idle_timeout, opts.line_timeout)
        };
        let s = |n| Some(Duration::from_secs(n));
        assert_eq!(parse(&[]), (s(60), s(10)));
        assert_eq!(parse(&["--once"]), (None, None));
        assert_eq!(
            parse(&["--once", "--idle-timeout", "5", "--line-timeout", "2"]),
            (s(5), s(2))
        );
        assert_eq!(
            parse(&["--idle-timeout", "0", "--line-timeout", "0"]),
            (None, None)
        );
        let id: Id = "p.d".parse().unwrap();
        let child = ChildBinding::input(&["--once"], &id, Port(20001));
        assert!(child.once);
        assert_eq!((child.idle_timeout, child.line_timeout), (None, None));
    }

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
            let first = InputOptions::try_parse_from(
                std::iter::once("bind-input").chain(args.iter().copied()),
            )
            .unwrap();
            let again = InputOptions::try_parse_from(
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
            let first = OutputOptions::try_parse_from(
                std::iter::once("bind-output").chain(args.iter().copied()),
            )
            .unwrap();
            let again = OutputOptions::try_parse_from(
                std::iter::once("bind-output".to_string()).chain(first.to_args()),
            )
            .unwrap();
            assert_eq!(format!("{first:?}"), format!("{again:?}"), "{args:?}");
        }
    }
}
