"""Convert a checkpoint of the `xlstm` package (xlstm.xLSTMLMModel, any mix of mLSTM and sLSTM blocks) to xlstm_hf.

    python scripts/convert_xlstm_package.py --config CONFIG.json|yaml --checkpoint MODEL.pt|.safetensors OUT
        [--push-to-hub ORG/NAME]

CONFIG holds the fields of xlstm.xLSTMLMModelConfig (as in the package's demos); MODEL the model's state_dict
(loaded with weights_only=True). Needs the `xlstm` package (pip install -e ".[dev]").
"""

import argparse
import json
from pathlib import Path

import torch

import xlstm_hf


def load_package_config(path: Path):
    from dacite import Config, from_dict
    from xlstm import xLSTMLMModelConfig

    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    else:
        data = json.loads(text)
    return from_dict(xLSTMLMModelConfig, data, config=Config(strict=True))


def load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID")
    args = parser.parse_args()
    from xlstm import xLSTMLMModel

    package_model = xLSTMLMModel(load_package_config(args.config))
    package_model.load_state_dict(load_state_dict(args.checkpoint))
    model = xlstm_hf.convert_from_xlstm_package(package_model.eval())
    model.save_pretrained(args.out)
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub)
    print(f"wrote {args.out}: blocks {''.join(model.config.block_types)}, {model.num_parameters():,} parameters")


if __name__ == "__main__":
    main()
