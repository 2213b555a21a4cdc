"""Prose written from a real server's numbers (notebook 06): one sentence per outcome, chosen by it.

Like `helpers.explain`, each function here writes the text that states what a run of the server
showed, worded by the rule it states (the rule is in the text, or in the verdict it is given).
A function given a verdict (`verdicts.say`'s decision) writes the sentence for the verdict that
decision reached, so the prose never contradicts the verdict table. `tests/test_explain_server.py`
runs every branch on numbers chosen by hand.
"""

from __future__ import annotations

from collections.abc import Mapping

from helpers import verdicts

STEP_GREW = 1.25  # a p50 step more than 1.25× one stream's grew with the batch
PATH_IS_SERVER = 3  # a path over 3× the client's own cost is mostly the API server


# --- Section 2: throughput against concurrency ------------------------------------------------


def closed_loop_throughput(one: Mapping[str, float], top: Mapping[str, float]) -> str:
    """The highest concurrency's tokens/s against the memory-bound prediction, the two measured
    factors that account for the share (`throughput_miss`), and whether the step itself grew with
    the batch (its p50 past `STEP_GREW`× one stream's). `one` and `top`: the concurrency table's
    rows at concurrency 1 and at the highest one."""
    c = top["concurrency"]
    why = throughput_miss(
        int(c),
        top["measured_over_predicted"],
        top["num_requests_running_mean"],
        one["itl_p50_s"],
        top["itl_p50_s"],
        top["client_itl_mean"],
    )
    text = (
        f"At concurrency {c:.0f} the server gave {top['output_tokens_per_s']:.1f} tokens/s, "
        f"{top['measured_over_predicted']:.0%} of the memory-bound prediction "
        f"({top['predicted_tokens_per_s']:.1f}: {c:.0f} streams at one stream's gap). {why} "
    )
    growth = top["itl_p50_s"] / one["itl_p50_s"]
    if growth > STEP_GREW:
        return text + (
            "A step of more sequences costs more on a CPU: its matmuls are skinny products far "
            "from the peak, whose cost grows with the batch (notebook 04's knee comes early), and "
            "vLLM-CPU runs its worker on one core."
        )
    return text + (
        f"The p50 step grew only {growth:.2f}× with the batch, so the steps themselves batched "
        "almost for free: the shortfall is the two factors above, not the step."
    )


def throughput_miss(
    concurrency: int,
    share: float,
    running_mean: float,
    itl_one_s: float,
    itl_p50_s: float,
    itl_mean_s: float,
) -> str:
    """Why a closed loop at `concurrency` gave `share` of the memory-bound prediction
    (concurrency ÷ the one-stream gap), split into two measured factors: how many requests the
    engine really held (its `/metrics` mean; a short run ramps up and drains) and how much longer
    the mean gap between tokens was than one stream's (a larger batch per step, and the steps
    where arriving requests' prompts were prefilled, which the p50 leaves out)."""
    held = running_mean / concurrency
    slower = itl_mean_s / itl_one_s
    explained = held / slower
    text = (
        f"Two measured factors account for it: the engine held {running_mean:.1f} requests on "
        f"average, {held:.0%} of the {concurrency} in flight (a short run ramps up and drains), "
        f"and the mean gap between tokens "
        f"was {itl_mean_s * 1e3:.0f} ms against one stream's {itl_one_s * 1e3:.0f} ms "
        f"({slower:.2f}×: p50 {itl_p50_s * 1e3:.0f} ms, the larger batch per step; the rest, "
        "the steps where arriving prompts were prefilled). "
        f"Together: {held:.0%} ÷ {slower:.2f} = {explained:.0%} of the prediction"
    )
    rest = share / explained
    if abs(rest - 1) <= 0.25:
        return text + f", within 25 % of the {share:.0%} measured."
    return text + (
        f", against {share:.0%} measured: a factor {rest:.2f} these two do not explain (the "
        "client's own time between requests, or token counts that differ from the planned ones)."
    )


# --- Section 3: the client against the server -------------------------------------------------


def client_path(
    path_ms: float,
    share: float,
    client_alone_ms: float,
    sent: int,
    itl_path_ms: float,
    running: float,
    concurrency: float,
) -> str:
    """What the client's TTFT adds to the server's (`path_ms`, `share` of what the client saw),
    told apart from the client's own cost against a loop-back server (`client_alone_ms`, with
    `sent` requests at once): mostly the API server past `PATH_IS_SERVER`× it, a visible part the
    client's above 1×, not told apart below. Then how far the inter-token gaps agree
    (`itl_path_ms`) and how many requests the engine held (`running`) at the top `concurrency`."""
    text = (
        f"Client TTFT exceeds the server's by a median **{path_ms:.1f} ms** ({share:.0%} of what "
        f"the client saw); the client with a loop-back server takes {client_alone_ms:.2f} ms, so "
    )
    if path_ms > PATH_IS_SERVER * client_alone_ms:
        text += (
            "almost all of the rest is the API server: HTTP, tokenization, handing the request "
            "to the engine core and the first chunk back. "
        )
    elif path_ms > client_alone_ms:
        text += "the client's own cost is a visible part of it. "
    else:
        text += (
            "the client alone costs more than the whole path (its loop-back figure sends "
            f"{sent} requests at once, each opening a connection): here the API server's share "
            "cannot be told apart from the client's. "
        )
    return text + (
        f"Inter-token gaps agree to {itl_path_ms:.2f} ms: once streaming, what the engine "
        "produces reaches the client at once. In a closed loop the engine held "
        f"{running:.1f} requests running on average at concurrency {concurrency:.0f}: Little's "
        "law gives in flight = concurrency only in a steady loop, and a run this short spends "
        "much of its time ramping up and draining."
    )


# --- Section 4: offered load --------------------------------------------------------------------


def simulated_load(decision, error, worst: float, points: int, requests: int) -> str:
    """The sentence after the simulator's verdict (every rate's median latency within 25 %).
    `error`: the % error of each metric (columns `latency_p50_s`, `latency_p99_s`, `tpot_p50_s`,
    `ttft_p50_s`) by load (its index, a fraction of capacity); `worst`: the load whose median
    missed most. When it fails, the larger of the TPOT and TTFT misses names what missed: the
    step's price or the queue."""
    off = error["latency_p50_s"][worst]
    step_off, queue_off = error["tpot_p50_s"][worst], error["ttft_p50_s"][worst]
    if abs(step_off) >= abs(queue_off):
        what = (
            "The step's price is what misses: a line through section 2's ITLs does not hold at "
            "the batch this load ran (or the machine was busier in one of the runs)."
        )
    else:
        what = (
            "The queue is what misses: the simulator's requests waited a different time than "
            "the server's (its price of a prompt token, or a short run's arrivals)."
        )
    return verdicts.say(
        decision,
        holds=f"The simulator, fitted on section 2's {points} closed-loop points, predicted every "
        f"rate's median latency within 25 % (worst {off:+.0f} % at {worst}×); p99, the slowest "
        f"of {requests} requests, is off by up to {error['latency_p99_s'].abs().max():.0f} %.",
        fails=f"Not within 25 %: at {worst}× the median latency is off by {off:+.0f} %, its TPOT "
        f"by {step_off:+.0f} % and its TTFT by {queue_off:+.0f} %. " + what,
    )


def overload(light: Mapping[str, float], heavy: Mapping[str, float], requests: int) -> str:
    """What the heaviest offered load did against the lightest (`light`, `heavy`: rows of the
    load table): how many ran at once and waited, TTFT p99 and TPOT p50, and whether the overload
    showed as a queue (someone waited) or as slower steps for everyone (nobody did)."""
    most = heavy["num_requests_waiting_max"]
    waiting = f"up to {most:.0f} waiting" if most else "none waiting"
    text = (
        f"At {heavy['rate']:.2f} requests/s the server ran up to "
        f"**{heavy['num_requests_running_max']:.0f}** requests at once and kept {waiting}; p99 "
        f"TTFT went from {light['ttft_p99_s']:.2f} s to {heavy['ttft_p99_s']:.2f} s and p50 TPOT "
        f"from {light['tpot_p50_s'] * 1e3:.0f} to {heavy['tpot_p50_s'] * 1e3:.0f} ms. "
    )
    if most == 0:
        text += (
            "Nobody waited: vLLM's batch cap (`--max-num-seqs`: 128 by default in the CPU "
            "build's API server) is far above this load, so every arrival joins the batch at once "
            "and the overload shows as slower steps for everyone (TPOT), not as a queue (TTFT). "
        )
    else:
        text += "Requests waited for a batch slot: the overload shows as queueing, in TTFT. "
    return (
        text + f"{requests} requests per point last seconds, so a queue has little time to build."
    )


# --- Section 5: prefix caching ------------------------------------------------------------------


def prefix_cache(
    shared: Mapping[str, float],
    distinct: Mapping[str, float],
    predicted: int,
    prefix: int,
    block: float,
    repeats: int,
) -> str:
    """The prompt tokens the server served from its cache (`shared`, `distinct`: rows of the
    prefix table) against `predicted` (16-token blocks), with TTFT and prefill; where the count
    is not the prediction, the server's own `block` size says how many whole blocks of the
    `prefix` the `repeats` prompts after the first could share."""
    cached = shared["server_cached_prompt_tokens"]
    text = (
        f"The server served **{cached:.0f}** prompt tokens from its cache for the shared prompts "
        f"(predicted {predicted}) and {distinct['server_cached_prompt_tokens']:.0f} for the "
        f"distinct ones; median TTFT {distinct['ttft_p50_s'] * 1e3:.0f} → "
        f"{shared['ttft_p50_s'] * 1e3:.0f} ms, prefill "
        f"{distinct['server_prefill_s_mean'] * 1e3:.0f} → "
        f"{shared['server_prefill_s_mean'] * 1e3:.0f} ms. "
    )
    if cached == predicted:
        return text + "As predicted."
    whole = prefix // block * block
    return text + (
        f"Not the prediction: this server's blocks are **{block:.0f}** tokens (its `/metrics` "
        f"cache_config_info; vLLM's CPU build sets 128), so a prompt shares only "
        f"{prefix // block:.0f} whole block(s) of the prefix: {repeats} × {whole:.0f} = "
        f"{repeats * whole:.0f} tokens. A prefix is shared a block at a time; the rest is "
        "recomputed."
    )


# --- Section 6: knobs that need a restart ----------------------------------------------------


def capped_itl(decision, default_ms: float, capped_ms: float, predicted_ms: float) -> str:
    """The sentence after the verdict 'capping the batch at 2 lowers ITL p50' (in ms: the
    default's, the capped server's and the simulator's prediction for it)."""
    moved = f"{default_ms:.0f} → {capped_ms:.0f} ms"
    return verdicts.say(
        decision,
        holds="Capped at 2, each step decodes fewer sequences: ITL p50 fell "
        f"from {default_ms:.0f} to {capped_ms:.0f} ms.",
        fails=f"Capped at 2, ITL p50 did not fall ({moved}; the simulator said "
        f"{predicted_ms:.0f}): each finished request lets a waiting one in, whose prompt rides "
        "in the next step, so more of the gaps carry a prefill.",
        noise=f"Capped at 2, ITL p50 moved {moved}: within 5 %, too close to tell apart.",
    )


def capped_ttft(
    decision, default_ms: float, capped_ms: float, prompts: int, prompt_tokens: int, budget: int
) -> str:
    """The sentence after the verdict 'capping the batch raises TTFT p50' (in ms), `prompts`
    requests of `prompt_tokens` in all sent at once under a `budget`-token step budget."""
    moved = f"{default_ms:.0f} → {capped_ms:.0f} ms"
    return verdicts.say(
        decision,
        holds=f"TTFT p50 rose to {capped_ms:.0f} ms: requests waited for a seat.",
        fails=f"TTFT p50 did not rise ({moved}): uncapped, all {prompts} prompts "
        f"({prompt_tokens} tokens, within the {budget}-token budget) were prefilled in one step, "
        "so every first token waited for all of them; capped, the first ones came after two "
        "prompts.",
        noise=f"TTFT p50 moved {moved}: within 5 %, too close to tell apart.",
    )


def prefill_budget(
    decision, budget: int, default_ms: float, small_ms: float, fixed_ms: float
) -> str:
    """The sentence after the verdict 'a `budget`-token prefill budget lowers the decoding
    streams' ITL p99' (in ms, the default's and the small budget's); `fixed_ms`: the fitted
    fixed cost of a step, which each chunk pays again."""
    moved = f"{default_ms:.0f} → {small_ms:.0f} ms"
    return verdicts.say(
        decision,
        holds=f"With a {budget}-token budget the streams' worst gaps shrank (ITL p99 {moved}), "
        "paid for in TTFT and in more steps.",
        fails=f"With a {budget}-token budget the worst gaps did not shrink ({moved}): each "
        f"{budget}-token chunk is a step that pays the fixed {fixed_ms:.0f} ms again (section "
        "4's fit), so a prompt's cost is spread, not removed, and p99 of few requests is their "
        "worst few gaps.",
        noise=f"With a {budget}-token budget the worst gaps moved {moved}: within 5 %, too close "
        "to tell apart.",
    )


def fp8_measured(
    row: Mapping[str, float | str], predicted: int, source: str, fp32_itl_ms: float | None
) -> str:
    """What the `--kv-cache-dtype fp8` start gave (`row`: its knob row, from `source`): the
    server's refusal, or its KV tokens against `predicted` and its ITL p50 at concurrency 4,
    beside fp32's (`fp32_itl_ms`) when that was measured in the same run (else None)."""
    head = f"--kv-cache-dtype fp8 ({source}): "
    if row["refused"]:
        return head + f"the server refused: {row['refused']}"
    text = head + (
        f"{row['kv_tokens']:,.0f} tokens (predicted {predicted:,}), ITL p50 "
        f"{row['itl_p50_s'] * 1e3:.0f} ms at concurrency 4"
    )
    if fp32_itl_ms is not None:
        text += f" (fp32 in the same run: {fp32_itl_ms:.0f} ms)"
    return text


def fp8_formula(decision, source: str, refused: str) -> str:
    """The sentence after the verdict 'the fp8 KV cache holds the tokens the formula predicts'
    (measured in `source`; `refused`: the server's refusal, if it refused)."""
    return verdicts.say(
        decision,
        holds=f"The fp8 cache ({source}) held the tokens notebook 02's formula predicts.",
        fails="The fp8 cache's size is not the formula's (its scales, or another block).",
        not_measured=f"The CPU build refused the fp8 KV cache here: {refused}",
    )


# --- Section 7: the course's engine against vLLM ---------------------------------------------


def engine_versus_vllm(
    tpot_ratio: float, ttft_ratio: float, waited_s: float | None, threads: int
) -> str:
    """The course's engine against vLLM on the same trace: `tpot_ratio` and `ttft_ratio` are
    course ÷ vLLM (p50s); `waited_s` the course's median queue time when it queued (else None);
    `threads`: torch's threads in this kernel. Ratios within 10 % count as the same."""
    text = (
        _against_vllm(tpot_ratio, "The course engine's TPOT p50", "faster")
        + "; "
        + _against_vllm(ttft_ratio, "its TTFT p50", "sooner")
        + ". "
    )
    if waited_s is not None:
        text += (
            f"Its requests waited a median {waited_s:.2f} s before they were admitted: at this "
            "rate it ran past its own capacity (notebook 05's knee), so a queue adds to its steps. "
        )
    else:
        text += "Its requests were admitted at once: the difference is a step's cost, not a queue. "
    if tpot_ratio > 1.10:
        return text + (
            "vLLM's step is a compiled graph with fused attention on a paged cache; the course's "
            "is eager PyTorch with Python around every layer (notebook 00's overhead)."
        )
    cores = (
        f"this kernel runs torch on {threads} threads while vLLM-CPU gives its model worker one "
        "core (it keeps one for its API server)"
        if threads > 1
        else "both run on one core, and vLLM's API server adds HTTP, tokenization and streaming"
    )
    return text + (
        f"Not the prediction: vLLM's compiled step did not win here. The likely reason: {cores}. "
        "To test it, rerun section 7 after `torch.set_num_threads(1)`."
    )


def _against_vllm(ratio: float, what: str, better: str) -> str:
    if abs(ratio - 1) <= 0.10:
        return f"{what} is within 10 % of vLLM's ({ratio:.2f}×)"
    if ratio > 1:
        return f"{what} is {ratio:.1f}× vLLM's"
    return f"{what} is {ratio:.2f}× vLLM's ({1 / ratio:.1f}× {better})"
