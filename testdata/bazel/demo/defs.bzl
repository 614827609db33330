"""A rule whose action runs through persistent-worker as a Bazel worker."""

def _demo_impl(ctx):
    outs = [ctx.actions.declare_file(ctx.label.name + ".txt")]
    for i in range(ctx.attr.extra_outputs):
        outs.append(ctx.actions.declare_file("%s.extra%d.txt" % (ctx.label.name, i)))

    # Everything before the flag file is a worker startup argument; the flag
    # file itself becomes the arguments of one WorkRequest.
    request_args = ctx.actions.args()
    request_args.use_param_file("@%s", use_always = True)
    request_args.set_param_file_format("multiline")
    for out in outs:
        request_args.add(out)

    requirements = {"supports-workers": "1"}
    if ctx.attr.multiplex:
        requirements["supports-multiplex-workers"] = "1"
    if ctx.attr.json:
        # Bazel 4 and later; the worker is told by its --worker-protocol flag.
        requirements["requires-worker-protocol"] = "json"

    ctx.actions.run(
        executable = ctx.executable.worker,
        inputs = [ctx.file.stamp],
        arguments = ctx.attr.worker_args + [request_args],
        outputs = outs,
        mnemonic = ctx.attr.mnemonic,
        progress_message = "Demo worker action for %s" % ctx.label,
        execution_requirements = requirements,
    )
    return [DefaultInfo(files = depset(outs))]

demo = rule(
    implementation = _demo_impl,
    attrs = {
        "worker": attr.label(
            default = Label("//worker:persistent-worker"),
            executable = True,
            allow_single_file = True,
            cfg = "host",
        ),
        "worker_args": attr.string_list(default = ["--verbose"]),
        # An input of every action: rewriting it makes Bazel run the actions
        # again without restarting the worker.
        "stamp": attr.label(
            default = Label("//demo:stamp.txt"),
            allow_single_file = True,
        ),
        "mnemonic": attr.string(default = "DemoWorker"),
        "multiplex": attr.bool(default = False),
        # Talk JSON instead of length-prefixed protobuf (needs Bazel 4 with
        # --experimental_worker_allow_json_protocol).
        "json": attr.bool(default = False),
        # More than zero gives the request more than one OUTFILE argument,
        # which the worker rejects with a usage error.
        "extra_outputs": attr.int(default = 0),
    },
)
