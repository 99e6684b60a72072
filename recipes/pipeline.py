"""All seven stages in order, each reading the previous stage's output: one before -> after table and one plot.

Order: the Thinker (specialist distillation -> audio distillation -> interaction RL), then the
Talker (pretraining -> DPO -> GSPO -> speaker fine-tune). Every stage is the ordinary recipe,
run in its own run directory ``<pipeline run>/<stage>/run/`` with the overrides in
``stages.<stage>`` (budgets shorter than the stand-alone defaults, so the whole chain fits in
half an hour on 2 CPU cores; change any of them, e.g. ``stages.talker_gspo.max_steps=10``).

Hand-offs are ordinary config keys whose value names an earlier stage's run directory as
``{stage}``: ``policy.path: "{talker_pretrain}/talker"`` makes DPO start from the pretrained
Talker. The defaults (``pipeline.yaml``):
  thinker_specialist_distill  -> ``model/``  -> thinker_audio_distill ``ears.start``: the
      distilled student (same tiny Thinker family and byte-level tokenizer; built with the audio
      student's audio-encoder size) is the model that gets ears and is then distilled from
      text to audio. It cannot be ``student.path`` directly: its audio encoder has never heard
      anything (audio distillation starts from a Thinker whose encoder is aligned), so the
      recipe's ears step (read the task, transcribe its spoken queries) runs on it first.
  thinker_audio_distill -> thinker_interaction_rl: NOT handed off on the embedded default. The
      interaction stage's embedded policy reads the 'conversations' BPE vocabulary (merges
      learned from its own conversations; a prompt ~3x shorter than in bytes) and is first
      warmed up on template conversations; the audio student has the byte-level vocabulary and
      has never seen a conversation, so RL from it has no reward signal to climb, and with
      byte-level prompts the stage would cost ~3x its budget. With real Thinkers (one
      tokenizer, aligned audio encoder) set ``stages.thinker_interaction_rl.policy.path:
      "{thinker_audio_distill}/model"`` (and ``stages.thinker_audio_distill.student.path:
      "{thinker_specialist_distill}/model"``).
  talker_pretrain ``talker/`` -> talker_dpo ``policy.path`` -> its ``talker/`` -> talker_gspo
      ``policy.path`` -> its ``talker/`` -> talker_speaker_ft ``policy.path`` (the base Talker
      the voice adapter belongs to).

``resume=true`` continues the newest unfinished pipeline run (or ``run_name=``): a stage whose
run directory holds ``summary.json`` is skipped, an unfinished one resumes from its own last
checkpoint. A stage that fails stops the pipeline with the stage named.

Target metrics: every stage's own (``<stage>/<metric>`` in summary.json), in one table
(summary.md) and one figure (plots/pipeline.png).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import yaml

from posttrain.config import RunConfig, load_config, option
from posttrain.errors import ConfigError, UserError
from posttrain.logging import Run, RunResult, quiet_libraries, write_json_atomic, write_text_atomic

RECIPE = "pipeline"

#: the stages, in the order they run
STAGES = (
    "thinker_specialist_distill",
    "thinker_audio_distill",
    "thinker_interaction_rl",
    "talker_pretrain",
    "talker_dpo",
    "talker_gspo",
    "talker_speaker_ft",
)

#: the metric each stage is for (marked in the table; the rest are reported alongside)
PRIMARY = {
    "thinker_specialist_distill": ["kl/arithmetic", "kl/strings"],
    "thinker_audio_distill": ["accuracy_gap"],
    "thinker_interaction_rl": ["reward/combined"],
    "talker_pretrain": ["wer"],
    "talker_dpo": ["preference_accuracy"],
    "talker_gspo": ["wer"],
    "talker_speaker_ft": ["speaker_similarity"],
}

STAGE_RUN_NAME = "run"


@dataclass
class Config(RunConfig):
    stages: dict[str, dict[str, Any]] = option({}, "per-stage overrides: stages.<stage>.<key>=value, exactly the keys `posttrain run <stage> --help` lists; a string value may name an earlier stage's run directory as {stage} (the hand-offs)")
    skip: list[str] = option([], "stages not to run (a later stage must then not hand off from them)", choices=list(STAGES))

    def validate(self) -> None:
        for name in self.stages:
            if name not in STAGES:
                import difflib

                close = difflib.get_close_matches(name, STAGES, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ConfigError(f"config key 'stages.{name}': no such stage{hint}; stages: {', '.join(STAGES)}")
            for key in ("output_dir", "run_name", "resume"):
                if key in self.stages[name]:
                    raise ConfigError(f"config key 'stages.{name}.{key}': the pipeline sets it (set {key} of the pipeline instead)")


# --------------------------------------------------------------------------- stage configs


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """``{a: {b: 1}, "c.d": 2}`` -> ``{"a.b": 1, "c.d": 2}``."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def as_override(key: str, value: Any) -> str:
    """``key=value`` as the command line writes it (strings raw, the rest as YAML)."""
    if isinstance(value, str):
        return f"{key}={value}"
    return f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix('...').strip()}"


def handoffs(values: dict[str, Any]) -> dict[str, list[str]]:
    """Key -> the earlier stages its value names as ``{stage}``."""
    return {k: [s for s in STAGES if "{" + s + "}" in v] for k, v in values.items() if isinstance(v, str) and any("{" + s + "}" in v for s in STAGES)}


def substitute(value: str, stage_dirs: dict[str, str]) -> str:
    """``value`` with every ``{stage}`` replaced by that stage's run directory."""
    for stage, folder in stage_dirs.items():
        value = value.replace("{" + stage + "}", folder)
    return value


def stage_reads(cfg: Config, name: str, stage_dirs: dict[str, str]) -> dict[str, str]:
    """The hand-off keys of stage ``name`` and the folders they name."""
    values = flatten(cfg.stages.get(name, {}))
    return {key: substitute(values[key], stage_dirs) for key in handoffs(values)}


def stage_overrides(cfg: Config, name: str, stage_dirs: dict[str, str] | None) -> list[str]:
    """The overrides of stage ``name``: the pipeline's seed, its ``stages.<name>`` keys with
    ``{stage}`` replaced by that stage's run directory, and where it runs. With ``stage_dirs``
    None (checking before anything runs) hand-off keys are left out: their folders do not
    exist yet."""
    values = flatten(cfg.stages.get(name, {}))
    links = handoffs(values)
    out = [f"seed={cfg.seed}"]
    for key, value in values.items():
        if key in links:
            if stage_dirs is None:
                continue
            value = substitute(value, stage_dirs)
        out.append(as_override(key, value))
    return out


def check_stages(cfg: Config) -> dict:
    """Every stage's config built (and so checked) before any stage runs; each hand-off names
    an earlier stage that runs."""
    from recipes import defaults_path, load_recipe

    configs = {}
    for i, name in enumerate(STAGES):
        for key, sources in handoffs(flatten(cfg.stages.get(name, {}))).items():
            for source in sources:
                if source not in STAGES[:i]:
                    raise ConfigError(f"config key 'stages.{name}.{key}': {{{source}}} is not an earlier stage; a stage reads only what ran before it")
                if source in cfg.skip and name not in cfg.skip:
                    raise ConfigError(f"config key 'stages.{name}.{key}' reads {{{source}}}, which skip= leaves out; skip {name} too or drop the hand-off")
        if name in cfg.skip:
            continue
        module = load_recipe(name)
        try:
            configs[name] = load_config(module.Config, defaults_path(name), stage_overrides(cfg, name, None))
        except ConfigError as e:
            raise ConfigError(f"stages.{name}: {e}") from None
    return configs


# --------------------------------------------------------------------------- the table and the plot


def verdict(before, after, better: str) -> str:
    if before is None or after is None:
        return "n/a"
    if after == before:
        return "="
    return "✓" if (after < before if better == "lower" else after > before) else "✗"


def table_rows(results: dict[str, dict]) -> list[dict]:
    """One row per (stage, target metric) of the finished stages' summaries."""
    rows = []
    for name in STAGES:
        if name not in results:
            continue
        for metric, m in results[name]["metrics"].items():
            rows.append({
                "stage": name, "metric": metric, "before": m.get("before"), "after": m.get("after"),
                "better": m.get("better", "higher"), "ok": verdict(m.get("before"), m.get("after"), m.get("better")),
                "primary": metric in PRIMARY.get(name, []),
            })
    return rows


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def format_pipeline_table(rows: list[dict], markdown: bool = False) -> str:
    """stage | metric | before | after | better | ok; the metric each stage is for marked *."""
    header = ["stage", "metric", "before", "after", "better", "ok"]
    body = [[r["stage"], r["metric"] + (" *" if r["primary"] else ""), _fmt(r["before"]), _fmt(r["after"]), r["better"], r["ok"]] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * 2 + ["---"] * 2) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.rjust(w) if i in (2, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(header)] + [fmt(r) for r in body])


def improvement(before, after, better: str) -> float | None:
    """The change in the better direction, relative to the larger of |before| and |after|
    (in [-1, 1] for same-sign values): +1 = all the way, 0 = no change, negative = worse."""
    if before is None or after is None:
        return None
    scale = max(abs(before), abs(after))
    if scale == 0:
        return 0.0
    sign = -1.0 if better == "lower" else 1.0
    return sign * (after - before) / scale


def plot_pipeline(rows: list[dict], path: str, title: str) -> str:
    """One figure: a bar per (stage, metric), the relative change in the better direction,
    labelled with before -> after; green better, red worse; the metric a stage is for in bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["before"] is not None and r["after"] is not None]
    fig, ax = plt.subplots(figsize=(9, 0.32 * max(len(shown), 1) + 1.4))
    ys = list(range(len(shown)))[::-1]
    values = [improvement(r["before"], r["after"], r["better"]) for r in shown]
    ax.barh(ys, values, color=["#2a9d55" if v > 0 else "#c0392b" if v < 0 else "#999999" for v in values], height=0.7)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{r['stage']}: {r['metric']}" for r in shown], fontsize=7)
    for label, r in zip(ax.get_yticklabels(), shown):
        if r["primary"]:
            label.set_fontweight("bold")
    for y, v, r in zip(ys, values, shown):
        ax.text(1.02, y, f"{_fmt(r['before'])} → {_fmt(r['after'])} ({r['better']})", va="center", fontsize=7, transform=ax.get_yaxis_transform())
    stage_edges = [i for i in range(1, len(shown)) if shown[i]["stage"] != shown[i - 1]["stage"]]
    for i in stage_edges:
        ax.axhline(ys[i] + 0.5, color="#cccccc", linewidth=0.8)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("change in the better direction, relative to max(|before|, |after|)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.subplots_adjust(right=0.78)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the recipe


def run(cfg: Config) -> RunResult:
    from recipes import defaults_path, load_recipe

    quiet_libraries()
    check_stages(cfg)  # a typo in the last stage fails before the first one runs
    pipeline = Run(RECIPE, cfg)
    print(f"{RECIPE}: run directory {pipeline.path}; stages: {', '.join(s for s in STAGES if s not in cfg.skip)}", flush=True)
    stage_dirs: dict[str, str] = {}
    results: dict[str, dict] = {}
    record = []
    todo = [s for s in STAGES if s not in cfg.skip]
    for i, name in enumerate(todo, 1):
        stage_dir = os.path.abspath(os.path.join(pipeline.path, name, STAGE_RUN_NAME))  # hand-offs work from any folder
        stage_dirs[name] = stage_dir
        summary_path = os.path.join(stage_dir, "summary.json")
        overrides = stage_overrides(cfg, name, stage_dirs)
        starts = stage_reads(cfg, name, stage_dirs)
        if os.path.exists(summary_path):
            with open(summary_path, encoding="utf-8") as fh:
                results[name] = json.load(fh)
            print(f"\n=== stage {i}/{len(todo)}: {name}: finished before, skipped ({stage_dir})", flush=True)
            record.append({"stage": name, "run_dir": stage_dir, "seconds": results[name].get("seconds"), "ran": False, "reads": starts})
            continue
        resuming = os.path.isdir(stage_dir)
        print(f"\n=== stage {i}/{len(todo)}: {name}" + (" (resuming)" if resuming else "")
              + "".join(f"; {k} = {v}" for k, v in starts.items()), flush=True)
        module = load_recipe(name)
        stage_cfg = load_config(module.Config, defaults_path(name), overrides + [
            f"output_dir={os.path.abspath(pipeline.path)}", f"run_name={STAGE_RUN_NAME}", f"resume={'true' if resuming else 'false'}",
        ])
        started = time.time()
        try:
            result = module.run(stage_cfg)
        except UserError as e:
            raise type(e)(f"pipeline stage {i}/{len(todo)} {name} failed ({stage_dir}): {e}; fix it, then continue with resume=true") from None
        except BaseException:
            print(f"\npipeline stage {i}/{len(todo)} {name} failed ({stage_dir}); the finished stages are kept, continue with resume=true", file=sys.stderr, flush=True)
            raise
        if os.path.normpath(result.run_dir) != os.path.normpath(stage_dir):  # Run chose the folder; hand-offs rely on it
            raise RuntimeError(f"stage {name} wrote {result.run_dir}, not {stage_dir}")
        results[name] = result.summary
        record.append({"stage": name, "run_dir": stage_dir, "seconds": round(time.time() - started, 1), "ran": True, "reads": starts})

    # The table, the figure, summary.json / summary.md.
    rows = table_rows(results)
    seconds = round(time.time() - pipeline.start, 1)
    stage_seconds = round(sum(s["seconds"] or 0 for s in record), 1)  # every stage, this run or an earlier one
    plot = plot_pipeline(rows, os.path.join(pipeline.path, "plots", "pipeline.png"),
                         f"pipeline: every stage's target metrics before → after ({stage_seconds / 60:.1f} min of stages)")
    primary = [r for r in rows if r["primary"]]
    moved = sum(r["ok"] == "✓" for r in primary)
    summary = {
        "recipe": RECIPE,
        "seconds": seconds,
        "stage_seconds": stage_seconds,
        "run_dir": pipeline.path,
        "metrics": {f"{r['stage']}/{r['metric']}": {"before": r["before"], "after": r["after"], "better": r["better"]} for r in rows},
        "primary": {f"{r['stage']}/{r['metric']}": r["ok"] for r in primary},
        "stages": record,
        "plot": plot,
    }
    stage_lines = "\n".join(
        f"| {s['stage']} | {'ran' if s['ran'] else 'skipped (finished before)'} | {s['seconds'] or 0:.0f} | "
        + (", ".join(f"`{k}` = `{os.path.relpath(v, pipeline.path)}`" for k, v in s["reads"].items()) or "its own start") + " |"
        for s in record
    )
    markdown = (
        f"# pipeline {os.path.basename(pipeline.path)}\n\n{format_pipeline_table(rows, markdown=True)}\n\n"
        f"`*` = the metric the stage is for: {moved} of {len(primary)} moved the right way.\n\n"
        f"| stage | this run | seconds | reads |\n|---|---|---:|---|\n{stage_lines}\n\n![pipeline](plots/pipeline.png)\n"
    )
    write_text_atomic(os.path.join(pipeline.path, "summary.md"), markdown)
    write_json_atomic(os.path.join(pipeline.path, "summary.json"), summary)
    print("\n" + format_pipeline_table(rows), flush=True)
    print(f"{RECIPE} done in {seconds:.0f}s ({stage_seconds:.0f}s of stages in all): {moved} of {len(primary)} stage metrics (*) moved the right way  [{pipeline.path}]", flush=True)
    return RunResult(pipeline.path, summary)
