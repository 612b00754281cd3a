//! Caps on the socket's connections, before anything else runs.
//!
//! Identity checks, rate limits and deadlines start once a call's message has been read, so
//! they cannot bound what a caller makes the daemon hold before that: open connections, and
//! on each, HTTP/2 streams whose bodies are still arriving. This module caps connections:
//! `limits.max_connections` open at once, all callers together (once reached, the daemon stops
//! accepting until one closes: new clients wait in the socket's backlog), and
//! `limits.max_connections_per_uid` per peer uid (a connection beyond it is closed at once, so
//! one local user cannot take every slot). The daemon caps the rest: calls in flight, all and
//! per uid (`inflight.rs`), and on each connection (`daemon.rs`) concurrent streams and the
//! time to receive a request.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::transport::server::{Connected, UdsConnectInfo};

use crate::slots::{KeyedSlot, KeyedSlots};

/// How long the accept loop pauses after `accept` failed (out of file descriptors, …).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// At most one warning about refused connections per this interval.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// An accepted connection holding its slots (global and per uid) while it is open.
#[derive(Debug)]
pub struct LimitedConnection {
    stream: UnixStream,
    _slot: KeyedSlot<u32>,
    _permit: OwnedSemaphorePermit,
}

impl Connected for LimitedConnection {
    type ConnectInfo = UdsConnectInfo;

    fn connect_info(&self) -> UdsConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for LimitedConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The accepted connections, for `serve_with_incoming`. Stops accepting when dropped.
#[derive(Debug)]
pub struct Incoming {
    accepted: mpsc::Receiver<io::Result<LimitedConnection>>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<LimitedConnection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.accepted.poll_recv(cx)
    }
}

/// Accepts on `listener` within the caps: at most `max` connections open, at most `per_uid`
/// of them from one peer uid.
pub fn limit(listener: UnixListener, max: usize, per_uid: usize) -> Incoming {
    let (tx, accepted) = mpsc::channel(1);
    let accept_loop = tokio::spawn(accept_loop(listener, max, per_uid, tx));
    Incoming {
        accepted,
        accept_loop,
    }
}

async fn accept_loop(
    listener: UnixListener,
    max: usize,
    per_uid: usize,
    tx: mpsc::Sender<io::Result<LimitedConnection>>,
) {
    let slots = Arc::new(Semaphore::new(max));
    let per = Arc::new(KeyedSlots::<u32>::default());
    let started = Instant::now();
    // Milliseconds since `started` of the last warning, plus one (0: none yet).
    let last_warning = AtomicU64::new(0);
    let warn = |message: &str, uid: Option<u32>| {
        let now = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = last_warning.load(Ordering::Relaxed);
        let interval = u64::try_from(WARN_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        if last == 0 || now.saturating_sub(last - 1) >= interval {
            last_warning.store(now.saturating_add(1), Ordering::Relaxed);
            tracing::warn!(uid, max, per_uid, "{message}");
        }
    };
    loop {
        // Waits while `max` connections are open: new clients queue in the backlog.
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        if slots.available_permits() == 0 {
            warn(
                "connection limit reached (limits.max_connections): new connections wait",
                None,
            );
        }
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let Ok(uid) = stream.peer_cred().map(|c| c.uid()) else {
            // No peer credentials: nobody to authorize; close it.
            continue;
        };
        let Some(slot) = per.try_take(&uid, per_uid) else {
            warn(
                "a uid reached limits.max_connections_per_uid: its new connection was closed",
                Some(uid),
            );
            continue;
        };
        let connection = LimitedConnection {
            stream,
            _slot: slot,
            _permit: permit,
        };
        if tx.send(Ok(connection)).await.is_err() {
            return;
        }
    }
}
