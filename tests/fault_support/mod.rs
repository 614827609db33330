//! What the fault and soak tests read about a running worker process.

#![allow(dead_code)]

/// The worker's threads and its `VmRSS` (KiB) from /proc/PID. gRPC's event
/// engine threads are not counted: that pool grows by a thread when its work
/// queues and retires the thread once idle, so a soak saw 16 threads in one
/// run and 17 in the next. Every thread the worker starts itself (its pool,
/// gRPC's completion-queue pollers, the input readers) is counted.
pub fn threads_and_rss(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"));
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("read tasks");
    let threads = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end() != "event_engine")
        .count() as u64;
    (threads, rss)
}

/// Alive means running or sleeping: a zombie has already exited and merely
/// waits for a reaper that a container's init may never be.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
            .unwrap_or(false),
        Err(_) => false,
    }
}
