"""examples/train.py --push_to_repo: model, tokenizer, code and a model card with the training arguments and results
reach the (loopback) Hub in one commit, and the repo loads back."""

import subprocess
import sys

import torch
from test_distributed import TINY_RUN, TRAIN

import xlstm_hf

pytest_plugins = ["hub_fixtures"]


def test_train_pushes_model_tokenizer_and_card(tmp_path, local_hub):
    repo = "org/xlstm-pydoc-tiny"
    cmd = [
        sys.executable,
        str(TRAIN),
        f"--output_dir={tmp_path / 'run'}",
        "--per_device_train_batch_size=8",
        *TINY_RUN,
        f"--push_to_repo={repo}",
    ]
    env = local_hub.subprocess_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    files = local_hub.server.files(repo)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "modeling_xlstm.py", "README.md"):
        assert name in files, sorted(files)
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    card = files["README.md"].data.decode()
    assert "pydoc_data.topics" in card and "learning_rate" in card and "perplexity" in card.lower()
    model = xlstm_hf.xLSTMForCausalLM.from_pretrained(repo).eval()
    local = xlstm_hf.xLSTMForCausalLM.from_pretrained(tmp_path / "run").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    assert torch.equal(model(ids).logits, local(ids).logits)
