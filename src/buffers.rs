//! The chunk buffers NAR data moves in between a session and its blocking store tasks: a
//! small per-session [`BufferPool`], and [`ChunkWriter`], the export sink that hands the
//! dumper's full buffers to the session without copying them.

use std::io;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::nar_fs::{NarSink, CHUNK};

/// How many chunks may wait between the session and a blocking store task.
pub(crate) const CHANNEL_DEPTH: usize = 4;

/// Most buffers a [`BufferPool`] keeps: every chunk that can be in flight at once.
const POOL_SIZE: usize = CHANNEL_DEPTH + 2;

/// Buffers of [`CHUNK`] bytes that go round between the session and its blocking store
/// tasks (the client's bytes read into them, export chunks written into them), so that a
/// session allocates a few of them once instead of one per chunk: a fresh allocation of
/// this size is page-faulted in and handed back to the kernel every time, which measured as
/// about a third of the server CPU of a download.
#[derive(Debug, Clone, Default)]
pub(crate) struct BufferPool(Arc<Mutex<Vec<Vec<u8>>>>);

impl BufferPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // The vector is valid whatever a panicking holder was doing.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An empty buffer with room for [`CHUNK`] bytes.
    pub(crate) fn take_vec(&self) -> Vec<u8> {
        self.lock()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(CHUNK))
    }

    /// [`Self::take_vec`] as a `BytesMut` (the same memory).
    pub(crate) fn take(&self) -> BytesMut {
        BytesMut::from(Bytes::from(self.take_vec()))
    }

    /// Takes back a chunk once nothing else refers to it.
    pub(crate) fn give(&self, chunk: Bytes) {
        if let Ok(buf) = chunk.try_into_mut() {
            self.put(buf.into());
        }
    }

    /// Keeps a buffer for reuse: one of the pool's size, not a large one a request grew
    /// (whose memory would stay held outside the budget).
    fn put(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut pool = self.lock();
        if (CHUNK..2 * CHUNK).contains(&buf.capacity()) && pool.len() < POOL_SIZE {
            pool.push(buf);
        }
    }

    /// `buf` as a chunk that comes back to the pool by itself when its last view is
    /// dropped, wherever that is (in the SSH connection's task once sent, say).
    fn chunk(&self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }
}

/// A buffer on loan from a [`BufferPool`], given back when dropped.
struct Pooled {
    buf: Vec<u8>,
    pool: BufferPool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

/// A [`NarSink`] for [`Store::export_nar_to`](crate::store::Store::export_nar_to) in a blocking task: takes the dumper's full
/// buffers (no copy) and hands them to the session through a bounded channel, so the
/// export runs at the pace of the client.
pub(crate) struct ChunkWriter {
    tx: mpsc::Sender<Bytes>,
    pool: BufferPool,
}

impl ChunkWriter {
    /// Sends full buffers on `tx`, taking fresh ones from `pool`.
    pub(crate) fn new(tx: mpsc::Sender<Bytes>, pool: BufferPool) -> Self {
        ChunkWriter { tx, pool }
    }
}

impl NarSink for ChunkWriter {
    fn write_buffer(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        let full = std::mem::replace(buf, self.pool.take_vec());
        self.tx
            .blocking_send(self.pool.chunk(full))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the session has ended"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_a_buffer_once_its_chunk_is_free() {
        let pool = BufferPool::default();
        let mut buf = pool.take();
        buf.extend_from_slice(&[1; CHUNK]);
        let ptr = buf.as_ptr();
        let chunk = buf.freeze();
        let shared = chunk.clone();
        pool.give(chunk);
        // Still referred to elsewhere: not reused, a new buffer comes instead.
        assert_ne!(pool.take().as_ptr(), ptr);
        pool.give(shared);
        let again = pool.take();
        assert_eq!((again.as_ptr(), again.len()), (ptr, 0));
        assert!(again.capacity() >= CHUNK);
    }

    #[test]
    fn a_pooled_chunk_comes_back_when_its_last_view_is_dropped() {
        let pool = BufferPool::default();
        let mut buf = pool.take_vec();
        buf.extend_from_slice(&[7; CHUNK]);
        let ptr = buf.as_ptr();
        let chunk = pool.chunk(buf);
        let packet = chunk.slice(1000..2000);
        drop(chunk);
        assert!(pool.lock().is_empty(), "a view is still alive");
        assert_eq!(&packet[..], &[7; 1000][..]);
        drop(packet);
        let again = pool.take_vec();
        assert_eq!((again.as_ptr(), again.len()), (ptr, 0));
        assert!(again.capacity() >= CHUNK);
    }
}
