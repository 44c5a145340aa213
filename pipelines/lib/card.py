"""Model cards from a lineage record (the studio's `store.ancestry`): Hub YAML metadata with the
evaluation results, and a body telling how the model was made (data and its hash, teacher, method
and hyperparameters, quantization recipe, quality gate, measured speed on which hardware) with
usage snippets. Checked locally before anything is uploaded."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pipelines.base import StepError, fmt
from pipelines.lib.stats import with_interval

BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
KIND_TEXT = {
    "onnx": "an ONNX Runtime GenAI model",
    "model": "a transformers model",
    "adapter": "a LoRA adapter",
    "dataset": "a dataset",
}


def model_card(lineage: dict[str, Any], repo_id: str, license: str = "apache-2.0") -> str:  # noqa: A002
    """README.md for the artifact in `lineage`, to be published as `repo_id`."""
    from huggingface_hub import ModelCardData

    artifact, runs = lineage["artifact"], lineage["runs"]
    kind = artifact["kind"]
    base = base_model(runs)
    data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        base_model=base,
        datasets=[d for d in _datasets(runs) if HUB_ID.match(d)] or None,
        library_name={"adapter": "peft", "onnx": "onnxruntime-genai"}.get(kind, "transformers"),
        pipeline_tag="text-generation",
        license=license,
        tags=_tags(kind, runs),
        eval_results=_eval_results(lineage) or None,
    )
    if base:
        relation = {"onnx": "quantized", "adapter": "adapter"}.get(kind)
        if relation is None:
            relation = "finetune" if _step(runs, "finetune") else None
        if relation:
            data.base_model_relation = relation
    return f"---\n{data.to_yaml()}\n---\n\n{_body(lineage, repo_id)}"


def check_card(text: str) -> None:
    """Parse the card as the Hub will; StepError naming what is wrong."""
    import yaml
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except (ValueError, yaml.YAMLError) as e:
        raise StepError(f"the model card's metadata is not valid: {e}") from None
    required = ("license", "pipeline_tag", "library_name", "tags")
    missing = [k for k in required if not card.data.get(k)]
    if missing:
        raise StepError(f"the model card lacks {', '.join(missing)}")
    for result in card.data.eval_results or []:
        if not isinstance(result.metric_value, (int, float)):
            raise StepError(f"the card's result '{result.metric_type}' is not a number")
    if len(card.text.strip()) < 100:
        raise StepError("the model card's body is empty")


def base_model(runs: list[dict[str, Any]]) -> str | None:
    """The Hub id this model descends from, if it has one (local folders have none)."""
    for run in runs:
        spec = run["config"].get("base_model") or (
            run["config"].get("model") if run["step"] == "quantize" else None
        )
        if spec in ("", "bundled"):
            return BUNDLED_HUB_ID
        if isinstance(spec, str) and HUB_ID.match(spec) and not Path(spec).exists():
            return spec
    return None


def label(value: Any) -> str:
    """A model or file as the card shows it: never a path of this machine."""
    text = str(value)
    if text in ("", "bundled"):
        return f"{BUNDLED_HUB_ID} (bundled)"
    match = re.search(r"runs/([\w-]+)/out/([^/\s]+)", text)
    if match:
        return f"{match.group(2)} of run {match.group(1)}" + text[match.end() :].split(" at ")[0]
    return Path(text).name if text.startswith(("/", "~", ".")) else text


def _step(runs: list[dict[str, Any]], step: str) -> dict[str, Any] | None:
    found = [r for r in runs if r["step"] == step]
    return found[-1] if found else None


def _datasets(runs: list[dict[str, Any]]) -> list[str]:
    return [r["config"]["hub_dataset"] for r in runs if r["config"].get("hub_dataset")]


def _tags(kind: str, runs: list[dict[str, Any]]) -> list[str]:
    tags = ["slmops-studio", "text-generation"]
    finetune = _step(runs, "finetune")
    if finetune:
        tags.append(finetune["config"].get("method", "finetune"))
        if finetune["summary"].get("distillation") or _step(runs, "synthesize"):
            tags.append("distillation")
    quantize = _step(runs, "quantize")
    if kind == "onnx" or quantize:
        tags += ["onnx", "onnxruntime-genai"] if kind == "onnx" else []
        if quantize:
            tags.append(quantize["config"].get("precision", ""))
    return [t for t in dict.fromkeys(tags) if t]


def _eval_results(lineage: dict[str, Any]) -> list[Any]:
    """model-index entries: the quality gate's measures and the evaluate runs' task metric."""
    from huggingface_hub import EvalResult

    results = []
    quantize = _step(lineage["runs"], "quantize")
    gate = (quantize or {}).get("summary", {}).get("gate") or {}
    quantized = (gate.get("models") or {}).get("quantized") or {}
    prompts = gate.get("prompts", "held-out prompts")
    for metric, value in (
        ("perplexity", quantized.get("perplexity")),
        (gate.get("metric") or "accuracy", quantized.get("metric")),
    ):
        if isinstance(value, (int, float)):
            results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type="slmops-heldout",
                    dataset_name=prompts,
                    metric_type=metric,
                    metric_value=round(float(value), 4),
                )
            )
    for measured in lineage.get("measured", []):
        summary = measured["summary"]
        student = (summary.get("models") or {}).get("student") or {}
        if measured["step"] == "evaluate" and isinstance(student.get("metric"), (int, float)):
            results.append(
                EvalResult(
                    task_type="text-generation",
                    dataset_type="slmops-heldout",
                    dataset_name=f"{summary.get('rows')} {summary.get('split')} rows"
                    + (
                        f" (95% CI {student['ci_low']:.3g}-{student['ci_high']:.3g})"
                        if student.get("ci_low") is not None
                        else ""
                    ),
                    metric_type=summary.get("metric") or "accuracy",
                    metric_value=round(float(student["metric"]), 4),
                )
            )
    return results


def _body(lineage: dict[str, Any], repo_id: str) -> str:
    artifact, runs = lineage["artifact"], lineage["runs"]
    kind = artifact["kind"]
    lines = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"This is {KIND_TEXT.get(kind, kind)}, made with SLMOps Studio in the steps recorded "
        "below. "
        f"Files: {artifact['bytes'] / 2**20:.1f} MB, sha256 `{artifact['sha256'][:16]}...`.",
        "",
        "## How it was made",
        "",
    ]
    for n, run in enumerate(runs, 1):
        lines.append(f"{n}. {_run_line(run)}")
    lines.append("")
    lines += _gate_section(_step(runs, "quantize"))
    lines += _measured_section(lineage.get("measured", []))
    lines += _usage(kind, repo_id)
    return "\n".join(lines) + "\n"


def _run_line(run: dict[str, Any]) -> str:
    c, s, step = run["config"], run["summary"], run["step"]
    ran = f" (run `{run['id']}`)"
    if step == "dataset":
        source = c.get("hub_dataset") or ", ".join(Path(f).name for f in c.get("files", []))
        return (
            f"**Dataset** '{run['name'] or 'dataset'}'{ran}: imported from {source}; "
            f"{s.get('rows_kept', '?')} of {s.get('rows_read', '?')} rows kept, splits "
            f"{_splits(s)}, content hash `{s.get('content_hash', '?')}`."
        )
    if step == "synthesize":
        return (
            f"**Teacher answers**{ran}: {label(s.get('teacher') or c.get('teacher'))} answered "
            f"{s.get('valid', '?')} of {s.get('rows', '?')} prompts (success "
            f"{fmt(_pct(s.get('success_ratio')), '{:.0f}', '%')}, temperature "
            f"{c.get('temperature')}), splits {_splits(s)}, content hash "
            f"`{s.get('content_hash', '?')}`."
        )
    if step == "finetune":
        method = c.get("method", "?")
        lora = f" r={c.get('lora_r')}, alpha={c.get('lora_alpha')}," if "lora" in method else ""
        kd = s.get("distillation") or {}
        teacher = (
            f" Distilled from {label(c.get('teacher'))} "
            f"({', '.join(f'{k}={v}' for k, v in kd.items() if not isinstance(v, (dict, list)))})."
            if c.get("teacher")
            else ""
        )
        return (
            f"**Finetuning**{ran}: {method} of {label(c.get('base_model'))},{lora} "
            f"{s.get('steps', '?')} steps, learning rate {c.get('learning_rate')}, batch "
            f"{c.get('batch_size')}, max length {c.get('max_seq_len')}; train loss "
            f"{fmt(s.get('train_loss_first'))} -> {fmt(s.get('train_loss'))}, validation loss "
            f"{fmt(s.get('eval_loss_before'))} -> {fmt(s.get('eval_loss'))}.{teacher}"
        )
    if step == "quantize":
        return (
            f"**Quantization**{ran}: {s.get('recipe') or c.get('precision')} with the "
            f"onnxruntime-genai model builder (format {c.get('format')}, target "
            f"{c.get('execution_provider')}, algorithm {c.get('algorithm')}, block size "
            f"{c.get('block_size')}, symmetric {c.get('symmetric')}, accuracy level "
            f"{c.get('accuracy_level')}, adapter {c.get('adapter')})."
        )
    return f"**{step}**{ran}: {run['name']}."


def _gate_section(quantize: dict[str, Any] | None) -> list[str]:
    gate = (quantize or {}).get("summary", {}).get("gate")
    if not gate:
        return []
    lines = [
        "## Quality gate",
        "",
        f"Measured on {gate.get('prompts')}, greedy, against the model before quantization "
        f"({gate.get('hardware') or gate.get('measured_on', 'cpu')}). Verdict: "
        f"**{gate.get('verdict')}**.",
        "",
        "| check | value | target | passed |",
        "|---|---|---|---|",
    ]
    for check in gate.get("checks", []):
        lines.append(
            f"| {check['name']} | {fmt(check['value'])} | {check['op']} {check['target']} | "
            f"{'yes' if check['passed'] else 'no'} |"
        )
    models = gate.get("models") or {}
    if models:
        lines += [
            "",
            "| model | task metric [95% CI] | perplexity | decode tokens/s | memory MB | size MB |",
            "|---|---|---|---|---|---|",
        ]
        for role, m in models.items():
            quality = with_interval(
                m.get("metric"), m.get("ci_low"), m.get("ci_high"), m.get("scored_rows", 0)
            )
            lines.append(
                f"| {role} | {quality} | {fmt(m.get('perplexity'))} | "
                f"{fmt(m.get('decode_tokens_per_s'))} | "
                f"{fmt(m.get('memory_mb'), '{:.0f}')} | {fmt(m.get('size_mb'), '{:.1f}')} |"
            )
    return [*lines, ""]


def _measured_section(measured: list[dict[str, Any]]) -> list[str]:
    lines = []
    benchmarks = [m for m in measured if m["step"] == "benchmark"]
    if benchmarks:
        lines += [
            "## Measured speed",
            "",
            "Served by the studio's OpenAI-compatible runtime, streamed, greedy, a fixed prompt "
            "set after a warm-up.",
            "",
            "| hardware | requests | tokens/s (decode) | first token avg / p95 | latency avg / "
            "p95 | peak memory |",
            "|---|---|---|---|---|---|",
        ]
        for b in benchmarks:
            s = b["summary"]
            lines.append(
                f"| {s.get('hardware')} | {s.get('requests')} | "
                f"{fmt(s.get('decode_tokens_per_s'), '{:.1f}')} | "
                f"{fmt(s.get('ttft_avg_s'), '{:.3f}')} / {fmt(s.get('ttft_p95_s'), '{:.3f}')} s | "
                f"{fmt(s.get('latency_avg_s'), '{:.2f}')} / "
                f"{fmt(s.get('latency_p95_s'), '{:.2f}')} s | "
                f"{fmt(s.get('peak_memory_mb'), '{:.0f}', ' MB')} |"
            )
        lines.append("")
    for e in (m for m in measured if m["step"] == "evaluate"):
        s, r = e["summary"], e["summary"].get("ratios") or {}
        if not lines or lines[-1] != "":
            lines.append("")
        lines += [
            f"Evaluation (run `{e['id']}`, {s.get('rows')} {s.get('split')} rows, "
            f"{s.get('metric')}): the student keeps {fmt(r.get('quality_kept_pct'))}% of the "
            f"teacher's quality with {fmt(r.get('time_saved_pct'))}% less time and "
            f"{fmt(r.get('memory_saved_pct'))}% less memory.",
            "",
        ]
    return lines


def _usage(kind: str, repo_id: str) -> list[str]:
    lines = ["## Usage", ""]
    if kind == "onnx":
        lines += [
            "With onnxruntime-genai:",
            "",
            "```python",
            "import onnxruntime_genai as og",
            "from huggingface_hub import snapshot_download",
            "",
            f'model = og.Model(snapshot_download("{repo_id}"))',
            "tokenizer = og.Tokenizer(model)",
            'messages = \'[{"role": "user", "content": "Hello!"}]\'',
            "params = og.GeneratorParams(model)",
            "params.set_search_options(max_length=512)",
            "generator = og.Generator(model, params)",
            "generator.append_tokens(tokenizer.encode(tokenizer.apply_chat_template(messages, "
            "add_generation_prompt=True)))",
            "stream = tokenizer.create_stream()",
            "while not generator.is_done():",
            "    generator.generate_next_token()",
            '    print(stream.decode(generator.get_next_tokens()[0]), end="", flush=True)',
            "```",
            "",
        ]
    elif kind == "adapter":
        lines += [
            "With transformers and peft:",
            "",
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            "from transformers import AutoTokenizer",
            "",
            f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
            "```",
            "",
        ]
    else:
        lines += [
            "With transformers:",
            "",
            "```python",
            "from transformers import pipeline",
            "",
            f'chat = pipeline("text-generation", model="{repo_id}")',
            'print(chat([{"role": "user", "content": "Hello!"}], max_new_tokens=64))',
            "```",
            "",
        ]
    lines += [
        "Served with an OpenAI-compatible API (`slmops serve` for ONNX folders, or Foundry "
        "Local), with the official `openai` client:",
        "",
        "```python",
        "from openai import OpenAI",
        "",
        'client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")',
        "reply = client.chat.completions.create(",
        f'    model="{repo_id.split("/")[-1]}",',
        '    messages=[{"role": "user", "content": "Hello!"}],',
        ")",
        "print(reply.choices[0].message.content)",
        "```",
    ]
    return lines


def _splits(summary: dict[str, Any]) -> str:
    splits = summary.get("splits") or {}
    return ", ".join(f"{k} {v}" for k, v in splits.items()) or "n/a"


def _pct(ratio: float | None) -> float | None:
    return None if ratio is None else 100 * ratio
