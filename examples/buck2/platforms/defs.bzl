# Execution platforms for the scenarios of the example.
#
# A platform decides where actions run (this machine, BuildBuddy or a
# NativeLink engine) and whether an action that carries a worker goes
# through it:
#   use_persistent_workers                        local Buck2 workers (gRPC)
#   use_bazel_protocol_remote_persistent_workers  remote workers (Bazel protocol)

def _remote_properties(ctx: AnalysisContext):
    """The REAPI platform properties of every remote action, per engine."""
    if ctx.attrs.engine == "nativelink":
        properties = {"OSFamily": "Linux"}
        if ctx.attrs.persistent_workers:
            # NativeLink serves an action through a persistent worker only
            # when it carries both (its scheduler must list both, and
            # Buck2's persistentWorkerKey, in supported_platform_properties:
            # see nativelink/README.md). It keys the worker by the command
            # line before the first @ argument, not by persistentWorkerKey.
            properties["supports-workers"] = "1"
            properties["requires-worker-protocol"] = "proto"
        return properties
    return {
        "OSFamily": "Linux",
        # The image that holds `persistent-worker` on PATH. Registry
        # credentials for a private image are not set here: they would
        # become part of every action digest and land in the cache.
        # The remote buckconfigs send them as
        # x-buildbuddy-platform.container-registry-{username,password}
        # headers from BUILDBUDDY_CONTAINER_USER/PASSWORD (see .envrc).
        "container-image": ctx.attrs.container_image,
        # Makes the workspace writable for non-root users; actions
        # run as the image's user (uid 65532, see ci/image.sh).
        "nonroot-workspace": True,
        # Keep the runner, and with it the worker process, between
        # actions: remote persistent workers need this.
        "recycle-runner": True,
    }

def _execution_platform_impl(ctx: AnalysisContext) -> list[Provider]:
    constraints = {}
    constraints.update(ctx.attrs.cpu_configuration[ConfigurationInfo].constraints)
    constraints.update(ctx.attrs.os_configuration[ConfigurationInfo].constraints)
    configuration = ConfigurationInfo(constraints = constraints, values = {})

    if ctx.attrs.remote:
        executor_config = CommandExecutorConfig(
            local_enabled = True,
            remote_enabled = True,
            # Limited hybrid: each action runs on exactly one side, remote
            # unless it asks for local, with no racing and no fallback.
            use_limited_hybrid = True,
            remote_cache_enabled = True,
            allow_cache_uploads = False,
            use_persistent_workers = False,
            # Remote workers get one request at a time: four actions at
            # once mean four workers; `concurrency` matters only locally.
            use_bazel_protocol_remote_persistent_workers = ctx.attrs.persistent_workers,
            remote_execution_properties = _remote_properties(ctx),
            remote_execution_use_case = "buck2-default",
            remote_output_paths = "output_paths",
        )
    else:
        executor_config = CommandExecutorConfig(
            local_enabled = True,
            remote_enabled = False,
            remote_cache_enabled = False,
            use_persistent_workers = ctx.attrs.persistent_workers,
        )

    platform = ExecutionPlatformInfo(
        label = ctx.label.raw_target(),
        configuration = configuration,
        executor_config = executor_config,
    )
    return [
        DefaultInfo(),
        ExecutionPlatformRegistrationInfo(platforms = [platform]),
    ]

execution_platform_rule = rule(
    impl = _execution_platform_impl,
    attrs = {
        "container_image": attrs.string(default = ""),
        "cpu_configuration": attrs.dep(providers = [ConfigurationInfo]),
        # Which remote engine's properties remote actions carry.
        "engine": attrs.string(default = "buildbuddy"),
        "os_configuration": attrs.dep(providers = [ConfigurationInfo]),
        "persistent_workers": attrs.bool(default = False),
        "remote": attrs.bool(default = False),
    },
)

def _host_cpu() -> str:
    arch = host_info().arch
    if arch.is_aarch64:
        return "prelude//cpu:arm64"
    return "prelude//cpu:x86_64"

def _host_os() -> str:
    return "prelude//os:macos" if host_info().os.is_macos else "prelude//os:linux"

def execution_platform(name, remote, persistent_workers, engine = "buildbuddy", **kwargs):
    """Declares one execution platform; reads the image from buckconfig."""
    if remote:
        # Remote actions run on Linux whatever the host is.
        cpu = "prelude//cpu:x86_64"
        os = "prelude//os:linux"
        image = read_root_config(
            "persistent_worker",
            "container_image",
            "docker://ghcr.io/your-org/persistent-worker:latest",
        )
    else:
        cpu = _host_cpu()
        os = _host_os()
        image = ""
    execution_platform_rule(
        name = name,
        cpu_configuration = cpu,
        os_configuration = os,
        remote = remote,
        persistent_workers = persistent_workers,
        container_image = image,
        engine = engine,
        **kwargs
    )
