"""Issue 22's property test: random bad values thrown at every public function of `planner`,
`verdicts` and `serving`. Each call either works (and returns no NaN: a verdict built on a
missing number is "not measured", never "holds") or raises ValueError / TypeError / LookupError
whose message names the argument — never an IndexError, KeyError, AttributeError,
ZeroDivisionError or a crash. Seeded, and a few seconds long.
"""

import dataclasses
import math
import random
import types

import pandas as pd
import pytest
import torch

from helpers import planner, serving, verdicts

BAD = [math.nan, math.inf, -math.inf, -1, 0, -0.5, 2.5, 10**30, "", "x", None, True, [], {}, (),
       [math.nan], object()]  # fmt: skip

ROWS = [{"batch": b, "prompt": 64, "new_tokens": 8, "tpot_s": 0.01 + 0.001 * b} for b in (1, 8)]
CEILINGS = types.SimpleNamespace(matmul_flops={"fp32": 1e11}, read_bandwidth=2e10)


def requests():
    return [
        serving.Request(torch.arange(1, 5), 3, 0.0),
        serving.Request(torch.arange(2, 9), 2, 0.5),
    ]


def run_table():
    return serving.run(None, requests(), clock=lambda s: 0.01)


STEPS = pd.DataFrame({"seqs": [1, 2, 4, 1, 3, 2], "tokens": [1, 2, 4, 9, 3, 7],
                      "context": [5, 9, 30, 9, 12, 40],
                      "step_s": [1.0, 1.2, 1.9, 1.5, 1.4, 1.6]})  # fmt: skip
MODEL = dict(model="llama-2-7b", gpu="h100-sxm", dtype="fp16")
# function → its valid keyword arguments; each argument in turn gets every bad value
CASES = {
    planner.predict: dict(**MODEL, tp=1, batch=1, prompt_tokens=64, new_tokens=8),
    planner.step_seconds: dict(**MODEL, tp=1, batch=1, tokens=1, context=8),
    planner.step_seconds_function: dict(**MODEL, tp=1),
    planner.calibrate: dict(measured=ROWS, **MODEL),
    planner.candidates: dict(
        model="llama-2-7b",
        gpu="h100-sxm",
        gpus=1,
        prompt_tokens=64,
        new_tokens=8,
        dtypes=("fp16",),
        batches=(1, 4),
    ),  # fmt: skip
    planner.best_config: dict(
        model="llama-2-7b", gpu="h100-sxm", gpus=1, tpot_budget_ms=50, batches=(1, 4)
    ),  # fmt: skip
    planner.gpu: dict(name="h100-sxm", engine="compiled"),
    planner.published_gpus: dict(engine="eager"),
    planner.spec_from_ceilings: dict(ceilings=CEILINGS, memory_bytes=0.0),
    planner.versus_published: dict(roles=("check",)),
    verdicts.compare: dict(
        name_a="a",
        a=1.0,
        spread_a=(0.9, 1.1),
        name_b="b",
        b=2.0,
        spread_b=(1.9, 2.1),
        claim="lower",
        rel_tol=0.05,
    ),  # fmt: skip
    verdicts.at_most: dict(name="x", value=1.0, limit=2.0),
    verdicts.at_least: dict(name="x", value=2.0, limit=1.0),
    verdicts.close_to: dict(name="x", value=1.0, target=1.02, rel_tol=0.05),
    verdicts.monotonic: dict(name="x", values=[3.0, 2.0, 1.0], rel_tol=0.05),
    verdicts.ms: dict(median_s=0.01, q1_s=0.009, q3_s=0.011),
    verdicts.row: dict(claim="c", evidence="e", decision=(verdicts.HOLDS, "rule")),
    verdicts.say: dict(decision=(verdicts.HOLDS, "rule")),
    verdicts.table: dict(rows=[("c", "e", "r", verdicts.HOLDS)]),
    serving.run: dict(
        model=None,
        requests=requests(),
        policy="continuous",
        max_batch=4,
        block_size=4,
        kv_blocks=16,
        prefill_chunk=8,
        clock=lambda s: 0.01,
    ),  # fmt: skip
    serving.summary: dict(df=run_table(), percentiles=(50, 90)),
    serving.goodput: dict(df=run_table(), ttft_s=1.0, tpot_s=1.0),
    serving.littles_law: dict(df=run_table()),
    serving.kv_usage: dict(df=run_table(), max_len=64),
    serving.fit_step_time: dict(steps=STEPS),
    serving.planner_step_time: dict(model="llama-3-8b", gpu="h100-sxm", dtype="bf16", tp=1),
    serving.published_lengths: dict(trace="azure-conv-2023"),
    serving.poisson_trace: dict(
        rate=2.0, n=3, seed=0, scale=0.01, vocab=500, max_prompt=8, max_output=4
    ),  # fmt: skip
    serving.blocks_for: dict(tokens=10, block_size=4),
}
# how an argument may be named in a message, besides its own name
ALIASES = {"name": ("gpu",), "tp": ("tp degree",), "values": ("values[",)}
VERDICT_NUMBERS = {"a", "b", "value", "limit", "target"}  # None or NaN there: not measured


def no_nan(result) -> bool:
    if isinstance(result, float):
        return not math.isnan(result)
    if isinstance(result, dict):
        return all(no_nan(v) for v in result.values())
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return all(no_nan(getattr(result, f.name)) for f in dataclasses.fields(result))
    return True  # tables may hold NaN by design (a one-token request has no TPOT)


def check_call(fn, kwargs, bad_args):
    try:
        result = fn(**kwargs)
    except (ValueError, TypeError, LookupError) as err:
        message = str(err).lower()
        names = [a for b in bad_args for a in (b, *ALIASES.get(b, ()))]
        assert any(n.lower() in message for n in names), (
            f"{fn.__module__}.{fn.__name__}({bad_args}) raised a message naming none of "
            f"{bad_args}: {type(err).__name__}: {err}"
        )
        assert "\n" not in str(err).strip() or fn is serving.run, f"not one line: {err}"
        return
    except Exception as err:  # noqa: BLE001 — the property: nothing else ever escapes
        pytest.fail(f"{fn.__module__}.{fn.__name__}({bad_args}) raised {type(err).__name__}: {err}")
    if callable(result) and fn in (planner.step_seconds_function, serving.planner_step_time):
        return
    assert no_nan(result), f"{fn.__name__}({bad_args}) returned NaN: {result}"
    if isinstance(result, verdicts.Decision):
        numbers = [kwargs[a] for a in bad_args if a in VERDICT_NUMBERS]
        numbers += [x for a in bad_args if a.startswith("spread") and isinstance(kwargs[a], list)
                    for x in kwargs[a]]  # fmt: skip
        missing = any(v is None or (isinstance(v, float) and v != v) for v in numbers)
        assert not (missing and result.verdict == verdicts.HOLDS), f"{fn.__name__}: holds on NaN"


@pytest.mark.parametrize("fn", list(CASES), ids=lambda f: f"{f.__module__}.{f.__name__}")
def test_every_argument_given_every_bad_value(fn):
    for arg in CASES[fn]:
        for bad in BAD:
            check_call(fn, {**CASES[fn], arg: bad}, [arg])


def test_random_combinations_of_bad_values():
    rng = random.Random(22)
    functions = list(CASES)
    for _ in range(300):
        fn = rng.choice(functions)
        args = rng.sample(list(CASES[fn]), k=min(len(CASES[fn]), rng.randint(1, 3)))
        check_call(fn, {**CASES[fn], **{a: rng.choice(BAD) for a in args}}, args)


def test_the_valid_calls_work():
    for fn, kwargs in CASES.items():
        result = fn(**kwargs)
        assert no_nan(result) or isinstance(result, pd.DataFrame), fn.__name__
