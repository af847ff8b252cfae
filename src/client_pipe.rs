//! The client's pipes (the relay's stdin and stdout), streamed through tokio by the session
//! and lent, out of tokio's poller, to the blocking tasks that move NAR data through them
//! directly (uploads read from stdin, exports spliced into stdout).
//!
//! Why lend them out of the poller: a pipe end registered with epoll wakes the runtime's
//! poller on every read or write at the other end (Linux wakes a polled pipe's waiters for
//! each one), even when no task waits for it. Nix reads and writes 32 KiB at a time, so a
//! 1 GiB transfer woke the runtime about 30,000 times for nothing.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::unix::pipe;

/// One end of a pipe as tokio streams it.
pub trait PipeEnd: Sized + Send + Unpin + 'static {
    /// Leaves tokio's poller; the descriptor stays non-blocking.
    fn into_fd(self) -> io::Result<OwnedFd>;
    /// Joins tokio's poller again (the descriptor is already non-blocking).
    fn from_fd(fd: OwnedFd) -> io::Result<Self>;
}

impl PipeEnd for pipe::Receiver {
    fn into_fd(self) -> io::Result<OwnedFd> {
        self.into_nonblocking_fd()
    }

    fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        pipe::Receiver::from_owned_fd_unchecked(fd)
    }
}

impl PipeEnd for pipe::Sender {
    fn into_fd(self) -> io::Result<OwnedFd> {
        self.into_nonblocking_fd()
    }

    fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        pipe::Sender::from_owned_fd_unchecked(fd)
    }
}

type Slot<P> = Arc<Mutex<Option<P>>>;

fn lock<P>(slot: &Slot<P>) -> MutexGuard<'_, Option<P>> {
    // The slot holds a plain value, valid whatever a panicking holder was doing.
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// The error of a stream whose pipe is lent out (or could not rejoin the poller).
fn lent_out() -> io::Error {
    io::Error::other("the client's pipe is in use by a blocking task")
}

/// One end of the client's pipe: an async stream (`AsyncRead` for a [`pipe::Receiver`],
/// `AsyncWrite` for a [`pipe::Sender`]) whose handles share the pipe, and which can be lent
/// out of tokio's poller with [`SharedPipe::lend`]. While it is lent, the stream fails.
pub struct SharedPipe<P>(Slot<P>);

impl<P: PipeEnd> SharedPipe<P> {
    /// Shares `end`.
    pub fn new(end: P) -> Self {
        SharedPipe(Arc::new(Mutex::new(Some(end))))
    }

    /// Another handle to the same pipe end.
    pub fn handle(&self) -> Self {
        SharedPipe(Arc::clone(&self.0))
    }

    /// Takes the pipe out of tokio's poller until the loan is dropped. Fails when it is
    /// lent already, or cannot leave the poller.
    pub fn lend(&self) -> io::Result<PipeLoan> {
        let end = lock(&self.0).take().ok_or_else(lent_out)?;
        let fd = end.into_fd()?;
        let slot = Arc::clone(&self.0);
        Ok(PipeLoan {
            fd: Some(fd),
            give_back: Some(Box::new(move |fd| match P::from_fd(fd) {
                Ok(end) => *lock(&slot) = Some(end),
                // The stream then fails, which ends the session with that error.
                Err(e) => tracing::warn!("the client's pipe cannot rejoin the poller: {e}"),
            })),
        })
    }

    fn with<T>(&self, f: impl FnOnce(Pin<&mut P>) -> Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match lock(&self.0).as_mut() {
            Some(end) => f(Pin::new(end)),
            None => Poll::Ready(Err(lent_out())),
        }
    }
}

impl AsyncRead for SharedPipe<pipe::Receiver> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.with(|end| end.poll_read(cx, buf))
    }
}

impl AsyncWrite for SharedPipe<pipe::Sender> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.with(|end| end.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.with(|end| end.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|end| end.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|end| end.poll_shutdown(cx))
    }
}

/// A pipe end lent out of tokio's poller ([`SharedPipe::lend`]); it rejoins the poller when
/// the loan is dropped. A blocking task holds the loan itself and uses the pipe through its
/// [`AsFd`] implementation.
pub struct PipeLoan {
    fd: Option<OwnedFd>,
    give_back: Option<Box<dyn FnOnce(OwnedFd) + Send + Sync>>,
}

/// The lent pipe (non-blocking), for the blocking task that holds the loan.
impl AsFd for PipeLoan {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.fd {
            Some(fd) => fd.as_fd(),
            None => unreachable!("only the loan's drop takes its descriptor"),
        }
    }
}

impl Drop for PipeLoan {
    fn drop(&mut self) {
        if let (Some(fd), Some(give_back)) = (self.fd.take(), self.give_back.take()) {
            give_back(fd);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_lent_pipe_fails_its_stream_and_works_again_once_returned() {
        let (tx, rx) = pipe::pipe().unwrap();
        let (reader, writer) = (SharedPipe::new(rx), SharedPipe::new(tx));
        let (mut r, mut w) = (reader.handle(), writer.handle());
        w.write_all(b"one").await.unwrap();

        let loan = writer.lend().unwrap();
        assert!(w.write_all(b"x").await.is_err(), "the lent stream fails");
        assert!(writer.lend().is_err(), "one loan at a time");
        rustix::io::write(&loan, b" two").unwrap();
        drop(loan);
        w.write_all(b" three").await.unwrap();

        let loan = reader.lend().unwrap();
        let mut buf = [0u8; 3];
        assert!(
            r.read_exact(&mut buf).await.is_err(),
            "the lent stream fails"
        );
        rustix::io::read(&loan, &mut buf).unwrap();
        assert_eq!(&buf, b"one");
        drop(loan);
        // Data that arrived before the pipe rejoined the poller is not missed.
        let mut rest = [0u8; 10];
        r.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b" two three");
    }
}
