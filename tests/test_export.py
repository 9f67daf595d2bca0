"""`peftlab export`: merged models and adapters that plain transformers + PEFT load and that predict what the run
recorded (checked in a Python process that never imports peftlab), QLoRA merged into a full-precision base, the
model card, and refusals (mixtures, unfinished runs, occupied outputs) that write nothing.

The base models are local folders (a tiny random BERT and Llama saved once), so an adapter's recorded base path
is one a process without peftlab can load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from peftlab.cli import main
from peftlab.config import load_experiment
from peftlab.errors import EXIT_BAD_INPUT, EXIT_OK
from peftlab.experiment import run_experiment
from peftlab.export import export_run
from peftlab.models import load_tokenizer, resolve_model
from peftlab.store import RUNNING, RunDir, read_jsonl, write_json, write_yaml
from tests.conftest import DATA, TINY_BERT, tiny_experiment, write_experiment
from tests.tasks.test_causal_classification import ONE_TOKEN, TINY_LLAMA

LABELS = ["negative", "neutral", "positive"]
TRAIN = {"epochs": 1, "max_steps": 2, "batch_size": 8, "precision": "fp32"}
EVALUATE = {"splits": ["test"], "baselines": False}


def save_base(folder: Path, spec: dict[str, Any], auto: Any) -> Path:
    """A tiny random model and the built-in tokenizer saved as a local model folder (seeded)."""
    from transformers import AutoConfig

    tokenizer = load_tokenizer(resolve_model(spec))
    config = AutoConfig.for_model(spec["arch"], **spec["config"], vocab_size=len(tokenizer))
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    auto.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train(tmp: Path, **changes: Any) -> Path:
    exp = tiny_experiment(tmp, train=TRAIN, evaluate=EVALUATE, **changes)
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as patch:  # the report (figures: seconds) is not what these tests read
        patch.setattr("peftlab.report.build_report", lambda path: {"html": path / "report.html"})
        code = run_experiment(load_experiment(write_experiment(tmp, exp)), executor="inline", log=lines.append)
    assert code == EXIT_OK, lines
    return tmp / "runs" / "tiny"


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """full, LoRA and (IA)3 on a local tiny BERT, with rates high enough that the adapters change the outputs."""
    from transformers import AutoModel

    tmp = tmp_path_factory.mktemp("bert")
    base = save_base(tmp / "bert-base", TINY_BERT, AutoModel)
    methods = {"full": {"train": {"lr": 1e-3}}, "lora": {"r": 4, "train": {"lr": 2e-2}}, "ia3": {"train": {"lr": 5e-2}}}
    return train(tmp, model=str(base), methods=methods)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """causal_classification (one-token verbalizers) with LoRA and QLoRA on a local tiny Llama."""
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("llama")
    base = save_base(tmp / "llama-base", TINY_LLAMA, AutoModelForCausalLM)
    lora = {"r": 2, "target_modules": ["q_proj", "v_proj"], "train": {"lr": 2e-2}}
    return train(
        tmp,
        model=str(base),
        task={"name": "causal_classification", "prompt": "review: {text} sentiment:", "verbalizers": ONE_TOKEN},
        data={"source": str(DATA / "tiny_cls"), "max_length": 32, "limits": {"train": 16}},
        methods={"lora": lora, "qlora": {"method": "lora", **lora, "quantize": "nf4"}},
    )


@pytest.fixture(scope="module")
def exported(bert: Path, llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str]]]:
    """Every export the tests read: name -> (folder, the lines it printed)."""
    out = tmp_path_factory.mktemp("exports")
    jobs = {
        "lora": (bert / "lora", True),
        "ia3": (bert / "ia3", True),
        "full": (bert / "full", True),
        "lora-adapter": (bert / "lora", False),
        "llama-lora": (llama / "lora", True),
        "qlora": (llama / "qlora", True),
        "qlora-adapter": (llama / "qlora", False),
    }
    done = {}
    for name, (run, merge) in jobs.items():
        lines: list[str] = []
        done[name] = (export_run(run, out / name, merge=merge, log=lines.append).path, lines)
    return done


def card_snippet(folder: Path) -> str:
    found = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)
    assert found, "the model card shows how to load the export"
    return found.group(1)


# Runs in a fresh interpreter that never imports peftlab: loads each model with transformers (+ PEFT for an
# adapter; an export through the code its model card shows) and returns its probabilities / log-likelihoods.
PLAIN = r"""
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

def scores(model, tokenizer, job):
    with torch.no_grad():
        if job["kind"] == "cls":
            batch = tokenizer(job["texts"], padding=True, truncation=True, max_length=32, return_tensors="pt")
            return model(**batch).logits.softmax(-1).tolist()
        rows = [model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1) for ids in job["prompts"]]
        return [row[job["verbalizers"]].tolist() for row in rows]

out = {}
for name, job in json.loads(open(sys.argv[1]).read()).items():
    if "snippet" in job:
        space = {}
        exec(job["snippet"], space)
        model, tokenizer = space["model"].eval(), space["tokenizer"]
    else:
        auto = AutoModelForSequenceClassification if job["kind"] == "cls" else AutoModelForCausalLM
        extra = {"num_labels": 3} if job["kind"] == "cls" else {}
        base_path = json.load(open(job["adapter"] + "/adapter_config.json"))["base_model_name_or_path"]
        model = PeftModel.from_pretrained(auto.from_pretrained(base_path, **extra), job["adapter"]).eval()
        tokenizer = AutoTokenizer.from_pretrained(job["adapter"])
    out[name] = {"scores": scores(model, tokenizer, job), "class": type(model).__name__}
    if isinstance(model, PeftModel):
        with model.disable_adapter():
            out[name]["without_adapter"] = scores(model, tokenizer, job)
out["peftlab_imported"] = any(m == "peftlab" or m.startswith("peftlab.") for m in sys.modules)
print(json.dumps(out))
"""


def recorded(run: Path) -> list[dict[str, Any]]:
    return read_jsonl(run / "predictions" / "test.jsonl")


def causal_inputs(run: Path) -> dict[str, Any]:
    """The prompts (token ids) and verbalizer tokens the run scored, from the task itself."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from peftlab.tasks import TASKS

    config = RunDir(run).config()
    state = dict(config["task"])
    task = TASKS.get(state.pop("name"))(**state)
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    rows = Dataset.from_list([{k: p[k] for k in ("id", "text", "label")} for p in recorded(run)])
    prompts = list(task.predict_features(rows, tokenizer, 32)["input_ids"])
    return {"kind": "causal", "prompts": prompts, "verbalizers": task.encoder(tokenizer).first_tokens.tolist()}


def expected_scores(run: Path, kind: str) -> list[list[float]]:
    field = "probs" if kind == "cls" else "loglik"
    return [[p[field][label] for label in LABELS] for p in recorded(run)]


def test_adapters_and_merged_exports_predict_what_the_run_recorded_without_peftlab(
    bert: Path, llama: Path, exported: dict[str, tuple[Path, list[str]]], tmp_path: Path
) -> None:
    cls = {"kind": "cls", "texts": [p["text"] for p in recorded(bert / "lora")]}
    causal = causal_inputs(llama / "lora")
    runs = {
        "lora/adapter": (bert / "lora", {**cls, "adapter": str(bert / "lora" / "adapter")}),
        "ia3/adapter": (bert / "ia3", {**cls, "adapter": str(bert / "ia3" / "adapter")}),
        "llama-lora/adapter": (llama / "lora", {**causal, "adapter": str(llama / "lora" / "adapter")}),
        "lora": (bert / "lora", {**cls, "snippet": card_snippet(exported["lora"][0])}),
        "ia3": (bert / "ia3", {**cls, "snippet": card_snippet(exported["ia3"][0])}),
        "full": (bert / "full", {**cls, "snippet": card_snippet(exported["full"][0])}),
        "llama-lora": (llama / "lora", {**causal, "snippet": card_snippet(exported["llama-lora"][0])}),
    }
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps({name: job for name, (_, job) in runs.items()}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-c", PLAIN, str(jobs)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out.pop("peftlab_imported") is False
    for name, (run, job) in runs.items():
        want = torch.tensor(expected_scores(run, job["kind"]))
        got = torch.tensor(out[name]["scores"])
        assert torch.allclose(got, want, atol=1e-4), f"{name}: {(got - want).abs().max()}"
        if "without_adapter" in out[name]:  # the comparison can fail: the base alone predicts otherwise
            assert (torch.tensor(out[name]["without_adapter"]) - want).abs().max() > 1e-3, name
        elif job["kind"] == "cls":  # a merged export is the plain task class, not a PEFT wrapper
            assert out[name]["class"] == "BertForSequenceClassification"
    assert out["llama-lora"]["class"] == "LlamaForCausalLM"


@pytest.mark.parametrize("name", ["lora", "ia3", "llama-lora"])
def test_a_merged_export_is_a_plain_model_folder_with_labels(exported: dict, name: str) -> None:
    folder, lines = exported[name]
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= files
    assert not any(f.startswith("adapter") for f in files)
    config = json.loads((folder / "config.json").read_text())
    assert config["id2label"] == {str(i): label for i, label in enumerate(LABELS)}
    assert config["label2id"] == {label: i for i, label in enumerate(LABELS)}
    keys = load_file(str(folder / "model.safetensors")).keys()
    assert not any("lora_" in k or "ia3_" in k or "modules_to_save" in k for k in keys)
    auto = "AutoModelForCausalLM" if name == "llama-lora" else "AutoModelForSequenceClassification"
    assert f"{auto}.from_pretrained" in card_snippet(folder) and "merged model" in lines[-1]
    assert not list(folder.parent.glob(f".{name}.*"))  # no temporary folder left beside it


def test_full_fine_tuning_merge_saves_the_whole_model_and_says_so(exported: dict, bert: Path) -> None:
    folder, lines = exported["full"]
    assert any("full fine-tuning" in line and "no adapter to merge" in line for line in lines)
    assert "no adapter to merge" in (folder / "README.md").read_text()
    saved = load_file(str(folder / "model.safetensors"))
    trained = load_file(str(bert / "full" / "adapter" / "model.safetensors"))
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)


def test_qlora_merges_into_a_full_precision_base_and_says_so(exported: dict, llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder, lines = exported["qlora"]
    note = next(line for line in lines if line.startswith("QLoRA"))
    assert "4-bit (nf4)" in note and "full-precision (float32)" in note
    assert note in (folder / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(type(m).__name__ != "Linear4bit" for m in model.modules())
    # merged = the unquantized base weight + B·A·alpha/r, exactly what PEFT's merge computes
    base = AutoModelForCausalLM.from_pretrained(llama.parents[1] / "llama-base")
    adapter = load_file(str(llama / "qlora" / "adapter" / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"] * (16 / 2)
    assert delta.abs().max() > 0
    merged = model.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(merged, base.model.layers[0].self_attn.q_proj.weight + delta, atol=1e-6)


def test_an_adapter_export_is_the_adapter_with_a_model_card(exported: dict, bert: Path) -> None:
    folder, _ = exported["lora-adapter"]
    run = bert / "lora"
    copied = {p.name for p in (run / "adapter").iterdir()}
    assert {p.name for p in folder.iterdir()} == copied | {"README.md"}
    for name in copied - {"README.md"}:  # PEFT's template card is replaced by peftlab's
        assert (folder / name).read_bytes() == (run / "adapter" / name).read_bytes(), name
    card = (folder / "README.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    import peftlab

    for text in (
        "library_name: peft",
        f"`{bert.parents[1] / 'bert-base'}`",  # the base model
        "- method: lora (as trained)",
        "r: 4",
        str(DATA / "tiny_cls"),  # the data
        f"| test | {metrics['eval']['test']['accuracy']:.4f} | {metrics['eval']['test']['macro_f1']:.4f} | 12 |",
        f"Exported by peftlab {peftlab.__version__}",
        f'PeftModel.from_pretrained(base, "{folder}")',
        f'AutoModelForSequenceClassification.from_pretrained("{bert.parents[1] / "bert-base"}", num_labels=3)',
    ):
        assert text in card, text


def test_a_qlora_adapter_export_says_how_its_base_was_loaded(exported: dict) -> None:
    folder, lines = exported["qlora-adapter"]
    assert any("QLoRA" in line and "4-bit (nf4)" in line for line in lines)
    assert "load it that way" in (folder / "README.md").read_text()
    snippet = card_snippet(folder)
    assert "AutoModelForCausalLM.from_pretrained" in snippet and "from_pretrained(base, " in snippet
    assert 'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)' in snippet


def test_a_mixture_is_refused_with_the_reason(bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    mixture = tmp_path / "runs" / "tiny" / "_mixtures" / "mix"
    write_yaml(mixture / "config.yaml", {"mixture": "mix", "method": "xlora", "experts": []})
    write_json(mixture / "status.json", {"state": "done"})
    write_json(mixture / "adapter" / "mixture.json", {"experts": []})
    out = tmp_path / "out"
    assert main(["export", str(mixture), "--merge", "--output", str(out)]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err
    assert str(mixture) in error and "mixture of LoRA experts" in error and "every token" in error
    assert not out.exists()


def bad_cases(bert: Path, tmp: Path) -> dict[str, tuple[list[str], Path, str]]:
    """name -> (arguments, the path the message must name, what it must say)."""
    unfinished = tmp / "runs" / "lora"
    shutil.copytree(bert / "lora", unfinished)
    RunDir(unfinished).set_status(RUNNING)
    occupied = tmp / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    return {
        "missing": ([str(tmp / "nope"), "--output", str(tmp / "o")], tmp / "nope", "no such run folder"),
        "experiment folder": ([str(bert), "--output", str(tmp / "o")], bert, "not a run folder"),
        "unfinished": ([str(unfinished), "--output", str(tmp / "o")], unfinished, "not finished (status: running)"),
        "occupied": ([str(bert / "lora"), "--output", str(occupied)], occupied, "--force"),
        "inside the run": ([str(bert / "lora"), "--output", str(bert / "lora" / "x")], bert / "lora" / "x", "overlaps"),
        "over the adapter": (
            [str(bert / "lora"), "--force", "--output", str(bert / "lora" / "adapter")],
            bert / "lora" / "adapter",
            "overlaps",
        ),
    }


@pytest.mark.parametrize("merge", [False, True])
def test_bad_input_exits_2_naming_the_path_and_writes_nothing(
    bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture, merge: bool
) -> None:
    cases = bad_cases(bert, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    run_before = sorted(p.relative_to(bert) for p in bert.rglob("*"))
    for name, (args, path, says) in cases.items():
        assert main(["export", *args, *(["--merge"] if merge else [])]) == EXIT_BAD_INPUT, name
        error = capsys.readouterr().err
        assert str(path) in error and says in error, (name, error)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert sorted(p.relative_to(bert) for p in bert.rglob("*")) == run_before
    assert (tmp_path / "occupied" / "keep.txt").read_text() == "mine"


def test_force_replaces_an_occupied_output_and_an_empty_one_needs_no_force(
    bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["export", str(bert / "ia3"), "--output", str(tmp_path / "empty")]) == EXIT_OK
    assert capsys.readouterr().out.strip() == str(tmp_path / "empty")
    assert (tmp_path / "empty" / "adapter_model.safetensors").exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "old.txt").write_text("old")
    assert main(["export", str(bert / "ia3"), "--force", "--output", str(occupied)]) == EXIT_OK
    assert not (occupied / "old.txt").exists() and (occupied / "README.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "occupied"]  # nothing left beside them


def test_a_killed_export_leaves_no_export_and_the_next_one_cleans_up(
    bert: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "export"
    monkeypatch.setenv("PEFTLAB_KILL_AT", "export")  # SIGKILL once all is written, before the rename
    pid = os.fork()  # a child with the libraries loaded already: no second interpreter to start
    if pid == 0:
        try:
            export_run(bert / "lora", out, merge=False, log=lambda m: None)
        finally:
            os._exit(3)  # never back into pytest; not reached when the kill point fires
    monkeypatch.delenv("PEFTLAB_KILL_AT")
    for _ in range(600):  # at most a minute: a hung child fails the test instead of hanging it
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the export did not reach its kill point within a minute")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    assert not out.exists()
    left = list(tmp_path.glob(".export.export-*.tmp"))
    assert len(left) == 1 and (left[0] / "README.md").exists()  # written in full, never renamed
    export_run(bert / "lora", out, merge=False, log=lambda m: None)
    assert (out / "README.md").exists() and [p.name for p in tmp_path.iterdir()] == ["export"]
