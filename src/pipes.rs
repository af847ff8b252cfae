//! The client's pipes in the hands of a blocking task that moves NAR data through them:
//! [`PipeSource`] reads an upload's body from the client's stdin, [`PipeSink`] writes an
//! export to its stdout, splicing large files' contents from the page cache. Both wait for the
//! client with `poll`, within a timeout, and pace themselves (see [`Pause`]) so that one
//! read or splice moves what many of the client's small writes or reads did.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::pipe::{splice, SpliceFlags};

use crate::nar_fs::{NarSink, CHUNK};

/// Why reading the client's stdin pipe stopped before the bytes asked for.
#[derive(Debug, thiserror::Error)]
pub enum PipeReadError {
    /// The client closed its end.
    #[error("the client's input ended in a NAR")]
    Eof,
    /// The client sent nothing for the whole timeout.
    #[error("timed out after {secs} s waiting for the client to send more")]
    Timeout {
        /// The timeout.
        secs: u64,
    },
    /// Reading or polling the pipe failed.
    #[error("reading the client's pipe: {0}")]
    Io(#[from] io::Error),
}

/// The error of a write that waited `limit` for the client to read.
pub(crate) fn write_timed_out(limit: Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "timed out after {} s waiting for the client to read (timeouts.write)",
            limit.as_secs()
        ),
    )
}

/// Smallest file whose contents a [`PipeSink`] splices: below this, reading the file into the
/// NAR buffer costs less than writing out the buffer first.
const SPLICE_MIN: u64 = 64 * 1024;

/// Bounds of the pause of [`PipeSink`] and [`PipeSource`], and where it starts.
const PAUSE_MIN: Duration = Duration::from_micros(50);
const PAUSE_MAX: Duration = Duration::from_millis(4);
const PAUSE_START: Duration = Duration::from_micros(200);

/// How long a blocking task that moves data through the client's pipe lets the client
/// work before it moves the next batch, instead of waking for each of the client's small
/// reads or writes (Nix reads and writes 32 KiB at a time). It adapts between
/// [`PAUSE_MIN`] and [`PAUSE_MAX`]: shorter when the client may have waited for this side,
/// longer when the client moved less than half a pipe meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pause(Duration);

impl Pause {
    fn new() -> Self {
        Pause(PAUSE_START)
    }

    fn sleep(self) {
        std::thread::sleep(self.0);
    }

    /// Adapts the pause to what the client did during the last one.
    fn adapt(&mut self, client_waited: bool, client_slow: bool) {
        if client_waited {
            self.0 = (self.0 / 2).max(PAUSE_MIN);
        } else if client_slow {
            self.0 = (self.0 * 2).min(PAUSE_MAX);
        }
    }
}

/// The capacity of the pipe `fd` in bytes (a pipe's default, should the kernel not say).
fn pipe_capacity(fd: impl AsFd) -> u64 {
    rustix::pipe::fcntl_getpipe_size(fd).unwrap_or(64 * 1024) as u64
}

/// Waits until `fd` is ready for `flags`; `Ok(false)` after `timeout`.
fn poll_ready(fd: impl AsFd, flags: PollFlags, timeout: Duration) -> io::Result<bool> {
    let limit = Timespec::try_from(timeout).map_err(io::Error::other)?;
    let mut fds = [PollFd::new(&fd, flags)];
    match rustix::event::poll(&mut fds, Some(&limit)) {
        Ok(0) => Ok(false),
        Ok(_) | Err(Errno::INTR) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// A client pipe in the hands of a blocking task: how long to wait for the client, the
/// pipe's capacity, and the [`Pause`] that lets the client fill or drain it before the task
/// takes its turn. [`PipeSource`] reads through one, [`PipeSink`] writes through one.
struct PacedPipe<F> {
    fd: F,
    timeout: Duration,
    capacity: u64,
    pause: Pause,
}

impl<F: AsFd> PacedPipe<F> {
    fn new(fd: F, timeout: Duration) -> Self {
        PacedPipe {
            capacity: pipe_capacity(&fd),
            fd,
            timeout,
            pause: Pause::new(),
        }
    }

    /// Waits until the pipe is ready for `flags`; `Ok(false)` after the timeout.
    fn ready(&self, flags: PollFlags) -> io::Result<bool> {
        poll_ready(&self.fd, flags, self.timeout)
    }

    /// Pauses, then waits as [`Self::ready`] does; returns the bytes then queued in the
    /// pipe, or `None` after the timeout.
    fn pause_then_wait(&mut self, flags: PollFlags) -> io::Result<Option<u64>> {
        self.pause.sleep();
        if !self.ready(flags)? {
            return Ok(None);
        }
        Ok(Some(rustix::io::ioctl_fionread(&self.fd)?))
    }
}

std::thread_local! {
    /// The read buffer of [`PipeSource`], kept by each blocking thread for its next upload
    /// (a fresh one per path would be page-faulted in every time).
    static SOURCE_BUF: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The client's stdin pipe, read by a blocking task for the body of an upload: exactly the
/// bytes asked for, so what follows the NAR stays in the pipe for the session. The pipe is
/// non-blocking (tokio's); the client is waited for at most the idle timeout. When the pipe
/// is empty and more than half a pipe is still to come, the task pauses (see [`Pause`]) so
/// that one read takes what many of the client's writes put in.
pub(crate) struct PipeSource<F> {
    pipe: PacedPipe<F>,
    /// Size of the reads (the thread's buffer is this long).
    pub(crate) read_size: usize,
}

impl<F: AsFd> PipeSource<F> {
    /// Reads `fd`, waiting at most `timeout` for the client.
    pub(crate) fn new(fd: F, timeout: Duration) -> Self {
        PipeSource {
            pipe: PacedPipe::new(fd, timeout),
            read_size: CHUNK,
        }
    }

    /// Reads exactly `len` bytes, handing each piece to `sink` as it arrives. The end of
    /// the client's input before that is [`PipeReadError::Eof`].
    pub(crate) fn read_exact<E: From<PipeReadError>>(
        &mut self,
        len: u64,
        mut sink: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut buf = SOURCE_BUF.take();
        buf.resize(self.read_size, 0);
        let result = self.read_into(&mut buf, len, &mut sink);
        SOURCE_BUF.set(buf);
        result
    }

    fn read_into<E: From<PipeReadError>>(
        &mut self,
        buf: &mut [u8],
        mut left: u64,
        sink: &mut impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        while left > 0 {
            // At most the buffer's length, so the cast cannot truncate.
            let want = left.min(buf.len() as u64) as usize;
            match rustix::io::read(&self.pipe.fd, &mut buf[..want]) {
                Ok(0) => return Err(PipeReadError::Eof.into()),
                Ok(n) => {
                    sink(&buf[..n])?;
                    left -= n as u64;
                }
                // Only a long remainder is worth pausing for; a short one waits for data.
                Err(Errno::AGAIN) if left > self.pipe.capacity / 2 => self.let_fill()?,
                Err(Errno::AGAIN) => self.wait()?,
                Err(Errno::INTR) => {}
                Err(e) => return Err(PipeReadError::Io(e.into()).into()),
            }
        }
        Ok(())
    }

    /// Lets the client fill part of the empty pipe, then waits for data as
    /// [`Self::wait`] does.
    fn let_fill(&mut self) -> Result<(), PipeReadError> {
        let queued = self
            .pipe
            .pause_then_wait(PollFlags::IN)?
            .ok_or_else(|| self.timed_out())?;
        let capacity = self.pipe.capacity;
        self.pipe
            .pause
            .adapt(queued >= capacity, queued < capacity / 2);
        Ok(())
    }

    /// Waits until the pipe has data (or the client closed it), or fails after the idle
    /// timeout.
    fn wait(&self) -> Result<(), PipeReadError> {
        if self.pipe.ready(PollFlags::IN)? {
            return Ok(());
        }
        Err(self.timed_out())
    }

    fn timed_out(&self) -> PipeReadError {
        PipeReadError::Timeout {
            secs: self.pipe.timeout.as_secs(),
        }
    }
}

/// The client's stdout pipe as a [`NarSink`] for an export in a blocking task: NAR framing
/// goes out with plain writes, and large files' contents are spliced from the page cache
/// into the pipe. The pipe is non-blocking (tokio's); a full pipe is waited for at most the
/// write timeout.
///
/// A reader that takes small reads from a full pipe (Nix reads 32 KiB at a time) wakes the
/// writer for each one, and those wake-ups cost more than the splices. So when a splice
/// finds the pipe full, the sink first pauses to let the reader drain part of it, then
/// fills it again with one splice (only while more than half a pipe remains to be sent: a
/// short remainder, such as the tail of a file that nearly fit, just waits for room, so
/// small paths pay no pause). The pause adapts: shorter when the pipe was found empty
/// (the reader may have waited), longer when it was still more than half full.
pub(crate) struct PipeSink<F> {
    pipe: PacedPipe<F>,
    /// Cleared when the kernel cannot splice from a file (the dumper then reads it).
    splice: bool,
}

impl<F: AsFd> PipeSink<F> {
    /// Writes to `fd`, waiting at most `timeout` for the client.
    pub(crate) fn new(fd: F, timeout: Duration) -> Self {
        PipeSink {
            pipe: PacedPipe::new(fd, timeout),
            splice: true,
        }
    }

    /// Lets the reader drain part of the full pipe (see the type's doc), then waits until
    /// it has room, as [`Self::wait`] does.
    fn let_drain(&mut self) -> io::Result<()> {
        let queued = self
            .pipe
            .pause_then_wait(PollFlags::OUT)?
            .ok_or_else(|| write_timed_out(self.pipe.timeout))?;
        let capacity = self.pipe.capacity;
        self.pipe.pause.adapt(queued == 0, queued > capacity / 2);
        Ok(())
    }

    /// Waits until the pipe has room, or fails after the write timeout.
    fn wait(&self) -> io::Result<()> {
        if self.pipe.ready(PollFlags::OUT)? {
            return Ok(());
        }
        Err(write_timed_out(self.pipe.timeout))
    }
}

impl<F: AsFd> NarSink for PipeSink<F> {
    fn write_buffer(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        let mut data = &buf[..];
        while !data.is_empty() {
            match rustix::io::write(&self.pipe.fd, data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(Errno::AGAIN) => self.wait()?,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        buf.clear();
        Ok(())
    }

    fn takes_file(&self, size: u64) -> bool {
        self.splice && size >= SPLICE_MIN
    }

    fn send_file(&mut self, file: &File, size: u64) -> io::Result<u64> {
        let mut sent = 0;
        while sent < size {
            let want = usize::try_from(size - sent).unwrap_or(usize::MAX);
            match splice(file, None, &self.pipe.fd, None, want, SpliceFlags::NONBLOCK) {
                // The file is shorter than it was: the dumper finds out and says so.
                Ok(0) => break,
                Ok(n) => sent += n as u64,
                // Only a long remainder is worth pausing for; a short one waits for room.
                Err(Errno::AGAIN) if size - sent > self.pipe.capacity / 2 => self.let_drain()?,
                Err(Errno::AGAIN) => self.wait()?,
                Err(Errno::INTR) => {}
                Err(Errno::INVAL) if sent == 0 => {
                    self.splice = false;
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(sent)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    /// A non-blocking pipe, as tokio leaves the client's stdout: (read end, write end).
    fn nonblocking_pipe() -> (OwnedFd, OwnedFd) {
        let (read, write) = rustix::pipe::pipe().unwrap();
        rustix::fs::fcntl_setfl(&write, rustix::fs::OFlags::NONBLOCK).unwrap();
        (read, write)
    }

    #[test]
    fn splicing_into_a_pipe_gives_the_same_nar() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("t");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        let big: Vec<u8> = (0..(3 << 20) + 5).map(|i: u32| (i % 251) as u8).collect();
        std::fs::write(root.join("big"), &big).unwrap();
        std::fs::write(root.join("sub/spliced"), &big[..SPLICE_MIN as usize + 3]).unwrap();
        std::fs::write(root.join("sub/small"), b"small").unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
        std::fs::set_permissions(root.join("big"), std::fs::Permissions::from_mode(0o555)).unwrap();
        std::os::unix::fs::symlink("sub/small", root.join("link")).unwrap();
        let mut want = Vec::new();
        crate::nar_fs::dump_path(&root, &mut want).unwrap();

        let (read, write) = nonblocking_pipe();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            io::Read::read_to_end(&mut File::from(read), &mut got).unwrap();
            got
        });
        let mut sink = PipeSink::new(write, Duration::from_secs(60));
        let size = crate::nar_fs::dump_to(&root, &mut sink).unwrap();
        assert!(sink.splice, "splice from a file into a pipe works");
        drop(sink);
        let got = reader.join().unwrap();
        assert_eq!(size, want.len() as u64);
        assert!(got == want, "the spliced NAR differs from dump_path's");
    }

    #[test]
    fn the_drain_pause_follows_how_full_the_pipe_is() {
        let (read, write) = nonblocking_pipe();
        let mut sink = PipeSink::new(write, Duration::from_secs(60));
        // Found empty after the pause: the reader may have waited, so the pause shrinks.
        sink.let_drain().unwrap();
        assert_eq!(sink.pipe.pause.0, PAUSE_START / 2);
        // Found still nearly full after the reader took 4 KiB: the pause grows.
        let chunk = vec![0u8; 4096];
        while rustix::io::write(&sink.pipe.fd, &chunk).is_ok() {}
        let reader = std::thread::spawn(move || {
            let mut got = [0u8; 4096];
            rustix::io::read(&read, &mut got).unwrap();
            read
        });
        sink.let_drain().unwrap();
        assert_eq!(sink.pipe.pause.0, PAUSE_START);
        drop(reader.join().unwrap());
    }

    #[test]
    fn a_pipe_nobody_reads_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, vec![7u8; 4 << 20]).unwrap();
        let (_read, write) = nonblocking_pipe();
        let mut sink = PipeSink::new(write, Duration::from_millis(20));
        match crate::nar_fs::dump_to(&file, &mut sink) {
            Err(crate::nar_fs::NarFsError::Io { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::TimedOut)
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
    }
}
