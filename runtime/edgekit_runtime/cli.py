"""The ``edgekit-runtime`` command: ``serve`` models over HTTP and ``score`` files offline.

The toolkit's ``edgekit serve`` / ``edgekit score`` are these same click commands. Errors of the
runtime's hierarchy become one line on stderr and the error's exit code, never a traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import click

from edgekit_runtime import __version__
from edgekit_runtime.bundle import BatchTimeoutPolicy
from edgekit_runtime.config import HTTP_SERVERS, BatchingOverrides, Config, load_config
from edgekit_runtime.errors import EdgekitError, InvalidInputError

if TYPE_CHECKING:
    from edgekit_runtime.agent import Agent
    from edgekit_runtime.runtime import Runtime
    from edgekit_runtime.signing import PublicKey

__all__ = ["COMMANDS", "ErrorMappingGroup", "main", "score", "serve"]

log = logging.getLogger("edgekit_runtime.cli")

_LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]


class _Failure(click.ClickException):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]


class ErrorMappingGroup(click.Group):
    """A click group that turns edgekit's errors into one clear line and their exit codes, never a
    traceback (the toolkit's `edgekit` command uses it too)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgekitError as e:
            raise _Failure(e.message, e.exit_code) from e
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            if os.environ.get("EDGEKIT_DEBUG"):
                raise
            msg = f"internal error: {type(e).__name__}: {e} (set EDGEKIT_DEBUG=1 for the traceback and report it)"
            raise _Failure(msg, 70) from e


def _sizes(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        sizes = [int(s) for s in value.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give increasing batch sizes like 1,2,4,8") from None
    if not sizes:
        raise click.BadParameter(f"{value!r}: give increasing batch sizes like 1,2,4,8")
    return sizes  # the rule itself (increasing, last = max_batch_size) is BatchingSettings'


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _byte_size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """``16777216``, ``16M``, ``512K``, ``1G`` (binary units), at least 64K."""
    if value is None:
        return None
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in _UNITS and not text[-1:].isdigit() else ""
    number = text[: len(text) - len(unit)]
    try:
        size = int(float(number) * _UNITS[unit])
    except ValueError:
        raise click.BadParameter(f"{value!r}: give a size in bytes, or with K, M or G, e.g. 16M") from None
    if size < 64 << 10:
        raise click.BadParameter(f"{value!r}: the telemetry queue needs at least 64K")
    return size


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )


_trust_key_option = click.option(
    "--trust-key",
    "trust_keys",
    multiple=True,
    type=click.Path(path_type=Path),
    help="use only bundles signed by this public key (repeat for several; see docs/signing.md)",
)


_FILE = click.Path(path_type=Path, exists=True, dir_okay=False)


def _labels(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in value:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: give KEY=VALUE, e.g. site=berlin")
        labels[key.strip()] = val.strip()
    return labels


@click.command()
@click.argument("sources", nargs=-1, type=click.Path(path_type=Path))
@click.option("--host", default=None, help="address to listen on  [default: 127.0.0.1]")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="port to listen on  [default: 8500]")
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), help="TOML config (server, per-model settings)"
)
@click.option("--max-batch-size", type=click.IntRange(min=1), help="rows per batch (all models)")
@click.option("--batch-timeout-micros", type=click.IntRange(min=0), help="max wait of a batch's oldest request")
@click.option(
    "--batch-timeout-policy",
    type=click.Choice(get_args(BatchTimeoutPolicy)),
    help="adaptive: run a batch early when waiting does not pay; fixed: wait the timeout (TF Serving)",
)
@click.option("--max-enqueued-batches", type=click.IntRange(min=1), help="queue bound in batches; full -> 503")
@click.option("--num-batch-threads", type=click.IntRange(min=1), help="batch worker threads, one engine each")
@click.option("--allowed-batch-sizes", callback=_sizes, help="pad batches up to these sizes, e.g. 1,2,4,8 (last = max)")
@click.option("--no-batching", is_flag=True, help="run each request on its own (for comparison)")
@click.option("--threads", type=click.IntRange(min=0), help="engine threads per worker (0 = engine default)")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), help="request body limit  [default: 64]")
@click.option(
    "--poll-seconds", type=click.FloatRange(min=0), help="watch sources for new versions; 0 = off  [default: 2]"
)
@click.option("--log-level", type=click.Choice(_LOG_LEVELS, case_sensitive=False), default=None, help="[default: info]")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="serving processes on the one port (SO_REUSEPORT), each with its own engines; "
    "helps compute-bound models on several cores  [default: 1]",
)
@_trust_key_option
@click.option("--broker", help="MQTT broker of the fleet, mqtt://HOST:PORT: runs the device agent (docs/ota.md)")
@click.option("--device-id", help="this device's id on the broker (letters, digits, ._-)  [needs --broker]")
@click.option("--profile", "device_profile", help="this device's profile name, as the hub shows it")
@click.option("--label", "labels", multiple=True, callback=_labels, help="KEY=VALUE label of this device (repeatable)")
@click.option("--tls-ca", type=_FILE, help="CA certificate of the broker (mqtts://)")
@click.option("--tls-cert", type=_FILE, help="this device's certificate (edgekit broker-config writes it)")
@click.option("--tls-key", type=_FILE, help="this device's private key")
@click.option("--mqtt-prefix", default="edgekit", show_default=True, help="topic prefix shared with the hub")
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    help="where the agent keeps its state  [default: STORE/.edgekit-agent of the first store]",
)
@click.option(
    "--telemetry-interval",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    default=None,
    help="seconds between telemetry messages to the hub; 0 = none  [default: 10; needs --broker]",
)
@click.option(
    "--telemetry-queue-bytes",
    callback=_byte_size,
    metavar="BYTES",
    help="bound of the on-disk telemetry queue, e.g. 16M; past it the oldest are dropped and counted  [default: 16M]",
)
@click.option(
    "--telemetry-rate",
    type=click.FloatRange(min=0.1),
    metavar="MSGS_PER_S",
    default=None,
    help="telemetry messages per second at most while a backlog drains  [default: 10]",
)
@click.option(
    "--http",
    "http_server",
    type=click.Choice(HTTP_SERVERS),
    default=HTTP_SERVERS[0],
    show_default=True,
    help="HTTP server: edgekit's own HTTP/1.1 protocol on httptools, or uvicorn (ASGI; slower, for comparison)",
)
def serve(  # noqa: PLR0917 - click passes every option as an argument
    sources: tuple[Path, ...],
    host: str | None,
    port: int | None,
    config_path: Path | None,
    max_batch_size: int | None,
    batch_timeout_micros: int | None,
    batch_timeout_policy: BatchTimeoutPolicy | None,
    max_enqueued_batches: int | None,
    num_batch_threads: int | None,
    allowed_batch_sizes: list[int] | None,
    no_batching: bool,
    threads: int | None,
    max_body_mb: float | None,
    poll_seconds: float | None,
    log_level: str | None,
    workers: int | None,
    trust_keys: tuple[Path, ...],
    broker: str | None,
    device_id: str | None,
    device_profile: str | None,
    labels: dict[str, str],
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    mqtt_prefix: str,
    state_dir: Path | None,
    telemetry_interval: float | None,
    telemetry_queue_bytes: int | None,
    telemetry_rate: float | None,
    http_server: str,
) -> None:
    """Serve model bundles over HTTP (TF Serving REST and Open Inference Protocol v2) with batching.

    Each SOURCE is a model store (STORE/NAME/VERSION/) or a bundle file (.ekb). Flags override the
    config file, which overrides each bundle's profile.
    """
    from edgekit_runtime.runtime import Runtime
    from edgekit_runtime.server import serve as run_server
    from edgekit_runtime.server.run import check_http_server

    check_http_server(http_server)  # before the config, the models and the agent: one line, exit 8
    config = load_config(config_path) if config_path is not None else Config()
    srv = config.server
    level = log_level or srv.log_level
    _logging(level)
    all_sources = [*sources, *(Path(s) for s in srv.sources)]
    if not all_sources:
        msg = "give at least one SOURCE: a model store directory or a .ekb bundle (or [server] sources in --config)"
        raise InvalidInputError(msg)
    flags = BatchingOverrides(
        enabled=False if no_batching else None,
        max_batch_size=max_batch_size,
        batch_timeout_micros=batch_timeout_micros,
        batch_timeout_policy=batch_timeout_policy,
        allowed_batch_sizes=allowed_batch_sizes,
        max_enqueued_batches=max_enqueued_batches,
        num_batch_threads=num_batch_threads,
    )
    runtime_keys = _trusted(trust_keys)
    processes = srv.workers if workers is None else workers
    if processes > 1:
        if broker:
            msg = "--workers above 1 does not run the device agent yet: drop --broker or --workers"
            raise InvalidInputError(msg)
        Runtime(all_sources, config=config, batching=flags, threads=threads).check_settings()
        from edgekit_runtime.server.workers import WorkerSpec, supervise

        spec = WorkerSpec(
            sources=[str(p) for p in all_sources],
            host=host or srv.host,
            port=srv.port if port is None else port,
            config=config.model_dump(mode="json"),
            flags=flags.model_dump(mode="json", exclude_none=True),
            threads=threads,
            trust_keys=[str(p) for p in trust_keys] if trust_keys else None,
            max_body_bytes=int((max_body_mb or srv.max_body_mb) * (1 << 20)),
            poll_seconds=srv.poll_seconds if poll_seconds is None else poll_seconds,
            log_level=level,
            http=http_server,
        )
        supervise(spec, processes)
        return
    first = all_sources[0]
    if broker and not first.exists() and first.suffix != ".ekb":
        # a new device: the agent installs into its store, so an empty one is where it starts
        try:
            first.mkdir(parents=True)
        except OSError as e:
            msg = f"{first}: cannot create the store for the agent ({e.strerror}); create it or give another STORE"
            raise InvalidInputError(msg) from None
        logging.getLogger("edgekit_runtime").info("created the empty store %s: the agent installs into it", first)
    runtime = Runtime(all_sources, config=config, batching=flags, threads=threads, trusted_keys=runtime_keys)
    runtime.check_settings()
    agent = _agent(
        runtime,
        all_sources,
        broker=broker,
        device_id=device_id,
        profile=device_profile,
        labels=labels,
        prefix=mqtt_prefix,
        state_dir=state_dir,
        tls=(tls_ca, tls_cert, tls_key),
        trusted_keys=runtime_keys,
        telemetry=(telemetry_interval, telemetry_queue_bytes, telemetry_rate),
    )
    if agent is not None:
        agent.start()
    try:
        run_server(
            runtime,
            host=host or srv.host,
            port=srv.port if port is None else port,
            max_body_bytes=int((max_body_mb or srv.max_body_mb) * (1 << 20)),
            poll_seconds=srv.poll_seconds if poll_seconds is None else poll_seconds,
            log_level=level,
            http=http_server,
            on_loaded=agent.loaded if agent is not None else None,
        )
    finally:
        if agent is not None:
            agent.stop()


def _agent(
    runtime: Runtime,
    sources: list[Path],
    *,
    broker: str | None,
    device_id: str | None,
    profile: str | None,
    labels: dict[str, str],
    prefix: str,
    state_dir: Path | None,
    tls: tuple[Path | None, Path | None, Path | None] = (None, None, None),
    trusted_keys: list[PublicKey] | None = None,
    telemetry: tuple[float | None, int | None, float | None] = (None, None, None),
) -> Agent | None:
    """The device agent when --broker is given; every setting checked before anything starts."""
    if broker is None:
        if device_id or profile or labels or state_dir or any(tls) or any(t is not None for t in telemetry):
            msg = (
                "--device-id, --profile, --label, --state-dir, --tls-* and --telemetry-* are the agent's: "
                "give --broker too"
            )
            raise InvalidInputError(msg)
        return None
    from edgekit_runtime.agent import Agent, parse_broker_url
    from edgekit_runtime.agent.protocol import check_device_id, check_prefix
    from edgekit_runtime.agent.telemetry import DEFAULT_INTERVAL, DEFAULT_RATE

    address = parse_broker_url(broker)
    if not device_id:
        msg = "--broker needs --device-id ID: the name this device has on the broker and in the hub"
        raise InvalidInputError(msg)
    check_device_id(device_id)
    check_prefix(prefix)
    stores = [s for s in sources if s.is_dir()]
    if state_dir is None:
        if not stores:
            msg = "the agent keeps its state in the first store directory; give one, or --state-dir DIR"
            raise InvalidInputError(msg)
        state_dir = stores[0] / ".edgekit-agent"
    if stores and trusted_keys is None:
        log.warning("the agent installs updates without --trust-key: any bundle the broker delivers would run")
    ca, cert, key = tls
    if (cert is None) != (key is None):
        msg = "--tls-cert and --tls-key go together: the device's certificate and its private key"
        raise InvalidInputError(msg)
    return Agent(
        runtime,
        address,
        device_id=device_id,
        state_dir=state_dir,
        profile=profile or "",
        labels=labels,
        prefix=prefix,
        store=stores[0] if stores else None,
        trusted_keys=trusted_keys,
        telemetry_interval=DEFAULT_INTERVAL if telemetry[0] is None else telemetry[0],
        telemetry_queue_bytes=telemetry[1],
        telemetry_rate=DEFAULT_RATE if telemetry[2] is None else telemetry[2],
        link_options={
            "tls_ca": str(ca) if ca else None,
            "tls_cert": str(cert) if cert else None,
            "tls_key": str(key) if key else None,
        },
    )


def _trusted(paths: tuple[Path, ...]) -> list[PublicKey] | None:
    """The public keys of --trust-key, read at start so a bad key file is a clear error at once."""
    from edgekit_runtime.signing import load_public_key

    return [load_public_key(p) for p in paths] if paths else None


@contextmanager
def _progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar when rich is installed (the toolkit), else click's."""
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    except ImportError:  # the device install has no rich
        with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
            yield bar.update
        return
    from rich.console import Console

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    # stderr, like every other human line: `score ... > file` must not capture the bar
    with Progress(*columns, transient=False, console=Console(stderr=True)) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="result file: .npy, .npz or .csv")
@click.option("--model", "model_name", help="which model, when BUNDLE is a store holding several")
@click.option("--max-batch-size", type=click.IntRange(min=1), help="rows per batch (default: the bundle's profile)")
@click.option("--num-batch-threads", type=click.IntRange(min=1), help="batch worker threads, one engine each")
@click.option("--threads", type=click.IntRange(min=0), help="engine threads per worker (0 = engine default)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bar")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary on stdout (implies --quiet)")
@_trust_key_option
def score(  # noqa: PLR0917 - click passes every option as an argument
    bundle: Path,
    input_path: Path,
    output: Path,
    model_name: str | None,
    max_batch_size: int | None,
    num_batch_threads: int | None,
    threads: int | None,
    quiet: bool,
    as_json: bool,
    trust_keys: tuple[Path, ...],
) -> None:
    """Score INPUT (.npy, .npz, .csv or a folder of images) with BUNDLE; write outputs to -o (.npy/.npz/.csv).

    Rows go through the same batcher and engines as the server.
    """
    from edgekit_runtime.runtime import Runtime
    from edgekit_runtime.scoring import read_inputs, write_outputs
    from edgekit_runtime.scoring import score as run_score

    if output.suffix.lower() not in (".npy", ".npz", ".csv"):
        msg = f"{output}: unsupported output; use .npy, .npz or .csv"
        raise InvalidInputError(msg)
    # No batching delay offline: the queue is always full, batches close on size.
    flags = BatchingOverrides(
        max_batch_size=max_batch_size, num_batch_threads=num_batch_threads, batch_timeout_micros=0
    )
    with Runtime(batching=flags, threads=threads, trusted_keys=_trusted(trust_keys)) as rt:
        names = rt.load(bundle)
        if model_name is None:
            if len(names) != 1:
                msg = f"{bundle} holds several models ({', '.join(names)}); choose one with --model"
                raise InvalidInputError(msg)
            model_name = names[0]
        model = rt.get(model_name)
        feeds, files = read_inputs(input_path, model)
        total = int(next(iter(feeds.values())).shape[0]) if feeds else 0
        started = time.perf_counter()
        if quiet or as_json:
            outputs = run_score(rt, model_name, feeds)
        else:
            with _progress(total, f"scoring {model_name} v{model.version}") as advance:
                outputs = run_score(rt, model_name, feeds, progress=advance)
        seconds = time.perf_counter() - started
    write_outputs(output, outputs, files)
    if as_json:
        summary = {
            "model": model_name,
            "version": model.version,
            "rows": total,
            "seconds": round(seconds, 4),
            "rows_per_s": round(total / seconds, 1) if seconds > 0 else None,
            "outputs": {k: list(v.shape) for k, v in outputs.items()},
            "output_file": str(output),
        }
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(f"wrote {total} rows of {', '.join(outputs)} to {output} in {seconds:.2f} s", err=True)


COMMANDS: list[click.Command] = [serve, score]


@click.group(cls=ErrorMappingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekit-runtime")
def cli() -> None:
    """edgekit-runtime: serve and score edgekit model bundles on a device."""


for _command in COMMANDS:
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="edgekit-runtime")
    sys.exit(0)
