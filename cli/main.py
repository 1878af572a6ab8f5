"""Entry point: a Click group whose subcommands are imported only when they run.

``vmq --help`` therefore imports neither torch nor any extension. Errors become one line on
stderr and an exit code (1 error, 2 usage); ``VMQ_DEBUG=1`` shows the traceback instead.
It also sets OpenMP's wait policy for the commands (:func:`vmq.cpus.openmp_wait_env`) while
torch is not yet imported.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

import click

from vmq import __version__

# name -> (module, one-line help); the module defines a Click command called `command`
COMMANDS = {
    "bench": ("vmq_cli.bench", "Latency, throughput and peak memory: quantized vs floating point."),
    "calibrate": ("vmq_cli.calibrate", "Record calibration statistics of a Vim for quantize."),
    "eval": ("vmq_cli.eval", "Evaluate a Vim model or a packed file (top-1, top-5, images/s)."),
    "quantize": ("vmq_cli.quantize", "Post-training quantization (PTQ4VM, baselines) to a packed file."),
    "vq": ("vmq_cli.vq", "Weight vector quantization (ViM-VQ, k-means baseline) to a packed file."),
    "inspect": ("vmq_cli.inspect", "Show a packed file: model, recipe, layers, bits, size, accuracy, checksum."),
    "env": ("vmq_cli.env", "Show versions, CPU features, CUDA and kernel availability."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(COMMANDS[name][0]).command

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def resolve_command(self, ctx, args):
        name = args[0] if args else None
        if name and not name.startswith("-") and name not in COMMANDS:
            import difflib

            close = difflib.get_close_matches(name, list(COMMANDS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise click.UsageError(f"no such command '{name}'{hint}", ctx)
        return super().resolve_command(ctx, args)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vmq")
def vmq() -> None:
    """vmq: compress Vision Mamba models (PTQ, VQ) and run them."""


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def main(argv=None) -> None:
    from vmq.cpus import openmp_wait_env
    from vmq.errors import VmqError

    # before any command imports torch: its OpenMP runtime reads these once, when it loads
    os.environ.update(openmp_wait_env())
    debug = os.environ.get("VMQ_DEBUG") == "1"
    if hasattr(signal, "SIGXFSZ"):  # over `ulimit -f`, a write fails (EFBIG: one clear error), not the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        rv = vmq.main(args=argv, prog_name="vmq", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except VmqError as exc:
        if debug:
            raise
        click.echo(f"error: {_first_line(exc)}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug: still one line, unless debugging
        if debug:
            raise
        click.echo(f"error: internal error: {type(exc).__name__}: {_first_line(exc)[:300]} "
                   "(set VMQ_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
