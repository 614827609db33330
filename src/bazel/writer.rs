//! Where a Bazel response leaves: the one output stream, shared by every pool
//! thread that finishes a request.
//!
//! A thread that finishes a request takes its place in line under a short
//! lock and does not wait for the stream. If no other thread is writing, it
//! becomes the writer: it writes every response in line, the ones queued
//! behind it meanwhile too, in one `writev` per turn, and leaves once the line
//! is empty. So a write that blocks (a pipe the client reads slowly) or is
//! slow (a system call that wakes the client) holds up no pool thread but
//! the writer, and responses that finish together leave in one system call.
//! Multiplex 4 with a file written per request spent its extra context
//! switches in threads queueing for a stream lock held across the write.

use std::io::{self, IoSlice, Write};
use std::mem;
use std::sync::{Condvar, Mutex};

use super::codec::WireFormat;
use crate::proto::worker_protocol::WorkResponse;
use crate::request::lock;

/// Writes whole responses in the order they were queued. Once the stream has
/// failed or been closed, nothing more (in particular no partial frame)
/// reaches it.
pub struct ResponseWriter {
    format: WireFormat,
    line: Mutex<Line>,
    /// Signalled when a writer leaves the line empty, for [`close`](Self::close).
    idle: Condvar,
}

struct Line {
    /// `None` once closed or failed, and while a writer has it out.
    stream: Option<Box<dyn Write + Send>>,
    /// Responses in order; not empty only while `writing`.
    frames: Vec<Frame>,
    /// The writer's batch between turns: the two vectors trade places, so
    /// queueing a response allocates nothing once they have grown.
    spare: Vec<Frame>,
    /// A thread has the turn to write and will write everything in line.
    writing: bool,
    closed: bool,
    /// Threads in [`close`](ResponseWriter::close) waiting on `idle`: a
    /// notify is a system call even when nobody waits, and every turn ends
    /// with one otherwise.
    closing: usize,
}

/// An encoded response.
pub struct Frame {
    id: i32,
    bytes: Vec<u8>,
}

/// A place in line for a response; [`Turn::write`] writes it unless another
/// thread is writing and takes it along.
#[must_use = "a turn that is never written leaves its responses unwritten"]
pub struct Turn<'a> {
    writer: &'a ResponseWriter,
    mine: bool,
}

impl ResponseWriter {
    pub fn new(format: WireFormat, out: Box<dyn Write + Send>) -> ResponseWriter {
        ResponseWriter {
            format,
            line: Mutex::new(Line {
                stream: Some(out),
                frames: Vec::new(),
                spare: Vec::new(),
                writing: false,
                closed: false,
                closing: 0,
            }),
            idle: Condvar::new(),
        }
    }

    /// Encodes, queues and writes one response.
    pub fn send(&self, response: &WorkResponse) {
        self.queue(self.encode(response)).write();
    }

    /// A response as it goes on the wire; encoding needs no lock.
    pub fn encode(&self, response: &WorkResponse) -> Frame {
        Frame {
            id: response.request_id,
            bytes: self.format.encode_response(response),
        }
    }

    /// Takes a place in line: whatever is queued or closed later comes after
    /// this response.
    pub fn queue(&self, frame: Frame) -> Turn<'_> {
        let mut line = lock(&self.line);
        let mine = !line.closed && {
            line.frames.push(frame);
            !mem::replace(&mut line.writing, true)
        };
        Turn { writer: self, mine }
    }

    /// Stops all further output once the responses already in line are
    /// written; responses queued later are dropped.
    pub fn close(&self) {
        let mut line = lock(&self.line);
        while line.writing {
            line.closing += 1;
            line = self.idle.wait(line).unwrap_or_else(|e| e.into_inner());
            line.closing -= 1;
        }
        line.closed = true;
        line.stream = None;
    }

    /// Writes everything in line until it is empty; only the thread whose
    /// turn it is calls this.
    fn write_line(&self) {
        let mut line = lock(&self.line);
        let mut batch = mem::take(&mut line.spare);
        loop {
            let mut stream = match line.stream.take() {
                Some(stream) if !line.frames.is_empty() => stream,
                stream => {
                    line.stream = stream;
                    line.frames.clear();
                    line.spare = batch;
                    line.writing = false;
                    break;
                }
            };
            mem::swap(&mut batch, &mut line.frames);
            drop(line);
            let written = write_frames(&mut *stream, &batch);
            line = lock(&self.line);
            match written {
                Ok(()) => line.stream = Some(stream),
                Err(e) => {
                    // The client is gone; it will not read anything else either.
                    let first = batch.first().map_or(0, |f| f.id);
                    crate::elog!("worker: cannot write response {first}: {e}");
                    line.closed = true;
                }
            }
            batch.clear();
        }
        let closing = line.closing > 0;
        drop(line);
        if closing {
            self.idle.notify_all();
        }
    }
}

impl Turn<'_> {
    /// Writes this response, and any queued behind it, unless another
    /// thread is writing: then that thread writes them.
    pub fn write(self) {
        if self.mine {
            self.writer.write_line();
        }
    }
}

/// Writes whole frames, as few system calls as the stream allows, then flushes.
fn write_frames(stream: &mut dyn Write, frames: &[Frame]) -> io::Result<()> {
    if let [frame] = frames {
        stream.write_all(&frame.bytes)?;
        return stream.flush();
    }
    let mut slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(&f.bytes)).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match stream.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::{bounded, unbounded, Receiver, Sender};
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(10);

    /// A pipe whose writes each wait for a go-ahead, after saying they began;
    /// every write (a `writev` takes all its buffers) is kept as one call.
    struct Gated {
        began: Sender<()>,
        go: Receiver<()>,
        calls: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl Gated {
        fn call(&mut self, bytes: Vec<u8>) -> io::Result<usize> {
            let _ = self.began.send(());
            self.go
                .recv_timeout(WAIT)
                .map_err(|_| io::Error::other("no go-ahead"))?;
            let n = bytes.len();
            lock(&self.calls).push(bytes);
            Ok(n)
        }
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.call(buf.to_vec())
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.call(bufs.iter().flat_map(|b| b.iter().copied()).collect())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Rig {
        writer: Arc<ResponseWriter>,
        began: Receiver<()>,
        go: Sender<()>,
        calls: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    fn rig() -> Rig {
        let (began_tx, began) = unbounded();
        let (go, go_rx) = unbounded();
        let calls = Arc::default();
        let gated = Gated {
            began: began_tx,
            go: go_rx,
            calls: Arc::clone(&calls),
        };
        Rig {
            writer: Arc::new(ResponseWriter::new(WireFormat::Proto, Box::new(gated))),
            began,
            go,
            calls,
        }
    }

    fn response(id: i32) -> WorkResponse {
        let mut response = WorkResponse::new();
        response.request_id = id;
        response.output = format!("answer {id}\n");
        response
    }

    fn wire(ids: &[i32]) -> Vec<u8> {
        ids.iter()
            .flat_map(|&id| WireFormat::Proto.encode_response(&response(id)))
            .collect()
    }

    /// Sends response `id` on a thread of its own; says when `send` returned.
    fn send_on_a_thread(writer: &Arc<ResponseWriter>, id: i32) -> Receiver<()> {
        let (done, returned) = bounded(1);
        let writer = Arc::clone(writer);
        thread::spawn(move || {
            writer.send(&response(id));
            let _ = done.send(());
        });
        returned
    }

    #[test]
    fn responses_finishing_during_a_write_return_at_once_and_leave_together_after_it() {
        let rig = rig();
        let first = send_on_a_thread(&rig.writer, 1);
        rig.began.recv_timeout(WAIT).expect("the first write began");
        // The first write is held: the next two must not wait for it.
        for id in [2, 3] {
            send_on_a_thread(&rig.writer, id)
                .recv_timeout(WAIT)
                .unwrap_or_else(|_| panic!("response {id} waited for the stream"));
        }
        rig.go.send(()).unwrap();
        rig.began
            .recv_timeout(WAIT)
            .expect("the second write began");
        rig.go.send(()).unwrap();
        first.recv_timeout(WAIT).expect("the writer finished");
        let calls = lock(&rig.calls).clone();
        assert_eq!(
            calls,
            [wire(&[1]), wire(&[2, 3])],
            "one write for the two queued"
        );
    }

    #[test]
    fn closing_waits_for_the_responses_in_line_and_drops_later_ones() {
        let rig = rig();
        let first = send_on_a_thread(&rig.writer, 1);
        rig.began.recv_timeout(WAIT).expect("the first write began");
        send_on_a_thread(&rig.writer, 2)
            .recv_timeout(WAIT)
            .expect("response 2 queued");
        let (closed_tx, closed) = bounded(1);
        let (writer, calls) = (Arc::clone(&rig.writer), Arc::clone(&rig.calls));
        thread::spawn(move || {
            writer.close();
            // What had been written when `close` returned.
            let _ = closed_tx.send(lock(&calls).concat());
        });
        // A negative check, so a bounded wait: `close` must still be waiting.
        assert!(
            closed.recv_timeout(Duration::from_millis(200)).is_err(),
            "close returned while responses were in line"
        );
        rig.go.send(()).unwrap();
        rig.go.send(()).unwrap();
        first.recv_timeout(WAIT).expect("the writer finished");
        let written = closed.recv_timeout(WAIT).expect("close returned");
        assert_eq!(written, wire(&[1, 2]));
        rig.writer.send(&response(3));
        assert_eq!(
            lock(&rig.calls).concat(),
            wire(&[1, 2]),
            "written after close"
        );
    }

    /// A pipe that takes at most `max` bytes per call, the way a full pipe
    /// or a slow reader hands back short writes; counts the calls.
    struct Trickle {
        max: usize,
        bytes: Arc<Mutex<Vec<u8>>>,
        calls: Arc<Mutex<usize>>,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            *lock(&self.calls) += 1;
            let n = buf.len().min(self.max);
            lock(&self.bytes).extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            *lock(&self.calls) += 1;
            let mut left = self.max;
            let mut taken = 0;
            for buf in bufs {
                let n = buf.len().min(left);
                lock(&self.bytes).extend_from_slice(&buf[..n]);
                taken += n;
                left -= n;
                if left == 0 {
                    break;
                }
            }
            Ok(taken)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn short_writes_are_resumed_where_they_stopped() {
        for max in [1, 3, 7] {
            let bytes = Arc::default();
            let calls = Arc::default();
            let stream = Trickle {
                max,
                bytes: Arc::clone(&bytes),
                calls: Arc::clone(&calls),
            };
            let writer = ResponseWriter::new(WireFormat::Proto, Box::new(stream));
            // One response alone (write_all), then three in one batch
            // (writev): the batch is queued while a write is in progress.
            writer.send(&response(1));
            let mut line = lock(&writer.line);
            line.writing = true;
            drop(line);
            let turns: Vec<_> = [2, 3, 4]
                .into_iter()
                .map(|id| writer.queue(writer.encode(&response(id))))
                .collect();
            assert!(
                turns.iter().all(|turn| !turn.mine),
                "a write was in progress"
            );
            drop(turns);
            lock(&writer.line).writing = false;
            writer.queue(writer.encode(&response(5))).write();
            writer.close();
            let expected = wire(&[1, 2, 3, 4, 5]);
            assert_eq!(*lock(&bytes), expected, "{max} byte(s) per call");
            assert!(
                *lock(&calls) >= expected.len().div_ceil(max),
                "{max} byte(s) per call: {} calls for {} bytes",
                lock(&calls),
                expected.len()
            );
        }
    }

    #[test]
    fn a_failed_write_ends_the_stream_for_good() {
        struct Broken(Arc<Mutex<usize>>);
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                *lock(&self.0) += 1;
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let attempts = Arc::default();
        let writer =
            ResponseWriter::new(WireFormat::Proto, Box::new(Broken(Arc::clone(&attempts))));
        writer.send(&response(1));
        writer.send(&response(2));
        writer.close();
        assert_eq!(*lock(&attempts), 1, "a write after the stream failed");
    }
}
