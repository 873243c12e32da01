"""Issue 11: safe by default. No code loads a pickle (or anything else that runs code) from a file, secret-looking
values stay out of what `ddl show` prints and a run directory keeps, and a run directory is its owner's alone."""

import ast

import pytest
import yaml

from ddl_apps.core.redact import REDACTED, redact, redact_text
from ddl_apps.recipe import list_recipes, load_recipe
from tests.engine_runs import PROBE, REPO, ddl, train

# ---- loading files ----------------------------------------------------------------------------------------
SCANNED = ("ddl_apps", "benchmarks", "examples")  # the code that reads users' and runs' files
PICKLERS = {"pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
NOT_A_CONSTANT = object()


def dotted_name(node: ast.expr) -> str:
    """`np.load` for the call np.load(...); '' for calls of anything but a (dotted) name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        owner = dotted_name(node.value)
        return f"{owner}.{node.attr}" if owner else ""
    return ""


def keyword(call: ast.Call, name: str, default: object = None) -> object:
    """The constant value a call passes for keyword `name`, `default` when it passes none."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else NOT_A_CONSTANT
    return default


def unsafe_call(call: ast.Call) -> str | None:
    """What is unsafe about a call, if it loads a file in a way that can run code."""
    name = dotted_name(call.func)
    owner, _, function = name.rpartition(".")
    if owner in PICKLERS or function == "read_pickle" or name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
        return f"{name} can run code from the file"
    if name == "torch.load" and keyword(call, "weights_only") is not True:
        return "torch.load without weights_only=True"
    if name in ("np.load", "numpy.load") and keyword(call, "allow_pickle", False) is not False:
        return f"{name} with allow_pickle"
    if function == "load_model" and keyword(call, "safe_mode") is not True:
        return f"{name} without safe_mode=True"
    if function == "from_pretrained" and "Model" in owner.rpartition(".")[2] \
            and keyword(call, "use_safetensors") is not True:
        return f"{name} without use_safetensors=True"
    return None


def unsafe_loads(source: str) -> list[tuple[int, str]]:
    """(line, problem) for every import of a pickling module and every unsafe loading call in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [(node.lineno, f"imports {m}") for m in modules if m.split(".")[0] in PICKLERS]
        elif isinstance(node, ast.Call) and (problem := unsafe_call(node)):
            found.append((node.lineno, problem))
    return found


def test_no_code_loads_pickles():
    """Horovod's broadcast_object (rank 0's object to the others, dist.on_root) pickles over the wire within
    one job; that never touches a file, and no code here imports a pickler."""
    files = [f for folder in SCANNED if (REPO / folder).is_dir() for f in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 20
    problems = [f"{f.relative_to(REPO)}:{line}: {problem}" for f in files
                for line, problem in unsafe_loads(f.read_text())]
    assert not problems, "\n".join(problems)


UNSAFE = ["import pickle", "from joblib import load", "import cloudpickle as cp", "pickle.loads(blob)",
          "torch.load(path)", "torch.load(path, weights_only=False)", "np.load(path, allow_pickle=True)",
          "numpy.load(path, allow_pickle=flag)", "pd.read_pickle(path)", "frame = pandas.read_pickle(path)",
          "keras.saving.load_model(path)", "keras.models.load_model(path, safe_mode=False)",
          "AutoModelForSequenceClassification.from_pretrained(folder)", "yaml.load(text, Loader=yaml.Loader)",
          "transformers.BertModel.from_pretrained(folder, use_safetensors=False)"]
SAFE = ["torch.load(path, weights_only=True)", "np.load(path)", "np.load(path, allow_pickle=False)",
        "keras.saving.load_model(path, compile=False, safe_mode=True)", "yaml.safe_load(text)",
        "AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True)",
        "nn.Embedding.from_pretrained(weights)", "AutoTokenizer.from_pretrained(folder)", "load_file(path)"]


@pytest.mark.parametrize("line", UNSAFE)
def test_the_scan_finds_each_unsafe_load(line):
    assert len(unsafe_loads(f"x = 1\n{line}\n")) == 1 and unsafe_loads(f"x = 1\n{line}\n")[0][0] == 2


@pytest.mark.parametrize("line", SAFE)
def test_the_scan_passes_safe_loads(line):
    assert unsafe_loads(line) == []


def test_pickled_transformer_weights_are_refused_before_training(tmp_path):
    from ddl_apps.errors import CheckpointError
    from ddl_apps.trainers.nlp import model

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(CheckpointError, match="safetensors only"):
        model.model_folder(str(tmp_path), weights=True)
    assert model.model_folder(str(tmp_path)) == tmp_path  # model.pretrained=false needs no weights


# ---- secrets ----------------------------------------------------------------------------------------------
HF_TOKEN = "hf_" + "aB3" * 12


def test_values_under_secret_keys_are_redacted_at_any_depth():
    config = {"data": {"source": "x.csv", "api_key": "abc123", "headers": [{"Authorization": "Bearer x"}]},
              "hub": {"HF_TOKEN": "t", "credentials": {"user": "bob", "pass": ["p1", "p2"]}},
              "model": {"max_tokens": 128, "tokenizer": "bert", "keyword_column": "text", "author": "me",
                        "apiKey": "k", "x-api-key": "k", "db_passwd": "p", "aws_secret_access_key": "s"}}
    assert redact(config) == {
        "data": {"source": "x.csv", "api_key": REDACTED, "headers": [{"Authorization": REDACTED}]},
        "hub": {"HF_TOKEN": REDACTED, "credentials": {"user": REDACTED, "pass": [REDACTED, REDACTED]}},
        "model": {"max_tokens": 128, "tokenizer": "bert", "keyword_column": "text", "author": "me",
                  "apiKey": REDACTED, "x-api-key": REDACTED, "db_passwd": REDACTED,
                  "aws_secret_access_key": REDACTED}}
    assert config["data"]["api_key"] == "abc123"  # the input is left as it was


@pytest.mark.parametrize("secret", [HF_TOKEN, "sk-proj-" + "x1" * 20, "AKIAIOSFODNN7EXAMPLE", "ghp_" + "Z9" * 18,
                                    "github_pat_" + "a_1" * 12, "xoxb-1234567890-abcdef", "AIza" + "k" * 35,
                                    "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----"])
def test_values_that_look_like_tokens_are_redacted_under_any_key(secret):
    assert redact({"description": f"uses {secret} daily", "list": [secret]}) == {
        "description": f"uses {REDACTED} daily", "list": [REDACTED]}


def test_passwords_in_urls_are_redacted_and_the_rest_kept():
    assert redact_text("postgres://bob:hunter2@db:5432/x and s3://bucket/key") == \
        f"postgres://bob:{REDACTED}@db:5432/x and s3://bucket/key"


@pytest.mark.parametrize("name", sorted(list_recipes()))
def test_shipped_recipes_pass_unchanged(name):
    resolved = load_recipe(name).model_dump(mode="json")
    assert redact(resolved) == resolved


def test_show_prints_no_secret():
    shown = ddl("show", PROBE, f"description=fetched with {HF_TOKEN}")
    assert shown.returncode == 0, shown.stderr
    assert HF_TOKEN not in shown.stdout and yaml.safe_load(shown.stdout)["description"] == f"fetched with {REDACTED}"


# ---- the run directory ------------------------------------------------------------------------------------
def test_a_run_directory_keeps_no_secret_and_is_private(tmp_path):
    run = train(tmp_path / "run", f"description=fetched with {HF_TOKEN}", "optim.epochs=1")
    config = (run / "config.yaml").read_text()
    assert HF_TOKEN not in config and yaml.safe_load(config)["description"] == f"fetched with {REDACTED}"
    evaluated = ddl("eval", str(run))  # reads config.yaml back
    assert evaluated.returncode == 0 and 0 < yaml.safe_load(evaluated.stdout)["accuracy"] <= 1, evaluated.stderr
    assert (run / "model").is_dir() and list((run / "checkpoints").iterdir())
    readable = [f"{path.relative_to(tmp_path)} {oct(path.lstat().st_mode & 0o777)}"
                for path in (run, *sorted(run.rglob("*"))) if path.lstat().st_mode & 0o077]
    assert not readable, "group or others may read:\n" + "\n".join(readable)
