# Rules for the persistent-worker example.
#
# `worker` describes how to start the tool; `demo` runs one request through it.
# The same command line serves three purposes:
#   * one-shot fallback: `<command> @argfile` (no WORKER_SOCKET, no --persistent_worker)
#   * local Buck2 worker: Buck2 starts `<command>` with WORKER_SOCKET set
#   * remote worker: the executor starts `<command> --persistent_worker`
# so every scenario runs the very same binary with the very same flags.

load("@prelude//utils:argfile.bzl", "at_argfile")

def _worker_impl(ctx: AnalysisContext) -> list[Provider]:
    # Every engine must see a new worker when the flags change, and engines
    # key workers differently:
    #   * NativeLink keys by the literal command line up to the first `@`
    #     argument (file contents play no part), and starts the worker in its
    #     shared root directory, where a path relative to an action's
    #     directory does not resolve: so the flags are plain, literal
    #     arguments.
    #   * Buck2's persistentWorkerKey (BuildBuddy keys by it) is a digest of
    #     the artifacts in WorkerInfo.exe, hidden ones included, and ignores
    #     plain arguments: so the same flags are also written to a file that
    #     rides along as a hidden artifact. It is never read; it only makes
    #     the key change with the flags.
    # Neither may look like an argument file (`@...`, `--flagfile=...`):
    # executors split those off as the request.
    flags = [
        "--work-ms",
        str(ctx.attrs.work_ms),
        "--concurrency",
        str(ctx.attrs.concurrency),
    ]
    key = ctx.actions.write("worker.key", flags)
    command = cmd_args(ctx.attrs.binary, flags, hidden = key)

    # Scenario 5: the local worker is the bridge in front of a Bazel-protocol
    # worker, which it starts as `<bridge command> --persistent_worker`. The
    # one-shot form stays the tool's own: it does the same work.
    worker_command = command
    if ctx.attrs.bridge:
        worker_command = cmd_args(command, "--bridge", "--", ctx.attrs.bridge)
    return [
        DefaultInfo(),
        # The one-shot form, used when the execution platform has workers off.
        RunInfo(args = command),
        # The long-lived form. Buck2 keeps one process per WorkerInfo for the
        # length of a build command and lets `concurrency` requests into it at
        # once; with the Bazel remote protocol flag, a remote executor may keep
        # it across actions too.
        WorkerInfo(
            exe = worker_command,
            concurrency = ctx.attrs.concurrency,
            supports_bazel_remote_persistent_worker_protocol = True,
        ),
    ]

worker_rule = rule(
    impl = _worker_impl,
    attrs = {
        # The tool: a bare name is looked up on PATH, or give a path.
        "binary": attrs.string(),
        # A Bazel-protocol worker's command to run behind `--bridge`; empty:
        # the tool itself is the worker.
        "bridge": attrs.list(attrs.string(), default = []),
        "concurrency": attrs.int(default = 4),
        "work_ms": attrs.int(default = 1000),
    },
)

def _demo_impl(ctx: AnalysisContext) -> list[Provider]:
    out = ctx.actions.declare_output(ctx.label.name)

    # One request = one argument, the output file. It travels in an @argfile:
    # remote persistent workers accept only @file/--flagfile arguments, and
    # local workers receive the unexpanded `@path` and read the file themselves.
    argfile = at_argfile(
        actions = ctx.actions,
        name = ctx.label.name + ".args",
        args = cmd_args(out.as_output()),
    )

    tool = ctx.attrs.worker
    ctx.actions.run(
        cmd_args(argfile),
        category = "demo",
        exe = WorkerRunInfo(
            worker = tool[WorkerInfo],
            exe = tool[RunInfo].args,
        ),
        env = {"CACHE_SILO_KEY": ctx.attrs.cache_silo_key},
    )
    return [DefaultInfo(default_output = out)]

demo_rule = rule(
    impl = _demo_impl,
    attrs = {
        "cache_silo_key": attrs.string(default = ""),
        "worker": attrs.exec_dep(providers = [WorkerInfo, RunInfo]),
    },
)

# Macros: buckconfig values can only be read while BUCK files are evaluated,
# so they are read here and handed to the rules as attributes.

def worker(name, **kwargs):
    worker_rule(
        name = name,
        binary = read_root_config("persistent_worker", "binary", "persistent-worker"),
        work_ms = int(read_root_config("persistent_worker", "work_ms", "1000")),
        concurrency = int(read_root_config("persistent_worker", "concurrency", "4")),
        bridge = read_root_config("persistent_worker", "bridge", "").split(),
        **kwargs
    )

def demo(name, **kwargs):
    demo_rule(
        name = name,
        cache_silo_key = read_root_config("build", "cache_silo_key", ""),
        **kwargs
    )
