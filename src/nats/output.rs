//! nats-output: every whole line written into a FIFO, published as one
//! NATS message.
//!
//! Into JetStream when a stream holds the subject: each publish is
//! acknowledged by the server, and carries a `Nats-Msg-Id` made of the
//! binding's stream identity (ID, host, start time) and the line's byte
//! offset, so a line sent again after a lost acknowledgement (a reconnect)
//! is dropped by the server's de-duplication instead of stored twice.
//! At most [`WINDOW`] lines wait for their acknowledgement; then the
//! binding stops reading its FIFO and the writers block, as a TCP peer
//! that stops reading makes bind-output do: memory stays bounded, and an
//! outage of the server holds the writers, losing nothing.
//!
//! Otherwise core NATS: published at once, no acknowledgement (at most
//! once; what the client holds when the server goes away may be lost).
//!
//! Stopping is bind-output's: a stop signal sends what the FIFO holds
//! (within a second), SIGUSR1 drains it to end-of-file, however long.

use std::collections::VecDeque;
use std::future::{Future, IntoFuture};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use tokio::io::Interest;

use crate::args::Id;
use crate::background::Ready;
use crate::binding::{Binding, BindingOptions, Reason, StopEvents};
use crate::error::{Error, ExitStatus, Result};
use crate::nats::cli::Subject;
use crate::nats::connect::{Settings, js_error};
use crate::nats::events::{self, AsyncStop};

/// Lines published and not acknowledged yet, at most.
pub(crate) const WINDOW: usize = 1024;
/// How long an acknowledgement may take before the line is sent again.
const ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a stopping binding may spend publishing what is left.
const FLUSH_LIMIT: Duration = Duration::from_millis(900);
/// Read from the FIFO at once, at most.
const CHUNK: usize = 64 * 1024;

pub struct OutputOptions {
    pub(crate) id: Id,
    pub(crate) subject: Subject,
    pub(crate) stream: Option<String>,
    pub(crate) core: bool,
    pub(crate) settings: Settings,
    pub(crate) common: BindingOptions,
}

/// Builds a current-thread runtime: the binding is one thread, as the
/// plain ones are (the signal mask, set before, stays the only one).
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("cannot start the NATS client's runtime", &e))
}

pub fn run(opts: OutputOptions) -> Result<()> {
    if opts.subject.has_wildcard() {
        return Err(Error::usage(format!(
            "SUBJECT '{}': a published subject has no wildcards",
            opts.subject
        )));
    }
    let binding = Binding::open(&opts.id, &opts.common)?;
    let common = opts.common.clone();
    binding.run("nats-output", &common, move |binding, stop, ready| {
        runtime()?.block_on(serve(binding, stop, ready, &opts))
    })
}

/// A line published, kept until acknowledged so it can be sent again.
struct InFlight {
    id: String,
    payload: bytes::Bytes,
    ack: Pin<
        Box<
            dyn Future<
                    Output = std::result::Result<
                        jetstream::publish::PublishAck,
                        jetstream::context::PublishError,
                    >,
                > + Send,
        >,
    >,
}

enum Sink {
    Core(async_nats::Client),
    JetStream(jetstream::Context),
}

/// The binding's stream identity: unique to this run of this binding, so
/// that message IDs of two runs (or hosts) never meet.
fn identity(id: &Id) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{id}@{host}:{started:x}.{}", std::process::id())
}

async fn serve(
    binding: &mut Binding,
    stop: &StopEvents,
    ready: &mut Ready,
    opts: &OutputOptions,
) -> Result<()> {
    let client = opts
        .settings
        .connect(&format!("nats-output {}", opts.id))
        .await?;
    let subject = opts.subject.0.clone();
    let sink = if opts.core {
        Sink::Core(client.clone())
    } else {
        let js = jetstream::ContextBuilder::new()
            .timeout(ACK_TIMEOUT)
            .ack_timeout(ACK_TIMEOUT)
            .max_ack_inflight(WINDOW * 2)
            .build(client.clone());
        match &opts.stream {
            Some(name) => {
                js.get_or_create_stream(jetstream::stream::Config {
                    name: name.clone(),
                    subjects: vec![subject.clone()],
                    ..Default::default()
                })
                .await
                .map_err(|e| js_error(format!("cannot use the JetStream stream {name}"), e))?;
                Sink::JetStream(js)
            }
            None => match js.stream_by_subject(subject.clone()).await {
                Ok(name) => {
                    log::info!("stream {name} holds {subject}: publishing into JetStream");
                    Sink::JetStream(js)
                }
                Err(e) => {
                    log::info!("no JetStream stream holds {subject} ({e}): core NATS");
                    Sink::Core(client.clone())
                }
            },
        }
    };
    let max_line = client.server_info().max_payload.max(1024);
    log::info!(
        "{} publishing to {subject} on {} ({}), FIFO {}",
        binding.id,
        opts.settings.servers(),
        match sink {
            Sink::Core(_) => "core NATS",
            Sink::JetStream(_) => "JetStream",
        },
        binding.fifo.path().display()
    );
    crate::status::start_binding(binding, "nats-output", 0, Some(&opts.settings.servers()));
    binding.ready(ready);
    let mut publisher = Publisher {
        sink,
        subject,
        identity: identity(&binding.id),
        offset: 0,
        pending: VecDeque::new(),
        buf: Vec::new(),
        max_line,
    };
    let events = AsyncStop::new(stop)?;
    let fifo = events::watch(binding.fifo.reader().as_raw_fd(), Interest::READABLE)?;
    let mut chunk = vec![0u8; CHUNK];
    let mut draining = false;
    let reason = loop {
        let room = publisher.pending.len() < WINDOW && !publisher.backlog();
        tokio::select! {
            reason = events.next(), if !draining => match reason {
                Reason::Drain => {
                    log::info!("draining: {reason}");
                    binding.fifo.remove();
                    binding.fifo.close_writer();
                    draining = true;
                }
                other => break other,
            },
            acked = publisher.front_ack() => {
                publisher.acked(acked).await?;
                publisher.pump().await?;
            }
            n = events::read(&fifo, &mut chunk), if room => {
                let n = n.map_err(|e| Error::io("cannot read the FIFO", &e))?;
                if n == 0 {
                    // Draining, and every writer is done.
                    publisher.finish_line().await?;
                    publisher.settle(None).await?;
                    let _ = publisher.flush(&client).await;
                    return Ok(());
                }
                crate::status::add_in(n);
                publisher.take(&chunk[..n]).await?;
            }
        }
    };
    // A stop: what the FIFO holds now goes out, within the limit.
    log::info!("stopping: {reason}");
    binding.fifo.remove();
    let deadline = Instant::now() + FLUSH_LIMIT;
    while let Some(n) = events::read_now(binding.fifo.reader().as_raw_fd(), &mut chunk)
        .map_err(|e| Error::io("cannot read the FIFO", &e))?
    {
        if n == 0 || Instant::now() >= deadline {
            break;
        }
        publisher.take(&chunk[..n]).await?;
        while publisher.backlog() && Instant::now() < deadline {
            let acked = tokio::time::timeout_at(deadline.into(), publisher.front_ack()).await;
            match acked {
                Ok(acked) => publisher.acked(acked).await?,
                Err(_) => break,
            }
            publisher.pump().await?;
        }
    }
    if !publisher.backlog() {
        publisher.finish_line().await?;
    }
    publisher.settle(Some(deadline)).await?;
    let _ = tokio::time::timeout_at(deadline.into(), publisher.flush(&client)).await;
    let lost = binding.fifo.unread() + publisher.pending.len();
    if lost > 0 {
        log::warn!("stopped with {lost} bytes or lines not sent or not acknowledged");
    }
    Ok(())
}

struct Publisher {
    sink: Sink,
    subject: String,
    identity: String,
    /// Bytes of lines taken so far: the next line's offset.
    offset: u64,
    pending: VecDeque<InFlight>,
    /// Bytes read from the FIFO and not published yet: lines waiting for
    /// room in the window, and the start of a line whose newline has not
    /// come yet.
    buf: Vec<u8>,
    /// The server's largest message: a longer line goes in pieces.
    max_line: usize,
}

type AckResult =
    std::result::Result<jetstream::publish::PublishAck, jetstream::context::PublishError>;
type AckFuture = Pin<Box<dyn Future<Output = AckResult> + Send>>;

/// An acknowledgement that fails, a little later: a failing server must
/// not make the binding spin.
fn failed(e: jetstream::context::PublishError) -> AckFuture {
    Box::pin(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        Err(e)
    })
}

impl Publisher {
    /// Takes bytes read from the FIFO, and publishes what lines it can.
    async fn take(&mut self, bytes: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(bytes);
        self.pump().await
    }

    /// Whether whole lines (or a piece of a line too long) wait to be
    /// published: then the FIFO is not read further.
    fn backlog(&self) -> bool {
        self.buf.len() >= self.max_line || memchr::memchr(b'\n', &self.buf).is_some()
    }

    /// Publishes the whole lines taken, as long as the window has room.
    async fn pump(&mut self) -> Result<()> {
        let mut start = 0;
        while self.pending.len() < WINDOW {
            let rest = &self.buf[start..];
            let (line, len) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..i], i + 1),
                None if rest.len() >= self.max_line => (&rest[..self.max_line], self.max_line),
                None => break,
            };
            let payload = bytes::Bytes::copy_from_slice(line);
            start += len;
            self.publish(payload, len as u64).await?;
        }
        self.buf.drain(..start);
        Ok(())
    }

    /// A last line without its newline: published as it is, once the
    /// lines before it are.
    async fn finish_line(&mut self) -> Result<()> {
        loop {
            self.pump().await?;
            if !self.backlog() {
                break;
            }
            let acked = self.front_ack().await;
            self.acked(acked).await?;
        }
        if !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            let n = line.len() as u64;
            self.publish(line.into(), n).await?;
        }
        Ok(())
    }

    /// Publishes one line of `len` bytes of the stream (its newline
    /// included).
    async fn publish(&mut self, payload: bytes::Bytes, len: u64) -> Result<()> {
        let id = format!("{}:{}", self.identity, self.offset);
        self.offset += len;
        crate::status::add_out(payload.len() + 1);
        match &self.sink {
            Sink::Core(client) => client
                .publish(self.subject.clone(), payload)
                .await
                .map_err(|e| js_error(format!("cannot publish to {}", self.subject), e)),
            Sink::JetStream(_) => {
                let (Ok(ack) | Err(ack)) = self.send(&id, payload.clone()).await;
                self.pending.push_back(InFlight { id, payload, ack });
                Ok(())
            }
        }
    }

    /// Sends one message to JetStream; its acknowledgement is awaited later.
    /// A send that fails at once (the client's queue full in an outage)
    /// gives an acknowledgement that fails, so it is sent again.
    async fn send(
        &self,
        id: &str,
        payload: bytes::Bytes,
    ) -> std::result::Result<AckFuture, AckFuture> {
        let Sink::JetStream(js) = &self.sink else {
            unreachable!("only JetStream acknowledges")
        };
        let message = jetstream::message::PublishMessage::build()
            .payload(payload)
            .message_id(id);
        match js.send_publish(self.subject.clone(), message).await {
            Ok(ack) => Ok(ack.into_future()),
            Err(e) => Err(failed(e)),
        }
    }

    /// The oldest acknowledgement, when there is one to wait for.
    async fn front_ack(&mut self) -> AckResult {
        match self.pending.front_mut() {
            Some(front) => front.ack.as_mut().await,
            None => std::future::pending().await,
        }
    }

    /// The oldest line's acknowledgement came, or failed: a failure sends
    /// it and every line after it again, in order, under the same IDs.
    async fn acked(&mut self, acked: AckResult) -> Result<()> {
        match acked {
            Ok(ack) => {
                if ack.duplicate {
                    log::debug!("{} was a duplicate", self.pending[0].id);
                }
                self.pending.pop_front();
            }
            Err(e) => {
                log::warn!(
                    "no acknowledgement for {} ({e}): sending {} lines again",
                    self.pending[0].id,
                    self.pending.len()
                );
                // Until a send fails at once (the client cannot take more
                // in an outage): the rest fail with it, and all are sent
                // again in the next round, so a stop is never kept waiting.
                let mut sending = true;
                for i in 0..self.pending.len() {
                    self.pending[i].ack = if sending {
                        let (id, payload) =
                            (self.pending[i].id.clone(), self.pending[i].payload.clone());
                        let (ack, sent) = match self.send(&id, payload).await {
                            Ok(ack) => (ack, true),
                            Err(ack) => (ack, false),
                        };
                        sending = sent;
                        ack
                    } else {
                        failed(jetstream::context::PublishError::new(
                            jetstream::context::PublishErrorKind::TimedOut,
                        ))
                    };
                }
            }
        }
        Ok(())
    }

    /// Waits until every line is acknowledged, or the deadline.
    async fn settle(&mut self, deadline: Option<Instant>) -> Result<()> {
        while !self.pending.is_empty() {
            let acked = match deadline {
                Some(d) => match tokio::time::timeout_at(d.into(), self.front_ack()).await {
                    Ok(a) => a,
                    Err(_) => return Ok(()),
                },
                None => self.front_ack().await,
            };
            self.acked(acked).await?;
        }
        Ok(())
    }

    async fn flush(&self, client: &async_nats::Client) -> Result<()> {
        client
            .flush()
            .await
            .map_err(|e| Error::new(ExitStatus::Unavailable, format!("cannot flush: {e}")))
    }
}
