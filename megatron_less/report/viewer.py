"""``megatron-less view RUN_DIR [--step N]``: one self-contained HTML page (no scripts, no
external files) of a step's logged rollouts: each group's responses side by side, every token
shaded by its entropy and marked by its LESS class, with reward and advantage per response;
truncated responses and responses left out of the loss are badged, and a token's hover title
gives |rollout - old| log-prob gap when the row logs both."""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

from megatron_less.algos.less.codes import CORRECT_ONLY, DEFAULT, HIGH, INCORRECT_ONLY, SHARED
from megatron_less.report import run_files

# class code -> (css class, legend text); tokens of a run without LESS have no class
CLASSES = {
    HIGH: ("high", "untouched, weight 1 (high-entropy, or a group all right or all wrong)"),
    DEFAULT: ("default", "low-entropy, in no shared segment (default weight)"),
    CORRECT_ONLY: ("corr", "segment seen only in correct responses (amplified)"),
    INCORRECT_ONLY: ("inc", "segment seen only in incorrect responses (suppressed)"),
    SHARED: ("shared", "segment seen in both (neutralised)"),
}
CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:18px 0 6px} .meta{color:#555;font-size:13px}
.legend{display:flex;flex-wrap:wrap;gap:14px;align-items:center;border:1px solid #ccc;padding:8px 10px;
  margin:10px 0;font-size:13px;border-radius:6px}
.ramp{display:inline-block;width:120px;height:12px;vertical-align:middle;
  background:linear-gradient(to right,rgb(255,255,255),rgb(255,140,0))}
.group{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:10px;align-items:start}
.resp{border:2px solid #ccc;border-radius:6px;padding:6px;font-family:ui-monospace,monospace;
  font-size:13px;line-height:1.9}
.resp.ok{border-color:#2e9e44} .resp.bad{border-color:#d33c3c}
.resp.cut{border-style:dashed} .resp.excl{opacity:.7;background:#f3f3f3}
.badge{display:inline-block;font-size:11px;padding:0 5px;margin:0 4px 2px 0;border-radius:8px;color:#fff}
.badge.cut{background:#b36b00} .badge.excl{background:#666}
.head{font-family:system-ui,sans-serif;font-size:12px;border-bottom:1px solid #ddd;margin-bottom:4px}
.t{white-space:pre-wrap;padding:1px 0;border-bottom:3px solid transparent}
.t.corr{border-bottom-color:#2e9e44} .t.inc{border-bottom-color:#d33c3c}
.t.shared{border-bottom:3px dotted #777;color:#666}
.t.default{border-bottom-color:#ddd}
.prompt{white-space:pre-wrap;font-family:ui-monospace,monospace;background:#f5f5f5;padding:6px;border-radius:4px}
"""


def _entropy_colour(h: float, h_max: float) -> str:
    """White (certain) to orange (uncertain); the scale is the page's largest entropy."""
    x = 0.0 if h_max <= 0 else min(max(h / h_max, 0.0), 1.0)
    return f"rgb(255,{round(255 - 115 * x)},{round(255 - 255 * x)})"


def _token_text(tok: str) -> str:
    return html.escape(tok.replace("\n", "⏎\n")) or "&#8203;"


BADGES = {"cut": "truncated at max_tokens", "excl": "not in the loss"}


def _response(r: dict, h_max: float) -> str:
    ok = r.get("correct")
    adv = r.get("advantage") or []
    big = max(adv, key=abs, default=0.0)
    marks = [m for m, on in (("cut", r.get("finish_reason") == "length"), ("excl", r.get("loss_excluded"))) if on]
    badges = "".join(f"<span class='badge {m}'>{BADGES[m]}</span>" for m in marks)
    head = (f"<div class='head'>{badges}<b>{'correct' if ok else 'wrong'}</b> · reward {r.get('reward', 0):g} · "
            f"{len(r.get('tokens', []))} tok{' (cut)' if 'cut' in marks else ''} · adv {big:+.2f}</div>")  # fmt: skip
    spans = []
    tokens = r.get("tokens", [])
    classes = r.get("less_class") or [None] * len(tokens)
    rollout_lp, old_lp = r.get("rollout_logprobs") or [], r.get("old_logprobs") or []
    gaps = len(rollout_lp) == len(old_lp) == len(tokens)
    for i, tok in enumerate(tokens):
        h = r["entropy"][i] if i < len(r.get("entropy", [])) else 0.0
        a = adv[i] if i < len(adv) else 0.0
        css, name = CLASSES.get(classes[i], ("", "no LESS class"))
        tip = f"entropy {h:.3f} | advantage {a:+.3f} | {name}"
        if gaps and rollout_lp[i] is not None and old_lp[i] is not None:
            tip += f" | log-prob gap |rollout - old| {abs(rollout_lp[i] - old_lp[i]):.4f}"
        spans.append(f"<span class='t {css}' style='background:{_entropy_colour(h, h_max)}' "
                     f"title='{html.escape(tip)}'>{_token_text(tok)}</span>")  # fmt: skip
    return f"<div class='resp {' '.join(['ok' if ok else 'bad', *marks])}'>{head}{''.join(spans)}</div>"


def _legend(h_max: float) -> str:
    items = [f"<span>entropy 0 <span class='ramp'></span> {h_max:.2f} nats</span>"]
    items += [f"<span><span class='t {css}'>&nbsp;tok&nbsp;</span> {html.escape(text)}</span>"
              for css, text in CLASSES.values()]  # fmt: skip
    items += ["<span style='border:2px solid #2e9e44;padding:0 4px'>correct</span>",
              "<span style='border:2px solid #d33c3c;padding:0 4px'>incorrect</span>",
              f"<span style='border:2px dashed #777;padding:0 4px'><span class='badge cut'>{BADGES['cut']}</span></span>",
              f"<span class='badge excl'>{BADGES['excl']}</span>"]  # fmt: skip
    return f"<div class='legend' id='legend'><b>Legend</b>{''.join(items)}</div>"


def render(run_dir: str | Path, step: int | None = None) -> tuple[int, str]:
    """(step shown, the page's HTML)."""
    step, rows = run_files.rollouts(run_dir, step)
    h_max = max((h for r in rows for h in r.get("entropy", [])), default=0.0)
    groups: dict = {}
    for r in rows:
        groups.setdefault(r.get("group"), []).append(r)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>rollouts step {step}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>Rollouts at step {step}</h1><div class='meta'>{html.escape(str(run_dir))} · {len(rows)} responses"
             f" in {len(groups)} group(s) · hover a token for its entropy, advantage, LESS class and log-prob gap</div>",
             _legend(h_max)]  # fmt: skip
    for g, rs in groups.items():
        correct = sum(bool(r.get("correct")) for r in rs)
        parts.append(f"<h2>Group {html.escape(str(g))}: {correct} of {len(rs)} correct · answer "
                     f"{html.escape(str(rs[0].get('answer', '')))}</h2>"
                     f"<div class='prompt'>{html.escape(str(rs[0].get('prompt', '')))}</div>")  # fmt: skip
        parts.append("<div class='group'>" + "".join(_response(r, h_max) for r in rs) + "</div>")
    parts.append("</body></html>")
    return step, "\n".join(parts)


def write_page(run_dir: str | Path, step: int | None = None, out: str | Path | None = None) -> Path:
    step, page = render(run_dir, step)
    out = Path(out) if out else Path(run_dir) / "viewer" / f"step_{step:06d}.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-less view", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a training run's output_dir")
    ap.add_argument("--step", type=int, help="the step to show (default: the last one logged)")
    ap.add_argument("--out", help="HTML path (default RUN_DIR/viewer/step_N.html)")
    args = ap.parse_args(argv)
    try:
        print(f"wrote {write_page(args.run_dir, args.step, args.out)}")
    except run_files.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
