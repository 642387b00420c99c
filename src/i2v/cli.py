"""The `i2v` command: generate a clip, pull and list models, run the demo (and, with the server, `serve`).

User mistakes print one line and exit 2; nothing here shows a traceback for them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from .errors import Canceled, I2VError
from .progress import DOWNLOAD_STAGE, DownloadProgress, Progress, Reporter, format_bytes
from .request import KlingRequest, field_errors
from .settings import TINY_PREFIX, Settings

if TYPE_CHECKING:
    from .engine import Engine
    from .weights import WeightsPlan

EXIT_USAGE = 2


class ProgressBar:
    """A tqdm bar on stderr: the stage as its label, denoising steps as its count, elapsed time; while
    weights download, their bytes with the rate and the time left."""

    STEPS = "{desc} {bar} {n}/{total} [{elapsed}]"
    BYTES = "{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"

    def __init__(self) -> None:
        from tqdm import tqdm

        # leave=False: the bar clears itself, so what stays on screen is the result line or the error.
        self._bar = tqdm(total=0, file=sys.stderr, dynamic_ncols=True, leave=False, bar_format=self.STEPS)
        self._bytes = False

    def __call__(self, progress: Progress) -> None:
        downloading = progress.stage == DOWNLOAD_STAGE
        self._bar.set_description_str(f"{progress.stage:<15}", refresh=False)
        if downloading != self._bytes:  # bytes with a rate, or steps: the bar starts afresh in the new unit
            self._bytes = downloading
            self._bar.unit, self._bar.unit_scale = ("B", True) if downloading else ("it", False)
            self._bar.bar_format = self.BYTES if downloading else self.STEPS
            self._bar.reset(total=progress.total or 0)
        if progress.total:
            self._bar.total = progress.total
            if downloading:  # through update(), which measures the rate
                self._bar.update((progress.step or 0) - self._bar.n)
            else:
                self._bar.n = progress.step or 0
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


class DownloadBar:
    """`i2v pull`'s bar on stderr: the bytes of all files, the rate and the time left; it stays on screen."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total, unit="B", unit_scale=True, file=sys.stderr, dynamic_ncols=True, desc="downloading"
        )

    def __call__(self, progress: DownloadProgress) -> None:
        self._bar.set_description_str(f"downloading {progress.model}", refresh=False)
        self._bar.update(progress.done - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="i2v", description="Image-to-video with the Kling v2.1 inputs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="render one clip to an mp4")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--start-image", required=True, help="path, http(s) URL or data URI")
    gen.add_argument("--end-image", help="last frame (pro mode only)")
    gen.add_argument("--mode", default="standard", help="standard (720p) or pro (1080p)")
    gen.add_argument("--duration", type=int, default=5, help="5 or 10 seconds")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--audio", action="store_true", help="mux the model's soundtrack when it makes one")
    gen.add_argument(
        "--preset", help="default, fast (step caching) or turbo (distilled model); see docs/speed.md"
    )
    gen.add_argument("--model", help="'tiny', a backend name, or NAME=FOLDER_OR_HUB_ID (see `i2v models`)")
    gen.add_argument(
        "--device",
        help="cuda:1, cpu, or a GPU group like cuda:0+cuda:1 that splits the clip across its GPUs "
        "(default: $I2V_DEVICE, else the first GPU)",
    )
    gen.add_argument("-o", "--output", required=True, type=Path)

    pull = commands.add_parser(
        "pull", help="download models' weights into the HF cache, with progress (resumes what is there)"
    )
    pull.add_argument(
        "models",
        nargs="*",
        help="backend names or NAME=HUB_ID (default: the configured model of each mode; see `i2v models`)",
    )
    pull.add_argument("--dry-run", action="store_true", help="print what would be fetched and its size")

    commands.add_parser("models", help="list the backends, their download size and what is in the cache")

    demo = commands.add_parser("demo", help="render the bundled example image (tiny model without a GPU)")
    demo.add_argument("-o", "--output", type=Path, default=Path("out/demo.mp4"))
    demo.add_argument("--model", help="force a model instead of choosing by hardware")

    serve = commands.add_parser("serve", help="run the Replicate-compatible HTTP API (tokens: I2V_API_TOKEN)")
    serve.add_argument("--host", help="interface to bind (default 0.0.0.0; 127.0.0.1 with --no-auth)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--model", help="'tiny', a backend name, or NAME=FOLDER_OR_HUB_ID (see `i2v models`)")
    serve.add_argument(
        "--data-dir", type=Path, help="predictions, files, outputs (default ~/.local/share/i2v)"
    )
    serve.add_argument("--no-auth", action="store_true", help="serve without tokens (binds loopback only)")

    migrate = commands.add_parser(
        "migrate",
        help="bring the server's database (I2V_DATABASE_URL, else the data dir's SQLite) to the newest "
        "schema now; `i2v serve` also does at start",
    )
    migrate.add_argument("--data-dir", type=Path, help="the data dir whose SQLite database to upgrade")
    migrate.add_argument(
        "--sql", action="store_true", help="print the SQL instead of running it (for a DBA to apply)"
    )
    migrate.add_argument("--since", help="with --sql: the revision the database is at (default: empty)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if not args.verbose:
        _quiet_libraries()
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "pull":
            return _pull(args)
        if args.command == "models":
            return _models()
        if args.command == "demo":
            return _demo(args)
        if args.command == "serve":
            from .server.main import serve  # the web stack loads only for this command

            return serve(
                host=args.host, port=args.port, model=args.model, data_dir=args.data_dir, no_auth=args.no_auth
            )
        if args.command == "migrate":
            from .server.main import migrate

            return migrate(data_dir=args.data_dir, sql=args.sql, since=args.since)
    except ValidationError as exc:
        for field, rule in field_errors(exc):
            print(f"error: {field}: {rule}", file=sys.stderr)
        return EXIT_USAGE
    except Canceled:
        print("canceled", file=sys.stderr)
        return 130
    except I2VError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return EXIT_USAGE


def _quiet_libraries() -> None:
    """Keep the libraries' own chatter (loading bars, optional-dependency notes) off the user's screen.

    These set the environment for the libraries (their documented switches), and read nothing of ours.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # ours show downloads (`DownloadBar`, a stage)
    # huggingface_hub prints its warnings (a resumed download) with a handler of its own: once is enough.
    logging.getLogger("huggingface_hub").propagate = False


def _generate(args: argparse.Namespace) -> int:
    request = KlingRequest(
        prompt=args.prompt,
        start_image=args.start_image,
        end_image=args.end_image,
        mode=args.mode,
        duration=args.duration,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        audio=args.audio,
        preset=args.preset,
    )
    from .engine import Engine  # a device group ("cuda:0+cuda:1") splits the clip across its GPUs

    return _render(Engine(args.model, device=args.device), request, args.output)


def _render(engine: Engine, request: KlingRequest, output: Path) -> int:
    from diffusers.utils import logging as diffusers_logging

    if not logging.getLogger().isEnabledFor(logging.INFO):  # our bar is the one progress display
        diffusers_logging.disable_progress_bar()
    output.parent.mkdir(parents=True, exist_ok=True)
    bar = ProgressBar()
    started = time.perf_counter()
    try:
        result = engine.generate(request, output, on_progress=bar)
    finally:
        bar.close()
    print(
        f"{result.path}  {result.width}x{result.height}  {result.num_frames} frames @ {result.fps} fps  "
        f"model {result.model}  seed {result.seed}  ({time.perf_counter() - started:.1f} s)"
    )
    return 0


def _pull(args: argparse.Namespace) -> int:
    """Plan every model first (sizes, cache, access), check the disk once, then download with one bar."""
    from . import weights
    from .backends import resolve
    from .errors import ModelUnavailable

    settings = Settings()
    refs: list[str] = []
    for ref in args.models or [settings.served_model or "default"]:
        refs += settings.models_in_use(ref) if ref in ("default", "tiny") else [ref]
    plans: list[WeightsPlan] = []
    failed = False
    for ref in dict.fromkeys(refs):
        if ref.startswith(TINY_PREFIX):
            print(f"{ref}: a tiny twin, built on this machine; nothing to pull")
            continue
        _, spec = resolve(ref, settings.tiny_dir, settings.extra_backends)
        repo = weights.hub_repo(spec.source)
        if repo is None:
            print(f"{spec.name}: weights in the local folder {spec.source}; nothing to pull")
            continue
        try:
            planned = weights.plan(spec.name, repo, spec.files)
        except ModelUnavailable as exc:
            failed = True
            print(f"error: {spec.name}: {exc}", file=sys.stderr)
            if args.dry_run:
                known = weights.cached_plan(spec.name, repo, spec.files)
                what = f"from the cache's file list: {known.summary()}" if known else "nothing in the cache"
                print(f"{spec.name:<20} {repo}: size unknown; {what}")
            continue
        print(f"{spec.name:<20} {repo}: {planned.summary()}")
        if args.dry_run:
            for file in planned.missing:
                print(f"    {file.path}  {format_bytes(file.size)}")
        plans.append(planned)
    needed = sum(p.missing_bytes for p in plans)
    free, folder = weights.free_disk()
    if args.dry_run:
        unknown = ", plus the models whose size is unknown," if failed else ""
        print(f"would fetch {format_bytes(needed)}{unknown} into {folder} ({format_bytes(free)} free)")
        return EXIT_USAGE if failed else 0
    if failed:
        return EXIT_USAGE
    weights.check_disk(plans, settings.min_free_disk)
    if needed:
        bar = DownloadBar(needed)
        try:
            weights.pull(plans, bar)
        finally:
            bar.close()
    for planned in plans:
        on_disk = weights.cached_plan(planned.model, planned.repo, planned.patterns) or planned
        where = weights.snapshot_folder(planned.repo, on_disk.revision) if on_disk.revision else folder
        print(f"{planned.model}: {len(on_disk.files) - len(on_disk.missing)} files, "
              f"{format_bytes(on_disk.cached_bytes)} in {where}")  # fmt: skip
    return 0


def _models() -> int:
    from .models_info import describe_models

    for line in describe_models():
        print(line)
    return 0


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .engine import Engine
    from .errors import ModelUnavailable

    example = resources.files("i2v") / "assets" / "example.jpg"
    request = KlingRequest(
        prompt="waves roll in slowly under a bright sun, the camera pans", start_image=str(example), seed=7
    )
    model = args.model
    if model is None and not torch.cuda.is_available():
        print(
            "demo: no CUDA GPU here, so rendering with the tiny random-weight model (noise, not a real clip)"
        )
        model = "tiny"
    engine = Engine(model)
    if model is None:
        bar = ProgressBar()  # missing weights download first, as a stage of the bar
        try:
            engine.backend(request.mode, report=Reporter(bar, None))
        except ModelUnavailable as exc:
            bar.close()
            print(
                f"demo: the real weights are not reachable ({str(exc).splitlines()[0][:300]}); using the tiny model"
            )
            engine = Engine("tiny")
        finally:
            bar.close()
    return _render(engine, request, args.output)
