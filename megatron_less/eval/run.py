"""Evaluate on the math benchmarks: generate (or load saved) responses, score, report.

The generation engine is passed in as a callable so that this module needs no model code:

    generate(prompts: list[str], n: int, temperature: float, top_p: float, max_tokens: int)
        -> list[list[str]]   # n responses per prompt, in prompt order

``megatron-less eval --samples FILE`` scores a saved samples document (see ``eval.samples``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from megatron_less.eval import metrics as M
from megatron_less.eval.report import format_table, plot_bars, write_json
from megatron_less.eval.samples import (
    SamplesError,
    build_document,
    load_document,
    responses_of,
    validate,
)
from megatron_less.rewards.equivalence import canonical
from megatron_less.rewards.math import DEFAULT_TIMEOUT, score_batch

GenerateFn = Callable[[list, int, float, float, int], list]
DEFAULT_BENCHMARKS = ("math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench")


def score_document(
    doc: dict,
    ks: Sequence[int] | None = None,
    num_workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    bootstrap: bool = True,
) -> dict:
    """Score every response of a samples document; returns the report (metrics + samples).

    All benchmarks go to the reward pool in one batch, so workers stay busy across them.
    """
    items_by_bench = validate(doc)
    flat_resp, flat_ref, spans = [], [], {}
    for name, items in items_by_bench.items():
        start = len(flat_resp)
        for i, item in enumerate(items):
            rs = responses_of(item, f"benchmarks.{name}[{i}]")
            flat_resp += rs
            flat_ref += [item["answer"]] * len(rs)
        spans[name] = (start, len(flat_resp))
    t0 = time.perf_counter()
    results = score_batch(flat_resp, flat_ref, num_workers=num_workers, timeout=timeout)
    score_seconds = time.perf_counter() - t0

    metrics, out_benchmarks = {}, {}
    for name, items in items_by_bench.items():
        start, _ = spans[name]
        pos, rows, correct, votes, reasons = start, [], [], [], {}
        for i, item in enumerate(items):
            rs = responses_of(item, f"benchmarks.{name}[{i}]")
            res = results[pos : pos + len(rs)]
            pos += len(rs)
            correct.append([r.score == 1.0 for r in res])
            # Majority vote groups answers by spelling up to layout ("1/2" and "\frac12" differ).
            votes.append([None if r.extracted is None else canonical(r.extracted) for r in res])
            for r in res:
                reasons[r.reason] = reasons.get(r.reason, 0) + 1
            row = {k: v for k, v in item.items() if k not in ("responses", "samples")}
            row["samples"] = [{"response": txt, **r.to_dict()} for txt, r in zip(rs, res)]
            rows.append(row)
        m = M.summarize(correct, votes, ks=ks, bootstrap=bootstrap)
        total = sum(reasons.values())
        m["no_box"] = reasons.get("no_box", 0) / total
        m["reasons"] = reasons
        metrics[name] = m
        out_benchmarks[name] = rows
    average = M.average_benchmarks(
        {k: {kk: vv for kk, vv in v.items() if kk != "reasons"} for k, v in metrics.items()}
    )
    meta = dict(doc.get("meta", {}))
    meta.update(scored_responses=len(flat_resp), score_seconds=round(score_seconds, 3))
    return {"meta": meta, "metrics": metrics, "average": average, "benchmarks": out_benchmarks}


def evaluate(
    generate_fn: GenerateFn,
    benchmarks: Sequence[str] = DEFAULT_BENCHMARKS,
    n: int = 8,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_tokens: int = 4096,
    template: str = "qwen_math",
    tokenizer=None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    score: bool = True,
    **score_kwargs,
) -> dict | None:
    """Generate n responses per problem for each benchmark, then score them (one generate call
    over all prompts, so an engine can batch across benchmarks)."""
    from megatron_less.data.benchmarks import display_names, load_benchmark
    from megatron_less.data.prompts import apply_template

    problems = {name: load_benchmark(b, data_dir)[:limit] for b, name in display_names(benchmarks).items()}
    prompts = [
        apply_template(template, p.problem, tokenizer) for ps in problems.values() for p in ps
    ]
    out = generate_fn(prompts, n, temperature, top_p, max_tokens)
    if len(out) != len(prompts) or any(len(r) != n for r in out):
        shape = f"{len(out)} rows with sizes {sorted({len(r) for r in out})}"
        raise ValueError(f"generate_fn returned {shape}; expected {len(prompts)} rows of {n}")
    by_bench, pos = {}, 0
    for b, ps in problems.items():
        by_bench[b] = out[pos : pos + len(ps)]
        pos += len(ps)
    meta = dict(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, template=template)
    if not score:  # other ranks of a torchrun job: generation is collective, scoring is not
        return None
    return score_document(build_document(problems, by_bench, meta), **score_kwargs)


def save_report(report: dict, out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": write_json(out_dir / "eval_results.json", report)}
    if plot:
        paths["png"] = plot_bars(out_dir / "eval_summary.png", report["metrics"], report["average"])
    return paths


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="megatron-less eval", description="Score math benchmark responses."
    )
    ap.add_argument("--samples", help="saved samples JSON to score (no generation)")
    ap.add_argument("--model", help="HF folder or megatron-less checkpoint to generate with")
    ap.add_argument("--engine", choices=["auto", "vllm", "builtin"], default="auto",
                    help="rollout engine (auto: vLLM when installed)")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size of the policy")
    ap.add_argument("--pp", type=int, default=1, help="pipeline parallel size of the policy")
    ap.add_argument("--rollout-tp", type=int, default=1, help="vLLM tensor parallel size")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if _on_gpu() else "fp32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--benchmarks",
        help="comma-separated names (default: all in --samples, else the six benchmarks)",
    )
    # --num-samples: torchrun reads a bare --n after the script as an abbreviation of its own flags
    ap.add_argument("--n", "--num-samples", dest="n", type=int, default=8, help="responses per problem (generation)")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--template", default="qwen_math")
    ap.add_argument("--tokenizer", help="tokenizer folder (for the chat template)")
    ap.add_argument("--data-dir", help="offline benchmark copies (default $MLESS_DATA_DIR)")
    ap.add_argument("--limit", type=int, help="first N problems per benchmark")
    ap.add_argument("--ks", help="comma-separated k for pass@k/worst@k (default 1,2,4,..,n)")
    ap.add_argument("--num-workers", type=int, help="reward worker processes")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per verdict")
    ap.add_argument("--out-dir", default="outputs/eval")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-bootstrap", action="store_true", help="skip verl-style bootstrap metrics")
    return ap


def main(argv: list[str] | None = None, generate_fn: GenerateFn | None = None) -> int:
    """``megatron-less eval``: score ``--samples``, or generate with ``--model`` (or a given
    ``generate_fn``) and score."""
    args = build_parser().parse_args(argv)
    if args.samples and args.model:
        print("error: pass either --samples or --model, not both", file=sys.stderr)
        return 2
    if args.model and generate_fn is None:
        import torch

        from megatron_less.eval.generate import model_generate_fn

        try:
            generate_fn = model_generate_fn(
                args.model, args.tokenizer, engine=args.engine, tp=args.tp, pp=args.pp,
                rollout_tp=args.rollout_tp, seed=args.seed,
                dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32,
            )
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    ks = [int(k) for k in args.ks.split(",")] if args.ks else None
    score_kwargs = dict(
        ks=ks, num_workers=args.num_workers, timeout=args.timeout, bootstrap=not args.no_bootstrap
    )
    chosen = [b for b in args.benchmarks.split(",") if b] if args.benchmarks else None
    try:
        if args.samples:
            doc = load_document(args.samples)
            if chosen:
                missing = [b for b in chosen if b not in doc["benchmarks"]]
                if missing:
                    raise SamplesError(
                        f"{args.samples}: no samples for {missing}; "
                        f"it has {list(doc['benchmarks'])}"
                    )
                doc["benchmarks"] = {b: doc["benchmarks"][b] for b in chosen}
            report = score_document(doc, **score_kwargs)
        elif generate_fn is not None:
            tokenizer = None
            tok_path = args.tokenizer or (args.model if args.model and not os.path.exists(
                os.path.join(args.model, "megatron_less.json")) else None)
            if tok_path:
                from megatron_less.data.tokenizer import load_tokenizer

                tokenizer = load_tokenizer(tok_path)
            report = evaluate(
                generate_fn,
                chosen or DEFAULT_BENCHMARKS,
                args.n,
                args.temperature,
                args.top_p,
                args.max_tokens,
                args.template,
                tokenizer,
                args.data_dir,
                args.limit,
                score=_rank() == 0,
                **score_kwargs,
            )
            if report is None:
                return 0
        else:
            print("error: nothing to evaluate; pass --model DIR or --samples FILE", file=sys.stderr)
            return 2
    except (SamplesError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report["metrics"], report["average"]))
    paths = save_report(report, args.out_dir, plot=not args.no_plot)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
