"""PEFT on a checkpoint loaded with trust_remote_code=True in a process that cannot import xlstm_hf (a Hub user):
`LoraConfig(task_type="CAUSAL_LM")` without `target_modules` finds our default targets, which the modeling file that
the checkpoint carries must register, and the adapter trains.
"""

import json
import math

import pytest
from conftest import randomize_, tiny_config
from hub_fixtures import WITHOUT_THE_PACKAGE, run_without_the_package

import xlstm_hf

pytest.importorskip("peft")

# The child cannot import xlstm_hf (hub_fixtures.WITHOUT_THE_PACKAGE).
CHILD = (
    WITHOUT_THE_PACKAGE
    + r"""

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
lora = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4))
ids = torch.randint(1, model.config.vocab_size, (2, 21))
opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
lora.train()
losses = []
for _ in range(2):
    loss = lora(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    losses.append(loss.item())
with torch.no_grad():
    losses.append(lora(input_ids=ids, labels=ids).loss.item())
print(json.dumps({
    "class": f"{type(model).__module__}.{type(model).__qualname__}",
    "lora_layers": sorted({n.rsplit(".", 1)[-1] for n, m in lora.named_modules() if isinstance(m, LoraLayer)}),
    "trainable": sorted({n for n, p in lora.named_parameters() if p.requires_grad and "lora_" not in n}),
    "losses": losses,
    "xlstm_hf_modules": sorted(m for m in sys.modules if m.split(".")[0] == "xlstm_hf"),
}))
"""
)

EXPECTED_TARGETS = {"paper": {"proj_up", "proj_up_gate", "proj_down"}, "7b": {"q", "k", "v", "out_proj", "proj_up"}}


@pytest.mark.parametrize("architecture", ["7b", "paper"])
def test_default_lora_targets_without_the_package(tmp_path, architecture):
    checkpoint = tmp_path / "checkpoint"
    randomize_(xlstm_hf.xLSTMForCausalLM(tiny_config(architecture))).save_pretrained(checkpoint)
    assert (checkpoint / "modeling_xlstm.py").is_file()  # register_for_auto_class copies the modeling files
    proc = run_without_the_package(CHILD, str(checkpoint), tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["class"].startswith("transformers_modules."), report["class"]
    assert report["xlstm_hf_modules"] == []
    assert EXPECTED_TARGETS[architecture] <= set(report["lora_layers"]), report["lora_layers"]
    assert report["trainable"] == []  # only the adapters train
    first, _, after = report["losses"]  # before step 1, before step 2, after step 2
    assert all(math.isfinite(x) for x in report["losses"]), report["losses"]
    assert after < first, report["losses"]
