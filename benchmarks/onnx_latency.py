"""`ddl bench export`: for each recipe, a short run with the recipe's own model, exported with `ddl export`; then
onnxruntime's latency on one example against the framework's, on one core: each recipe measured in a process pinned
to CPU 0 (`taskset -c 0`) with one thread in the framework and in onnxruntime, the median of 200 calls after 20
warm-up calls, the two taking turns every 20 calls. What each call covers is in NOTES below (the same work on
both sides).

    .venv/bin/python benchmarks/onnx_latency.py            # train, export, measure: benchmarks/results/export.json
    .venv/bin/python benchmarks/onnx_latency.py measure RECIPE RUN_DIR   # one recipe's figures, as JSON
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import VENV_BIN, run, write_result  # noqa: E402

CALLS, WARM_UP = 200, 20
CORPUS = ("--train", "160", "--eval", "24", "--seed", "3")  # the speech run's corpus (tests/trainers/asr's)
# Each recipe's model as it ships; a slice of its data and one epoch (latency does not depend on training).
RUNS = {
    "fraud_mlp": ["data.rows=20000", "optim.epochs=1", "model.baselines=[]"],
    "churn_tabm": ["optim.epochs=1", "model.baselines=[]"],
    "image_resnet": ["data.limit=600", "optim.epochs=1"],
    "nlp_minilm": ["data.rows=200", "optim.epochs=1", "model.baseline=false"],
    "asr_conformer": ["optim.epochs=1"],
    "recsys_neumf": ["optim.epochs=1", "model.baseline=false"],
}
NOTES = {
    "fraud_mlp": "one row of the table: `ddl predict`'s preprocessing (pandas, numpy) and the model / the graph "
                 "from the row's numbers and category text",
    "churn_tabm": "as fraud_mlp",
    "image_resnet": "one 28x28 image in [0, 1] through the model, traced once as a tf.function",
    "nlp_minilm": "one tokenised review (21 tokens) through the model and softmax; tokenising not counted",
    "asr_conformer": "one test utterance's audio (the log-mel front end and the model); decoding not counted",
    "recsys_neumf": "one user's scores for all 1,682 items",
}


def medians_ms(calls: dict[str, Callable[[], object]], rounds: int = 10) -> dict[str, float]:
    """Each call's median time: after the warm-up, the calls take turns in rounds of CALLS / rounds each, so a
    load that comes and goes weighs on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        for _ in range(WARM_UP):
            call()
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(CALLS // rounds):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {f"{name}_ms": round(1000 * statistics.median(t), 3) for name, t in times.items()}


def one_core_session(path: Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def tabular(run_dir: Path) -> dict[str, Callable]:
    import pandas as pd
    import pyarrow.parquet as pq
    import torch

    from ddl_apps.core.rundir import load_run_recipe
    from ddl_apps.trainers.tabular import data
    from ddl_apps.trainers.tabular.trainer import load_exported

    model, pre, _ = load_exported(run_dir / "model")
    source = data.source_file(load_run_recipe(run_dir).data.source)
    row = (pq.ParquetFile(source).read_row_group(0).slice(0, 1).to_pandas() if data.is_parquet(source)
           else pd.read_csv(source, nrows=1))
    session = one_core_session(run_dir / "model.onnx")
    strings = [data.category_strings(row[c]).fillna("").to_numpy(object) for c in pre.vocabularies]
    numeric = [data.column_numbers(row[c], c, "the row", refuse_text=False)[0] for c in pre.numeric]
    inputs = {"numeric": np.column_stack(numeric), "categories": np.column_stack(strings)}
    as_fed = pd.DataFrame(inputs["categories"], columns=list(pre.vocabularies))  # (the graph's lookup of them)
    assert np.array_equal(pre.category_indices(as_fed), pre.transform(row)[1])

    numbers, categories = (torch.from_numpy(a) for a in pre.transform(row))

    def model_alone():
        with torch.no_grad():
            return model.probability(numbers, categories)

    def framework():
        pre.transform(row)
        return model_alone()

    return {"framework": framework, "onnxruntime": lambda: session.run(None, inputs), "model_alone": model_alone}


def image(run_dir: Path) -> dict[str, Callable]:
    from ddl_apps.trainers.image.trainer import load_exported

    model, labels = load_exported(run_dir / "model")
    x = np.random.default_rng(0).random((1, labels["image_size"], labels["image_size"], labels["channels"]),
                                        dtype=np.float32)
    import tensorflow as tf

    serving = tf.function(lambda images: model(images, training=False))  # (a graph, as a SavedModel serves it)
    session = one_core_session(run_dir / "model.onnx")
    return {"framework": lambda: serving(x), "onnxruntime": lambda: session.run(None, {"image": x}),
            "eager": lambda: model(x, training=False)}


def text(run_dir: Path) -> dict[str, Callable]:
    import torch

    from ddl_apps.trainers.nlp import model as nlp_model

    classifier, tokenizer = nlp_model.load_exported(run_dir / "model")
    encoded = tokenizer(["A sharp, funny film that knows exactly what it wants to say, and says it well."],
                        return_token_type_ids=False, return_tensors="pt")
    session = one_core_session(run_dir / "model.onnx")
    inputs = {name: encoded[name].numpy() for name in ("input_ids", "attention_mask")}

    def framework():
        with torch.no_grad():
            return classifier(**encoded).logits.softmax(-1)

    return {"framework": framework, "onnxruntime": lambda: session.run(None, inputs)}


def speech(run_dir: Path) -> dict[str, Callable]:
    import torch

    from ddl_apps.core.rundir import load_run_recipe
    from ddl_apps.trainers.asr import data
    from ddl_apps.trainers.asr.audio import load_audio
    from ddl_apps.trainers.asr.trainer import load_exported

    model, n_mels = load_exported(run_dir / "model")
    features = data.LogMel(n_mels)
    first = json.loads((Path(load_run_recipe(run_dir).data.source) / "test.jsonl").read_text().splitlines()[0])
    audio = load_audio(Path(load_run_recipe(run_dir).data.source) / first["audio_filepath"])
    session = one_core_session(run_dir / "model.onnx")
    inputs = {"audio": audio[None], "audio_lengths": np.array([len(audio)])}

    def framework():
        with torch.no_grad():
            x = features(torch.from_numpy(audio))[None]
            return model(x, torch.tensor([x.shape[1]]))

    return {"framework": framework, "onnxruntime": lambda: session.run(None, inputs)}


def recommendation(run_dir: Path) -> dict[str, Callable]:
    import torch

    from ddl_apps.trainers.recsys.trainer import load_exported

    model, catalogue, _ = load_exported(run_dir / "model")
    user, items = torch.tensor([0]), torch.arange(len(catalogue["items"]))[None]
    session = one_core_session(run_dir / "model.onnx")
    inputs = {"user": user.numpy(), "items": items.numpy()}

    def framework():
        with torch.no_grad():
            return torch.sigmoid(model(user, items))

    return {"framework": framework, "onnxruntime": lambda: session.run(None, inputs)}


MEASURES = {"fraud_mlp": tabular, "churn_tabm": tabular, "image_resnet": image, "nlp_minilm": text,
            "asr_conformer": speech, "recsys_neumf": recommendation}


def measure(recipe: str, run_dir: Path) -> dict:
    """In this process, pinned to one core by its caller: the latencies, one thread each."""
    if recipe == "image_resnet":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    else:
        import torch

        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    return medians_ms(MEASURES[recipe](run_dir))


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ddl-bench-export-") as scratch:
        corpus = Path(scratch) / "corpus"
        run([str(VENV_BIN / "ddl"), "data", "asr-commands", str(corpus), *CORPUS])
        for recipe, overrides in RUNS.items():
            run_dir = Path(scratch) / recipe
            extra = [f"data.source={corpus}"] if recipe == "asr_conformer" else []
            run([str(VENV_BIN / "ddl"), "train", recipe, f"run.dir={run_dir}", *overrides, *extra])
            exported = run([str(VENV_BIN / "ddl"), "export", str(run_dir), "--format", "onnx"])
            difference = float(exported.rsplit("difference ", 1)[1].split(")")[0])
            measured = run(["taskset", "-c", "0", str(VENV_BIN / "python"), __file__, "measure", recipe,
                            str(run_dir)])
            figures = json.loads(next(line for line in reversed(measured.splitlines()) if line.startswith("{")))
            rows.append({"recipe": recipe, **figures, "ratio": round(figures["framework_ms"] /
                                                                     figures["onnxruntime_ms"], 2),
                         "onnx_mib": round((run_dir / "model.onnx").stat().st_size / 2**20, 1),
                         "example_difference": difference, "call": NOTES[recipe]})
            print(f"{recipe}: {rows[-1]}", flush=True)
    write_result("export", {"calls": CALLS, "warm_up": WARM_UP, "rows": rows})


if __name__ == "__main__":
    if sys.argv[1:2] == ["measure"]:
        print(json.dumps(measure(sys.argv[2], Path(sys.argv[3]))))
    else:
        main()
