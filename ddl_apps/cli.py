"""`ddl`: list, show, train, evaluate and use recipes.

`ddl train RECIPE -np N` validates the recipe in this process (a bad one exits with code 2 before any worker
starts), then launches `horovodrun` with N workers that each run `ddl train` again. Under horovodrun (or with
N=1) it trains in this process.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import yaml
from rich.markup import escape

from ddl_apps.console import stderr_console
from ddl_apps.core.launch import Elastic, choose_controller, hostfile_discovery
from ddl_apps.errors import ClusterError, UserError

console = stderr_console()


def inside_horovodrun() -> bool:
    return "HOROVOD_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ


# Where launchers put a worker's rank: horovodrun, mpirun, and srun (before MPI starts, only SLURM / PMIx know it).
RANK_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def is_quiet_rank() -> bool:
    return next((os.environ[v] for v in RANK_VARIABLES if v in os.environ), "0") != "0"


class UserErrorsExit2(click.Group):
    """Errors in the user's input: one message, no traceback, exit code 2 (printed by rank 0 only). Workers that
    lost each other: one message from each survivor, exit code 75."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (UserError, ClusterError) as e:
            lost = isinstance(e, ClusterError)
            if lost or not is_quiet_rank():  # every surviving worker says what it lost
                console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            sys.exit(ClusterError.exit_code if lost else 2)


@click.group(cls=UserErrorsExit2)
def main() -> None:
    """Distributed deep-learning recipes on one Horovod core."""


@main.command()
def recipes() -> None:
    """List the recipes: the shipped ones and those of installed trainer packages."""
    from ddl_apps.recipe import list_recipes

    for name, description in list_recipes().items():
        click.echo(f"{name:24s} {description}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
def show(recipe: str, overrides: tuple[str, ...]) -> None:
    """Print the resolved config of RECIPE with OVERRIDES (section.key=value)."""
    from ddl_apps.core.redact import redact
    from ddl_apps.recipe import load_recipe

    config = load_recipe(recipe, list(overrides))
    click.echo(yaml.safe_dump(redact(config.model_dump(mode="json")), sort_keys=False), nl=False)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("-np", "num_proc", type=click.IntRange(min=1),
              help="workers  [default: the slots of -H / --hostfile, else 1; --elastic: --max-np]")
@click.option("-H", "--hosts", help="host1:slots,host2:slots (passed to horovodrun)")
@click.option("--hostfile", type=click.Path(exists=True, dir_okay=False), help="horovodrun hostfile")
@click.option("--mpi", "controller", flag_value="mpi", help="use the MPI controller  [default on one host]")
@click.option("--gloo", "controller", flag_value="gloo",
              help="use the Gloo controller  [default across hosts and with --elastic]")
@click.option("--resume", is_flag=True, help="continue the run in run.dir (or the newest) from its checkpoint")
@click.option("--elastic", is_flag=True, help="go on when workers fail, take in workers that join (Gloo; PyTorch "
              "recipes); with --hostfile, editing the file adds or removes hosts")
@click.option("--min-np", type=click.IntRange(min=1), default=1, show_default=True,
              help="--elastic: fewest workers to go on with")
@click.option("--max-np", type=click.IntRange(min=1), help="--elastic: most workers  [default: -np]")
@click.option("--host-discovery-script", help="--elastic: a command printing the available hosts as host:slots "
              "lines (instead of -H / --hostfile; default: this machine)")
@click.option("--blacklist-cooldown-range", "rejoin_after_s", type=click.IntRange(min=1, max=3600), nargs=2,
              default=Elastic.rejoin_after_s, show_default=True, metavar="MIN MAX",
              help="--elastic: seconds before a host whose workers all failed may rejoin (from MIN, doubling with "
              "each failure up to MAX)")
def train(recipe, overrides, num_proc, hosts, hostfile, controller, resume, elastic, min_np, max_np,
          host_discovery_script, rejoin_after_s) -> None:
    """Train RECIPE, on one process or on -np N Horovod workers."""
    from ddl_apps.recipe import load_recipe

    config = load_recipe(recipe, list(overrides))
    if not inside_horovodrun() and (elastic or (num_proc or 1) > 1 or hosts or hostfile):
        from ddl_apps.core.launch import run_horovod

        command = [sys.executable, "-m", "ddl_apps.cli", "train", recipe, *overrides, *(["--resume"] if resume else [])]
        listed = _listed_hosts(hosts, hostfile)
        controller = controller or choose_controller(config.dist.controller, elastic, listed)
        if not elastic:  # the hosts as -H: horovodrun reads only `host slots=N` lines of the forms a hostfile takes
            num_proc = num_proc or sum(slots for _, slots in listed) or 1
            host_list = ",".join(f"{host}:{slots}" for host, slots in listed) or None
            sys.exit(run_horovod(command, num_proc, controller, host_list).returncode)
        max_np, extra = _elastic_run(config, resume, controller, num_proc, min_np, max_np, rejoin_after_s,
                                     None if host_discovery_script else listed)
        with tempfile.TemporaryDirectory(prefix="ddl-hosts-") as scratch:
            discovery, interface = ((host_discovery_script, None) if host_discovery_script else
                                    _hostfile_discovery(listed or [("localhost", max_np)], hostfile, Path(scratch)))
            job = Elastic(min_np, max_np, discovery, config.dist.collective_timeout_s(elastic=True),
                          tuple(rejoin_after_s), interface)
            sys.exit(run_horovod(command + extra, num_proc or max_np, controller, elastic=job).returncode)
    from ddl_apps.core.training import run_training
    from ddl_apps.registry import load_trainer

    run_dir = run_training(config, resume, load_trainer(config.trainer))
    if not is_quiet_rank():
        console.print(f"run directory: {run_dir}")


def _listed_hosts(hosts: str | None, hostfile: str | None) -> list[tuple[str, int]]:
    """The hosts and their slots that -H or --hostfile give (none without either)."""
    from ddl_apps.core.hosts import parse_hostfile

    try:
        return parse_hostfile(Path(hostfile).read_text() if hostfile else "\n".join((hosts or "").split(",")))
    except (OSError, ValueError) as e:
        raise click.UsageError(f"hosts {hostfile or hosts!r}: {e}") from None


def _elastic_run(config, resume: bool, controller: str, num_proc: int | None, min_np: int, max_np: int | None,
                 rejoin_after_s: tuple[int, int], listed: list[tuple[str, int]] | None) -> tuple[int, list[str]]:
    """--max-np (default: -np, or the listed hosts' slots), and the overrides every worker gets: the run directory
    (chosen here, as a worker joining later cannot agree on it with the others) and the global batch of --max-np
    workers (with --resume, the one the run was trained with)."""
    from ddl_apps.core import rundir

    max_np = max_np or num_proc or sum(slots for _, slots in listed or [])
    if not max_np:
        raise click.UsageError("--elastic needs --max-np (the most workers) or -np")
    if not min_np <= (num_proc or max_np) <= max_np:
        raise click.UsageError(f"--elastic needs --min-np <= -np <= --max-np (got {min_np}, {num_proc}, {max_np})")
    if config.dist.zero:
        from ddl_apps.core.launch import ZERO_UNDER_ELASTIC

        raise click.UsageError(ZERO_UNDER_ELASTIC)
    if controller != "gloo":
        raise click.UsageError("--elastic runs on Gloo; leave out --mpi (and dist.controller=mpi)")
    if rejoin_after_s[0] > rejoin_after_s[1]:
        raise click.UsageError(f"--blacklist-cooldown-range needs MIN <= MAX (got {rejoin_after_s[0]} "
                               f"{rejoin_after_s[1]})")
    run_dir = rundir.choose_run_dir(config, resume)
    rundir.check_new_run(run_dir, resume)
    if resume:  # the global batch the run was trained with, which its workers cannot agree on among themselves
        from ddl_apps.core.checkpointer import keep_trained_batch, trained_batch

        keep_trained_batch(config, trained_batch(run_dir / rundir.CHECKPOINTS) or {})
    return max_np, [f"run.dir={run_dir}", f"dist.batch_workers={config.dist.batch_workers or max_np}"]


def _hostfile_discovery(listed: list[tuple[str, int]], hostfile: str | None, scratch: Path) -> tuple[str, str | None]:
    """Discovery from the user's hostfile (re-read while the job runs), else from these hosts written to one; and
    the network interface when every host is this machine."""
    from ddl_apps.core.hosts import all_local

    path = Path(hostfile) if hostfile else scratch / "hosts"
    if not hostfile:
        path.write_text("".join(f"{host}:{slots}\n" for host, slots in listed))
    return hostfile_discovery(path), "lo" if all_local(listed) else None


def _run_trainer(run_dir: Path):
    """The recipe a run was trained with, and its trainer."""
    from ddl_apps.core.rundir import load_run_recipe
    from ddl_apps.registry import load_trainer

    config = load_run_recipe(run_dir)
    return config, load_trainer(config.trainer)


@main.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
def evaluate(run_dir: Path) -> None:
    """Evaluate the exported model of RUN_DIR on its test split and print the metrics as JSON."""
    from ddl_apps.core.training import evaluate_exported

    config, trainer = _run_trainer(run_dir)
    click.echo(json.dumps(evaluate_exported(config, run_dir, trainer), indent=1))


def _run_hook(run_dir: Path, name: str, missing: str):
    """The trainer hook `name` (predict, recommend) of the run's trainer; a RecipeError saying `missing` if it has
    none."""
    from ddl_apps.errors import RecipeError

    hook = getattr(_run_trainer(run_dir)[1].load_hooks(), name)
    if hook is None:
        raise RecipeError(missing)
    return hook


def _predict(run_dir: Path, inputs: tuple[str, ...], output: Path | None) -> None:
    predict = _run_hook(run_dir, "predict", f"the trainer of {run_dir} has no 'ddl predict'")
    predict(run_dir, list(inputs), output)


RUN_DIR = click.argument("run_dir", type=click.Path(path_type=Path))
INPUTS = click.argument("inputs", nargs=-1, required=True)
OUTPUT = click.option("-o", "--output", type=click.Path(path_type=Path), help="also write the results to this file")


BENCHMARK_PARTS = ("allreduce", "scaling", "overhead", "peer", "data", "hosts", "zero", "export", "tabular",
                   "report")  # benchmarks/run.py's


@main.command()
@click.argument("parts", nargs=-1, type=click.Choice(BENCHMARK_PARTS))
def bench(parts: tuple[str, ...]) -> None:
    """Run the benchmarks (all, or the PARTS named; `report` only rebuilds) and rebuild BENCHMARKS.md."""
    runner = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
    if not runner.exists():
        raise click.UsageError(f"ddl bench runs from a source checkout; {runner} is missing")
    sys.exit(subprocess.run([sys.executable, str(runner), *parts], check=False).returncode)


@main.command()
@RUN_DIR
@INPUTS
@OUTPUT
def predict(run_dir: Path, inputs: tuple[str, ...], output: Path | None) -> None:
    """Score INPUTS with the model a run exported (what INPUTS are depends on the trainer)."""
    _predict(run_dir, inputs, output)


@main.command()
@RUN_DIR
@INPUTS
@OUTPUT
def transcribe(run_dir: Path, inputs: tuple[str, ...], output: Path | None) -> None:
    """Print the transcript of each audio file in INPUTS (a speech run's `ddl predict`)."""
    _predict(run_dir, inputs, output)


@main.command()
@RUN_DIR
@click.argument("user_id")
@click.option("-k", "count", type=click.IntRange(min=1), default=10, show_default=True, help="items to list")
def recommend(run_dir: Path, user_id: str, count: int) -> None:
    """Print the top items for USER_ID (a recommendation run's model), leaving out those the user has seen."""
    recommend = _run_hook(run_dir, "recommend",
                          f"{run_dir} is not a recommendation run; ddl recommend needs one (e.g. recsys_neumf)")
    recommend(run_dir, user_id, count)


EXPORT_FORMATS = ("onnx",)


@main.command()
@RUN_DIR
@click.option("--format", "format_", type=click.Choice(EXPORT_FORMATS), default="onnx", show_default=True,
              help="the file format")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="the file to write  [default: RUN_DIR/model.onnx]")
def export(run_dir: Path, format_: str, output: Path | None) -> None:
    """Write the model RUN_DIR exported as an ONNX file, checked against the framework's own predictions."""
    from ddl_apps.core.rundir import MODEL_DIR
    from ddl_apps.errors import CheckpointError

    output = output or run_dir / f"model.{format_}"
    if output.exists():
        raise UserError(f"{output} already exists; remove it or name another file with -o")
    if not output.parent.is_dir():
        raise UserError(f"the folder of {output} does not exist; create it or name another file with -o")
    export_onnx = _run_hook(run_dir, "export_onnx", f"the trainer of {run_dir} cannot export to ONNX (its "
                            "TrainerHooks has no export_onnx; see docs/writing-a-trainer.md)")
    if not (run_dir / MODEL_DIR).is_dir():
        raise CheckpointError(f"{run_dir} has no exported model ({MODEL_DIR}/); did the run finish? (runs stopped by "
                              "run.max_steps export nothing: resume them with --resume)")
    difference = export_onnx(run_dir / MODEL_DIR, output)
    console.print(f"wrote {output} (onnxruntime against the framework on an example batch: largest absolute "
                  f"difference {difference:.1e})", highlight=False, markup=False)


@main.group()
def data() -> None:
    """Make datasets: prepare a recipe's data once, for every run and worker to stream."""


@data.command("prepare", context_settings={"ignore_unknown_options": True})
@click.argument("recipe")
@click.argument("overrides", nargs=-1)
@click.option("-o", "--output", help="a folder or s3://bucket/prefix  [default: the cache, where data.prepared=auto "
              "finds it]")
def prepare(recipe: str, overrides: tuple[str, ...], output: str | None) -> None:
    """Read RECIPE's data source once (OVERRIDES as for train) and write it prepared: shards and a manifest."""
    import time

    from ddl_apps.data.dataset import PreparedDataset
    from ddl_apps.data.prepare import prepare as prepare_data
    from ddl_apps.recipe import load_recipe
    from ddl_apps.registry import load_trainer

    config = load_recipe(recipe, list(overrides))
    preparer = load_trainer(config.trainer).load_hooks().prepare
    if preparer is None:
        raise UserError(f"the {config.trainer!r} trainer reads its data itself; it has nothing to prepare")
    start = time.perf_counter()
    location = prepare_data(config, preparer, output)
    manifest = PreparedDataset(location).manifest
    rows = ", ".join(f"{split} {manifest.rows(split):,}" for split in manifest.splits)
    size = sum(shard.bytes for shards in manifest.splits.values() for shard in shards) / 2**20
    command = shlex.join(["ddl", "train", recipe, *overrides, f"data.prepared={location}"])
    console.print(f"prepared {rows} rows ({size:,.1f} MiB) in {time.perf_counter() - start:.1f} s: {location}\n"
                  f"train from it with: {command}", highlight=False, markup=False)  # (runs as printed)


@data.command("asr-commands")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--train", "train_count", type=click.IntRange(min=1), default=8000, show_default=True)
@click.option("--eval", "eval_count", type=click.IntRange(min=1), default=800, show_default=True,
              help="utterances in each of the valid and test splits")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), help="parallel synthesis processes [default: all cores]")
def asr_commands(out_dir: Path, train_count: int, eval_count: int, seed: int, workers: int | None) -> None:
    """Synthesise a spoken-command corpus with espeak-ng into OUT_DIR (audio + JSON-lines manifests)."""
    from ddl_apps.trainers.asr import corpus

    manifests = corpus.generate(out_dir, {"train": train_count, "valid": eval_count, "test": eval_count}, seed,
                                workers)
    info = json.loads((out_dir / "corpus.json").read_text())
    console.print(f"wrote {sum(info['counts'].values())} utterances ({info['hours']} h) to {out_dir}: "
                  + ", ".join(str(m) for m in manifests.values()), highlight=False)


if __name__ == "__main__":
    main()
