//! nats-master: master's daemons, their lines published to NATS.
//!
//! Everything but the far end is master's ([`crate::daemons`],
//! [`Owner`]): the daemon directory, one process group per daemon, the
//! registry, the guardian and watchdog, signals and exit statuses.
//! Instead of asking a pool for a port, each daemon gets a nats-output
//! child publishing on `PREFIX.HOST.DAEMON` into the JetStream stream
//! that holds `PREFIX.>` (made sure of first, so that no line goes
//! where nothing keeps it). There is no session and no key: the
//! server's credentials and TLS protect the stream, and the children
//! read the same credential files.

use crate::cli::ChildBinding;
use crate::daemons::{self, Plan};
use crate::error::Result;
use crate::nats::bus::NatsMasterOptions;
use crate::nats::cli::{NatsOutput, Subject};
use crate::supervise::{Owner, START_LIMIT};

pub fn run(opts: NatsMasterOptions) -> Result<()> {
    let ddir = std::path::absolute(&opts.ddir).unwrap_or(opts.ddir.clone());
    let list = daemons::list(&ddir)?;
    // Before any other thread (the runtime's resolver may start some):
    // then the runtime and its threads are gone.
    crate::nats::output::runtime()?.block_on(async {
        opts.bus
            .stream(&format!("nats-master {}", opts.name))
            .await
            .map(drop)
    })?;
    let mut owner = Owner::new("master", true)?;
    owner.publish(0, Some(&opts.bus.settings.servers()));
    let bus = &opts.bus;
    let mut started = Vec::new();
    let outcome = (|| {
        for (name, path) in &list {
            let subject = format!("{}.{}.{name}", bus.prefix, opts.name);
            let subject: Subject = subject.parse().map_err(crate::error::Error::usage)?;
            let child = NatsOutput::child(name, &subject, &bus.stream, &bus.connect);
            let plan = Plan {
                child: ChildBinding::NatsOutput(Box::new(child)),
                stream: name,
                // It connects and finds its stream before it is ready.
                limit: bus.connect.connect_timeout * 2 + START_LIMIT,
                secret: None,
                to: subject.to_string(),
            };
            started.push(daemons::start(&mut owner, name, path, &ddir, plan)?);
        }
        crate::notify::ready(&format!("{} daemons running", started.len()));
        daemons::wait(&mut owner, &mut started)
    })();
    owner.finish(outcome)
}
