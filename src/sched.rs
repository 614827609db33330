//! What the worker asks of the kernel's scheduler: a short time slice for
//! its own threads, so that a request's thread, woken by its client, runs at
//! once on a machine whose cores are busy with a build.
//!
//! Why: with every core busy, a woken thread on Linux's EEVDF scheduler
//! (6.6 and later) may wait until the running task's slice ends, up to a
//! scheduler tick (4 ms at 250 Hz), even when that task is `nice 19`. From
//! 6.12 a task may ask for a shorter slice (`sched_setattr` with
//! `sched_runtime`, 0.1 ms to 100 ms), and a waking task with a shorter slice
//! than the running one preempts it (the PREEMPT_SHORT scheduler feature).
//! An unprivileged process may ask this for itself: the policy stays
//! `SCHED_OTHER` and the nice value stays what it is. Threads inherit the
//! slice when they are created, so it is asked once, before any thread
//! starts. On older kernels the call fails or changes nothing; the worker
//! then runs as before.
//!
//! Never for the worker's children: a bridge's child (a compiler) gets the
//! kernel's default slice back before it runs ([`default_slice_in_child`]).
//!
//! It also tells the Bazel reading thread whether the machine has a core to spare
//! ([`Spare`]): a thread that waits awake for the next request (to
//! spare the request a wake-up) takes nothing from anybody on an idle
//! machine, but on a busy one the CPU time it spends is time the scheduler
//! then gives back to the busy processes, in slices that requests wait out.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;
use std::time::Duration;

/// `struct sched_attr` up to `sched_period` (`SCHED_ATTR_SIZE_VER0`).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Sets the calling thread's slice to `slice`, or back to the kernel's
/// default with `Duration::ZERO`, keeping its policy (`SCHED_OTHER`) and its
/// nice value. Only system calls: safe between fork and exec.
fn set_slice(slice: Duration, nice: i32) -> std::io::Result<()> {
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        nice,
        runtime: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
        ..SchedAttr::default()
    };
    // SAFETY: a valid sched_attr of the size it declares, for this thread.
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// This process's nice value (`getpriority` returns it as is on Linux's
/// libc wrapper; -1 is a valid value, so errno decides).
fn nice() -> std::io::Result<i32> {
    // SAFETY: plain system calls; errno is this thread's.
    unsafe {
        *libc::__errno_location() = 0;
        let n = libc::getpriority(libc::PRIO_PROCESS, 0);
        match *libc::__errno_location() {
            0 => Ok(n),
            e => Err(std::io::Error::from_raw_os_error(e)),
        }
    }
}

/// Asks for `slice` for the calling thread and every thread it starts from
/// now on. The caller decides what a failure means (older kernels refuse a
/// `sched_runtime` for `SCHED_OTHER`).
pub fn request_slice(slice: Duration) -> std::io::Result<()> {
    set_slice(slice, nice()?)
}

/// The slice the kernel gives the calling thread now, from
/// `/proc/thread-self/sched` (`se.slice`, in ns); `None` where the kernel
/// does not show it.
pub fn current_slice() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("se.slice"))?;
    let ns: u64 = line.rsplit(':').next()?.trim().parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// For `pre_exec`: gives a child process the kernel's default slice back,
/// `nice` being the value it runs at. Errors are ignored: a kernel without
/// custom slices gave the worker none to inherit.
pub fn default_slice_in_child(nice: i32) {
    let _ = set_slice(Duration::ZERO, nice);
}

/// The nice value to pass to [`default_slice_in_child`], read before fork.
pub fn nice_for_children() -> i32 {
    nice().unwrap_or(0)
}

/// Whether the machine has a core to spare for the Bazel reading thread to
/// wait awake on, judged from the runnable count in `/proc/loadavg`.
///
/// Not from one reading against the cores: measured on 2 cores while
/// serving a lockstep client, the count was one over the cores (3) in 27 to
/// 52 % of readings on an idle machine, the client's own threads being
/// runnable right when an answer reaches them (the benchmark client reads
/// responses on one thread and hands them to another); and beside four
/// `nice 19` hogs it was 1 in a third of readings (hogs off their
/// run queues for a moment) and 5 or more in the rest. An idle machine
/// almost never showed 4 or more (0.1 %).
///
/// So: a reading of more than one task over the cores makes the machine
/// busy for the next 16 readings (`SPARE_BUSY_READINGS`), whatever they show;
/// otherwise a core is spare. Starts busy: a worker started on a busy
/// machine never waits awake. Never with fewer than 2 cores to run on
/// (its affinity): the thread waiting awake would hold the one core, and
/// its client, if it shares it, gets it back only when the kernel
/// preempts the waiting thread; a floor waiting the same way yields it,
/// and the two pinned to one core would measure that, not the worker.
///
/// Tried instead, in A/B runs (not stored; docs/performance.md has the
/// figures): one reading against the cores, which blocked after a third to
/// a half of the answers on an idle machine (quiet no-op p50 24 to 28 µs
/// against 8); the share of readings over the cores averaged over the last
/// 16, which waited awake beside niced hogs after every two readings under
/// (0.40 % of requests over 2 ms); waiting awake until the reading thread
/// is preempted, which the client's own threads, woken on its core, do.
#[derive(Debug)]
pub struct Spare {
    /// Readings left before a core may be spare again.
    busy_for: u32,
}

/// Readings a crowded one keeps the machine busy for.
const SPARE_BUSY_READINGS: u32 = 16;

impl Default for Spare {
    fn default() -> Self {
        Spare {
            busy_for: SPARE_BUSY_READINGS,
        }
    }
}

impl Spare {
    /// Reads the runnable count once (one `pread`, about a microsecond; none
    /// on one core) and says whether the machine has a core to spare now.
    pub fn now(&mut self) -> bool {
        static PROBE: OnceLock<Option<(File, usize)>> = OnceLock::new();
        let probe = PROBE.get_or_init(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            File::open("/proc/loadavg").ok().map(|file| (file, cores))
        });
        let Some((file, cores)) = probe else {
            return false;
        };
        self.note(*cores, || {
            let mut buf = [0u8; 128];
            let n = file.read_at(&mut buf, 0).ok()?;
            runnable(&buf[..n])
        })
    }

    /// Counts one reading of the runnable count, taken by `read` only when
    /// it can matter (not on one core). `None`: unreadable, which counts as
    /// crowded: waiting awake is then never worth the risk.
    fn note(&mut self, cores: usize, read: impl FnOnce() -> Option<usize>) -> bool {
        if cores < 2 {
            return false;
        }
        if read().is_none_or(|n| n > cores + 1) {
            self.busy_for = SPARE_BUSY_READINGS;
            return false;
        }
        if self.busy_for > 0 {
            self.busy_for -= 1;
            return false;
        }
        true
    }
}

/// The runnable-task count in `/proc/loadavg` ("0.10 0.20 0.30 2/345 678").
fn runnable(loadavg: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(loadavg).ok()?;
    let field = text.split_ascii_whitespace().nth(3)?;
    field.split('/').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts busy; readings at most one over the cores (a lockstep
    /// client's own threads) free a core after 16 and keep it spare; one
    /// more over than that makes the machine busy for the next 16
    /// readings, however empty; so do unreadable ones. One core is never
    /// spare.
    #[test]
    fn a_core_is_spare_unless_a_recent_reading_was_crowded() {
        let mut spare = Spare::default();
        let cores = 2;
        for n in 0..16 {
            assert!(
                !spare.note(cores, || Some(n % 4)),
                "spare at reading {n} of the first 16"
            );
        }
        for n in 0..1_000 {
            assert!(
                spare.note(cores, || Some(n % 4)),
                "busy at reading {n}, count {}",
                n % 4
            );
        }
        for crowded in [Some(4), Some(6), None] {
            assert!(!spare.note(cores, || crowded), "spare with {crowded:?}");
            for n in 0..16 {
                assert!(
                    !spare.note(cores, || Some(1)),
                    "spare {n} readings after {crowded:?}"
                );
            }
            assert!(
                spare.note(cores, || Some(1)),
                "still busy 17 readings after {crowded:?}"
            );
        }
        for n in 0..100 {
            assert!(
                !spare.note(1, || Some(1)),
                "spare on one core at reading {n}"
            );
        }
    }

    #[test]
    fn the_runnable_count_is_the_fourth_field_of_loadavg() {
        assert_eq!(runnable(b"0.50 0.40 0.30 3/345 12345\n"), Some(3));
        assert_eq!(runnable(b"0.50 0.40 0.30 12/345 1"), Some(12));
        for bad in [
            &b""[..],
            b"0.50 0.40 0.30",
            b"0.50 0.40 0.30 x/345 1",
            b"\xff",
        ] {
            assert_eq!(runnable(bad), None, "{bad:?}");
        }
    }

    /// On a kernel with custom slices (6.12+), the slice asked for is the
    /// slice a thread started afterwards runs with, and a thread can go back
    /// to the default. Elsewhere the request fails and nothing is asserted.
    #[test]
    fn a_requested_slice_is_inherited_by_new_threads() {
        let Some(default) = current_slice() else {
            return eprintln!("no se.slice in /proc/thread-self/sched: not checked");
        };
        let asked = Duration::from_micros(100);
        let (inherited, restored) = std::thread::spawn(move || {
            if let Err(e) = request_slice(asked) {
                eprintln!("sched_setattr refused ({e}): not checked");
                return (None, None);
            }
            let inherited = std::thread::spawn(current_slice).join().ok().flatten();
            let _ = set_slice(Duration::ZERO, nice_for_children());
            (inherited, current_slice())
        })
        .join()
        .expect("the test thread ran");
        if let Some(inherited) = inherited {
            assert_eq!(inherited, asked);
            assert_eq!(restored, Some(default));
        }
    }
}
