"""Under horovodrun from the repository root: the probe trained with each ZeRO stage and without, one run after
another in each worker's process, into OUT/<name>. `np2` (at -np 2): every stage with SGD and AdamW, with
accumulation 2 and clipping, the variants (mixed precision, compression, skipped steps) with and without ZeRO, and
runs stopped at step 10 with stage 3 and without ZeRO, the first resumed; `np1` (at -np 1): the one-worker
references, the stage-3 run resumed with ZeRO and without, the other with stage 3."""

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # (tests.probe)

from ddl_apps import cli  # noqa: E402
from ddl_apps.core import dist  # noqa: E402

OUT, PHASE = Path(sys.argv[1]), sys.argv[2]
PROBE = "tests/probe/digits.yaml"
EVERY_RUN = ("optim.accumulation=2", "optim.clip_grad_norm=0.5", "dist.zero_bucket_mb=0.001",  # units of 262 floats
             "optim.epochs=1", "run.eval_every_epoch=false")
OPTIMIZERS = {"sgd": ("optim.name=sgd",), "adamw": ("optim.name=adamw", "optim.lr=0.005")}
VARIANTS = {"bf16": ("run.precision=bf16",), "fp16": ("run.precision=fp16", *OPTIMIZERS["adamw"]),
            "compressed": ("dist.compression=fp16",),
            "skip": ("data.nan_examples=[5,700]", "optim.nonfinite=skip")}
STOPPED = (*OPTIMIZERS["adamw"], "optim.batch_size=16", "dist.zero=3")  # a stage-3 run stopped at step 10
COPIES = {"stopped": ("resumed-np2", "resumed-np1-zero3", "resumed-np1-zero0"),
          "stopped-zero0": ("replicated-np1-zero3",)}


def train(name: str, *overrides: str, resume: bool = False) -> None:
    cli.main(["train", PROBE, f"run.dir={OUT / name}", *EVERY_RUN, *overrides, *(["--resume"] if resume else [])],
             standalone_mode=False)


if PHASE == "np2":
    for optimizer, settings in OPTIMIZERS.items():
        for zero in range(4):
            train(f"{optimizer}-zero{zero}", *settings, "optim.batch_size=16", f"dist.zero={zero}")
    for variant, settings in VARIANTS.items():
        for zero in (0, 3 if variant in ("fp16", "compressed") else 2):
            train(f"{variant}-zero{zero}", *settings, "optim.batch_size=16", f"dist.zero={zero}")
    train("stopped", *STOPPED, "run.max_steps=10")
    train("stopped-zero0", *STOPPED[:-1], "dist.zero=0", "run.max_steps=10")
    if dist.topology().is_root:
        for stopped, copies in COPIES.items():
            for copy in copies:
                shutil.copytree(OUT / stopped, OUT / copy)
    dist.allreduce_sum([0])  # (the copies are there)
    train("resumed-np2", *STOPPED, resume=True)
else:
    for optimizer, settings in OPTIMIZERS.items():
        train(f"{optimizer}-np1", *settings, "optim.batch_size=32")
    train("resumed-np1-zero3", *STOPPED, resume=True)
    train("resumed-np1-zero0", *STOPPED[:-1], "dist.zero=0", resume=True)
    train("replicated-np1-zero3", *STOPPED, resume=True)
