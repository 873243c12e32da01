"""The NLP recipe against its peer: the same MiniLM fine-tune with the Hugging Face `Trainer` in one process.

Same split, tokenizer, model, head initialisation seed, batch size, epochs, learning rate and schedule,
warm-up, clipping and optimizer (the core's AdamW, handed to the Trainer), length-grouped batches in both.
ddl_apps runs through `ddl train` at np=1 and np=2 (learning rate scaled by workers, as the recipe says).
Training samples/s counts training steps only (no evaluation) on both sides.

    .venv/bin/python benchmarks/nlp_peer.py [--out benchmarks/results/nlp_peer.json] [recipe overrides ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = "nlp_minilm"


def ddl_apps_run(np: int, overrides: list[str], run_dir: Path) -> dict:
    """Accuracy, macro-F1, training samples/s and wall time of `ddl train` at np workers."""
    started = time.perf_counter()
    subprocess.run([str(REPO / ".venv/bin/ddl"), "train", RECIPE, "-np", str(np), f"run.dir={run_dir}",
                    "run.progress=false", *overrides], check=True)
    wall = time.perf_counter() - started
    summary = json.loads((run_dir / "summary.json").read_text())
    test = summary["results"]["model (test)"]
    return {"runner": "ddl_apps (Horovod)", "workers": np, "accuracy": test["accuracy"],
            "macro_f1": test["macro_f1"], "samples_per_s": summary["training"]["samples_per_s"],
            "wall_s": round(wall, 1), "baseline": summary["results"].get("baseline TF-IDF LR (test)")}


def hf_trainer_run(overrides: list[str], out_dir: Path) -> dict:
    """The same fine-tune with transformers.Trainer in this process (all cores)."""
    import numpy as np
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from ddl_apps.core.torch_engine import make_optimizer
    from ddl_apps.recipe import load_recipe
    from ddl_apps.trainers.nlp.trainer import build_task, classification_metrics

    started = time.perf_counter()
    recipe = load_recipe(RECIPE, overrides)
    task = build_task(recipe, topology=None)
    torch.manual_seed(recipe.run.seed)
    classifier = task.build_model()

    def examples(source) -> list[dict]:
        return [{"input_ids": ids, "labels": int(label)}  # the sampler groups by len(input_ids)
                for ids, label in zip(source.token_ids, source.labels, strict=True)]

    optim = recipe.optim
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=optim.batch_size, per_device_eval_batch_size=64,
        num_train_epochs=optim.epochs, learning_rate=optim.lr, weight_decay=optim.weight_decay,
        warmup_steps=optim.warmup_steps, lr_scheduler_type="linear", max_grad_norm=optim.clip_grad_norm or 0.0,
        gradient_accumulation_steps=optim.accumulation, seed=recipe.run.seed,
        train_sampling_strategy="group_by_length", save_strategy="no",
        eval_strategy="no", report_to=[], use_cpu=True, logging_steps=50, dataloader_num_workers=0,
        disable_tqdm=True)
    trainer = Trainer(model=classifier, args=args, train_dataset=examples(task.train),
                      data_collator=DataCollatorWithPadding(task.tokenizer),
                      optimizers=(make_optimizer(optim, classifier.parameters(), optim.lr), None))
    train_metrics = trainer.train().metrics
    predictions = trainer.predict(examples(task.test))  # label_ids: the Trainer reorders by length here too
    test = classification_metrics(predictions.label_ids, np.argmax(predictions.predictions, -1))
    return {"runner": "Hugging Face Trainer", "workers": 1, **test,
            "samples_per_s": round(train_metrics["train_samples_per_second"], 1),
            "wall_s": round(time.perf_counter() - started, 1)}


def row_name(row: dict) -> str:
    return "trainer" if row["runner"].startswith("Hugging") else f"np{row['workers']}"


def table(rows: list[dict]) -> str:
    peer = next(r for r in rows if r["runner"].startswith("Hugging"))
    lines = ["| runner | workers | test accuracy | macro-F1 | training samples/s | vs Trainer | wall time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['runner']} | {r['workers']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | "
                     f"{r['samples_per_s']:.1f} | {r['samples_per_s'] / peer['samples_per_s']:.2f}x | "
                     f"{r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/nlp_peer.json")
    parser.add_argument("--only", choices=["trainer", "np1", "np2"], action="append",
                        help="re-run only these, keeping the other rows of --out")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run, e.g. optim.epochs=1")
    args = parser.parse_args()
    kept = json.loads(args.out.read_text())["rows"] if args.only and args.out.exists() else []
    runs = {"trainer": lambda scratch: hf_trainer_run(args.overrides, scratch / "hf"),
            "np1": lambda scratch: ddl_apps_run(1, args.overrides, scratch / "np1"),
            "np2": lambda scratch: ddl_apps_run(2, args.overrides, scratch / "np2")}
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, run in runs.items():
            rerun = not args.only or name in args.only
            rows += [run(Path(scratch))] if rerun else [r for r in kept if row_name(r) == name]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"recipe": RECIPE, "overrides": args.overrides, "rows": rows}, indent=1))
    print(table(rows))


if __name__ == "__main__":
    sys.exit(main())
