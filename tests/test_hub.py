"""Push to and pull from a Hub (the loopback server of hub_server.py) with real huggingface_hub and transformers code.

One module-scoped repo holds three commits: a tiny model sharded with a small `max_shard_size`, its tokenizer, and a
second version of the weights. Tests pull it into fresh caches by repo id, pin revisions, load it in a child process
that cannot import xlstm_hf (`trust_remote_code=True`), and damage it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import raises_naming
from hub_fixtures import WITHOUT_THE_PACKAGE, run_without_the_package
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.dynamic_module_utils import get_imports

import xlstm_hf
from xlstm_hf.hub import block_pattern, check_checkpoint, count_parameters, model_card, push_model

pytest_plugins = ["hub_fixtures"]
# huggingface_hub's own LFS PUT passes `data=` to httpx2.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

REPO = "org/xlstm-tiny"
MAX_SHARD_SIZE = 20_000  # bytes: the tiny model's 130 kB of weights in several shards
PACKAGE_DIR = Path(xlstm_hf.__file__).parent
# Files of the package that the model does not need at run time: they must not travel with the weights.
# the Hub push code, and the vLLM plugin (it runs inside vLLM from the installed package, never as remote code)
NOT_MODEL_CODE = {"__init__.py", "hub.py", "vllm_plugin.py", "vllm_xlstm.py"}
TEXT = "w1 w2 w3 w5 w8 w13 w21 w34 w55 w89 w0 w7 w42"


def tiny_model(seed: int) -> xlstm_hf.xLSTMForCausalLM:
    """xLSTM[2:1] with perturbed weights (no init symmetry hides a missing or swapped tensor)."""
    config = xlstm_hf.xLSTMConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=3, num_heads=2, slstm_at=[1], chunk_size=8
    )
    torch.manual_seed(seed)
    model = xlstm_hf.xLSTMForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[UNK]", "[EOS]", *(f"w{i}" for i in range(90))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


@dataclass
class Pushed:
    v1: xlstm_hf.xLSTMForCausalLM
    v2: xlstm_hf.xLSTMForCausalLM
    tokenizer: PreTrainedTokenizerFast
    first: str  # commit of v1
    second: str  # commit of v2
    input_ids: torch.Tensor  # [2, 13]: 13 tokens span two chunks of 8


@pytest.fixture(scope="module")
def pushed(module_local_hub) -> Pushed:
    v1, v2, tokenizer = tiny_model(1), tiny_model(2), tiny_tokenizer()
    first = v1.push_to_hub(REPO, max_shard_size=MAX_SHARD_SIZE).oid
    tokenizer.push_to_hub(REPO)
    second = v2.push_to_hub(REPO, max_shard_size=MAX_SHARD_SIZE, commit_message="v2").oid
    ids = tokenizer([TEXT, " ".join(reversed(TEXT.split()))], return_tensors="pt")["input_ids"]
    return Pushed(v1, v2, tokenizer, first, second, ids)


def test_push_uploads_sharded_safetensors_config_code_and_card(pushed, module_local_hub):
    server = module_local_hub.server
    files = server.files(REPO)
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) > 1 and all(files[f].lfs_sha256 is not None for f in shards)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"))]
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "README.md"} <= set(files)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)

    config = json.loads(server.read(REPO, "config.json"))
    assert config["model_type"] == "xlstm_hf"
    assert config["auto_map"]["AutoConfig"] == "configuration_xlstm.xLSTMConfig"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_xlstm.xLSTMHFForCausalLM"
    assert config["architectures"] == ["xLSTMHFForCausalLM"]  # no transformers class has this name (TRL looks there)

    index = json.loads(server.read(REPO, "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(pushed.v2.state_dict())
    for shard in shards:
        data = server.read(REPO, shard)
        tensor_bytes = len(data) - 8 - int.from_bytes(data[:8], "little")
        tensors = [k for k, f in index["weight_map"].items() if f == shard]
        assert tensor_bytes <= MAX_SHARD_SIZE or len(tensors) == 1, (shard, tensor_bytes, tensors)


def test_pull_by_repo_id_into_fresh_cache_is_bit_identical(pushed, module_local_hub):
    cache = module_local_hub.fresh_cache()
    model = AutoModelForCausalLM.from_pretrained(REPO).eval()
    assert type(model) is xlstm_hf.xLSTMForCausalLM
    assert torch.equal(logits(model, pushed.input_ids), logits(pushed.v2, pushed.input_ids))
    tokenizer = AutoTokenizer.from_pretrained(REPO)
    assert tokenizer(TEXT)["input_ids"] == pushed.tokenizer(TEXT)["input_ids"]
    snapshot = cache / "models--org--xlstm-tiny" / "snapshots" / pushed.second
    assert len(list(snapshot.glob("model-*.safetensors"))) > 1


def test_revision_pins_the_weights(pushed, module_local_hub):
    module_local_hub.fresh_cache()
    old = AutoModelForCausalLM.from_pretrained(REPO, revision=pushed.first).eval()
    new = AutoModelForCausalLM.from_pretrained(REPO, revision=pushed.second).eval()
    assert torch.equal(logits(old, pushed.input_ids), logits(pushed.v1, pushed.input_ids))
    assert torch.equal(logits(new, pushed.input_ids), logits(pushed.v2, pushed.input_ids))
    assert not torch.equal(logits(old, pushed.input_ids), logits(new, pushed.input_ids))
    commits = [c.commit_id for c in HfApi().list_repo_commits(REPO)]
    assert commits[0] == pushed.second and pushed.first in commits


def _settled_requests(server, quiet: float = 0.5, limit: float = 10.0) -> int:
    """The server's request count once none has arrived for `quiet` seconds: a request started by the online loads
    (on another thread) could otherwise land inside the offline window (it did once in a full CI run)."""
    count, deadline = len(server.requests), time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(quiet)
        if len(server.requests) == count:
            break
        count = len(server.requests)
    return count


def test_offline_loads_from_the_cache(pushed, module_local_hub):
    module_local_hub.fresh_cache()
    AutoModelForCausalLM.from_pretrained(REPO)
    AutoTokenizer.from_pretrained(REPO)
    answered = _settled_requests(module_local_hub.server)
    module_local_hub.set_offline()
    try:
        model = AutoModelForCausalLM.from_pretrained(REPO).eval()
        tokenizer = AutoTokenizer.from_pretrained(REPO)
    finally:
        module_local_hub.set_offline(False)
    offline_requests = module_local_hub.server.requests[answered:]
    assert not offline_requests, f"requests made while offline: {offline_requests}"
    assert torch.equal(logits(model, pushed.input_ids), logits(pushed.v2, pushed.input_ids))
    assert tokenizer(TEXT)["input_ids"] == pushed.tokenizer(TEXT)["input_ids"]


def test_uploaded_code_is_exactly_the_package_modeling_files(pushed, module_local_hub):
    files = module_local_hub.server.files(REPO)
    uploaded = {f for f in files if f.endswith(".py")}
    expected = {p.name for p in PACKAGE_DIR.glob("*.py")} - NOT_MODEL_CODE
    # A package file left behind is one that modeling_xlstm.py does not reach through `from .x import y`.
    assert uploaded == expected, f"not uploaded: {sorted(expected - uploaded)}, not ours: {sorted(uploaded - expected)}"
    for name in sorted(uploaded):
        assert module_local_hub.server.read(REPO, name) == (PACKAGE_DIR / name).read_bytes(), name
        # What transformers will require installed before loading (imports outside try/availability guards).
        imports = set(get_imports(PACKAGE_DIR / name)) - set(sys.stdlib_module_names) - {"__future__"}
        assert imports <= {"torch", "transformers", "safetensors"}, f"{name} needs {imports}"


# Run in a child that cannot import xlstm_hf (hub_fixtures.WITHOUT_THE_PACKAGE).
# The load-time options of the Triton run: the chunkwise kernel's chunks are powers of two from 16 (13 tokens: one
# partial chunk); the chunk places the stabiliser, not the function.
KERNELS = {"backend": "triton", "chunk_size": 16}
CHILD = (
    WITHOUT_THE_PACKAGE
    + r"""

import logging

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


class Warnings(logging.Handler):  # warnings of the remote code: a backend that falls back to PyTorch warns

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        if record.name.startswith("transformers_modules"):
            self.messages.append(record.getMessage())


warned = Warnings()
logging.getLogger().addHandler(warned)
repo, input_ids, out = sys.argv[1], torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
KERNELS = json.loads(sys.argv[5])
model = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)  # it reads config.json (auto_map) too
device = "cuda" if torch.cuda.is_available() else "cpu"  # without CUDA the kernels run under TRITON_INTERPRET=1
kernels = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, **KERNELS).eval().to(device)
with torch.no_grad():
    outputs = {"reference": model(input_ids).logits, "kernels": kernels(input_ids.to(device)).logits.cpu()}
save_file(outputs, out)
print(json.dumps({
    "class": f"{type(model).__module__}.{type(model).__qualname__}",
    "tokens": tokenizer(sys.argv[4])["input_ids"],
    "xlstm_hf_modules": sorted(m for m in sys.modules if m.split(".")[0] == "xlstm_hf"),
    "kernel_device": device,
    "warnings": warned.messages,
}))
"""
)


@pytest.fixture(scope="module")
def remote_code_child(pushed, module_local_hub, tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    module_local_hub.fresh_cache()
    tmp = tmp_path_factory.mktemp("remote_code")
    out = tmp / "logits.safetensors"
    interpret = {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"}
    args = [REPO, json.dumps(pushed.input_ids.tolist()), str(out), TEXT, json.dumps(KERNELS)]
    proc = run_without_the_package(CHILD, *args, tmp=tmp, env=module_local_hub.subprocess_env(**interpret))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip(), proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), load_file(out)


def test_remote_code_without_the_package_is_bit_identical(pushed, remote_code_child):
    report, outputs = remote_code_child
    assert report["class"].startswith("transformers_modules.") and report["class"].endswith(".xLSTMHFForCausalLM")
    assert report["xlstm_hf_modules"] == []
    assert report["tokens"] == pushed.tokenizer(TEXT)["input_ids"]
    assert torch.equal(outputs["reference"], logits(pushed.v2, pushed.input_ids))


def test_remote_code_without_the_package_runs_the_triton_kernels(pushed, remote_code_child):
    """The kernel files travel with the checkpoint and run from the Hub's copy (KERNELS): on CUDA, the logits of the
    installed package's kernels on the same device, bit for bit; without CUDA, in Triton's interpreter, the reference
    logits to the kernels' float32 tolerance (summation order; tests/test_mlstm_chunk.py). No fallback to PyTorch,
    which would warn."""
    report, outputs = remote_code_child
    assert report["warnings"] == []
    if torch.cuda.is_available():
        assert report["kernel_device"] == "cuda"
        installed = AutoModelForCausalLM.from_pretrained(REPO, **KERNELS).eval().cuda()
        assert torch.equal(outputs["kernels"], logits(installed, pushed.input_ids.cuda()).cpu())
    else:
        assert report["kernel_device"] == "cpu"
        torch.testing.assert_close(outputs["kernels"], logits(pushed.v2, pushed.input_ids), atol=1e-4, rtol=1e-4)


def test_push_with_a_wrong_token_is_a_clear_401(pushed):
    with pytest.raises(HfHubHTTPError) as err:
        pushed.v1.push_to_hub(REPO, token="hf_wrong_token")
    assert err.value.response.status_code == 401


def damaged_branch(repo_id: str, branch: str, path: str, data: bytes) -> None:
    """A branch of `repo_id`'s main whose `path` holds `data`."""
    api = HfApi()
    api.create_branch(repo_id, branch=branch)
    api.upload_file(repo_id=repo_id, path_or_fileobj=data, path_in_repo=path, revision=branch)


def test_truncated_or_corrupted_safetensors_is_a_clear_error(pushed, module_local_hub):
    module_local_hub.fresh_cache()
    shard = sorted(f for f in module_local_hub.server.files(REPO) if f.endswith(".safetensors"))[0]
    good = module_local_hub.server.read(REPO, shard)
    damaged_branch(REPO, "truncated", shard, good[: len(good) - 64])
    with pytest.raises(SafetensorError):
        AutoModelForCausalLM.from_pretrained(REPO, revision="truncated")
    header_length = int.from_bytes(good[:8], "little")
    damaged_branch(REPO, "bad-header", shard, good[:8] + b"#" * header_length + good[8 + header_length :])
    with pytest.raises(SafetensorError):
        AutoModelForCausalLM.from_pretrained(REPO, revision="bad-header")


def test_download_cut_short_is_a_clear_error(pushed, module_local_hub):
    """Bytes lost between the Hub's storage and the cache are caught by the size check, before any load."""
    module_local_hub.fresh_cache()
    server = module_local_hub.server
    damaged_branch(
        REPO, "lost-bytes", "model.safetensors.index.json", server.read(REPO, "model.safetensors.index.json")
    )
    shard = sorted(f for f in server.files(REPO, "lost-bytes") if f.endswith(".safetensors"))[-1]
    good = server.read(REPO, shard, "lost-bytes")
    server.corrupt_lfs_object(REPO, shard, good[:-10], revision="lost-bytes")
    try:
        with raises_naming(str(len(good)), str(len(good) - 10), error=OSError):  # both sizes
            AutoModelForCausalLM.from_pretrained(REPO, revision="lost-bytes")
    finally:
        server.corrupt_lfs_object(REPO, shard, good, revision="lost-bytes")


def load_push_script():
    path = Path(__file__).parents[1] / "scripts" / "push_checkpoint.py"
    spec = importlib.util.spec_from_file_location("push_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_push_checkpoint_script_writes_the_card_and_round_trips(pushed, module_local_hub, tmp_path, capsys):
    out = tmp_path / "checkpoint"
    pushed.v1.save_pretrained(out, max_shard_size=MAX_SHARD_SIZE)
    pushed.tokenizer.save_pretrained(out)
    (out / "training_args.json").write_text(json.dumps({"learning_rate": 0.003, "max_steps": 100}))
    (out / "all_results.json").write_text(json.dumps({"train_loss": 2.5}))
    (out / "training_args.bin").write_bytes(b"pickle")  # what Trainer leaves: never uploaded

    commit = load_push_script().main([str(out), "org/scripted", "--dataset", "tiny-text"])
    printed = capsys.readouterr().out
    assert "[1/3]" in printed and "[3/3]" in printed and commit in printed

    server = module_local_hub.server
    files = server.files("org/scripted")
    assert "training_args.bin" not in files and "README.md" in files
    card = server.read("org/scripted", "README.md").decode()
    n = sum(p.numel() for p in pushed.v1.parameters())
    assert count_parameters(pushed.v1.config) == n
    for expected in ("xLSTM[2:1]", f"{n:,}", "`msm`", "trust_remote_code=True", "import xlstm_hf", "tiny-text"):
        assert expected in card, expected
    assert "learning_rate" in card and "train_loss" in card and "library_name: transformers" in card
    assert block_pattern(pushed.v1.config) == "xLSTM[2:1]"

    module_local_hub.fresh_cache()
    model = AutoModelForCausalLM.from_pretrained("org/scripted").eval()
    assert torch.equal(logits(model, pushed.input_ids), logits(pushed.v1, pushed.input_ids))


def test_push_checkpoint_refuses_a_damaged_directory(pushed, tmp_path):
    out = tmp_path / "checkpoint"
    pushed.v1.save_pretrained(out, max_shard_size=MAX_SHARD_SIZE)
    check_checkpoint(out)
    shard = sorted(out.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1])
    with raises_naming(shard.name, str(shard.stat().st_size)):
        load_push_script().main([str(out), "org/never-created"])
    for f in out.glob("*.safetensors"):
        f.unlink()
    (out / "pytorch_model.bin").write_bytes(b"pickle")
    with raises_naming("pytorch_model.bin", "safe_serialization"):
        check_checkpoint(out)


def test_push_model_is_one_commit_with_the_card(pushed, module_local_hub):
    before = len(module_local_hub.server.commit_ids("org/xlstm-tiny"))
    commit = push_model(pushed.v2, "org/one-commit", tokenizer=pushed.tokenizer, datasets=["tiny-text"])
    assert module_local_hub.server.commit_ids("org/one-commit")[1:] == [commit.oid]
    files = module_local_hub.server.files("org/one-commit")
    assert {"README.md", "config.json", "tokenizer.json", "modeling_xlstm.py", "model.safetensors"} <= set(files)
    assert "xLSTM[2:1]" in module_local_hub.server.read("org/one-commit", "README.md").decode()
    assert len(module_local_hub.server.commit_ids("org/xlstm-tiny")) == before


@pytest.mark.parametrize(
    ("architecture", "slstm_at", "layers", "pattern"),
    [("paper", [], 2, "xLSTM[1:0]"), ("paper", [7], 8, "xLSTM[7:1]"), ("paper", [0, 1], 2, "xLSTM[0:1]"),
     ("7b", [], 2, "xLSTM-7B layout")],
)  # fmt: skip
def test_model_card_pattern_and_parameter_count(architecture, slstm_at, layers, pattern):
    config = xlstm_hf.xLSTMConfig(
        architecture=architecture, vocab_size=97, hidden_size=64, num_hidden_layers=layers, num_heads=2,
        slstm_at=slstm_at, tie_word_embeddings=True,
    )  # fmt: skip
    n = sum(p.numel() for p in xlstm_hf.xLSTMForCausalLM(config).parameters())  # the tied matrix once
    assert block_pattern(config) == pattern and count_parameters(config) == n
    card = model_card(config, repo_id="org/card").content
    assert pattern in card and f"{n:,}" in card and "| Tied embeddings | True |" in card
    assert ("sLSTM heads" in card) == bool(slstm_at)
