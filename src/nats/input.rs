//! nats-input: every message received on a subject, one line in a FIFO.
//!
//! Under JetStream (a stream holds the subject) the binding pulls from a
//! consumer — durable when named, so the server remembers its place — at
//! most [`BATCH`] messages at a time, and acknowledges each only once its
//! line is in the FIFO: when the reader is slow the FIFO fills, the
//! binding stops pulling, and memory stays bounded. Lines are spliced
//! into the FIFO from [`Position`]'s record, which knows at every instant
//! which messages' lines are in, so a binding killed before its
//! acknowledgements reached the server, or a server restarted before it
//! stored them, does not make a line come twice: a message found there
//! is acknowledged only, whatever the server's count of its deliveries.
//! Bindings sharing a durable consumer (or a queue group, which names
//! one) share its messages.
//!
//! Otherwise core NATS: a subscription (a queue group's, if given), at
//! most once; the client buffers a bounded number of messages for a slow
//! reader and drops the rest.
//!
//! Lines go into the FIFO whole, as far as the kernel takes them whole:
//! written ones as bind-input writes them ([`PipeRoom`]), spliced ones
//! as [`Spliced`] counts the pipe's slots.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures_util::{FutureExt, StreamExt};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::args::Id;
use crate::background::Ready;
use crate::binding::{Binding, BindingOptions, StopEvents};
use crate::error::{Error, ExitStatus, Result};
use crate::framer::PipeRoom;
use crate::nats::cli::{Deliver, Subject};
use crate::nats::connect::{Settings, js_error};
use crate::nats::events::{self, AsyncStop, Fd};
use crate::nats::output::runtime;
use crate::nats::position::{DATA, MAX_LINES, Position, Stored};

/// Messages pulled at once, at most: what the binding holds for a slow
/// reader.
pub(crate) const BATCH: usize = 256;
/// A consumer's messages delivered and not acknowledged, at most.
pub(crate) const MAX_ACK_PENDING: i64 = 1024;
/// How long the server waits for an acknowledgement before it delivers
/// the message again (to this binding or another of its group).
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Longest wait between looks at the FIFO's room while a line waits for
/// enough of it (the kernel wakes a writer for one free page only).
const ROOM_CHECK: Duration = Duration::from_millis(20);

pub struct InputOptions {
    pub(crate) id: Id,
    pub(crate) subject: Subject,
    pub(crate) durable: Option<String>,
    pub(crate) queue: Option<String>,
    pub(crate) deliver: Deliver,
    pub(crate) stream: Option<String>,
    pub(crate) core: bool,
    pub(crate) settings: Settings,
    pub(crate) common: BindingOptions,
}

pub fn run(opts: InputOptions) -> Result<()> {
    let consumer = match (&opts.durable, &opts.queue) {
        (Some(d), Some(q)) if d != q => {
            return Err(Error::usage(
                "--durable and --queue name the same consumer under JetStream: give one",
            ));
        }
        (d, q) => d.clone().or_else(|| q.clone()),
    };
    if let Some(name) = &consumer
        && (name.is_empty() || name.chars().any(|c| c.is_whitespace() || ".*>".contains(c)))
    {
        return Err(Error::usage(format!(
            "'{name}': a consumer or queue group name has no spaces, dots, * or >"
        )));
    }
    let binding = Binding::open(&opts.id, &opts.common)?;
    let common = opts.common.clone();
    binding.run("nats-input", &common, move |binding, stop, ready| {
        runtime()?.block_on(serve(binding, stop, ready, &opts, consumer))
    })
}

enum Source {
    Core(async_nats::Subscriber),
    JetStream {
        // Boxed: the pull stream is large, the subscription small.
        messages: Box<pull::Stream>,
        position: Position,
    },
}

async fn serve(
    binding: &mut Binding,
    stop: &StopEvents,
    ready: &mut Ready,
    opts: &InputOptions,
    consumer: Option<String>,
) -> Result<()> {
    let client = opts
        .settings
        .connect(&format!("nats-input {}", opts.id))
        .await?;
    let subject = opts.subject.0.clone();
    let js = jetstream::new(client.clone());
    let stream = if opts.core {
        None
    } else if let Some(name) = &opts.stream {
        let s = js
            .get_or_create_stream(jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![subject.clone()],
                ..Default::default()
            })
            .await
            .map_err(|e| js_error(format!("cannot use the JetStream stream {name}"), e))?;
        Some((name.clone(), s))
    } else {
        match js.stream_by_subject(subject.clone()).await {
            Ok(name) => {
                let s = js
                    .get_stream(&name)
                    .await
                    .map_err(|e| js_error(format!("cannot use the JetStream stream {name}"), e))?;
                Some((name, s))
            }
            Err(e) if opts.durable.is_some() => {
                return Err(Error::new(
                    ExitStatus::Unavailable,
                    format!(
                        "--durable needs a JetStream stream holding {subject}, and none does \
                         ({e}): give --stream NAME to create one"
                    ),
                ));
            }
            Err(e) => {
                log::info!("no JetStream stream holds {subject} ({e}): core NATS");
                None
            }
        }
    };
    let mut source = match stream {
        None => {
            let sub = match &opts.queue {
                Some(group) => client.queue_subscribe(subject.clone(), group.clone()).await,
                None => client.subscribe(subject.clone()).await,
            }
            .map_err(|e| js_error(format!("cannot subscribe to {subject}"), e))?;
            // The subscription is in place only once the server has it.
            client
                .flush()
                .await
                .map_err(|e| js_error(format!("cannot subscribe to {subject}"), e))?;
            Source::Core(sub)
        }
        Some((stream_name, stream)) => {
            let config = pull::Config {
                durable_name: consumer.clone(),
                filter_subject: subject.clone(),
                deliver_policy: match opts.deliver {
                    Deliver::New => jetstream::consumer::DeliverPolicy::New,
                    Deliver::All => jetstream::consumer::DeliverPolicy::All,
                    Deliver::Last => jetstream::consumer::DeliverPolicy::Last,
                    Deliver::Since(t) => {
                        jetstream::consumer::DeliverPolicy::ByStartTime { start_time: t }
                    }
                },
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                max_ack_pending: MAX_ACK_PENDING,
                inactive_threshold: if consumer.is_some() {
                    Duration::ZERO
                } else {
                    Duration::from_secs(300)
                },
                ..Default::default()
            };
            let mut config = config;
            // When the consumer this binding replaces was made: its
            // record of lines written holds for the new one.
            let mut carried = None;
            if let (Some(name), None) = (&consumer, &opts.queue)
                && let Ok(info) = stream.consumer_info(name).await
                && info.num_ack_pending > 0
            {
                // A binding of this consumer died holding messages: the
                // server would deliver them again only after ACK_WAIT, and
                // after newer ones. The consumer's own binding (without a
                // queue group it has one) starts it again right after the
                // last message acknowledged, so the lines stay in order.
                let from = info.ack_floor.stream_sequence + 1;
                carried = Some(stamp(info.created));
                log::info!(
                    "consumer {name}: {} messages delivered and not acknowledged; \
                     resuming at stream sequence {from}",
                    info.num_ack_pending
                );
                stream
                    .delete_consumer(name)
                    .await
                    .map_err(|e| js_error(format!("cannot restart the consumer {name}"), e))?;
                config.deliver_policy = jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                };
            }
            let c: jetstream::consumer::Consumer<pull::Config> = match &consumer {
                Some(name) => stream.get_or_create_consumer(name, config).await,
                None => stream.create_consumer(config).await,
            }
            .map_err(|e| {
                js_error(
                    format!("cannot create a consumer of {subject} on stream {stream_name}"),
                    e,
                )
            })?;
            let consumer_name = c.cached_info().name.clone();
            let messages = c
                .stream()
                .max_messages_per_batch(BATCH)
                .heartbeat(Duration::from_secs(5))
                .messages()
                .await
                .map_err(|e| js_error(format!("cannot consume {subject}"), e))?;
            let position = Position::open(
                &binding.dir.dotfile(binding.id.as_str(), "nats"),
                &format!(
                    "{stream_name} {} {consumer_name}",
                    stamp(stream.cached_info().created)
                ),
                &stamp(c.cached_info().created),
                carried.as_deref(),
            )?;
            log::info!("consumer {consumer_name} of stream {stream_name}");
            Source::JetStream {
                messages: Box::new(messages),
                position,
            }
        }
    };
    log::info!(
        "{} receiving {subject} from {}, FIFO {}",
        binding.id,
        opts.settings.servers(),
        binding.fifo.path().display()
    );
    crate::status::start_binding(binding, "nats-input", 0, Some(&opts.settings.servers()));
    binding.ready(ready);
    let events = AsyncStop::new(stop)?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |p| p as usize);
    let mut writer = LineWriter {
        fd: binding.fifo.file().as_raw_fd(),
        watch: events::watch(binding.fifo.file().as_raw_fd(), Interest::WRITABLE)?,
        room: PipeRoom::new(binding.fifo.capacity(), page),
        capacity: binding.fifo.capacity(),
        line: Vec::new(),
        spliced: Spliced::new(binding.fifo.capacity(), page),
    };
    let unread = || binding.fifo.unread();
    let reason = loop {
        tokio::select! {
            reason = events.next() => break reason,
            step = receive(&mut source, &mut writer, &unread) => step?,
        }
    };
    log::info!("stopping: {reason}");
    // Acknowledgements sent are on their way: let them reach the server.
    let _ = tokio::time::timeout(Duration::from_millis(500), client.flush()).await;
    Ok(())
}

/// A time as the position file names it.
fn stamp(t: time::OffsetDateTime) -> String {
    t.unix_timestamp_nanos().to_string()
}

/// Takes one message and writes its line. A line is written whole or not
/// begun, so a stop in the middle of the wait leaves nothing half done
/// (the message then comes again: it was not acknowledged).
async fn receive(
    source: &mut Source,
    writer: &mut LineWriter,
    unread: &impl Fn() -> usize,
) -> Result<()> {
    match source {
        Source::Core(sub) => {
            let Some(message) = sub.next().await else {
                return Err(Error::new(
                    ExitStatus::Unavailable,
                    "the NATS connection was closed",
                ));
            };
            writer.write(&message.payload, unread).await
        }
        Source::JetStream { messages, position } => {
            let mut batch = match messages.next().await {
                Some(Ok(m)) => vec![m],
                Some(Err(e)) => {
                    // Missed heartbeats in an outage: the stream carries on
                    // once the client has reconnected.
                    log::warn!("consuming: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    return Ok(());
                }
                None => {
                    return Err(Error::new(
                        ExitStatus::Unavailable,
                        "the JetStream consumer ended",
                    ));
                }
            };
            // What else has come already goes in with it: a splice takes
            // a pipe slot of its own, so lines spliced one by one would
            // fill the FIFO with a few hundred of them.
            let mut bytes = batch[0].payload.len();
            while batch.len() < MAX_LINES && bytes < writer.spliced.chunk {
                match messages.next().now_or_never() {
                    Some(Some(Ok(m))) => {
                        bytes += m.payload.len() + 1;
                        batch.push(m);
                    }
                    Some(Some(Err(e))) => {
                        log::warn!("consuming: {e}");
                        break;
                    }
                    _ => break,
                }
            }
            let mut lines = Vec::with_capacity(batch.len());
            for message in &batch {
                let (m, delivered) = match message.info() {
                    Ok(info) => (
                        Stored {
                            seq: info.stream_sequence,
                            stamp: info.published.unix_timestamp_nanos() as u64,
                        },
                        info.delivered,
                    ),
                    Err(_) => (Stored { seq: 0, stamp: 0 }, 1),
                };
                let seq = m.seq;
                let line = message.payload.len() as u64 + 1;
                // Whatever the server says of its deliveries (after a
                // restart of its own it may not know of one), a message
                // whose line is in the FIFO is acknowledged only.
                match position.resumed(m) {
                    Some(rest) => {
                        let done = line.saturating_sub(rest);
                        log::info!(
                            "message {seq}: {done} of its {line} bytes were written before a \
                             restart: writing the rest"
                        );
                        lines.push((m, &message.payload[..], done as usize));
                    }
                    None if position.written(m) => {
                        log::info!(
                            "message {seq} (delivered {delivered} times) was written already: \
                             acknowledged only"
                        );
                    }
                    None => {
                        if delivered > 1 {
                            log::info!("message {seq} delivered {delivered} times, first written");
                        }
                        lines.push((m, &message.payload[..], 0));
                    }
                }
            }
            writer.splice(position, &lines, unread).await?;
            for message in &batch {
                if let Err(e) = message.ack().await {
                    log::warn!("cannot acknowledge a message: {e}");
                }
            }
            Ok(())
        }
    }
}

struct LineWriter {
    fd: std::os::fd::RawFd,
    watch: AsyncFd<Fd>,
    room: PipeRoom,
    capacity: usize,
    line: Vec<u8>,
    spliced: Spliced,
}

impl LineWriter {
    /// Writes `payload` and a newline into the FIFO, waiting for room.
    async fn write(&mut self, payload: &[u8], unread: &impl Fn() -> usize) -> Result<()> {
        self.line.clear();
        self.line.extend_from_slice(payload);
        self.line.push(b'\n');
        let mut done = 0;
        while done < self.line.len() {
            let rest = &self.line[done..];
            self.room.unread(unread());
            // Whole when the kernel is sure to take it whole; a line longer
            // than the pipe goes in pieces, as bind-input's do.
            let whole = rest.len() <= libc::PIPE_BUF || rest.len() <= self.room.room();
            if whole || (done == 0 && rest.len() > self.capacity) || done > 0 {
                match events::raw_write(self.fd, rest) {
                    Ok(n) => {
                        self.room.wrote(n);
                        crate::status::add_out(n);
                        done += n;
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Error::io("cannot write into the FIFO", &e)),
                }
            }
            self.wait().await;
        }
        crate::status::add_in(payload.len());
        Ok(())
    }

    /// Until the FIFO may have more room.
    async fn wait(&self) {
        tokio::select! {
            guard = self.watch.writable() => {
                if let Ok(mut guard) = guard {
                    guard.clear_ready();
                }
            }
            () = tokio::time::sleep(ROOM_CHECK) => {}
        }
    }

    /// Splices `lines` (stream sequence, payload, bytes of its line in
    /// the FIFO already: a killed binding's cut line) into the FIFO from
    /// `position`'s data area, each with a newline, waiting for room, and
    /// records each once whole. What went in is in `position` at every
    /// instant, whatever stops it.
    async fn splice(
        &mut self,
        position: &mut Position,
        lines: &[(Stored, &[u8], usize)],
        unread: &impl Fn() -> usize,
    ) -> Result<()> {
        self.line.clear();
        // Where in `self.line` each line ends.
        let mut ends = Vec::with_capacity(lines.len());
        for &(seq, payload, done) in lines {
            let start = self.line.len();
            self.line.extend_from_slice(payload);
            self.line.push(b'\n');
            self.line.drain(start..start + done.min(payload.len() + 1));
            ends.push((seq, self.line.len() as u64));
        }
        let mut from = 0;
        let mut recorded = 0;
        while from < self.line.len() {
            // A piece: a chunk of the lines; its entries are the lines it
            // holds a part of, each ending where it ends (past the piece
            // for one that goes on).
            let to = self.line.len().min(from + self.spliced.chunk);
            let piece = &self.line[from..to];
            let entries: Vec<(Stored, u64)> = ends
                .iter()
                .enumerate()
                .filter(|&(i, &(_, end))| {
                    let start = if i == 0 { 0 } else { ends[i - 1].1 };
                    end > from as u64 && start < to as u64
                })
                .map(|(_, &(seq, end))| (seq, end - from as u64))
                .collect();
            let at = loop {
                self.spliced.unread(unread());
                if let Some(at) = self.spliced.place(piece.len()) {
                    break at;
                }
                self.wait().await;
            };
            position.put(at, piece, &entries);
            self.spliced.head = at + piece.len() as u64;
            let mut off = 0;
            while off < piece.len() {
                self.spliced.unread(unread());
                let rest = piece.len() - off;
                let room = self.spliced.room(at + off as u64);
                // Whole lines, as far as the FIFO's slots take them.
                let n = if rest as u64 <= room {
                    rest
                } else {
                    entries
                        .iter()
                        .map(|&(_, end)| end as usize)
                        .filter(|&end| end > off && ((end - off) as u64) <= room)
                        .max()
                        .map_or(0, |end| end - off)
                };
                if n > 0 {
                    match position.splice(self.fd, n) {
                        Ok(0) => {
                            return Err(Error::new(
                                ExitStatus::IoErr,
                                "cannot splice a line into the FIFO: its record ended",
                            ));
                        }
                        Ok(n) => {
                            self.spliced.spliced(at + off as u64, n);
                            crate::status::add_out(n);
                            off += n;
                            while let Some(&(seq, end)) = ends.get(recorded)
                                && end <= (from + off) as u64
                            {
                                position.record(seq);
                                recorded += 1;
                            }
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(Error::io("cannot splice a line into the FIFO", &e)),
                    }
                }
                self.wait().await;
            }
            from = to;
        }
        for &(_, payload, _) in lines {
            crate::status::add_in(payload.len());
        }
        Ok(())
    }
}

/// What the FIFO holds of the lines spliced from the data area: the
/// pieces not read to their end yet, each a span of the area and one
/// pipe slot per page it touches (a spliced page is never merged with
/// another write, as written ones are). Bytes other writers put in make
/// it see the FIFO fuller than it is, never emptier: the data area is
/// written over only where the FIFO is surely past.
struct Spliced {
    page: u64,
    slots: u64,
    /// Longest piece of a line put in at once: a line up to this long
    /// goes in whole, as a written one up to the pipe's size does.
    chunk: usize,
    /// Where in the data area (counted on, not wrapped) the next piece
    /// goes.
    head: u64,
    /// Bytes spliced in all.
    total: u64,
    /// (start in the area, `total` at its end, slots).
    pieces: VecDeque<(u64, u64, u64)>,
    used: u64,
}

impl Spliced {
    fn new(capacity: usize, page: usize) -> Spliced {
        Spliced {
            page: page as u64,
            slots: (capacity / page) as u64,
            // A page less than the pipe: a piece fits it from any start.
            chunk: (capacity - page).min(DATA as usize / 2),
            head: 0,
            total: 0,
            pieces: VecDeque::new(),
            used: 0,
        }
    }

    /// The FIFO holds `unread` bytes now (FIONREAD).
    fn unread(&mut self, unread: usize) {
        let consumed = self.total.saturating_sub(unread as u64);
        while let Some(&(_, end, slots)) = self.pieces.front() {
            if end > consumed {
                break;
            }
            self.pieces.pop_front();
            self.used -= slots;
        }
    }

    fn span(&self, at: u64, len: usize) -> u64 {
        (at + len as u64 - 1) / self.page - at / self.page + 1
    }

    /// How many bytes from `at` on the FIFO's free slots take.
    fn room(&self, at: u64) -> u64 {
        if self.pieces.is_empty() {
            return u64::MAX;
        }
        match self.slots.saturating_sub(self.used) {
            0 => 0,
            free => (at / self.page + free) * self.page - at,
        }
    }

    /// Where a piece of `len` bytes goes: right after the last one,
    /// or at the area's start if it would cross the end; None while the
    /// FIFO may still hold that place's bytes.
    fn place(&self, len: usize) -> Option<u64> {
        let len = len as u64;
        let mut at = self.head;
        if at % DATA + len > DATA {
            at = at.next_multiple_of(DATA);
        }
        let tail = self.pieces.front().map_or(at, |&(start, _, _)| start);
        (at + len - tail <= DATA).then_some(at)
    }

    /// `n` bytes at `at` went in.
    fn spliced(&mut self, at: u64, n: usize) {
        let slots = self.span(at, n);
        self.total += n as u64;
        self.pieces.push_back((at, self.total, slots));
        self.used += slots;
    }
}
