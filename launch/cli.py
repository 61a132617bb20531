"""`valleyforge`: run a config's stages here or submit them to a Ray cluster, run the demo, answer
with a model, build, inspect and verify shards."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data_shards.errors import ValleyForgeError
from launch.stop_request import Stopped

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIG = CONFIGS / "demo.yaml"
GENERATE_LOG = Path.home() / ".cache" / "valleyforge" / "generate.log"  # library warnings of `generate`


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="valleyforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the stages a config lists; run again, it continues where it stopped")
    run.add_argument("config")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    run.add_argument(
        "--restart",
        action="store_true",
        help="start over: new MLflow runs, every stage trained again, checkpoints ignored",
    )

    submit = sub.add_parser(
        "submit", help="run a config as a job on a Ray cluster (Ray Jobs), or write a KubeRay RayJob for it (--kuberay)"
    )
    submit.add_argument("config")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    submit.add_argument(
        "--address",
        help="the job server, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS, "
        "or RAY_ADDRESS when it is an http URL)",
    )
    submit.add_argument(
        "--follow",
        action="store_true",
        help="stream the job's log; exit 0 when it succeeds, 1 when it fails, 3 when stopped",
    )
    submit.add_argument(
        "--no-install",
        action="store_true",
        help="install nothing: the cluster's image already has ValleyForge's requirements",
    )
    submit.add_argument("--kuberay", action="store_true", help="print a KubeRay RayJob manifest instead of submitting")
    submit.add_argument("--image", help="--kuberay: an image with Ray and ValleyForge installed")
    submit.add_argument("--namespace", help="--kuberay: the Kubernetes namespace")
    submit.add_argument(
        "--workers-per-pod",
        type=int,
        default=1,
        help="--kuberay: training workers (GPUs with cluster.use_gpu) per worker pod",
    )
    submit.add_argument(
        "--secret",
        help="--kuberay: a Secret whose keys become the pods' environment "
        "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...)",
    )

    jobs = sub.add_parser("jobs", help="the jobs submitted to a Ray cluster")
    jobs.add_argument("--address", help="the job server, as for submit")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    jobs_sub.add_parser("list", help="submitted jobs, newest first")
    for name, text in (("status", "a job's status"), ("logs", "a job's log"), ("stop", "stop a job")):
        command = jobs_sub.add_parser(name, help=text)
        command.add_argument("job_id")
        if name == "logs":
            command.add_argument("--follow", action="store_true", help="stream until the job ends; exit as for submit")

    demo = sub.add_parser("demo", help="synthetic shards -> stage 1 -> stage 2 -> evaluation, on this machine")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    generate = sub.add_parser(
        "generate",
        help=f"answer a prompt about a video or image with an exported model (library warnings go to {GENERATE_LOG})",
    )
    generate.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or an export folder")
    media = generate.add_mutually_exclusive_group()
    media.add_argument("--video")
    media.add_argument("--image")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--template", help="conversation template (default: the one the model was trained with)")
    generate.add_argument("--max-new-tokens", type=int, default=64)

    checkpoints = sub.add_parser(
        "checkpoints", help="the checkpoints recorded in MLflow for a stage run (MLFLOW_TRACKING_URI, else ./mlflow.db)"
    )
    checkpoints.add_argument("ref", help="a stage run id, models:/NAME/VERSION or models:/NAME@ALIAS")

    shards = sub.add_parser("shards", help="write and read webdataset shards")
    shards_sub = shards.add_subparsers(dest="shards_command", required=True)
    synth = shards_sub.add_parser("synth", help="write the synthetic moving-shapes dataset")
    synth.add_argument("--out", required=True)
    synth.add_argument("--train-samples", type=int, default=2048)
    synth.add_argument("--heldout-samples", type=int, default=96)
    synth.add_argument("--samples-per-shard", type=int, default=128)
    synth.add_argument("--seed", type=int, default=0)

    build = shards_sub.add_parser("build", help="annotation files + media -> webdataset shards")
    build.add_argument("annotations", nargs="+", help="LLaVA/Valley JSON or JSONL, or caption CSV/JSONL")
    build.add_argument("--media-root", required=True, help="folder the annotations' media paths are under")
    build.add_argument("--out", required=True)
    build.add_argument("--samples-per-shard", type=int, default=1000)
    build.add_argument("--max-shard-bytes", type=int, default=1 << 30)
    build.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    build.add_argument("--video-size", type=int, help="transcode: short side in pixels")
    build.add_argument("--video-fps", type=float, help="transcode: frames per second kept")
    build.add_argument("--keyframe-interval", type=int, default=8, help="transcode: frames between keyframes")
    build.add_argument("--max-seconds", type=float, help="transcode: cut longer videos")
    build.add_argument("--image-max-side", type=int, help="scale larger images down to this side")
    build.add_argument("--tokenizer", help="tokenizer folder for the length limit (default: count words)")
    build.add_argument("--max-tokens", type=int, default=4096, help="reject longer conversations")

    inspect = shards_sub.add_parser("inspect", help="counts, durations, text lengths and a contact sheet")
    inspect.add_argument("path", help="split directory, shard glob or brace range")
    inspect.add_argument("--sheet", default="contact_sheet.png", help="where to write the contact sheet PNG")
    inspect.add_argument("--tokenizer", help="tokenizer folder for the length histogram (default: words)")
    inspect.add_argument("--sheet-samples", type=int, default=6)

    verify = shards_sub.add_parser("verify", help="decode every sample and check sha256 against the manifest")
    verify.add_argument("path", help="split directory, shard glob or brace range")
    return parser


def _run(config_path: str, overrides: list[str], restart: bool = False) -> int:
    from launch.config import load_config
    from launch.console import quiet_libraries

    cfg = load_config(config_path, overrides)
    from launch.pipeline import Pipeline  # imported first: the libraries install their log handlers on import
    from launch.stop_request import StopRequest

    quiet_libraries(cfg.resolved_output_dir() / "logs" / "driver.log")
    with StopRequest().listening() as stop:
        registered = Pipeline(cfg, stop=stop).run(restart)
    print("\nRegistered models:")
    for stage in registered:
        print(
            f"  {stage.stage_name:<10} models:/{stage.model_name}/{stage.version}   (models:/{stage.model_name}@latest)"
        )
    from launch.tracking import resolve_tracking_uri

    print(f"\nOpen them: mlflow ui --backend-store-uri {resolve_tracking_uri(cfg.tracking)}")
    return 0


def _submit(args) -> int:
    from launch.config import load_config
    from launch.submit import JobServer, cluster_job_config, submit
    from launch.tracking import resolve_tracking_uri

    cfg = cluster_job_config(load_config(args.config, args.overrides))
    tracking_uri = resolve_tracking_uri(cfg.tracking)
    if args.kuberay:
        from launch.kuberay import rayjob_manifest

        if not args.image:
            raise ValleyForgeError(
                "--kuberay needs --image: an image with Ray and ValleyForge installed (README, Submitting to a cluster)"
            )
        print(rayjob_manifest(cfg, tracking_uri, args.image, args.namespace, args.workers_per_pod, args.secret), end="")
        return 0
    server = JobServer(args.address)
    job_id = submit(server, cfg, tracking_uri, install=not args.no_install, project=Path.cwd())
    print(
        f"submitted {job_id} to {server.address}\n"
        f"  watch: {server.address}/#/jobs/{job_id}  or  valleyforge jobs --address {server.address} logs "
        f"--follow {job_id}\n  tracking: {tracking_uri}"
    )
    if not tracking_uri.startswith(("http://", "https://", "databricks")):
        print(
            f"  note: {tracking_uri} is a file on this machine: the job tracks there only if its head node "
            f"sees this path (set MLFLOW_TRACKING_URI to a server otherwise)"
        )
    return server.follow(job_id) if args.follow else 0


def _jobs(args) -> int:
    from launch.submit import JobServer, job_table

    server = JobServer(args.address)
    if args.jobs_command == "list":
        print("\n".join(job_table(server)) or f"no jobs submitted to {server.address}")
    elif args.jobs_command == "status":
        info = server.call("get_job_info", args.job_id)
        print(f"{args.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    elif args.jobs_command == "logs":
        if args.follow:
            return server.follow(args.job_id)
        print(server.call("get_job_logs", args.job_id), end="")
    else:
        server.call("stop_job", args.job_id)
        print(f"{args.job_id}: {server.wait(args.job_id, timeout_s=60)}")
    return 0


def _demo(overrides: list[str]) -> int:
    from data_shards.write.synth import write_synthetic_dataset
    from launch.config import load_config

    cfg = load_config(DEMO_CONFIG, overrides)
    if not isinstance(cfg.stages[0].train_data, str):
        raise ValleyForgeError(
            f"{DEMO_CONFIG}: stages.0.train_data: the demo writes its synthetic data under a "
            f"split directory and trains on it; a mixture needs `valleyforge run` with data of "
            f"its own"
        )
    data_dir = Path(cfg.stages[0].train_data).parents[1]
    if not (data_dir / "instruct" / "heldout" / "manifest.json").is_file():
        write_synthetic_dataset(
            data_dir, train_samples=2048, heldout_samples=96, progress=lambda msg: print(f"[data] {msg}")
        )
    return _run(str(DEMO_CONFIG), overrides)


def _generate(args) -> int:
    from launch.config import TrackingConfig
    from launch.console import quiet_libraries
    from launch.tracking import fetch_model, resolve_tracking_uri
    from trainer.generate import generate_from_export

    quiet_libraries(GENERATE_LOG)
    folder = fetch_model(args.model, resolve_tracking_uri(TrackingConfig()))
    print(generate_from_export(folder, args.prompt, args.video or args.image, args.template, args.max_new_tokens))
    return 0


def _checkpoints(args) -> int:
    from mlflow import MlflowClient

    from launch.checkpoint_registry import checkpoint_table
    from launch.config import TrackingConfig
    from launch.tracking import resolve_tracking_uri

    print("\n".join(checkpoint_table(MlflowClient(resolve_tracking_uri(TrackingConfig())), args.ref)))
    return 0


def _shards_synth(args) -> int:
    from data_shards.write.synth import write_synthetic_dataset

    write_synthetic_dataset(
        Path(args.out),
        args.train_samples,
        args.heldout_samples,
        seed=args.seed,
        samples_per_shard=args.samples_per_shard,
        progress=print,
    )
    return 0


def _shards_build(args) -> int:
    from data_shards.write.ingest import IngestOptions
    from data_shards.write.shards import BuildOptions, build_shards
    from data_shards.write.transcode import TranscodeOptions

    transcode = TranscodeOptions(
        video_size=args.video_size,
        video_fps=args.video_fps,
        keyframe_interval=args.keyframe_interval,
        max_seconds=args.max_seconds,
        image_max_side=args.image_max_side,
    )
    options = BuildOptions(
        IngestOptions(str(Path(args.media_root).absolute()), transcode, args.max_tokens),
        args.samples_per_shard,
        args.max_shard_bytes,
        args.tokenizer,
    )
    summary = build_shards(args.annotations, args.out, options, workers=args.workers)
    rejected = sum(summary.rejects.values())
    print(
        f"{summary.num_input} input samples = {summary.num_written} written + {rejected} rejected; "
        f"{summary.shards} shards in {summary.out}"
        + (f" ({summary.skipped_chunks} chunks already built, skipped)" if summary.skipped_chunks else "")
    )
    for reason, count in summary.rejects.items():
        print(f"  rejected, {reason}: {count}")
    if rejected:
        print(f"  details: {summary.out / 'rejects.jsonl'}")
    return 0


def _shards_inspect(args) -> int:
    from data_shards.inspection import contact_sheet, inspect_shards
    from data_shards.tokenizer import token_counter

    result = inspect_shards(args.path, token_counter(args.tokenizer), args.sheet_samples)
    print(result.report().replace("text length", "token length" if args.tokenizer else "word count"))
    print(f"contact sheet: {contact_sheet(result.sheet_rows, args.sheet)}")
    return 0


def _shards_verify(args) -> int:
    from data_shards.inspection import verify_shards

    decoded, problems = verify_shards(args.path)
    for problem in problems:
        print(f"FAILED {problem}", file=sys.stderr)
    print(f"{decoded} samples decoded, {len(problems)} problem(s)")
    return 1 if problems else 0


SHARD_COMMANDS = {"synth": _shards_synth, "build": _shards_build, "inspect": _shards_inspect, "verify": _shards_verify}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {
        "run": lambda: _run(args.config, args.overrides, args.restart),
        "demo": lambda: _demo(args.overrides),
        "submit": lambda: _submit(args),
        "jobs": lambda: _jobs(args),
        "generate": lambda: _generate(args),
        "checkpoints": lambda: _checkpoints(args),
        "shards": lambda: SHARD_COMMANDS[args.shards_command](args),
    }
    try:
        return commands[args.command]()
    except Stopped as err:  # on request: where, in one line
        print(f"valleyforge: {err}", file=sys.stderr)
        return err.exit_code
    except ValleyForgeError as err:  # the user's to fix: told in one line; anything else keeps its traceback
        print(f"valleyforge: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(
            "valleyforge: stopped at once"
            + (": a rerun resumes each stage from its newest checkpoint" if args.command in ("run", "demo") else ""),
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
