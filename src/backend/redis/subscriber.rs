//! The bus's subscriber: a Redis connection that only subscribes, with a reader of its own.
//!
//! Every message a node receives from the bus is read here, so this is on the path of every
//! delivery. redis-rs reads each reply with its general RESP parser, which cost about 5,000
//! instructions per pub/sub message (callgrind), more than a node's own work on it; on a
//! subscribed connection a reply has one of a few shapes (a message, a confirmation, a pong, an
//! error), read here in a few hundred, and a message's payload is handed on without a copy.
//! The connection speaks RESP2, where a subscribed connection answers every command with arrays.
//!
//! One task owns the socket: it writes the commands it is sent and reads everything Redis
//! sends, handing each message to the [`Receiver`] on that same task and each other reply to the
//! command waiting for it, in order. When the connection ends, the commands waiting fail and the
//! receiver is told once; connecting again is the owner's job.
//!
//! The sharded bus (`sharded.rs`) uses the same connection for Redis Cluster's sharded pub/sub:
//! `smessage` is a message like `message`, and every `sunsubscribe` goes to the receiver rather
//! than to a waiting command, because Redis 7 sends one unasked when the slot of a subscribed
//! channel moves to another node, and in RESP2 it looks just like the confirmation of a
//! `SUNSUBSCRIBE`. So a `SUNSUBSCRIBE` waits for no confirmation: it is answered by nothing, or
//! by an error, and a [`Batch`] follows every run of them with a `PING` that tells which.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use redis::{ConnectionAddr, ConnectionInfo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// Bytes read at least at once.
const READ_SIZE: usize = 16 * 1024;

/// Where the subscriber's traffic goes.
pub(crate) trait Receiver: Send + Sync + 'static {
    /// The messages published on the channels of one read from the connection, in order.
    /// Called on the connection's task: it must not block.
    fn messages(&self, read: &[Published]);
    /// The connection ended (it is not called when the owner drops the subscriber).
    fn closed(&self);
    /// Redis no longer sends this connection `channel`'s sharded messages: the answer to a
    /// `SUNSUBSCRIBE`, or its own notice that the channel's slot moved away. Called on the
    /// connection's task, after the messages read before it.
    fn unsubscribed(&self, _channel: &[u8]) {}
}

/// A message as received: the frame it came in, and where its channel and payload are in it.
pub(crate) struct Published {
    frame: Bytes,
    channel: std::ops::Range<usize>,
    payload: std::ops::Range<usize>,
}

impl Published {
    pub(crate) fn channel(&self) -> &[u8] {
        &self.frame[self.channel.clone()]
    }

    pub(crate) fn payload(&self) -> Bytes {
        self.frame.slice(self.payload.clone())
    }
}

/// A handle on the connection; its task ends when every handle is dropped.
#[derive(Clone)]
pub(crate) struct Subscriber {
    commands: mpsc::UnboundedSender<Command>,
    timeout: Duration,
}

/// Commands to write at once, and for each the number of replies that complete it (0: a
/// `SUNSUBSCRIBE`, which only an error answers) and who waits for them.
struct Command {
    bytes: Vec<u8>,
    parts: Vec<(usize, oneshot::Sender<io::Result<()>>)>,
}

/// Sharded pub/sub commands written to the connection in one write, each answered on its own.
/// Every command names channels of one slot (Redis refuses others with `CROSSSLOT`).
#[derive(Default)]
pub(crate) struct Batch {
    bytes: Vec<u8>,
    /// The replies each command waits for, in order (0: a `SUNSUBSCRIBE`).
    parts: Vec<usize>,
    /// Whether a `SUNSUBSCRIBE` waits for the `PING` that tells it succeeded.
    unsettled: bool,
}

impl Batch {
    /// Adds an `SSUBSCRIBE`, confirmed once per channel; answers its index among the outcomes.
    pub(crate) fn ssubscribe(&mut self, channels: &[String]) -> usize {
        self.settle();
        write_command(&mut self.bytes, b"SSUBSCRIBE", channels);
        self.parts.push(channels.len());
        self.parts.len() - 1
    }

    /// Adds a `SUNSUBSCRIBE`; answers its index among the outcomes.
    pub(crate) fn sunsubscribe(&mut self, channels: &[String]) -> usize {
        write_command(&mut self.bytes, b"SUNSUBSCRIBE", channels);
        self.parts.push(0);
        self.unsettled = true;
        self.parts.len() - 1
    }

    /// Follows a run of `SUNSUBSCRIBE`s with a `PING`: its reply, when no error came first,
    /// says they succeeded.
    fn settle(&mut self) {
        if std::mem::take(&mut self.unsettled) {
            write_command(&mut self.bytes, b"PING", &[]);
            self.parts.push(1);
        }
    }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

impl Subscriber {
    /// Connects to the server `info` names, signs in when it names credentials, and starts the
    /// connection's task. `timeout` bounds the connect and every command.
    pub(crate) async fn connect(info: &ConnectionInfo, timeout: Duration, to: Arc<dyn Receiver>) -> io::Result<Self> {
        let mut stream = tokio::time::timeout(timeout, open(info.addr()))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting to redis timed out"))??;
        let mut input = BytesMut::new();
        let settings = info.redis_settings();
        if let Some(password) = settings.password() {
            let mut auth: Vec<&[u8]> = vec![b"AUTH"];
            auth.extend(settings.username().map(str::as_bytes));
            auth.push(password.as_bytes());
            let signed_in = async {
                stream.write_all(&command(&auth)).await?;
                loop {
                    if let Some((reply, used)) = Reply::read(&input)? {
                        let outcome = reply.outcome(&input);
                        input.advance(used);
                        return outcome;
                    }
                    read(&mut stream, &mut input).await?;
                }
            };
            tokio::time::timeout(timeout, signed_in)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "signing in to redis timed out"))??;
        }
        let (commands, queue) = mpsc::unbounded_channel();
        tokio::spawn(run(stream, input, queue, to));
        Ok(Self { commands, timeout })
    }

    pub(crate) async fn subscribe(&self, channels: &[String]) -> io::Result<()> {
        self.each_channel(b"SUBSCRIBE", channels).await
    }

    pub(crate) async fn unsubscribe(&self, channels: &[String]) -> io::Result<()> {
        self.each_channel(b"UNSUBSCRIBE", channels).await
    }

    pub(crate) async fn ping(&self) -> io::Result<()> {
        self.send(command(&[b"PING"]), 1).await
    }

    /// Writes `batch` in one write and answers each of its commands' outcome, by index; an
    /// error for them all when the connection is closed. The whole batch has the subscriber's
    /// timeout.
    pub(crate) async fn send_batch(&self, mut batch: Batch) -> Vec<io::Result<()>> {
        batch.settle();
        let (parts, answers): (Vec<_>, Vec<_>) = batch
            .parts
            .iter()
            .map(|&replies| {
                let (done, answer) = oneshot::channel();
                ((replies, done), answer)
            })
            .unzip();
        if self.commands.send(Command { bytes: batch.bytes, parts }).is_err() {
            return answers.iter().map(|_| Err(closed())).collect();
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut outcomes = Vec::with_capacity(answers.len());
        for answer in answers {
            outcomes.push(match tokio::time::timeout_at(deadline, answer).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(closed()),
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "redis did not answer in time")),
            });
        }
        outcomes
    }

    /// A command that Redis confirms once per channel.
    async fn each_channel(&self, name: &[u8], channels: &[String]) -> io::Result<()> {
        if channels.is_empty() {
            return Ok(());
        }
        let mut args: Vec<&[u8]> = Vec::with_capacity(1 + channels.len());
        args.push(name);
        args.extend(channels.iter().map(|c| c.as_bytes()));
        self.send(command(&args), channels.len()).await
    }

    async fn send(&self, bytes: Vec<u8>, replies: usize) -> io::Result<()> {
        let (done, answer) = oneshot::channel();
        self.commands.send(Command { bytes, parts: vec![(replies, done)] }).map_err(|_| closed())?;
        match tokio::time::timeout(self.timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(closed()),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "redis did not answer in time")),
        }
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the redis subscriber connection is closed")
}

async fn open(addr: &ConnectionAddr) -> io::Result<Box<dyn Stream>> {
    match addr {
        ConnectionAddr::Tcp(host, port) => {
            let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            Ok(Box::new(stream))
        }
        #[cfg(unix)]
        ConnectionAddr::Unix(path) => Ok(Box::new(tokio::net::UnixStream::connect(path).await?)),
        other => {
            Err(io::Error::new(io::ErrorKind::Unsupported, format!("redis subscriber: cannot connect to {other}")))
        }
    }
}

/// Reads more input; an error when the stream ended.
async fn read(stream: &mut Box<dyn Stream>, input: &mut BytesMut) -> io::Result<()> {
    input.reserve(READ_SIZE);
    match stream.read_buf(input).await? {
        0 => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "redis closed the connection")),
        _ => Ok(()),
    }
}

/// Appends the command `name channels…` in RESP to `out`.
fn write_command(out: &mut Vec<u8>, name: &[u8], channels: &[String]) {
    let mut n = itoa::Buffer::new();
    out.push(b'*');
    out.extend_from_slice(n.format(1 + channels.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    for arg in std::iter::once(name).chain(channels.iter().map(|c| c.as_bytes())) {
        out.push(b'$');
        out.extend_from_slice(n.format(arg.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// A command in RESP: an array of bulk strings.
fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    let mut n = itoa::Buffer::new();
    out.push(b'*');
    out.extend_from_slice(n.format(args.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    for arg in args {
        out.push(b'$');
        out.extend_from_slice(n.format(arg.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The connection's task: writes commands, reads replies and messages, until the stream ends
/// (then tells `to`) or every handle is gone.
async fn run(
    mut stream: Box<dyn Stream>,
    mut input: BytesMut,
    mut queue: mpsc::UnboundedReceiver<Command>,
    to: Arc<dyn Receiver>,
) {
    // Commands written and not yet answered in full, oldest first, with the replies they lack.
    let mut waiting: VecDeque<(usize, oneshot::Sender<io::Result<()>>)> = VecDeque::new();
    let ended = loop {
        match take_replies(&mut input, &mut waiting, &*to) {
            Ok(()) => {}
            Err(e) => break e,
        }
        input.reserve(READ_SIZE);
        tokio::select! {
            read = stream.read_buf(&mut input) => match read {
                Ok(0) => break io::Error::new(io::ErrorKind::UnexpectedEof, "redis closed the connection"),
                Ok(_) => {}
                Err(e) => break e,
            },
            command = queue.recv() => {
                let Some(Command { bytes, parts }) = command else { return };
                if let Err(e) = stream.write_all(&bytes).await {
                    for (_, done) in parts {
                        let _ = done.send(Err(io::Error::new(e.kind(), e.to_string())));
                    }
                    break e;
                }
                waiting.extend(parts);
            }
        }
    };
    tracing::debug!(error = %ended, "redis subscriber connection ended");
    for (_, done) in waiting.drain(..) {
        let _ = done.send(Err(closed()));
    }
    to.closed();
}

/// Hands on every whole reply `input` starts with; an error when Redis sent something this
/// connection cannot have asked for.
fn take_replies(
    input: &mut BytesMut,
    waiting: &mut VecDeque<(usize, oneshot::Sender<io::Result<()>>)>,
    to: &dyn Receiver,
) -> io::Result<()> {
    let mut read = Vec::new();
    let outcome = take_each(input, waiting, &mut read, to);
    if !read.is_empty() {
        to.messages(&read);
    }
    outcome
}

fn take_each(
    input: &mut BytesMut,
    waiting: &mut VecDeque<(usize, oneshot::Sender<io::Result<()>>)>,
    read: &mut Vec<Published>,
    to: &dyn Receiver,
) -> io::Result<()> {
    while let Some((reply, used)) = Reply::read(input)? {
        if let Some((channel, payload)) = reply.message(input) {
            read.push(Published { frame: input.split_to(used).freeze(), channel, payload });
            continue;
        }
        if let Some(channel) = reply.sunsubscribed(input) {
            // After the messages before it: none of this channel can follow it.
            if !read.is_empty() {
                to.messages(read);
                read.clear();
            }
            if let Some(channel) = channel {
                to.unsubscribed(&input[channel]);
            }
            input.advance(used);
            continue;
        }
        let outcome = reply.outcome(input);
        input.advance(used);
        if outcome.is_ok() {
            // Whatever this answers was written after the SUNSUBSCRIBEs waiting: they succeeded.
            while waiting.front().is_some_and(|(left, _)| *left == 0) {
                let (_, done) = waiting.pop_front().expect("there is a front");
                let _ = done.send(Ok(()));
            }
        }
        let Some((left, _)) = waiting.front_mut() else {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "redis sent a reply nobody asked for"));
        };
        *left = left.saturating_sub(1);
        if *left == 0 || outcome.is_err() {
            let (_, done) = waiting.pop_front().expect("there is a front");
            let _ = done.send(outcome);
        }
    }
    Ok(())
}

/// Most items of an array reply on a subscribed connection (`pmessage` has four).
const MAX_ITEMS: usize = 4;

/// One reply, as positions in the input it was read from.
#[derive(Debug, PartialEq)]
enum Reply {
    /// `+OK` and the like.
    Simple,
    /// `-ERR …`: where its text is.
    Error(std::ops::Range<usize>),
    Integer,
    /// An array of bulk strings (where each is; `None`: nil) and integers (`None`).
    Array([Option<std::ops::Range<usize>>; MAX_ITEMS], usize),
}

impl Reply {
    /// Reads the reply `input` starts with and answers it with its length; `None` while it is
    /// not whole yet.
    fn read(input: &[u8]) -> io::Result<Option<(Self, usize)>> {
        let Some((kind, text, mut at)) = line(input, 0) else { return Ok(None) };
        let reply = match kind {
            b'+' => Self::Simple,
            b'-' => Self::Error(text),
            b':' => Self::Integer,
            b'*' => {
                let n = number(&input[text])?;
                if n > MAX_ITEMS as i64 {
                    return Err(malformed());
                }
                let mut items: [Option<std::ops::Range<usize>>; MAX_ITEMS] = Default::default();
                for item in items.iter_mut().take(n.max(0) as usize) {
                    let Some((kind, text, next)) = line(input, at) else { return Ok(None) };
                    at = next;
                    match kind {
                        b':' => {}
                        b'$' => {
                            let len = number(&input[text])?;
                            if len < 0 {
                                continue;
                            }
                            let end = at.checked_add(len as usize).ok_or_else(malformed)?;
                            if input.len() < end + 2 {
                                return Ok(None);
                            }
                            *item = Some(at..end);
                            at = end + 2;
                        }
                        _ => return Err(malformed()),
                    }
                }
                Self::Array(items, n.max(0) as usize)
            }
            _ => return Err(malformed()),
        };
        Ok(Some((reply, at)))
    }

    /// A published message (`message`, or `smessage` on a sharded channel): where its channel
    /// and payload are.
    fn message(&self, input: &[u8]) -> Option<(std::ops::Range<usize>, std::ops::Range<usize>)> {
        match self {
            Self::Array([Some(kind), Some(channel), Some(payload), _], 3)
                if matches!(&input[kind.clone()], b"message" | b"smessage") =>
            {
                Some((channel.clone(), payload.clone()))
            }
            _ => None,
        }
    }

    /// A `sunsubscribe` (asked for or not): where its channel is (`None`: nil, the answer to a
    /// `SUNSUBSCRIBE` of nothing).
    fn sunsubscribed(&self, input: &[u8]) -> Option<Option<std::ops::Range<usize>>> {
        match self {
            Self::Array([Some(kind), channel, _, _], 3) if &input[kind.clone()] == b"sunsubscribe" => {
                Some(channel.clone())
            }
            _ => None,
        }
    }

    /// What a reply to a command says: an error reply fails it.
    fn outcome(&self, input: &[u8]) -> io::Result<()> {
        match self {
            Self::Error(text) => {
                Err(io::Error::other(format!("redis: {}", String::from_utf8_lossy(&input[text.clone()]))))
            }
            _ => Ok(()),
        }
    }
}

fn malformed() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "redis sent a reply this subscriber does not understand")
}

/// The line at `at`: its type byte, where the rest of it is (without CRLF), and where the next
/// line starts; `None` while it is not whole yet.
fn line(input: &[u8], at: usize) -> Option<(u8, std::ops::Range<usize>, usize)> {
    let kind = *input.get(at)?;
    let end = at + 1 + input.get(at + 1..)?.windows(2).position(|w| w == b"\r\n")?;
    Some((kind, at + 1..end, end + 2))
}

fn number(text: &[u8]) -> io::Result<i64> {
    std::str::from_utf8(text).ok().and_then(|t| t.parse().ok()).ok_or_else(malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages handed on, as (channel, payload), and everything handed on, in order.
    #[derive(Default)]
    struct Seen {
        messages: std::sync::Mutex<Vec<(Vec<u8>, Bytes)>>,
        log: std::sync::Mutex<Vec<String>>,
    }

    impl Receiver for Seen {
        fn messages(&self, read: &[Published]) {
            let mut messages = self.messages.lock().unwrap();
            messages.extend(read.iter().map(|m| (m.channel().to_vec(), m.payload())));
            let mut log = self.log.lock().unwrap();
            log.extend(read.iter().map(|m| format!("message {}", String::from_utf8_lossy(m.channel()))));
        }

        fn closed(&self) {}

        fn unsubscribed(&self, channel: &[u8]) {
            self.log.lock().unwrap().push(format!("unsubscribed {}", String::from_utf8_lossy(channel)));
        }
    }

    /// Waiting commands for `parts` (replies each), and their answers.
    #[allow(clippy::type_complexity)]
    fn waiting_for(
        parts: &[usize],
    ) -> (VecDeque<(usize, oneshot::Sender<io::Result<()>>)>, Vec<oneshot::Receiver<io::Result<()>>>) {
        parts
            .iter()
            .map(|&replies| {
                let (done, answer) = oneshot::channel();
                ((replies, done), answer)
            })
            .unzip()
    }

    #[test]
    fn sharded_messages_and_unasked_sunsubscribes_go_to_the_receiver_in_order() {
        let traffic = b"*3\r\n$10\r\nssubscribe\r\n$4\r\nch:a\r\n:1\r\n\
            *3\r\n$8\r\nsmessage\r\n$4\r\nch:a\r\n$2\r\nhi\r\n\
            *3\r\n$12\r\nsunsubscribe\r\n$4\r\nch:a\r\n:0\r\n\
            *3\r\n$8\r\nsmessage\r\n$4\r\nch:b\r\n$2\r\nho\r\n\
            *3\r\n$10\r\nssubscribe\r\n$4\r\nch:b\r\n:1\r\n";
        for cut in 0..traffic.len() {
            let seen = Seen::default();
            let (mut waiting, mut answers) = waiting_for(&[2]);
            let mut input = BytesMut::from(&traffic[..cut]);
            take_replies(&mut input, &mut waiting, &seen).unwrap();
            input.extend_from_slice(&traffic[cut..]);
            take_replies(&mut input, &mut waiting, &seen).unwrap();
            assert!(input.is_empty() && waiting.is_empty(), "cut at {cut}");
            assert!(answers[0].try_recv().unwrap().is_ok(), "the sunsubscribe is not one of its replies");
            assert_eq!(
                *seen.log.lock().unwrap(),
                ["message ch:a", "unsubscribed ch:a", "message ch:b"],
                "cut at {cut}"
            );
            assert_eq!(seen.messages.lock().unwrap()[1].1, Bytes::from_static(b"ho"));
        }
    }

    #[test]
    fn a_moved_ssubscribe_fails_alone_and_a_ping_settles_the_sunsubscribes_before_it() {
        let mut batch = Batch::default();
        let gone = batch.sunsubscribe(&["x".to_owned()]);
        let moved = batch.ssubscribe(&["y".to_owned()]);
        let taken = batch.ssubscribe(&["z".to_owned(), "z2".to_owned()]);
        assert_eq!((gone, moved, taken), (0, 2, 3), "a PING after the SUNSUBSCRIBE");
        assert_eq!(batch.parts, [0, 1, 1, 2]);
        assert!(
            batch
                .bytes
                .starts_with(b"*2\r\n$12\r\nSUNSUBSCRIBE\r\n$1\r\nx\r\n*1\r\n$4\r\nPING\r\n*2\r\n$10\r\nSSUBSCRIBE")
        );
        let seen = Seen::default();
        let (mut waiting, mut answers) = waiting_for(&batch.parts);
        let mut input = BytesMut::from(
            &b"*3\r\n$12\r\nsunsubscribe\r\n$1\r\nx\r\n:0\r\n\
            *2\r\n$4\r\npong\r\n$0\r\n\r\n\
            -MOVED 12 127.0.0.1:7001\r\n\
            *3\r\n$10\r\nssubscribe\r\n$1\r\nz\r\n:1\r\n\
            *3\r\n$10\r\nssubscribe\r\n$2\r\nz2\r\n:2\r\n"[..],
        );
        take_replies(&mut input, &mut waiting, &seen).unwrap();
        let outcomes: Vec<io::Result<()>> = answers.iter_mut().map(|a| a.try_recv().unwrap()).collect();
        assert!(outcomes[0].is_ok() && outcomes[1].is_ok() && outcomes[3].is_ok());
        let e = outcomes[2].as_ref().unwrap_err().to_string();
        assert!(e.contains("MOVED 12"), "{e}");
        assert_eq!(*seen.log.lock().unwrap(), ["unsubscribed x"]);

        // A SUNSUBSCRIBE that Redis refuses takes the error; the PING still its pong.
        let mut batch = Batch::default();
        batch.sunsubscribe(&["x".to_owned()]);
        batch.settle();
        let (mut waiting, mut answers) = waiting_for(&batch.parts);
        let mut input = BytesMut::from(&b"-MOVED 3 127.0.0.1:7002\r\n*2\r\n$4\r\npong\r\n$0\r\n\r\n"[..]);
        take_replies(&mut input, &mut waiting, &seen).unwrap();
        assert!(answers[0].try_recv().unwrap().is_err());
        assert!(answers[1].try_recv().unwrap().is_ok());
    }

    const TRAFFIC: &[u8] = b"*3\r\n$9\r\nsubscribe\r\n$4\r\nch:a\r\n:1\r\n\
        *3\r\n$7\r\nmessage\r\n$4\r\nch:a\r\n$13\r\nM - x\r\n1 2\n{}\r\n\
        *3\r\n$7\r\nmessage\r\n$4\r\nch:a\r\n$0\r\n\r\n\
        *2\r\n$4\r\npong\r\n$0\r\n\r\n\
        -ERR unknown command\r\n\
        +PONG\r\n";

    #[test]
    fn replies_split_anywhere_are_read_whole_and_in_order() {
        for cut in 0..TRAFFIC.len() {
            let seen = Seen::default();
            let mut rx = Vec::new();
            let mut waiting = VecDeque::new();
            for replies in [1, 1, 1, 1] {
                let (done, answer) = oneshot::channel();
                waiting.push_back((replies, done));
                rx.push(answer);
            }
            let mut input = BytesMut::from(&TRAFFIC[..cut]);
            take_replies(&mut input, &mut waiting, &seen).unwrap();
            input.extend_from_slice(&TRAFFIC[cut..]);
            take_replies(&mut input, &mut waiting, &seen).unwrap();
            assert!(input.is_empty(), "cut at {cut}: everything was read");
            let messages = seen.messages.lock().unwrap();
            assert_eq!(messages.len(), 2, "cut at {cut}");
            assert_eq!((&messages[0].0[..], &messages[0].1[..]), (&b"ch:a"[..], &b"M - x\r\n1 2\n{}"[..]));
            assert_eq!(&messages[1].1[..], b"");
            let outcomes: Vec<bool> = rx.iter_mut().map(|a| a.try_recv().unwrap().is_ok()).collect();
            assert_eq!(outcomes, [true, true, false, true], "cut at {cut}: confirmation, pong, error, pong");
        }
    }

    #[test]
    fn a_command_waits_for_all_its_confirmations_and_stray_replies_are_refused() {
        let seen = Seen::default();
        let (done, mut answer) = oneshot::channel();
        let mut waiting = VecDeque::from([(2, done)]);
        let mut input = BytesMut::from(&b"*3\r\n$11\r\nunsubscribe\r\n$1\r\na\r\n:1\r\n"[..]);
        take_replies(&mut input, &mut waiting, &seen).unwrap();
        assert!(answer.try_recv().is_err(), "one of two confirmations");
        input.extend_from_slice(b"*3\r\n$11\r\nunsubscribe\r\n$1\r\nb\r\n:0\r\n");
        take_replies(&mut input, &mut waiting, &seen).unwrap();
        assert!(answer.try_recv().unwrap().is_ok());
        input.extend_from_slice(b"+OK\r\n");
        assert!(take_replies(&mut input, &mut waiting, &seen).is_err(), "nobody asked");
        let mut garbage = BytesMut::from(&b"?what\r\n"[..]);
        assert!(take_replies(&mut garbage, &mut VecDeque::new(), &seen).is_err());
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        assert_eq!(command(&[b"SUBSCRIBE", b"a", b""]), b"*3\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n$0\r\n\r\n");
    }

    /// Against a real Redis (`SWITCHYARD_TEST_REDIS`): subscribe, receive, ping, unsubscribe.
    #[tokio::test]
    async fn subscribes_and_receives_from_a_real_redis() {
        let url = crate::testing::redis_url();
        let client = crate::backend::redis::client(&url).unwrap();
        let seen = Arc::new(Seen::default());
        let info = client.get_connection_info().clone();
        let subscriber = match Subscriber::connect(&info, Duration::from_secs(2), seen.clone()).await {
            Ok(subscriber) => subscriber,
            Err(e) => {
                return crate::testing::absent("redis subscriber", &format!("no Redis at {url}: {e}"))
                    .unwrap_or_default();
            }
        };
        let channel = format!("{}:sub", crate::testing::unique_prefix());
        subscriber.subscribe(std::slice::from_ref(&channel)).await.unwrap();
        subscriber.ping().await.unwrap();
        let mut publisher = crate::backend::redis::commands(&client, &url).await.unwrap();
        let payload = vec![b'x'; 100_000];
        let receivers: i64 =
            redis::cmd("PUBLISH").arg(&channel).arg(&payload).query_async(&mut publisher).await.unwrap();
        assert_eq!(receivers, 1);
        for _ in 0..100 {
            if !seen.messages.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let messages = seen.messages.lock().unwrap().clone();
        assert_eq!(messages, vec![(channel.clone().into_bytes(), Bytes::from(payload))], "larger than one read");
        subscriber.unsubscribe(&[channel]).await.unwrap();
        subscriber.ping().await.unwrap();
    }

    /// A refused sign-in fails the connect with Redis's answer (the test Redis has no password,
    /// so any password is refused).
    #[tokio::test]
    async fn a_refused_sign_in_fails_the_connect() {
        let url = crate::testing::redis_url().replacen("redis://", "redis://:not-the-password@", 1);
        let info = crate::backend::redis::client(&url).unwrap().get_connection_info().clone();
        assert!(info.redis_settings().password().is_some());
        match Subscriber::connect(&info, Duration::from_secs(2), Arc::new(Seen::default())).await {
            Ok(_) => panic!("signed in with a wrong password"),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                crate::testing::absent("redis subscriber", &format!("no Redis at {url}: {e}")).unwrap_or_default()
            }
            Err(e) => assert!(e.to_string().starts_with("redis: "), "{e}"),
        }
    }
}
