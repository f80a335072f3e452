//! Bounded output buffers: each process keeps its recent output chunks, and the sandbox
//! log keeps recent chunks of every process. When a buffer is over its byte limit the
//! oldest chunks are evicted and counted; a producer never waits for a consumer.
//!
//! Small writes coalesce: output goes into an open tail chunk (same process and
//! stream, up to 64 KiB) that is sealed when a reader asks for it. A reader that keeps
//! up gets output as soon as it is written; one that lags gets fewer, larger chunks
//! instead of a flood of tiny ones.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tartarus_proto::Stream;
use tokio::sync::Notify;

/// Bookkeeping cost charged per chunk on top of its data, so a flood of one-byte
/// chunks is bounded too.
const CHUNK_OVERHEAD: usize = 64;
/// Largest batch of entries handed to a reader per wake-up.
const BATCH_BYTES: usize = 1 << 20;
/// Largest chunk that small writes are coalesced into (and the size of one read).
pub const COALESCE_BYTES: usize = 256 << 10;
/// Smallest chunk size a ring splits or coalesces to.
const MIN_CHUNK_BYTES: usize = 4 << 10;

#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub ts: f64,
    pub pid: u32,
    pub stream: Stream,
    pub data: Bytes,
}

impl Entry {
    fn cost(&self) -> usize {
        self.data.len() + CHUNK_OVERHEAD
    }
}

/// The newest chunk while it can still grow.
#[derive(Debug)]
struct Tail {
    seq: u64,
    ts: f64,
    pid: u32,
    stream: Stream,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct State {
    entries: VecDeque<Entry>,
    tail: Option<Tail>,
    coalesce: usize,
    bytes: usize,
    limit: usize,
    /// Sequence number the next entry gets; sequence numbers start at 1.
    next_seq: u64,
    evicted: u64,
    closed: bool,
}

/// What a reader gets: entries it has not seen, and how many it missed to eviction.
#[derive(Debug, Default)]
pub struct Batch {
    pub entries: Vec<Entry>,
    pub missed: u64,
    /// The sequence number to read from next time.
    pub resume: u64,
    /// The buffer is closed and this batch holds its last entries.
    pub closed: bool,
}

#[derive(Debug)]
pub struct Ring {
    state: Mutex<State>,
    notify: Notify,
}

impl Ring {
    /// A ring of `limit` bytes whose chunks are at most a quarter of it (4 KiB…256 KiB),
    /// so eviction stays fine-grained and the newest chunk never overshoots the bound.
    pub fn new(limit: usize) -> Arc<Self> {
        Self::with_coalescing(limit, (limit / 4).clamp(MIN_CHUNK_BYTES, COALESCE_BYTES))
    }

    /// A ring whose writes are split and coalesced into chunks of `coalesce` bytes
    /// (0: every write is one chunk, as it came).
    pub fn with_coalescing(limit: usize, coalesce: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                entries: VecDeque::new(),
                tail: None,
                coalesce,
                bytes: 0,
                limit,
                next_seq: 1,
                evicted: 0,
                closed: false,
            }),
            notify: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-updated in a way
        // that matters more than losing the agent, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends output; returns the sequence number of the chunk that holds its end.
    pub fn push(&self, pid: u32, stream: Stream, ts: f64, data: &[u8]) -> u64 {
        let piece = match self.lock().coalesce {
            0 => data.len().max(1),
            n => n,
        };
        let mut seq = 0;
        for part in data.chunks(piece) {
            seq = self.push_piece(pid, stream, ts, part);
        }
        self.notify.notify_waiters();
        seq
    }

    fn push_piece(&self, pid: u32, stream: Stream, ts: f64, data: &[u8]) -> u64 {
        {
            let mut st = self.lock();
            let limit = st.coalesce;
            let grown = match &mut st.tail {
                Some(t)
                    if t.pid == pid && t.stream == stream && t.buf.len() + data.len() <= limit =>
                {
                    t.buf.extend_from_slice(data);
                    Some(t.seq)
                }
                _ => None,
            };
            let seq = match grown {
                Some(seq) => {
                    st.bytes += data.len();
                    seq
                }
                None => {
                    seal(&mut st);
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    st.bytes += data.len() + CHUNK_OVERHEAD;
                    st.tail = Some(Tail {
                        seq,
                        ts,
                        pid,
                        stream,
                        buf: data.to_vec(),
                    });
                    if st.coalesce == 0 {
                        seal(&mut st);
                    }
                    seq
                }
            };
            // The newest chunk is always kept, even when alone it exceeds the limit.
            trim(&mut st);
            seq
        }
    }

    pub fn close(&self) {
        let mut st = self.lock();
        seal(&mut st);
        st.closed = true;
        drop(st);
        self.notify.notify_waiters();
    }

    /// Lowers the limit (to reclaim memory of finished processes) and evicts to fit.
    pub fn shrink_to(&self, limit: usize) {
        let mut st = self.lock();
        st.limit = st.limit.min(limit);
        seal(&mut st);
        trim_all(&mut st);
    }

    pub fn buffered_bytes(&self) -> usize {
        self.lock().bytes
    }

    pub fn last_seq(&self) -> u64 {
        self.lock().next_seq - 1
    }

    pub fn evicted(&self) -> u64 {
        self.lock().evicted
    }

    /// Entries with `seq >= next`, up to `max_bytes` of data (at least one entry).
    pub fn read_from(&self, next: u64, max_bytes: usize) -> Batch {
        let mut st = self.lock();
        seal(&mut st);
        let first = st.entries.front().map_or(st.next_seq, |e| e.seq);
        let missed = first.saturating_sub(next);
        let start = next.max(first);
        let skip = (start - first) as usize;
        let mut batch = Batch {
            missed,
            resume: start,
            ..Batch::default()
        };
        let mut size = 0;
        for entry in st.entries.iter().skip(skip) {
            if !batch.entries.is_empty() && size + entry.data.len() > max_bytes {
                return batch;
            }
            size += entry.data.len();
            batch.resume = entry.seq + 1;
            batch.entries.push(entry.clone());
        }
        batch.closed = st.closed;
        batch
    }

    /// Waits until there is an entry with `seq >= next` or the buffer is closed, then
    /// reads like [`Ring::read_from`].
    pub async fn wait_from(&self, next: u64, max_bytes: usize) -> Batch {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.lock();
                if st.closed || st.next_seq > next {
                    drop(st);
                    return self.read_from(next, max_bytes);
                }
            }
            notified.await;
        }
    }
}

/// How a [`pump`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PumpEnd {
    /// The buffer closed and every remaining entry was delivered.
    Closed,
    /// Not following, and every entry so far was delivered.
    CaughtUp,
    /// The consumer went away.
    Gone,
}

/// Delivers entries with `seq > since_seq` to `emit` (false from it stops the pump);
/// with `follow`, keeps waiting for new entries until the buffer closes. Returns how
/// it ended and how many entries were evicted before they could be delivered.
pub async fn pump<F, Fut>(ring: &Ring, since_seq: u64, follow: bool, mut emit: F) -> (PumpEnd, u64)
where
    F: FnMut(Entry) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut next = since_seq.saturating_add(1);
    let mut missed = 0;
    loop {
        let batch = if follow {
            ring.wait_from(next, BATCH_BYTES).await
        } else {
            ring.read_from(next, BATCH_BYTES)
        };
        missed += batch.missed;
        // Entries evicted before this read are skipped, not waited for again.
        next = batch.resume;
        let caught_up = batch.entries.is_empty();
        for entry in batch.entries {
            if !emit(entry).await {
                return (PumpEnd::Gone, missed);
            }
        }
        if batch.closed {
            return (PumpEnd::Closed, missed);
        }
        if !follow && caught_up {
            return (PumpEnd::CaughtUp, missed);
        }
    }
}

/// Turns the open tail into an ordinary entry.
fn seal(st: &mut State) {
    if let Some(t) = st.tail.take() {
        st.entries.push_back(Entry {
            seq: t.seq,
            ts: t.ts,
            pid: t.pid,
            stream: t.stream,
            data: Bytes::from(t.buf),
        });
    }
}

/// Evicts the oldest entries while over the limit, keeping the newest chunk.
fn trim(st: &mut State) {
    let keep = if st.tail.is_some() { 0 } else { 1 };
    while st.bytes > st.limit && st.entries.len() > keep {
        evict_oldest(st);
    }
}

/// Evicts while over the limit, down to nothing.
fn trim_all(st: &mut State) {
    while st.bytes > st.limit && !st.entries.is_empty() {
        evict_oldest(st);
    }
}

fn evict_oldest(st: &mut State) {
    if let Some(old) = st.entries.pop_front() {
        st.bytes -= old.cost();
        st.evicted += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(ring: &Ring, text: &str) -> u64 {
        ring.push(1, Stream::Stdout, 0.0, text.as_bytes())
    }

    #[test]
    fn sequence_starts_at_one_and_reads_resume() {
        let ring = Ring::with_coalescing(1 << 20, 0);
        assert_eq!(push(&ring, "a"), 1);
        assert_eq!(push(&ring, "b"), 2);
        let batch = ring.read_from(1, usize::MAX);
        assert_eq!(batch.entries.len(), 2);
        assert_eq!(batch.missed, 0);
        let batch = ring.read_from(2, usize::MAX);
        assert_eq!(batch.entries[0].data.as_ref(), b"b");
        assert!(ring.read_from(3, usize::MAX).entries.is_empty());
    }

    #[test]
    fn eviction_drops_oldest_and_readers_count_the_gap() {
        let ring = Ring::with_coalescing(3 * (CHUNK_OVERHEAD + 10), 0);
        for i in 0..10 {
            push(&ring, &format!("chunk-{i:04}"));
        }
        assert_eq!(ring.evicted(), 7);
        let batch = ring.read_from(1, usize::MAX);
        assert_eq!(batch.missed, 7);
        assert_eq!(batch.entries.first().unwrap().seq, 8);
        assert!(ring.buffered_bytes() <= 3 * (CHUNK_OVERHEAD + 10));
    }

    #[test]
    fn batches_respect_the_byte_budget() {
        let ring = Ring::with_coalescing(1 << 20, 0);
        for _ in 0..10 {
            push(&ring, "0123456789");
        }
        assert_eq!(ring.read_from(1, 25).entries.len(), 2);
        assert_eq!(ring.read_from(1, 1).entries.len(), 1);
    }

    #[tokio::test]
    async fn a_reader_behind_an_eviction_skips_ahead() {
        let ring = Ring::with_coalescing(2 * (CHUNK_OVERHEAD + 1), 0);
        for _ in 0..5 {
            push(&ring, "x");
        }
        ring.close();
        let mut seen = Vec::new();
        let (end, missed) = pump(&ring, 0, true, |e| {
            seen.push(e.seq);
            async { true }
        })
        .await;
        assert_eq!((end, missed, seen), (PumpEnd::Closed, 3, vec![4, 5]));
    }

    #[test]
    fn small_writes_coalesce_until_a_reader_takes_them() {
        let ring = Ring::new(1 << 20);
        assert_eq!(push(&ring, "a"), 1);
        assert_eq!(push(&ring, "b"), 1);
        assert_eq!(ring.push(1, Stream::Stderr, 0.0, b"e"), 2);
        assert_eq!(push(&ring, "c"), 3);
        let batch = ring.read_from(1, usize::MAX);
        let chunks: Vec<&[u8]> = batch.entries.iter().map(|e| e.data.as_ref()).collect();
        assert_eq!(chunks, vec![&b"ab"[..], b"e", b"c"]);
        // The tail was sealed by the read: new output starts a new chunk.
        assert_eq!(push(&ring, "d"), 4);
        let big = vec![0u8; COALESCE_BYTES];
        assert_eq!(ring.push(1, Stream::Stdout, 0.0, &big), 5);
        assert_eq!(ring.last_seq(), 5);
    }

    #[tokio::test]
    async fn waiters_wake_on_push_and_close() {
        let ring = Ring::with_coalescing(1 << 20, 0);
        let r2 = ring.clone();
        let waiter = tokio::spawn(async move { r2.wait_from(1, usize::MAX).await });
        tokio::task::yield_now().await;
        push(&ring, "x");
        assert_eq!(waiter.await.unwrap().entries.len(), 1);
        let r3 = ring.clone();
        let waiter = tokio::spawn(async move { r3.wait_from(2, usize::MAX).await });
        tokio::task::yield_now().await;
        ring.close();
        assert!(waiter.await.unwrap().closed);
    }
}
