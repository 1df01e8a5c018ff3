"""Beyond one process: examples/train.py under torchrun (DDP on gloo, CPU) gives the losses and weights of one process
with the same global batch; FSDP2 (`fully_shard` of every block, then the root, as `_no_split_modules` asks) on gloo
does the same; `device_map` placement never splits a block.

accelerate turns FSDP on only for multi-accelerator runs: on CPU the Trainer's `--fsdp` silently falls back to DDP. So
FSDP is tested here with torch's own `fully_shard`, which works on CPU with gloo (torch 2.13).

Tolerances: DDP averages the two halves' gradients with an all-reduce, one process sums the whole batch: the same
numbers in another order, 1e-5 relative on the losses and the weights after a few steps.
"""

from __future__ import annotations

import json
import os
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


# torchrun's --standalone: a local rendezvous on a port the OS picks, where a port probed free beforehand could be
# taken by another process before torchrun binds it
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def run_train(output_dir: Path, nproc: int, per_device_batch: int, *extra: str) -> dict:
    args = [f"--output_dir={output_dir}", f"--per_device_train_batch_size={per_device_batch}", *TINY_RUN, *extra]
    if nproc == 1:
        cmd = [sys.executable, str(TRAIN), *args]
    else:
        cmd = [*TORCHRUN, f"--nproc_per_node={nproc}", str(TRAIN), "--ddp_backend=gloo", *args]
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


FSDP_SCRIPT = """
import os, sys
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard

sys.path.insert(0, os.environ["REPO"])
import xlstm_hf

distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
torch.manual_seed(0)
config = xlstm_hf.xLSTMConfig(
    vocab_size=97, hidden_size=32, num_hidden_layers=3, num_heads=2, chunk_size=8, slstm_at=[1]
)
model = xlstm_hf.xLSTMForCausalLM(config)
if distributed:
    no_split = tuple(model._no_split_modules)
    for module in model.modules():
        if type(module).__name__ in no_split:
            fully_shard(module)
    fully_shard(model)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
generator = torch.Generator().manual_seed(0)
losses = []
for _ in range(3):
    ids = torch.randint(0, 97, (4, 24), generator=generator).chunk(world)[rank]
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    loss = loss.detach().clone()
    if distributed:
        dist.all_reduce(loss)
    losses.append(loss.item() / world)
sharded = sum(isinstance(m, FSDPModule) for m in model.modules())
if distributed:
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
else:
    state = model.state_dict()
if rank == 0:
    torch.save({"losses": losses, "sharded": sharded, "state": state}, os.environ["OUT"])
if distributed:
    dist.barrier()  # no rank tears gloo down while the other still talks to it
    dist.destroy_process_group()
# Everything is on disk: leave without the interpreter's teardown, where a rank was once killed by SIGABRT
# ("terminate called without an active exception", a joinable C++ thread destroyed at exit) in a full-suite run.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
"""


def test_fsdp2_two_processes_match_one(tmp_path):
    """SGD, not Adam: Adam divides the round-off of near-zero gradients by their own size (see test_training.py)."""
    script = tmp_path / "fsdp_cpu.py"
    script.write_text(FSDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", REPO=str(TRAIN.parents[1]))
    for name, cmd in (
        ("single", [sys.executable, str(script)]),
        ("fsdp", [*TORCHRUN, "--nproc_per_node=2", str(script)]),
    ):
        proc = subprocess.run(
            cmd, env=dict(env, OUT=str(tmp_path / f"{name}.pt")), capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-5000:]
        assert "returned a view tensor" not in proc.stderr, proc.stderr[-5000:]
    single, fsdp = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "fsdp.pt")
    assert fsdp["sharded"] == 3 + 1  # every block, then the root
    torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-5)
    for name, w in single["state"].items():
        torch.testing.assert_close(fsdp["state"][name], w, rtol=1e-5, atol=1e-5, msg=name)


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
