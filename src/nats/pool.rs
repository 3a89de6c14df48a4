//! nats-pool: pool's FIFOs, fed from NATS instead of a master's session.
//!
//! It watches the subjects of the stream that holds `PREFIX.>` (the
//! stream's own list of subjects, so what was published before it
//! started is found too) and, for each new `PREFIX.HOST.DAEMON`, starts
//! a nats-input child of ID `HOST.DAEMON` on that subject, through a
//! durable consumer of its own named after the subject: a restarted
//! nats-pool resumes every daemon's stream where it stopped, each line
//! once and in order. Then it prints `NAME FIFO`, as a pool prints
//! `NAME PORT FIFO`. The children are pool's: registry, guardian,
//! watchdog, signals and exit statuses ([`Owner`]). One that ends is
//! started again; all are stopped with it.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sha2::Digest;
use tokio::io::Interest;

use crate::args::Id;
use crate::cli::ChildBinding;
use crate::error::{Error, ExitStatus, Result};
use crate::nats::bus::NatsPoolOptions;
use crate::nats::cli::{NatsInput, Subject};
use crate::nats::output::runtime;
use crate::supervise::{Owner, START_LIMIT};

/// How often the stream's subjects are listed: how soon a new daemon's
/// FIFO appears.
const LOOK_EVERY: Duration = Duration::from_millis(250);
/// How long a child that ended, or could not start, waits to be started
/// again.
const RETRY_AFTER: Duration = Duration::from_secs(2);

pub fn run(opts: NatsPoolOptions) -> Result<()> {
    let mut owner = Owner::new("pool", false)?;
    owner.publish(0, Some(&opts.bus.settings.servers()));
    let outcome = runtime().and_then(|rt| rt.block_on(serve(&opts, &mut owner)));
    owner.finish(outcome)
}

/// The durable consumer of `subject`: readable, and unique (two subjects
/// that read alike differ in the hash).
fn consumer_name(durable: &str, name: &Id) -> String {
    let readable: String = name
        .as_str()
        .chars()
        .map(|c| if c == '.' { '_' } else { c })
        .collect();
    let hash = hex::encode(&sha2::Sha256::digest(name.as_str().as_bytes())[..4]);
    format!("{durable}-{readable}-{hash}")
}

async fn serve(opts: &NatsPoolOptions, owner: &mut Owner) -> Result<()> {
    let bus = &opts.bus;
    let (_client, mut stream) = bus.stream(&format!("nats-pool {}", bus.prefix)).await?;
    let signals =
        crate::nats::events::watch(owner.signals.as_fd().as_raw_fd(), Interest::READABLE)?;
    crate::notify::ready(&format!("watching {}", bus.wildcard()));
    let head = format!("{}.", bus.prefix);
    // ID → subject, of the children running.
    let mut running: HashMap<String, String> = HashMap::new();
    // Subjects whose child ended or failed, and when to try again.
    let mut retry: HashMap<String, Instant> = HashMap::new();
    let mut refused: HashSet<String> = HashSet::new();
    let mut listing_failed = false;
    loop {
        if let Some(sig) = owner.stop_signal() {
            return Err(Error::new(ExitStatus::Signal(sig as i32), ""));
        }
        for (entry, how) in owner.reap() {
            if let Some(subject) = running.remove(&entry.name) {
                log::warn!(
                    "the binding {} of {subject} ended ({how}): starting it again",
                    entry.name
                );
                retry.insert(subject, Instant::now() + RETRY_AFTER);
            }
        }
        match subjects(&mut stream, &bus.wildcard()).await {
            Ok(found) => {
                if listing_failed {
                    log::info!("the stream {} answers again", bus.stream);
                    listing_failed = false;
                }
                for subject in found {
                    let Some(rest) = subject.strip_prefix(&head) else {
                        continue;
                    };
                    if running.values().any(|s| s == &subject)
                        || retry.get(&subject).is_some_and(|t| Instant::now() < *t)
                        || refused.contains(&subject)
                    {
                        continue;
                    }
                    let name = match rest.parse::<Id>() {
                        Ok(name) => name,
                        Err(why) => {
                            log::warn!("{subject}: no FIFO for it, {rest} is not an ID ({why})");
                            refused.insert(subject);
                            continue;
                        }
                    };
                    retry.remove(&subject);
                    match start(opts, owner, &name, &subject) {
                        Ok(()) => {
                            running.insert(name.to_string(), subject);
                        }
                        Err(e) if matches!(e.status, ExitStatus::Signal(_)) => return Err(e),
                        Err(e) => {
                            log::error!("{e}: trying again in {} s", RETRY_AFTER.as_secs());
                            retry.insert(subject, Instant::now() + RETRY_AFTER);
                        }
                    }
                }
            }
            // The client reconnects by itself; the FIFOs stay meanwhile.
            Err(e) if !listing_failed => {
                log::warn!("cannot list the subjects of the stream {}: {e}", bus.stream);
                listing_failed = true;
            }
            Err(_) => {}
        }
        tokio::select! {
            guard = signals.readable() => {
                if let Ok(mut guard) = guard {
                    guard.clear_ready();
                }
            }
            () = tokio::time::sleep(LOOK_EVERY) => {}
        }
    }
}

/// The subjects of `stream` under `filter`.
async fn subjects(
    stream: &mut async_nats::jetstream::stream::Stream,
    filter: &str,
) -> std::result::Result<Vec<String>, String> {
    let mut listing = stream
        .info_with_subjects(filter)
        .await
        .map_err(|e| e.to_string())?;
    let mut found = Vec::new();
    while let Some(item) = listing.next().await {
        found.push(item.map_err(|e| e.to_string())?.0);
    }
    found.sort();
    Ok(found)
}

/// Starts the nats-input of `subject` and prints its `NAME FIFO` line.
fn start(opts: &NatsPoolOptions, owner: &mut Owner, name: &Id, subject: &str) -> Result<()> {
    let bus = &opts.bus;
    let subject: Subject = subject.parse().map_err(Error::usage)?;
    let durable = consumer_name(&opts.durable, name);
    let child = NatsInput::child((name, &subject), (&bus.stream, &durable), &bus.connect);
    let limit = bus.connect.connect_timeout * 2 + START_LIMIT;
    owner.start_binding(ChildBinding::NatsInput(Box::new(child)), name, limit, None)?;
    log::info!("{subject} → {name} (consumer {durable})");
    let fifo = owner.dir.fifo(name);
    let mut out = std::io::stdout().lock();
    // A reader that went away must not stop the pool.
    let _ = writeln!(out, "{name} {}", fifo.display());
    let _ = out.flush();
    Ok(())
}
