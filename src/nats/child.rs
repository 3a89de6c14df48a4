//! The command lines of the NATS bindings that nats-master and nats-pool
//! start as children, built from the clap types they parse into (as
//! cli.rs does for bind-input and bind-output), so that a renamed flag
//! breaks the build or the round-trip test, never a pool at run time.
//!
//! Secrets stay in their files: a child is given the files' paths (made
//! absolute), never their contents.

use clap::Parser;

use crate::args::Id;
use crate::cli::Args;
use crate::nats::cli::{ConnectArgs, Deliver, NatsArgs, NatsInput, NatsOutput, Subject};

impl ConnectArgs {
    fn push_args(&self, a: &mut Args) {
        let path = |p: &Option<std::path::PathBuf>| {
            p.as_ref().map(|p| {
                std::path::absolute(p)
                    .unwrap_or(p.clone())
                    .display()
                    .to_string()
            })
        };
        a.value("--server", Some(self.server.join(",")));
        a.value("--user", self.user.as_ref());
        a.value("--password-file", path(&self.password_file));
        a.value("--token-file", path(&self.token_file));
        a.value("--creds", path(&self.creds));
        a.value("--nkey", path(&self.nkey));
        a.flag("--tls", self.tls);
        a.value("--tls-ca", path(&self.tls_ca));
        a.value("--tls-cert", path(&self.tls_cert));
        a.value("--tls-key", path(&self.tls_key));
        a.secs("--connect-timeout", Some(self.connect_timeout));
    }
}

impl NatsArgs {
    /// The options both bindings take, then `-- ID SUBJECT`.
    fn push_args(&self, a: &mut Args, id: &Id, subject: &Subject) {
        a.value("--stream", self.via.stream.as_ref());
        a.flag("--core", self.via.core);
        self.connect.push_args(a);
        self.common.push_args(a);
        a.0.extend(["--".into(), id.to_string(), subject.0.clone()]);
    }
}

impl std::fmt::Display for Deliver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Deliver::New => f.write_str("new"),
            Deliver::All => f.write_str("all"),
            Deliver::Last => f.write_str("last"),
            Deliver::Since(t) => write!(f, "@{}", t.unix_timestamp()),
        }
    }
}

impl NatsOutput {
    /// `nats-output ID SUBJECT` into the JetStream stream `stream`, with
    /// these connection settings.
    pub(crate) fn child(id: &Id, subject: &Subject, stream: &str, connect: &ConnectArgs) -> Self {
        let mut b = NatsOutput::try_parse_from(["nats-output", id.as_str(), "--", &subject.0])
            .expect("a valid ID and subject parse");
        b.nats.via.stream = Some(stream.to_string());
        b.nats.connect = connect.clone();
        b
    }

    /// The command line (without the program's name) that parses back
    /// into this.
    pub(crate) fn to_args(&self) -> Vec<String> {
        let mut a = Args::default();
        self.nats.push_args(&mut a, &self.id, &self.subject);
        a.0
    }
}

impl NatsInput {
    /// `nats-input ID SUBJECT` through the durable consumer `durable` of
    /// the JetStream stream `stream`, from its first message.
    pub(crate) fn child(
        (id, subject): (&Id, &Subject),
        (stream, durable): (&str, &str),
        connect: &ConnectArgs,
    ) -> Self {
        let mut b = NatsInput::try_parse_from(["nats-input", id.as_str(), "--", &subject.0])
            .expect("a valid ID and subject parse");
        b.nats.via.stream = Some(stream.to_string());
        b.durable = Some(durable.to_string());
        b.deliver = Deliver::All;
        b.nats.connect = connect.clone();
        b
    }

    /// The command line (without the program's name) that parses back
    /// into this.
    pub(crate) fn to_args(&self) -> Vec<String> {
        let mut a = Args::default();
        a.value("--durable", self.durable.as_ref());
        a.value("--queue", self.queue.as_ref());
        // It conflicts with --core, which has no start point.
        a.value("--deliver", (!self.nats.via.core).then_some(&self.deliver));
        self.nats.push_args(&mut a, &self.id, &self.subject);
        a.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `args` parsed as `program`'s, built back by `to_args` and parsed
    /// again, give the same thing.
    fn round_trip<T: Parser + std::fmt::Debug>(
        program: &str,
        cases: &[&[&str]],
        to_args: impl Fn(&T) -> Vec<String>,
    ) {
        for args in cases {
            let parsed = T::try_parse_from(std::iter::once(program).chain(args.iter().copied()))
                .expect("parses");
            let again =
                T::try_parse_from(std::iter::once(program.to_string()).chain(to_args(&parsed)))
                    .expect("round trip parses");
            assert_eq!(format!("{parsed:?}"), format!("{again:?}"), "{args:?}");
        }
    }

    /// What nats-master and nats-pool build parses back to the same thing.
    #[test]
    fn nats_child_command_lines_round_trip() {
        let tls = "--user u --password-file /p --tls --tls-ca /ca --tls-cert /c --tls-key /k";
        let tls: Vec<&str> = tls
            .split(' ')
            .chain(["-t", "2.5", "--core", "x", "a.b"])
            .collect();
        round_trip::<NatsOutput>(
            "nats-output",
            &[
                &["d", "logs.h.d"],
                &["--stream", "LOGS", "-s", "nats://a:1,tls://b:2", "d", "l.x"],
                &tls,
            ],
            NatsOutput::to_args,
        );
        let creds = "--durable k --deliver @1700000000 --nkey /n d l.*";
        let token = "--queue g --token-file /t --core x a.b";
        round_trip::<NatsInput>(
            "nats-input",
            &[
                &["d", "logs.>"],
                &creds.split(' ').collect::<Vec<_>>(),
                &token.split(' ').collect::<Vec<_>>(),
            ],
            NatsInput::to_args,
        );
    }
}
