"""Run by tests/test_vllm.py with the Python of vLLM's own environment (it pins its own torch and transformers):
``python vllm_child.py job.json result.json``. The job names LLM instances and what to ask each; the result holds
what vLLM answered, compared against xlstm_hf's generate() by the test in the project's environment.

Job: {"instances": [{"name", "model", "engine": LLM kwargs, "prompts": [[ids]], "max_tokens",
                     "sampling": {"seed", "n", "temperature", "max_tokens"} or null}],
      "refused": [{"name", "model", "engine"}],          # LLM(...) must raise at start-up
      "kernel_checks": [{"name", "config": xLSTMConfig kwargs}]}   # check_servable(..., device="cuda")
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback


def shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def run_instance(spec: dict) -> dict:
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(model=spec["model"], **spec["engine"])
    started = time.perf_counter() - start
    prompts = [{"prompt_token_ids": p} for p in spec["prompts"]]
    greedy = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], ignore_eos=True, logprobs=1)
    outs = llm.generate(prompts, greedy, use_tqdm=False)
    result = {
        "startup_s": started,
        "greedy": [list(o.outputs[0].token_ids) for o in outs],
        # the logprob of each chosen token, as vLLM computed it
        "logprobs": [
            [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]
            for o in outs
        ],
    }
    if spec.get("sampling"):
        s = spec["sampling"]
        params = SamplingParams(
            temperature=s["temperature"], n=s["n"], seed=s["seed"], max_tokens=s["max_tokens"], ignore_eos=True
        )
        runs = []
        for _ in range(2):
            outs = llm.generate(prompts, params, use_tqdm=False)
            runs.append([[list(c.token_ids) for c in o.outputs] for o in outs])
        result["sampled"] = runs
    result["total_s"] = time.perf_counter() - start
    shutdown(llm)
    return result


def run_refused(spec: dict) -> str | None:
    from vllm import LLM

    try:
        llm = LLM(model=spec["model"], **spec["engine"])
    except Exception as e:  # noqa: BLE001 - the test reads the message, whatever the type vLLM wraps it in
        return "".join(traceback.format_exception_only(e)) + repr(e.__cause__ or e.__context__)
    shutdown(llm)
    return None


def run_kernel_check(spec: dict) -> str | None:
    from xlstm_hf import xLSTMConfig
    from xlstm_hf.vllm_plugin import check_servable

    try:
        check_servable(xLSTMConfig(**spec["config"]), 1, 1, "cuda")
    except ValueError as e:
        return str(e)
    return None


def register_twice() -> list[str]:
    """The entry point run again on top of vLLM's own run of it: no error, and both architectures registered."""
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    from xlstm_hf.vllm_plugin import ARCHITECTURES, register

    load_general_plugins()
    register()
    register()
    return [arch for arch in ARCHITECTURES if arch in ModelRegistry.get_supported_archs()]


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    start = time.perf_counter()
    result = {
        "registered": register_twice(),
        "kernel_checks": {s["name"]: run_kernel_check(s) for s in job.get("kernel_checks", [])},
        "refused": {s["name"]: run_refused(s) for s in job.get("refused", [])},
        "instances": {s["name"]: run_instance(s) for s in job.get("instances", [])},
    }
    result["total_s"] = time.perf_counter() - start
    with open(sys.argv[2], "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
