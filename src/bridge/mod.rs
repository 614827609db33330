//! The bridge: a [`Handler`] that serves each request by forwarding it as a
//! `WorkRequest` to a Bazel-protocol worker running as a child process. Put
//! behind the Buck2 front end it turns any Bazel-protocol worker into a Buck2
//! local worker; behind the Bazel front end a pool of singleplex children
//! becomes one multiplex worker.
//!
//! - Children are kept per environment key (as Bazel's worker key includes
//!   the environment): a request is served by a child started with exactly
//!   its environment on top of the bridge's. At most `--max-env-keys` keys
//!   have children; a new key beyond that retires the least recently used
//!   key, preferring one whose children are all idle. Idle children stop at
//!   once, busy ones after their request.
//! - Singleplex children (default): one request at a time each, started on
//!   demand; the pool's `--concurrency` threads bound how many serve at once,
//!   and idle children of other keys stop to keep the total at that bound. A
//!   request that stops early cannot be cancelled in such a child, so the
//!   child is killed after `--cancel-grace-ms` and replaced later.
//! - `--multiplex`: one child per key, requests tagged with unique non-zero
//!   ids; a request that stops early is sent a `cancel` request.
//! - Recycling (`--max-requests-per-child`, `--max-child-rss-mib`): a child
//!   over either limit takes no new request, finishes the ones it has, and
//!   is stopped (stdin closed, then killed after [`EXIT_BOUND`]).
//!
//! [`child`] runs one process, [`env_key`] names an environment; this module
//! decides which child serves which request and what the client hears when a
//! child fails.

pub mod child;
pub mod env_key;

use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use crate::bazel::WireFormat;
use crate::proto::worker_protocol::{WorkRequest, WorkResponse};
use crate::request::{lock, Handler, Request, Response, Stop};
use child::{Child, Outcome, Spawner, Spec};
use env_key::EnvKey;

/// Children that fail to start this many times in a row make requests fail
/// at once instead of starting another child for each one.
pub const START_FAILURES: u32 = 3;
/// First wait before a new start is tried after [`START_FAILURES`]; it
/// doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often a request waiting for its child looks at its cancel token. The
/// token offers no wake-up a channel wait could join, and a response ends the
/// wait at once, so only a stop is noticed up to this late.
const STOP_POLL: Duration = Duration::from_millis(10);
/// At shutdown, how long children may take to exit after their stdin closes.
pub const EXIT_BOUND: Duration = Duration::from_secs(2);

/// Distinct request environments with children at once, unless
/// `--max-env-keys` says otherwise.
pub const DEFAULT_MAX_ENV_KEYS: usize = 4;

/// How the bridge runs its children (`--bridge` and the options after it).
#[derive(Debug, Clone)]
pub struct Settings {
    pub command: Vec<String>,
    pub multiplex: bool,
    pub protocol: WireFormat,
    pub cancel_grace: Duration,
    pub max_message_bytes: usize,
    pub verbose: bool,
    pub cwd: PathBuf,
    /// Environment keys with children at once; 0 ignores the requests'
    /// environments (every child gets the bridge's own).
    pub max_env_keys: usize,
    /// Singleplex children kept across all keys: the front end's
    /// concurrency, which already bounds how many serve at once.
    pub max_children: usize,
    pub recycle: Recycle,
}

/// When a child is replaced by a fresh one; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recycle {
    /// `--max-requests-per-child`: requests a child serves before it stops.
    pub max_requests: Option<u64>,
    /// `--max-child-rss-mib`: resident memory (VmRSS, checked after each
    /// answer) over which a child stops.
    pub max_rss_mib: Option<u64>,
}

#[derive(Default)]
struct Starts {
    failures_in_a_row: u32,
    last_failure: String,
    retry_at: Option<Instant>,
    backoff: Duration,
}

/// The children of one environment key.
struct Pool {
    key: EnvKey,
    /// Tells this pool from a later one of the same key: a child that comes
    /// back to a pool that was retired meanwhile stops.
    id: u64,
    /// Singleplex children not serving a request.
    idle: Vec<Arc<Child>>,
    /// The multiplex child.
    shared: Option<Arc<Child>>,
    /// Requests of this key being served now.
    busy: usize,
    /// When a request of this key last came, on [`Pools::clock`].
    last_used: u64,
}

#[derive(Default)]
struct Pools {
    list: Vec<Pool>,
    clock: u64,
    next_id: u64,
}

/// Children to stop once the pools' lock is let go, each with the line the
/// log gets (if any).
type Retired = Vec<(Arc<Child>, Option<String>)>;

impl Pools {
    /// The index of `key`'s pool, made if missing (retiring the least
    /// recently used key when there would be more than `max`); marks it used.
    fn enter(&mut self, key: &EnvKey, max: usize, retired: &mut Retired) -> usize {
        self.clock += 1;
        let now = self.clock;
        if let Some(at) = self.list.iter().position(|p| &p.key == key) {
            self.list[at].last_used = now;
            return at;
        }
        if self.list.len() >= max.max(1) {
            self.retire_one_key(key, max, retired);
        }
        self.next_id += 1;
        self.list.push(Pool {
            key: key.clone(),
            id: self.next_id,
            idle: Vec::new(),
            shared: None,
            busy: 0,
            last_used: now,
        });
        self.list.len() - 1
    }

    /// Retires the least recently used key whose children are all idle, or
    /// the least recently used key if every key is busy: its idle children
    /// stop now, its busy ones when their requests end.
    fn retire_one_key(&mut self, newcomer: &EnvKey, max: usize, retired: &mut Retired) {
        let oldest_idle = self
            .list
            .iter()
            .enumerate()
            .filter(|(_, p)| p.busy == 0)
            .min_by_key(|(_, p)| p.last_used);
        let oldest = self
            .list
            .iter()
            .enumerate()
            .min_by_key(|(_, p)| p.last_used);
        let Some((at, _)) = oldest_idle.or(oldest) else {
            return;
        };
        let pool = self.list.remove(at);
        let why = format!(
            "bridge: {} retired to make room for {} (--max-env-keys {}); {} idle child(ren) \
             stop now, {} busy after their requests",
            pool.key.label(),
            newcomer.label(),
            max,
            pool.idle.len() + usize::from(pool.shared.as_ref().is_some_and(|c| idle(c))),
            pool.busy,
        );
        let mut why = Some(why);
        for child in pool.idle {
            retired.push((child, why.take()));
        }
        if let Some(child) = pool.shared {
            child.draining.store(true, Ordering::SeqCst);
            if idle(&child) {
                retired.push((child, why.take()));
            }
        }
        if let Some(why) = why {
            crate::elog!("{why}");
        }
    }

    /// Before a singleplex child starts for the pool at `except`: if the
    /// children kept would then number more than `max`, one idle child of
    /// the least recently used other key stops.
    fn trim(&mut self, except: usize, max: usize, retired: &mut Retired) {
        let kept: usize = self.list.iter().map(|p| p.idle.len() + p.busy).sum();
        if kept <= max {
            return;
        }
        let victim = self
            .list
            .iter_mut()
            .enumerate()
            .filter(|(at, p)| *at != except && !p.idle.is_empty())
            .min_by_key(|(_, p)| p.last_used);
        if let Some((_, pool)) = victim {
            if let Some(child) = pool.idle.pop() {
                retired.push((child, None));
            }
        }
    }

    fn by_id(&mut self, id: u64) -> Option<&mut Pool> {
        self.list.iter_mut().find(|p| p.id == id)
    }
}

fn idle(child: &Child) -> bool {
    child.in_flight.load(Ordering::SeqCst) == 0
}

pub struct Bridge {
    settings: Settings,
    spawner: Spawner,
    pools: Mutex<Pools>,
    /// Every child started and not yet gone, for shutdown.
    all: Arc<Mutex<Vec<Arc<Child>>>>,
    starts: Mutex<Starts>,
    next_id: AtomicI32,
}

enum Waited {
    Answer(WorkResponse),
    Fault(String),
    Stopped(Stop),
}

impl Bridge {
    pub fn new(settings: Settings) -> std::io::Result<Bridge> {
        Ok(Bridge {
            settings,
            spawner: Spawner::start()?,
            pools: Mutex::default(),
            all: Arc::default(),
            starts: Mutex::default(),
            next_id: AtomicI32::new(1),
        })
    }

    fn spec(&self, key: &EnvKey) -> Spec {
        Spec {
            command: self.settings.command.clone(),
            protocol: self.settings.protocol,
            max_message_bytes: self.settings.max_message_bytes,
            cwd: self.settings.cwd.clone(),
            env: key.clone(),
        }
    }

    /// A new child for `key`, unless recent starts failed too often.
    fn start_child(&self, key: &EnvKey) -> Result<Arc<Child>, String> {
        {
            let starts = lock(&self.starts);
            if let Some(at) = starts.retry_at {
                if Instant::now() < at {
                    return Err(format!(
                        "{}bridge: the child failed to start {} times in a row; not starting \
                         another for {} ms\n",
                        starts.last_failure,
                        starts.failures_in_a_row,
                        at.saturating_duration_since(Instant::now()).as_millis()
                    ));
                }
            }
        }
        let spec = self.spec(key);
        match Child::start(&self.spawner, &spec) {
            Ok(child) => {
                if self.settings.verbose {
                    crate::elog!(
                        "bridge: started child pid {}: {} --persistent_worker ({})",
                        child.pid(),
                        spec.display(),
                        key.label()
                    );
                }
                lock(&self.all).push(Arc::clone(&child));
                Ok(child)
            }
            Err(message) => {
                self.start_failed(&message);
                Err(message)
            }
        }
    }

    fn start_failed(&self, message: &str) {
        let mut starts = lock(&self.starts);
        starts.failures_in_a_row += 1;
        starts.last_failure = message.to_owned();
        if starts.failures_in_a_row >= START_FAILURES {
            starts.backoff = if starts.backoff.is_zero() {
                FIRST_BACKOFF
            } else {
                (starts.backoff * 2).min(MAX_BACKOFF)
            };
            starts.retry_at = Some(Instant::now() + starts.backoff);
        }
    }

    fn started_fine(&self) {
        let mut starts = lock(&self.starts);
        if starts.failures_in_a_row > 0 {
            *starts = Starts::default();
        }
    }

    /// Drops a dead or killed child; one that died before ever answering
    /// counts as a failed start.
    fn discard(&self, child: &Arc<Child>, message: &str) {
        lock(&self.all).retain(|c| !Arc::ptr_eq(c, child));
        if !child.answered() {
            self.start_failed(message);
        }
    }

    /// Stops children that are done with: their stdin closes, a well-behaved
    /// worker exits, and one that has not after [`EXIT_BOUND`] is killed. The
    /// wait happens on a thread of its own, so no request waits for it.
    fn retire(&self, retired: Retired) {
        for (child, why) in retired {
            if let Some(why) = why {
                crate::elog!("{why}");
            }
            child.draining.store(true, Ordering::SeqCst);
            child.close_stdin();
            let all = Arc::clone(&self.all);
            let stopping = Arc::clone(&child);
            let started = std::thread::Builder::new()
                .name(format!("child-{}-stop", child.pid()))
                .spawn(move || {
                    stop_within(&stopping, EXIT_BOUND);
                    lock(&all).retain(|c| !Arc::ptr_eq(c, &stopping));
                });
            if started.is_err() {
                child.kill_now();
                lock(&self.all).retain(|c| !Arc::ptr_eq(c, &child));
            }
        }
    }

    /// Why `child` should stop now that it answered, if it should.
    fn worn_out(&self, child: &Child) -> Option<String> {
        let recycle = self.settings.recycle;
        let served = child.assigned.load(Ordering::SeqCst);
        if recycle.max_requests.is_some_and(|max| served >= max) {
            return Some(format!(
                "bridge: child pid {} ({}) served {served} requests \
                 (--max-requests-per-child); stopping it, a fresh child takes the next request",
                child.pid(),
                child.env_key().label()
            ));
        }
        let max_rss = recycle.max_rss_mib?;
        let rss = env_key::rss_mib(child.pid())?;
        (rss > max_rss).then(|| {
            format!(
                "bridge: child pid {} ({}) has {rss} MiB resident after {served} requests, over \
                 --max-child-rss-mib {max_rss}; stopping it, a fresh child takes the next request",
                child.pid(),
                child.env_key().label()
            )
        })
    }

    fn key_of(&self, request: &Request) -> EnvKey {
        if self.settings.max_env_keys == 0 {
            if self.settings.verbose && !request.env.is_empty() {
                crate::elog!(
                    "bridge: {} env entr(ies) of the request ignored (--max-env-keys 0); the \
                     child runs with the bridge's environment",
                    request.env.len()
                );
            }
            return EnvKey::default();
        }
        EnvKey::new(&request.env)
    }

    fn work_request(&self, request: &Request, id: i32) -> WorkRequest {
        let mut work = WorkRequest::new();
        work.arguments = request.args.clone();
        work.request_id = id;
        work.verbosity = request.verbosity;
        // A Bazel client's sandbox travels on; the child shares our cwd.
        if request.workdir != self.settings.cwd {
            work.sandbox_dir = match request.workdir.strip_prefix(&self.settings.cwd) {
                Ok(relative) => relative.to_string_lossy().into_owned(),
                Err(_) => request.workdir.to_string_lossy().into_owned(),
            };
        }
        work
    }

    /// Waits for the child's answer until the request stops.
    fn wait(&self, answer: &Receiver<Outcome>, request: &Request) -> Waited {
        loop {
            match answer.recv_timeout(STOP_POLL) {
                Ok(Ok(response)) => return Waited::Answer(response),
                Ok(Err(message)) => return Waited::Fault(message),
                Err(RecvTimeoutError::Disconnected) => {
                    return Waited::Fault("bridge: the child went away without an answer\n".into())
                }
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(stop) = request.cancel.stopped() {
                        return Waited::Stopped(stop);
                    }
                }
            }
        }
    }

    /// Waits `--cancel-grace-ms` for an answer that may still come.
    fn grace(&self, answer: &Receiver<Outcome>) -> Option<WorkResponse> {
        match answer.recv_timeout(self.settings.cancel_grace) {
            Ok(Ok(response)) => Some(response),
            _ => None,
        }
    }

    fn respond(&self, child: &Child, response: WorkResponse) -> Response {
        let mut output = response.output;
        if self.settings.verbose {
            output = format!(
                "bridge: answered by child pid {} ({}, exit code {})\n{output}",
                child.pid(),
                child.env_key().label(),
                response.exit_code
            );
        }
        Response {
            exit_code: response.exit_code,
            output,
            cancelled: response.was_cancelled,
            timed_out: false,
        }
    }

    /// An idle child of `key` (or `None`: start one), counted busy in the
    /// pool whose id comes back.
    fn take_idle(&self, key: &EnvKey) -> (u64, Option<Arc<Child>>) {
        let mut retired = Retired::new();
        let mut dead = Vec::new();
        let taken = {
            let mut pools = lock(&self.pools);
            let at = pools.enter(key, self.settings.max_env_keys, &mut retired);
            let pool = &mut pools.list[at];
            pool.busy += 1;
            let id = pool.id;
            let mut found = None;
            while let Some(child) = pool.idle.pop() {
                if child.is_dead() {
                    dead.push(child);
                } else {
                    found = Some(child);
                    break;
                }
            }
            match &found {
                Some(child) => {
                    child.assigned.fetch_add(1, Ordering::SeqCst);
                }
                None => pools.trim(at, self.settings.max_children, &mut retired),
            }
            (id, found)
        };
        for child in dead {
            self.discard(&child, "");
        }
        self.retire(retired);
        taken
    }

    /// The request of pool `id` no longer uses a child.
    fn leave(&self, id: u64) {
        if let Some(pool) = lock(&self.pools).by_id(id) {
            pool.busy = pool.busy.saturating_sub(1);
        }
    }

    /// A singleplex child that answered goes back to its pool, unless it is
    /// worn out or its key was retired meanwhile.
    fn give_back(&self, id: u64, child: Arc<Child>) {
        let worn_out = self.worn_out(&child);
        let mut retired = Retired::new();
        {
            let mut pools = lock(&self.pools);
            match pools.by_id(id) {
                Some(pool) => {
                    pool.busy = pool.busy.saturating_sub(1);
                    match worn_out {
                        None => pool.idle.push(child),
                        why => retired.push((child, why)),
                    }
                }
                None => retired.push((child, worn_out)),
            }
        }
        self.retire(retired);
    }

    fn handle_singleplex(&self, request: &Request, key: &EnvKey) -> Response {
        let (pool, child) = match self.take_idle(key) {
            (pool, Some(child)) => (pool, child),
            (pool, None) => match self.start_child(key) {
                Ok(child) => {
                    child.assigned.fetch_add(1, Ordering::SeqCst);
                    (pool, child)
                }
                Err(message) => {
                    self.leave(pool);
                    return Response::error(1, message);
                }
            },
        };
        let answer = match child.send(&self.work_request(request, 0)) {
            Ok(answer) => answer,
            Err(message) => {
                self.leave(pool);
                self.discard(&child, &message);
                return Response::error(1, message);
            }
        };
        match self.wait(&answer, request) {
            Waited::Answer(response) => {
                self.started_fine();
                let response = self.respond(&child, response);
                self.give_back(pool, child);
                response
            }
            Waited::Fault(message) => {
                self.leave(pool);
                self.discard(&child, &message);
                Response::error(1, message)
            }
            Waited::Stopped(stop) => {
                if let Some(response) = self.grace(&answer) {
                    let response = self.respond(&child, response);
                    self.give_back(pool, child);
                    return response;
                }
                let why = match stop {
                    Stop::Cancelled => "was cancelled",
                    Stop::TimedOut => "timed out",
                };
                let message = format!(
                    "bridge: the request {why}; a singleplex child cannot be cancelled, so child \
                     pid {} was killed after {} ms and will be replaced\n",
                    child.pid(),
                    self.settings.cancel_grace.as_millis()
                );
                child.kill(&format!("was killed: its request {why}"));
                self.leave(pool);
                lock(&self.all).retain(|c| !Arc::ptr_eq(c, &child));
                Response::stopped(stop, message)
            }
        }
    }

    /// The multiplex child of `key`, started if needed, with this request
    /// counted on it and on its pool (whose id comes back).
    fn multiplex_child(&self, key: &EnvKey) -> Result<(u64, Arc<Child>), String> {
        let mut retired = Retired::new();
        let mut dead = None;
        let taken = {
            let mut pools = lock(&self.pools);
            let at = pools.enter(key, self.settings.max_env_keys, &mut retired);
            let pool = &mut pools.list[at];
            if pool.shared.as_ref().is_some_and(|c| c.is_dead()) {
                dead = pool.shared.take();
            }
            let child = match &pool.shared {
                Some(child) => Ok(Arc::clone(child)),
                // Started under the lock: one child per key, and a start is
                // a fork and an exec, not a wait for the child.
                None => self.start_child(key),
            };
            child.map(|child| {
                pool.busy += 1;
                pool.shared = Some(Arc::clone(&child));
                child.in_flight.fetch_add(1, Ordering::SeqCst);
                let assigned = child.assigned.fetch_add(1, Ordering::SeqCst) + 1;
                let recycle = self.settings.recycle;
                if recycle.max_requests.is_some_and(|max| assigned >= max) {
                    // This request is its last; the next one starts a fresh
                    // child while this one finishes what it has.
                    pool.shared = None;
                    child.draining.store(true, Ordering::SeqCst);
                    crate::elog!(
                        "bridge: child pid {} ({}) was given {assigned} requests \
                         (--max-requests-per-child); it stops once they are answered, a fresh \
                         child takes the next request",
                        child.pid(),
                        key.label()
                    );
                }
                (pool.id, child)
            })
        };
        if let Some(dead) = dead {
            self.discard(&dead, "");
        }
        self.retire(retired);
        taken
    }

    /// A multiplex request is done with its child: the child stops if it is
    /// draining and this was its last request, or if it answered and is now
    /// over `--max-child-rss-mib`.
    fn multiplex_done(&self, id: u64, child: &Arc<Child>, answered: bool) {
        let rss = match (answered, self.settings.recycle.max_rss_mib) {
            (true, Some(max)) if !child.draining.load(Ordering::SeqCst) => {
                env_key::rss_mib(child.pid())
                    .filter(|&rss| rss > max)
                    .map(|rss| (rss, max))
            }
            _ => None,
        };
        let mut retired = Retired::new();
        {
            let mut pools = lock(&self.pools);
            let pool = pools.by_id(id);
            if let Some(pool) = pool {
                pool.busy = pool.busy.saturating_sub(1);
                if rss.is_some() && pool.shared.as_ref().is_some_and(|c| Arc::ptr_eq(c, child)) {
                    pool.shared = None;
                }
            }
            let left = child
                .in_flight
                .fetch_sub(1, Ordering::SeqCst)
                .saturating_sub(1);
            let mut why = None;
            if let Some((rss, max)) = rss {
                if !child.draining.swap(true, Ordering::SeqCst) {
                    why = Some(format!(
                        "bridge: child pid {} ({}) has {rss} MiB resident, over \
                         --max-child-rss-mib {max}; it stops once its {left} other request(s) \
                         are answered, a fresh child takes the next request",
                        child.pid(),
                        child.env_key().label()
                    ));
                }
            }
            if child.draining.load(Ordering::SeqCst) && left == 0 {
                retired.push((Arc::clone(child), why));
            } else if let Some(why) = why {
                crate::elog!("{why}");
            }
        }
        self.retire(retired);
    }

    fn next_id(&self) -> i32 {
        loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            // Zero means singleplex on the wire; negative ids look odd to tools.
            if id > 0 {
                return id;
            }
            let _ = self.next_id.compare_exchange(
                id.wrapping_add(1),
                1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    fn handle_multiplex(&self, request: &Request, key: &EnvKey) -> Response {
        let (pool, child) = match self.multiplex_child(key) {
            Ok(taken) => taken,
            Err(message) => return Response::error(1, message),
        };
        let id = self.next_id();
        let answer = match child.send(&self.work_request(request, id)) {
            Ok(answer) => answer,
            Err(message) => {
                self.multiplex_done(pool, &child, false);
                return Response::error(1, message);
            }
        };
        let (response, answered) = match self.wait(&answer, request) {
            Waited::Answer(response) => {
                self.started_fine();
                (self.respond(&child, response), true)
            }
            Waited::Fault(message) => (Response::error(1, message), false),
            Waited::Stopped(stop) => {
                child.cancel(id);
                match self.grace(&answer) {
                    Some(response) => (self.respond(&child, response), true),
                    None => {
                        child.forget(id);
                        let response = Response::stopped(
                            stop,
                            format!(
                                "bridge: request {id} stopped; child pid {} was asked to cancel \
                                 it and did not answer within {} ms\n",
                                child.pid(),
                                self.settings.cancel_grace.as_millis()
                            ),
                        );
                        (response, false)
                    }
                }
            }
        };
        self.multiplex_done(pool, &child, answered);
        response
    }
}

/// Waits up to `bound` for a child whose stdin is closed to exit, then kills
/// it.
fn stop_within(child: &Child, bound: Duration) {
    let deadline = Instant::now() + bound;
    while !child.has_exited() {
        if Instant::now() >= deadline {
            crate::elog!(
                "bridge: child pid {} did not exit within {} ms of end of input; killing it",
                child.pid(),
                bound.as_millis()
            );
            child.kill_now();
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Handler for Bridge {
    fn handle(&self, request: &Request) -> Response {
        let key = self.key_of(request);
        if self.settings.multiplex {
            self.handle_multiplex(request, &key)
        } else {
            self.handle_singleplex(request, &key)
        }
    }

    /// Closes every child's stdin, gives them [`EXIT_BOUND`] to exit, then
    /// kills the rest.
    fn shutdown(&self) {
        let children = std::mem::take(&mut *lock(&self.all));
        lock(&self.pools).list.clear();
        for child in &children {
            child.close_stdin();
        }
        let deadline = Instant::now() + EXIT_BOUND;
        let mut left: Vec<_> = children;
        while !left.is_empty() && Instant::now() < deadline {
            left.retain(|child| !child.has_exited());
            if !left.is_empty() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for child in &left {
            crate::elog!(
                "bridge: child pid {} did not exit within {} ms of end of input; killing it",
                child.pid(),
                EXIT_BOUND.as_millis()
            );
            child.kill_now();
        }
    }
}
