//! The whole Bazel front end: arbitrary stdin into `serve` with a trivial
//! handler. It must return (no hang, no panic), write only whole, decodable
//! responses, and, when the input was well formed, answer every request that
//! is not a cancel exactly once, under its id.
#![no_main]

use std::io::{BufReader, Write};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use persistent_worker::bazel::worker::{serve, Config};
use persistent_worker::bazel::WireFormat;
use persistent_worker::pool::Pool;
use persistent_worker::request::{Request, Response};

const MAX: usize = 1 << 16;

#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn cwd() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        persistent_worker::argfile::set_max_bytes(1 << 14);
        tempfile::tempdir().expect("temp dir")
    })
    .path()
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("listing /proc/self/task")
        .count()
}

/// Waits until the threads `serve` left behind have ended. On a malformed
/// stream it returns without joining its threads (the worker exits then);
/// here they would live on into the next input or the process's exit, and
/// the leak checks would judge memory they still hold. Waiting keeps each
/// input whole.
fn wait_for_threads(before: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while threads() > before {
        assert!(
            Instant::now() < deadline,
            "{} threads left by serve still running after 10 s",
            threads() - before
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stdin)) = data.split_first() else {
        return;
    };
    let before = threads();
    let format = if selector & 1 == 0 {
        WireFormat::Proto
    } else {
        WireFormat::Json
    };
    let config = Config {
        format,
        max_message_bytes: MAX,
        cwd: cwd().to_path_buf(),
        verbose: false,
    };
    let handler = Arc::new(|r: &Request| Response::ok(r.args.join(" ")));
    let output = Shared::default();
    let result = serve(
        handler,
        Pool::new(2),
        &config,
        BufReader::with_capacity(
            usize::from(selector >> 1) + 1,
            std::io::Cursor::new(stdin.to_vec()),
        ),
        Box::new(output.clone()),
    );
    wait_for_threads(before);

    // What a client would read: whole responses and nothing else.
    let written = output.0.lock().unwrap().clone();
    let mut reader = &written[..];
    let mut answered = Vec::new();
    while let Some(response) = format
        .read_response(&mut reader, usize::MAX)
        .expect("output is whole, well-formed responses")
    {
        answered.push(response.request_id);
    }

    if result.is_ok() {
        // Every request that is not a cancel is answered exactly once, under
        // its own id: the ids answered are the ids asked, as many times each.
        let mut input = BufReader::new(stdin);
        let mut asked = Vec::new();
        while let Some(request) = format
            .read_request(&mut input, MAX)
            .expect("serve read this input without error")
        {
            if !request.cancel {
                asked.push(request.request_id);
            }
        }
        asked.sort_unstable();
        answered.sort_unstable();
        assert_eq!(answered, asked, "ids answered vs. ids asked");
    }
});
