//! A child's output read line by line on threads of their own, and bounded
//! waits for the line a test expects: a worker that never says it fails the
//! test with everything it did say, instead of hanging it.
//!
//! Every line read is kept in the log, whichever wait read it. A line that a
//! wait has handed to the test is not handed out again, so two waits for
//! the same text find two lines.

use std::io::{BufRead, BufReader, Read};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};

/// The lines of one or more streams, in the order they arrive.
pub struct Lines {
    incoming: Receiver<String>,
    /// Every line read so far, and whether a wait has returned it.
    log: Vec<(String, bool)>,
}

impl Lines {
    /// Reads each of `streams` on a thread; the lines end once all of them
    /// reach end of file.
    pub fn of(streams: Vec<Box<dyn Read + Send>>) -> Lines {
        let (tx, incoming) = unbounded();
        for stream in streams {
            read_into(stream, tx.clone());
        }
        Lines {
            incoming,
            log: Vec::new(),
        }
    }

    /// Waits up to `limit` for a line containing `needle` that no wait has
    /// returned yet (one read earlier counts), and returns it.
    #[track_caller]
    pub fn expect_line(&mut self, needle: &str, limit: Duration) -> String {
        if let Some(entry) = self
            .log
            .iter_mut()
            .find(|(line, returned)| !returned && line.contains(needle))
        {
            entry.1 = true;
            return entry.0.clone();
        }
        let deadline = Instant::now() + limit;
        loop {
            match self.read(deadline) {
                Ok(line) if line.contains(needle) => {
                    self.log.push((line.clone(), true));
                    return line;
                }
                Ok(line) => self.log.push((line, false)),
                Err(e) => panic!(
                    "no line containing {needle:?} within {limit:?} ({e:?}); so far:\n{}",
                    self.text()
                ),
            }
        }
    }

    /// Waits up to `limit` until `count` lines read (returned or not)
    /// contain `needle`; returns the last of them.
    #[track_caller]
    pub fn expect_lines(&mut self, needle: &str, count: usize, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some((line, _)) = self
                .log
                .iter()
                .filter(|(line, _)| line.contains(needle))
                .nth(count.saturating_sub(1))
            {
                return line.clone();
            }
            match self.read(deadline) {
                Ok(line) => self.log.push((line, false)),
                Err(e) => {
                    let found = self.log.iter().filter(|(l, _)| l.contains(needle)).count();
                    panic!(
                        "{found} of {count} lines containing {needle:?} within {limit:?} \
                         ({e:?}); so far:\n{}",
                        self.text()
                    )
                }
            }
        }
    }

    /// The next line not read yet, within `limit`; it counts as returned.
    pub fn next_line(&mut self, limit: Duration) -> Result<String, RecvTimeoutError> {
        let line = self.read(Instant::now() + limit)?;
        self.log.push((line.clone(), true));
        Ok(line)
    }

    /// Reads to the end of every stream, within `limit`; `false` if one is
    /// still open then.
    pub fn until_closed(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            match self.read(deadline) {
                Ok(line) => self.log.push((line, false)),
                Err(RecvTimeoutError::Disconnected) => return true,
                Err(RecvTimeoutError::Timeout) => return false,
            }
        }
    }

    /// Every line read so far.
    pub fn log(&self) -> Vec<String> {
        self.log.iter().map(|(line, _)| line.clone()).collect()
    }

    /// Every line read so far, one per line, for failure messages.
    pub fn text(&self) -> String {
        self.log().join("\n")
    }

    fn read(&self, deadline: Instant) -> Result<String, RecvTimeoutError> {
        self.incoming.recv_deadline(deadline)
    }
}

fn read_into(stream: impl Read + Send + 'static, tx: Sender<String>) {
    thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}
