//! A TCP fault proxy for failure tests. It sits between nodes and any backend server (Redis,
//! PostgreSQL, MySQL, NATS, RabbitMQ) and pauses, delays, cuts or refuses their connections on
//! command, so a test breaks the network path instead of signalling one server's process.
//!
//! Invariants:
//! - It runs on a thread of its own with a current-thread runtime, so it keeps relaying whatever
//!   the test's runtime does (busy, paused clock, either `#[tokio::test]` flavor), for node
//!   processes and in-process nodes alike.
//! - A control method has taken effect when it returns, for current and later connections: bytes
//!   that reach the proxy after `pause()` returns are held until `resume()`, and every connection
//!   the proxy had accepted is closed when `cut()` returns.
//! - Bytes are forwarded in order, and only `cut` (or drop) loses any.
//! - Memory is bounded: a paused relay stops reading, so peers see TCP backpressure, and a
//!   delayed one holds at most `IN_FLIGHT` chunks per direction.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// The most bytes read from a socket at once.
const CHUNK: usize = 16 * 1024;
/// Chunks read but not yet written, per direction: with `CHUNK`, what a relay may hold.
const IN_FLIGHT: usize = 16;
/// How long `cut` waits for the relays to close their sockets; they only need to be polled once.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// The faults in force; every relay watches them.
#[derive(Clone, Copy, Debug, Default)]
struct Faults {
    paused: bool,
    refuse: bool,
    delay: Duration,
    stopping: bool,
}

/// The connections accepted since the last cut. `cut` sets `closed` and then waits for the last
/// relay holding this generation to drop it, which it does after closing its sockets.
#[derive(Default)]
struct Generation {
    closed: watch::Sender<bool>,
}

struct Shared {
    faults: watch::Sender<Faults>,
    generation: Mutex<Arc<Generation>>,
    open: AtomicUsize,
}

/// A proxy on 127.0.0.1 in front of one upstream address; dropping it closes everything.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and relays every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("fault proxy binds");
        listener.set_nonblocking(true).expect("non-blocking listener");
        let addr = listener.local_addr().expect("fault proxy address");
        let shared = Arc::new(Shared {
            faults: watch::Sender::new(Faults::default()),
            generation: Mutex::new(Arc::default()),
            open: AtomicUsize::new(0),
        });
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("fault proxy runtime");
        let serving = serve(listener, upstream, shared.clone());
        let thread = std::thread::Builder::new()
            .name(format!("fault-proxy-{}", addr.port()))
            .spawn(move || runtime.block_on(serving))
            .expect("fault proxy thread");
        Self { addr, shared, thread: Some(thread) }
    }

    /// Where clients connect instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Freezes every connection, current and new: nothing is forwarded either way and the
    /// sockets stay open, as with a server that stopped answering.
    pub fn pause(&self) {
        self.set(|f| f.paused = true);
    }

    /// Ends a pause; what was held back is delivered, in order.
    pub fn resume(&self) {
        self.set(|f| f.paused = false);
    }

    /// While true, new connections are accepted and reset at once, as by a server that is down.
    pub fn refuse(&self, refuse: bool) {
        self.set(|f| f.refuse = refuse);
    }

    /// Holds each chunk this long after it was read before forwarding it; `Duration::ZERO` ends
    /// the delay.
    pub fn delay(&self, delay: Duration) {
        self.set(|f| f.delay = delay);
    }

    /// Lifts every fault: resume, stop refusing, no delay.
    pub fn heal(&self) {
        self.set(|f| {
            f.paused = false;
            f.refuse = false;
            f.delay = Duration::ZERO;
        });
    }

    /// Resets every connection the proxy has accepted, both sides, and returns once they are
    /// closed. Later connections are relayed as usual (unless refused).
    pub fn cut(&self) {
        assert!(self.close_all(), "fault proxy: connections still open {CLOSE_WAIT:?} after a cut");
    }

    /// The connections being relayed now.
    pub fn connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    fn set(&self, change: impl FnOnce(&mut Faults)) {
        self.shared.faults.send_modify(change);
    }

    /// Starts a new generation, closes the old one's connections and answers whether they all
    /// closed in time.
    fn close_all(&self) -> bool {
        let fresh = Arc::new(Generation::default());
        let old = std::mem::replace(&mut *self.shared.generation.lock().expect("generation lock"), fresh);
        old.closed.send_replace(true);
        let deadline = std::time::Instant::now() + CLOSE_WAIT;
        while Arc::strong_count(&old) > 1 {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Reset the connections first: tasks the runtime drops would only close (FIN).
        self.close_all();
        self.set(|f| f.stopping = true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts until the proxy is dropped, one relay task per connection.
async fn serve(listener: std::net::TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    let listener = TcpListener::from_std(listener).expect("fault proxy listener");
    let mut faults = shared.faults.subscribe();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = faults.wait_for(|f| f.stopping) => return,
        };
        let Ok((client, _)) = accepted else {
            // Out of descriptors, most likely: let some close rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if shared.faults.borrow().refuse {
            reset(client);
            continue;
        }
        shared.open.fetch_add(1, Ordering::SeqCst);
        let generation = shared.generation.lock().expect("generation lock").clone();
        let tally = Tally { shared: shared.clone(), generation };
        tokio::spawn(relay(client, upstream, shared.faults.subscribe(), tally));
    }
}

/// Counts one relayed connection for as long as its task lives (or its runtime does).
struct Tally {
    shared: Arc<Shared>,
    generation: Arc<Generation>,
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Relays one connection until both sides finished, an error, or a cut; the latter two reset
/// both sockets so neither peer mistakes the end for an orderly close.
async fn relay(mut client: TcpStream, upstream: SocketAddr, faults: watch::Receiver<Faults>, tally: Tally) {
    let mut closed = tally.generation.closed.subscribe();
    let mut server = None;
    let ended = tokio::select! {
        ended = forward(&mut client, &mut server, upstream, faults) => ended,
        _ = closed.wait_for(|closed| *closed) => Err(io::ErrorKind::ConnectionAborted.into()),
    };
    if ended.is_err() {
        reset(client);
        if let Some(server) = server {
            reset(server);
        }
    } else {
        drop((client, server));
    }
    drop(tally);
}

async fn forward(
    client: &mut TcpStream,
    server: &mut Option<TcpStream>,
    upstream: SocketAddr,
    mut faults: watch::Receiver<Faults>,
) -> io::Result<()> {
    // A frozen server answers nothing, so a paused proxy does not even reach the upstream.
    faults.wait_for(|f| !f.paused).await.map_err(stopped)?;
    let server = server.insert(TcpStream::connect(upstream).await?);
    let (client_read, client_write) = client.split();
    let (server_read, server_write) = server.split();
    tokio::try_join!(pipe(client_read, server_write, faults.clone()), pipe(server_read, client_write, faults))?;
    Ok(())
}

/// One direction: a reader that stops while paused, a bounded queue, and a writer that holds
/// each chunk until it is due and the proxy is not paused. An EOF is passed on as a half-close.
async fn pipe(from: ReadHalf<'_>, to: WriteHalf<'_>, faults: watch::Receiver<Faults>) -> io::Result<()> {
    let (chunks, queued) = mpsc::channel(IN_FLIGHT);
    tokio::try_join!(read_side(from, chunks, faults.clone()), write_side(queued, to, faults))?;
    Ok(())
}

struct Chunk {
    read_at: Instant,
    bytes: Vec<u8>,
}

async fn read_side(
    mut from: ReadHalf<'_>,
    chunks: mpsc::Sender<Chunk>,
    mut faults: watch::Receiver<Faults>,
) -> io::Result<()> {
    let mut buf = vec![0; CHUNK];
    loop {
        if faults.borrow_and_update().paused {
            changed(&mut faults).await?;
            continue;
        }
        // A read is cancelled (losing nothing) when the faults change, so a pause stops it.
        let n = tokio::select! {
            read = from.read(&mut buf) => read?,
            change = changed(&mut faults) => { change?; continue; }
        };
        if n == 0 {
            return Ok(());
        }
        let chunk = Chunk { read_at: Instant::now(), bytes: buf[..n].to_vec() };
        if chunks.send(chunk).await.is_err() {
            return Ok(());
        }
    }
}

async fn write_side(
    mut queued: mpsc::Receiver<Chunk>,
    mut to: WriteHalf<'_>,
    mut faults: watch::Receiver<Faults>,
) -> io::Result<()> {
    while let Some(chunk) = queued.recv().await {
        let mut written = 0;
        while written < chunk.bytes.len() {
            // Re-read before every write: a chunk read before a pause must still wait for it.
            let now = *faults.borrow_and_update();
            let due = chunk.read_at + now.delay;
            if now.paused {
                changed(&mut faults).await?;
            } else if Instant::now() < due {
                tokio::select! {
                    () = tokio::time::sleep_until(due) => {}
                    change = changed(&mut faults) => change?,
                }
            } else {
                tokio::select! {
                    sent = to.write(&chunk.bytes[written..]) => match sent? {
                        0 => return Err(io::ErrorKind::WriteZero.into()),
                        n => written += n,
                    },
                    change = changed(&mut faults) => change?,
                }
            }
        }
    }
    // The FIN is forwarded like a byte: not during a pause.
    faults.wait_for(|f| !f.paused).await.map_err(stopped)?;
    to.shutdown().await
}

async fn changed(faults: &mut watch::Receiver<Faults>) -> io::Result<()> {
    faults.changed().await.map_err(stopped)
}

fn stopped(_: watch::error::RecvError) -> io::Error {
    io::Error::other("fault proxy stopped")
}

/// Closes with an RST (SO_LINGER 0), which the peer sees at once, unlike a FIN behind data.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::support::WAIT;

    /// Long enough to say nothing came; short next to `WAIT`.
    const QUIET: Duration = Duration::from_millis(300);

    /// An echo server on the test's runtime; answers its address.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("echo binds");
        let addr = listener.local_addr().expect("echo address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    /// A server that reads its first connection to the end and hands over what it read.
    async fn sink_server() -> (SocketAddr, tokio::sync::oneshot::Receiver<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("sink binds");
        let addr = listener.local_addr().expect("sink address");
        let (done, received) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("sink accepts");
            let mut bytes = Vec::new();
            stream.read_to_end(&mut bytes).await.expect("sink reads");
            let _ = done.send(bytes);
        });
        (addr, received)
    }

    async fn proxied() -> FaultProxy {
        FaultProxy::start(echo_server().await)
    }

    async fn connect(proxy: &FaultProxy) -> TcpStream {
        TcpStream::connect(proxy.addr()).await.expect("connect to the proxy")
    }

    /// Reads exactly `len` bytes, or `None` when they did not all come within `wait`.
    async fn read_within(stream: &mut TcpStream, len: usize, wait: Duration) -> Option<Vec<u8>> {
        let mut buf = vec![0; len];
        let read = tokio::time::timeout(wait, stream.read_exact(&mut buf)).await;
        read.ok()?.ok()?;
        Some(buf)
    }

    async fn roundtrip(stream: &mut TcpStream, bytes: &[u8]) {
        stream.write_all(bytes).await.expect("write");
        let echoed = read_within(stream, bytes.len(), WAIT).await;
        assert_eq!(echoed.as_deref(), Some(bytes), "echoed through the proxy");
    }

    /// Whether the peer closed (EOF) or reset the connection within `WAIT`.
    async fn ended(stream: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(WAIT, stream.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) | Err(_) => false,
        }
    }

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + WAIT;
        while !check() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `len` bytes that repeat only every 251, so a lost or reordered chunk shows.
    fn pattern(len: usize) -> Vec<u8> {
        let block: Vec<u8> = (0..251).collect();
        let mut bytes = block.repeat(len / block.len() + 1);
        bytes.truncate(len);
        bytes
    }

    #[tokio::test]
    async fn bytes_pass_both_ways_and_closes_propagate() {
        let proxy = proxied().await;
        let mut client = connect(&proxy).await;
        roundtrip(&mut client, b"hello").await;
        assert_eq!(proxy.connections(), 1);
        let big = pattern(1 << 20);
        let (mut read, mut write) = client.into_split();
        let sending = tokio::spawn(async move {
            write.write_all(&pattern(1 << 20)).await.expect("write");
            write
        });
        let mut echoed = vec![0; big.len()];
        tokio::time::timeout(WAIT, read.read_exact(&mut echoed)).await.expect("in time").expect("read");
        assert!(echoed == big, "a megabyte comes back intact and in order");
        drop((read, sending.await.expect("writer")));
        eventually("the relay ends once the client closed", || proxy.connections() == 0).await;
    }

    #[tokio::test]
    async fn pause_holds_bytes_and_resume_delivers_them_in_order() {
        let proxy = proxied().await;
        let mut old = connect(&proxy).await;
        roundtrip(&mut old, b"warm").await;
        proxy.pause();
        for part in [&b"one"[..], b"two", b"three"] {
            old.write_all(part).await.expect("write while paused");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut new = connect(&proxy).await;
        new.write_all(b"new").await.expect("write while paused");
        assert_eq!(read_within(&mut old, 1, QUIET).await, None, "nothing passes a pause");
        assert_eq!(read_within(&mut new, 1, QUIET).await, None, "nor on a connection made during it");
        proxy.resume();
        assert_eq!(read_within(&mut old, 11, WAIT).await.as_deref(), Some(&b"onetwothree"[..]));
        assert_eq!(read_within(&mut new, 3, WAIT).await.as_deref(), Some(&b"new"[..]));
    }

    #[tokio::test]
    async fn a_pause_stops_reading_instead_of_buffering() {
        // More than the kernel's socket buffers hold (tcp_rmem's plus tcp_wmem's maximum is 36
        // MiB here), so the writer gets it all out during the pause only if the proxy reads.
        const LEN: usize = 64 << 20;
        let (sink, received) = sink_server().await;
        let proxy = FaultProxy::start(sink);
        let mut client = connect(&proxy).await;
        eventually("the proxy accepts", || proxy.connections() == 1).await;
        let data = Arc::new(pattern(LEN));
        let written = Arc::new(AtomicUsize::new(0));
        proxy.pause();
        let writing = tokio::spawn({
            let (data, written) = (data.clone(), written.clone());
            async move {
                for piece in data.chunks(64 * 1024) {
                    client.write_all(piece).await.expect("write");
                    written.fetch_add(piece.len(), Ordering::SeqCst);
                }
                client.shutdown().await.expect("shutdown");
                client
            }
        });
        // Until the writer stalls (or is done): a proxy that reads on would let it write it all.
        let deadline = std::time::Instant::now() + WAIT;
        let mut last = usize::MAX;
        while written.load(Ordering::SeqCst) != last && std::time::Instant::now() < deadline {
            last = written.load(Ordering::SeqCst);
            tokio::time::sleep(QUIET).await;
        }
        let held = written.load(Ordering::SeqCst);
        assert!(held < LEN, "the paused proxy stopped reading; the writer got {held} of {LEN} bytes out");
        proxy.resume();
        let got = tokio::time::timeout(WAIT, received).await.expect("in time").expect("the sink's bytes");
        assert!(got == *data, "everything arrives after the resume, in order ({} bytes)", got.len());
        writing.await.expect("writer task");
    }

    #[tokio::test]
    async fn cut_resets_every_connection_and_new_ones_work() {
        let proxy = proxied().await;
        let mut a = connect(&proxy).await;
        roundtrip(&mut a, b"a").await;
        let mut b = connect(&proxy).await;
        roundtrip(&mut b, b"b").await;
        proxy.pause(); // a paused connection is cut too
        proxy.cut();
        assert_eq!(proxy.connections(), 0, "closed when cut returns");
        assert!(ended(&mut a).await, "the first client sees its connection end");
        assert!(ended(&mut b).await, "the second client sees its connection end");
        proxy.resume();
        let mut c = connect(&proxy).await;
        roundtrip(&mut c, b"c").await;
    }

    #[tokio::test]
    async fn refuse_closes_new_connections_until_lifted() {
        let proxy = proxied().await;
        let mut old = connect(&proxy).await;
        roundtrip(&mut old, b"old").await;
        proxy.refuse(true);
        // The reset may even beat the end of the client's connect.
        if let Ok(mut refused) = TcpStream::connect(proxy.addr()).await {
            assert!(ended(&mut refused).await, "a new connection is closed at once");
        }
        assert_eq!(proxy.connections(), 1, "the refused connection was never relayed");
        roundtrip(&mut old, b"still").await;
        proxy.refuse(false);
        let mut new = connect(&proxy).await;
        roundtrip(&mut new, b"new").await;
    }

    #[tokio::test]
    async fn delay_adds_latency_each_way_and_keeps_order() {
        const DELAY: Duration = Duration::from_millis(300);
        let proxy = proxied().await;
        let mut client = connect(&proxy).await;
        roundtrip(&mut client, b"warm").await;
        proxy.delay(DELAY);
        let started = std::time::Instant::now();
        for part in [&b"1"[..], b"2", b"3"] {
            client.write_all(part).await.expect("write");
        }
        assert_eq!(read_within(&mut client, 3, WAIT).await.as_deref(), Some(&b"123"[..]));
        assert!(started.elapsed() >= DELAY * 2, "both directions wait: {:?}", started.elapsed());
        proxy.delay(Duration::ZERO);
        let started = std::time::Instant::now();
        roundtrip(&mut client, b"fast").await;
        assert!(started.elapsed() < DELAY, "no delay once it is zero: {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn heal_lifts_every_fault() {
        let proxy = proxied().await;
        let mut old = connect(&proxy).await;
        roundtrip(&mut old, b"warm").await;
        proxy.pause();
        proxy.refuse(true);
        proxy.delay(WAIT);
        proxy.heal();
        let started = std::time::Instant::now();
        roundtrip(&mut old, b"old").await;
        let mut new = connect(&proxy).await;
        roundtrip(&mut new, b"new").await;
        assert!(started.elapsed() < QUIET, "no delay left: {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn drop_closes_connections_and_the_listener() {
        let proxy = proxied().await;
        let addr = proxy.addr();
        let mut client = connect(&proxy).await;
        roundtrip(&mut client, b"warm").await;
        drop(proxy);
        assert!(ended(&mut client).await, "the client sees its connection end");
        assert!(TcpStream::connect(addr).await.is_err(), "nothing listens any more");
    }
}
