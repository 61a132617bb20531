"""`valleyforge`: run a config's stages, run the demo, write synthetic shards."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO_CONFIG = CONFIGS / "demo.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="valleyforge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the stages a config lists")
    run.add_argument("config")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    demo = sub.add_parser("demo", help="synthetic shards -> stage 1 -> stage 2 -> evaluation, on this machine")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")

    shards = sub.add_parser("shards", help="write and read webdataset shards")
    shards_sub = shards.add_subparsers(dest="shards_command", required=True)
    synth = shards_sub.add_parser("synth", help="write the synthetic moving-shapes dataset")
    synth.add_argument("--out", required=True)
    synth.add_argument("--train-samples", type=int, default=2048)
    synth.add_argument("--heldout-samples", type=int, default=96)
    synth.add_argument("--samples-per-shard", type=int, default=128)
    synth.add_argument("--seed", type=int, default=0)
    return parser


def _run(config_path: str, overrides: list[str]) -> int:
    from launch.config import load_config
    from launch.console import quiet_libraries

    cfg = load_config(config_path, overrides)
    from launch.pipeline import Pipeline  # imported first: the libraries install their log handlers on import
    quiet_libraries(cfg.resolved_output_dir() / "logs" / "driver.log")
    registered = Pipeline(cfg).run()
    print("\nRegistered models:")
    for stage in registered:
        print(f"  {stage.stage:<10} models:/{stage.name}/{stage.version}   (models:/{stage.name}@latest)")
    from launch.tracking import resolve_tracking_uri
    print(f"\nOpen them: mlflow ui --backend-store-uri {resolve_tracking_uri(cfg.tracking)}")
    return 0


def _demo(overrides: list[str]) -> int:
    from launch.config import load_config
    from data_shards.synth import write_synthetic_dataset

    cfg = load_config(DEMO_CONFIG, overrides)
    data_dir = Path(cfg.stages[0].train_data).parents[1]
    if not (data_dir / "instruct" / "heldout" / "manifest.json").is_file():
        write_synthetic_dataset(data_dir, train_samples=2048, heldout_samples=96,
                                progress=lambda msg: print(f"[data] {msg}"))
    return _run(str(DEMO_CONFIG), overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args.config, args.overrides)
        if args.command == "demo":
            return _demo(args.overrides)
        if args.command == "shards" and args.shards_command == "synth":
            from data_shards.synth import write_synthetic_dataset
            write_synthetic_dataset(Path(args.out), args.train_samples, args.heldout_samples, seed=args.seed,
                                    samples_per_shard=args.samples_per_shard, progress=print)
            return 0
    except ValueError as err:  # config and input errors: one line, no traceback
        print(f"valleyforge: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"valleyforge: error: {err}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
