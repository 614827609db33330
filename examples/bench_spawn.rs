//! Process-start benchmark: `posix_spawn` + `waitpid` of a command, RUNS
//! times, stdout and stderr to /dev/null. With a static "hello" this is the
//! process floor, what a one-shot action cannot go below; with the worker in
//! one-shot mode it is the cost a persistent worker saves.
//!
//! usage: bench_spawn RUNS JSON_OUT PROGRAM [ARGS...]
//! Prints one line and writes the figures as JSON (the fields the worker
//! benchmark writes: `requests`, `throughput_per_s`, `latency_ms`).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;
use std::time::Instant;

extern "C" {
    static environ: *const *mut libc::c_char;
}

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let (Some(runs), Some(json_out), Some(_)) = (
        args.first()
            .and_then(|r| r.to_str()?.parse::<usize>().ok())
            .filter(|&n| n > 0),
        args.get(1),
        args.get(2),
    ) else {
        eprintln!("usage: bench_spawn RUNS JSON_OUT PROGRAM [ARGS...]");
        return ExitCode::from(2);
    };
    let Ok(argv) = args[2..]
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
    else {
        eprintln!("bench_spawn: an argument contains a NUL byte");
        return ExitCode::from(2);
    };
    let mut pointers: Vec<*mut libc::c_char> = argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    pointers.push(std::ptr::null_mut());
    let null = c"/dev/null";
    let mut times = Vec::with_capacity(runs);
    let started = Instant::now();
    for _ in 0..runs {
        let t0 = Instant::now();
        // SAFETY: the file actions are initialised before use and destroyed
        // after; argv is NUL-terminated C strings ending in a null pointer
        // that outlive the call; environ is the process's environment.
        let status = unsafe {
            let mut actions: libc::posix_spawn_file_actions_t = std::mem::zeroed();
            libc::posix_spawn_file_actions_init(&mut actions);
            for fd in [1, 2] {
                libc::posix_spawn_file_actions_addopen(
                    &mut actions,
                    fd,
                    null.as_ptr(),
                    libc::O_WRONLY,
                    0,
                );
            }
            let mut pid: libc::pid_t = 0;
            let rc = libc::posix_spawn(
                &mut pid,
                pointers[0],
                &actions,
                std::ptr::null(),
                pointers.as_ptr(),
                environ,
            );
            libc::posix_spawn_file_actions_destroy(&mut actions);
            if rc != 0 {
                eprintln!(
                    "bench_spawn: cannot start {:?}: {}",
                    args[2],
                    std::io::Error::from_raw_os_error(rc)
                );
                return ExitCode::from(2);
            }
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
            status
        };
        times.push(t0.elapsed().as_secs_f64() * 1000.0);
        if status != 0 {
            eprintln!("bench_spawn: {:?} ended with wait status {status}", args[2]);
            return ExitCode::from(1);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let at = |p: f64| times[((p / 100.0 * runs as f64).ceil() as usize).clamp(1, runs) - 1];
    let json = format!(
        "{{\"requests\": {runs}, \"throughput_per_s\": {:.4}, \"latency_ms\": {{\"p50\": {:.4}, \
         \"p90\": {:.4}, \"p99\": {:.4}, \"p999\": {:.4}}}}}\n",
        runs as f64 / elapsed,
        at(50.0),
        at(90.0),
        at(99.0),
        at(99.9)
    );
    println!(
        "{:?}: {runs} runs, p50 {:.3} ms, p99 {:.3} ms",
        args[2],
        at(50.0),
        at(99.0)
    );
    if let Err(e) = std::fs::write(json_out, json) {
        eprintln!("bench_spawn: cannot write {json_out:?}: {e}");
        return ExitCode::from(2);
    }
    ExitCode::SUCCESS
}
