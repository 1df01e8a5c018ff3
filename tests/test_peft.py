"""PEFT on xLSTMForCausalLM: default LoRA targets of our model_type, explicit targets, DoRA, merge, adapter-only save.

Tolerances: merged weights change the order of float32 sums (W x + B A x vs (W + B A) x), so merged logits match the
adapter model's to 1e-5, not bitwise.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_, tiny_config

import xlstm_hf

peft = pytest.importorskip("peft")

ARCHITECTURES = ["paper", "7b"]


def tiny_model(architecture: str) -> xlstm_hf.xLSTMForCausalLM:
    return xlstm_hf.xLSTMForCausalLM(tiny_config(architecture)).eval()


def randomize_adapters_(model: torch.nn.Module) -> None:
    """LoRA's B starts at zero (the adapter is then a no-op); give every adapter weight a value so tests can fail."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.1)


def lora_layer_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_lora_default_targets(architecture):
    model = tiny_model(architecture)
    ids = torch.randint(0, model.config.vocab_size, (2, 21))
    base_logits = model(ids).logits
    lora = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4))
    expected = {"paper": {"proj_up", "proj_up_gate", "proj_down"}, "7b": {"q", "k", "v", "out_proj", "proj_up"}}
    assert expected[architecture] <= lora_layer_names(lora)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # fresh adapters are a no-op; after a step they are not
    torch.testing.assert_close(lora(ids).logits, base_logits)
    lora.train()
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.allclose(lora.eval()(ids).logits, base_logits)


def test_lora_explicit_targets():
    model = tiny_model("7b")
    lora = peft.get_peft_model(model, peft.LoraConfig(target_modules=["fgate_preact", "igate_preact"], r=2))
    assert lora_layer_names(lora) == {"fgate_preact", "igate_preact"}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_merge_and_unload_equals_adapter(architecture, use_dora):
    model = randomize_(tiny_model(architecture))
    lora = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, use_dora=use_dora)).eval()
    randomize_adapters_(lora)
    ids = torch.randint(0, model.config.vocab_size, (2, 19))
    with torch.no_grad():
        adapter_logits = lora(ids).logits
        merged = lora.merge_and_unload()
        assert not lora_layer_names(merged)
        torch.testing.assert_close(merged(ids).logits, adapter_logits, atol=1e-5, rtol=1e-5)


def test_dora_trains():
    model = tiny_model("paper")
    lora = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, use_dora=True))
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    loss = lora(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for n, p in lora.named_parameters() if "lora_magnitude_vector" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_save_and_load_adapter_only(tmp_path):
    randomize_(tiny_model("paper")).save_pretrained(tmp_path / "base")
    # loaded from a path, so that the adapter config records where its base model lives (AutoPeftModel reads it)
    model = xlstm_hf.xLSTMForCausalLM.from_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4)).eval()
    randomize_adapters_(lora)
    ids = torch.randint(0, model.config.vocab_size, (1, 13))
    with torch.no_grad():
        expected = lora(ids).logits
    lora.save_pretrained(tmp_path / "adapter")
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert saved == {"adapter_config.json", "adapter_model.safetensors", "README.md"} - ({"README.md"} - saved)
    adapter_bytes = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < (tmp_path / "base" / "model.safetensors").stat().st_size / 2

    base = xlstm_hf.xLSTMForCausalLM.from_pretrained(tmp_path / "base")
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected)
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(auto(ids).logits, expected)


def test_finetune_lora_example(tmp_path):
    """examples/finetune_lora.py (DoRA) on a tiny model saved by examples/train.py and a local text file: adapter and
    merged model are saved, and the merged model gives the adapter model's logits."""
    from test_distributed import run_train

    run_train(tmp_path / "base", nproc=1, per_device_batch=8)
    lines = [f"Line {i}: the quick brown fox jumps over the lazy dog number {i}." for i in range(60)]
    (tmp_path / "data.txt").write_text("\n".join(lines))
    script = Path(__file__).resolve().parents[1] / "examples" / "finetune_lora.py"
    cmd = [
        sys.executable,
        str(script),
        f"--model={tmp_path / 'base'}",
        f"--train_file={tmp_path / 'data.txt'}",
        f"--output_dir={tmp_path / 'lora'}",
        "--block_size=32",
        "--max_steps=4",
        "--use_dora",
        "--merge",
        "--max_new_tokens=4",
        "--use_cpu",
        "--disable_tqdm=true",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "eval perplexity" in proc.stdout
    base = xlstm_hf.xLSTMForCausalLM.from_pretrained(tmp_path / "base")
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    merged = xlstm_hf.xLSTMForCausalLM.from_pretrained(tmp_path / "lora" / "merged").eval()
    ids = torch.randint(0, merged.config.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)
