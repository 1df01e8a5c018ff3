"""Beyond one process: examples/train.py under torchrun (DDP on gloo, CPU) gives the losses and weights of one process
with the same global batch; `device_map` placement never splits a block.

Tolerances: DDP averages the two halves' gradients with an all-reduce, one process sums the whole batch: the same
numbers in another order, 1e-5 relative on the losses and the weights after a few steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

import xlstm_hf

TRAIN = Path(__file__).resolve().parents[1] / "examples" / "train.py"

# A tiny model on the default data (Python's documentation topics), a 280-token BPE, four steps over the same eight
# rows: the global batch is the whole training set, so the two runs see the same rows in every step whatever order
# their samplers draw them in.
TINY_RUN = [
    "--max_train_samples=8",
    "--max_eval_samples=16",
    "--config_overrides=hidden_size=32,num_hidden_layers=2,num_heads=2,chunk_size=16,dropout=0.0",
    "--block_size=64",
    "--bpe_vocab_size=280",
    "--max_steps=4",
    "--warmup_steps=0",
    "--learning_rate=3e-3",
    "--logging_steps=1",
    "--max_new_tokens=4",
    "--use_cpu",
    "--disable_tqdm=true",
    "--dataloader_num_workers=0",
    "--per_device_eval_batch_size=8",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(output_dir: Path, nproc: int, per_device_batch: int, *extra: str) -> dict:
    args = [f"--output_dir={output_dir}", f"--per_device_train_batch_size={per_device_batch}", *TINY_RUN, *extra]
    if nproc == 1:
        cmd = [sys.executable, str(TRAIN), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            str(TRAIN),
            "--ddp_backend=gloo",
            *args,
        ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((output_dir / "trainer_state.json").read_text())


def train_losses(state: dict) -> list[float]:
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_ddp_two_processes_match_one(tmp_path):
    single = run_train(tmp_path / "single", nproc=1, per_device_batch=8)
    ddp = run_train(tmp_path / "ddp", nproc=2, per_device_batch=4)
    # both trained the same BPE on the same text (the DDP run on its main process only)
    assert (tmp_path / "ddp" / "tokenizer.json").read_text() == (tmp_path / "single" / "tokenizer.json").read_text()
    single_losses, ddp_losses = train_losses(single), train_losses(ddp)
    assert len(single_losses) == len(ddp_losses) == 4
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single_losses), rtol=1e-5, atol=1e-5)
    single_weights = load_file(tmp_path / "single" / "model.safetensors")
    ddp_weights = load_file(tmp_path / "ddp" / "model.safetensors")
    assert single_weights.keys() == ddp_weights.keys()
    for name, w in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], w, rtol=1e-5, atol=1e-5, msg=name)
    assert xlstm_hf.xLSTMForCausalLM.from_pretrained(tmp_path / "ddp").config.hidden_size == 32


def test_device_map_never_splits_a_block():
    """accelerate's placement (what device_map="auto" uses) under a memory budget that spreads the model over three
    devices: every block lands whole on one of them, because of `_no_split_modules`."""
    accelerate = pytest.importorskip("accelerate")
    model = xlstm_hf.xLSTMForCausalLM(tiny_config("paper", num_hidden_layers=6, slstm_at=[2]))
    block_bytes = max(sum(p.numel() * 4 for p in b.parameters()) for b in model.backbone.blocks)
    budget = {0: int(2.5 * block_bytes), 1: int(2.5 * block_bytes), "cpu": 10**9}
    device_map = accelerate.infer_auto_device_map(
        model, max_memory=budget, no_split_module_classes=model._no_split_modules
    )
    assert len(set(device_map.values())) >= 2
    for key in device_map:
        parts = key.split(".")
        if "blocks" in parts:
            assert len(parts) == parts.index("blocks") + 2, f"{key}: a block was split across devices"
