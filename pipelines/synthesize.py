"""Teacher-written training data: the teacher answers a dataset's train and validation prompts,
the answers are checked by the task preset, and the valid ones become a new dataset folder.

Every answer is stored as it arrives (workdir/checkpoints/answers.jsonl), so an interrupted run
resumes without asking the teacher twice for the same prompt and settings.

Run as: python -m pipelines.synthesize --config cfg.json --workdir out/
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.base import (
    CHECKPOINT_DIR,
    Log,
    Progress,
    Reporter,
    StepError,
    StepResult,
    main,
    option,
)
from pipelines.lib.dataset_folder import SPLITS, content_hash, dataset_labels
from pipelines.lib.generation import TeacherFields, check_connection
from pipelines.lib.sampling import Reply
from pipelines.lib.tasks import Task, TaskFields, label_bias
from pipelines.reports import for_step

EXAMPLES = 3  # examples kept per kind of rejection


@dataclass(frozen=True, kw_only=True)
class SynthesizeConfig(TaskFields, TeacherFields):
    dataset_dir: str = option(
        label="Dataset", help="A dataset folder from the Data tab; its prompts go to the teacher."
    )
    splits: str = option(
        "train,validation",
        "Splits to answer",
        "Which splits the teacher answers; the test split is kept with its own answers.",
    )
    max_rows: int = option(0, "Max rows", "At most this many rows per split; 0 answers all.")
    min_success_ratio: float = option(
        0.7,
        "Min success ratio",
        "The run fails when fewer rows than this share get a valid teacher answer.",
    )
    price_input_per_m: float = option(
        0.0, "Price per 1M input tokens", "For the cost estimate of an endpoint (0: no cost)."
    )
    price_output_per_m: float = option(
        0.0, "Price per 1M output tokens", "For the cost estimate of an endpoint."
    )

    def __post_init__(self):
        self.check_task()
        self.check_teacher()
        chosen = [s.strip() for s in self.splits.split(",") if s.strip()]
        if not chosen or set(chosen) - set(SPLITS):
            raise ValueError(f"splits must name some of {', '.join(SPLITS)}, got {self.splits!r}")
        if not 0 <= self.min_success_ratio <= 1:
            raise ValueError(f"min_success_ratio must be in [0, 1], got {self.min_success_ratio}")
        if self.max_rows < 0 or self.price_input_per_m < 0 or self.price_output_per_m < 0:
            raise ValueError("max_rows and prices must be >= 0")

    @property
    def queue(self) -> str:
        return "network" if self.endpoint else "compute"

    @property
    def outputs(self) -> dict[str, str]:
        return {"dataset": "dataset"}


CONFIG = SynthesizeConfig


def run(config: SynthesizeConfig, workdir: Path, report: Reporter) -> StepResult:
    """Ask the teacher, check the answers, write the teacher-answered dataset folder."""
    folder = Path(config.dataset_dir)
    if not (folder / "train.jsonl").exists():
        raise StepError(f"{folder} has no train.jsonl: pick a dataset imported in the Data tab.")
    labels = dataset_labels(folder) if config.task == "classification" else []
    if config.task == "classification" and not labels:
        raise StepError(
            "the classification task needs a label set, and this dataset has none (or more "
            "than 50 distinct answers): import it as classification (text + label), or pick "
            "another task."
        )
    task = config.build(labels)
    chosen = [s.strip() for s in config.splits.split(",") if s.strip()]
    rows = {s: _read(folder / f"{s}.jsonl", config.max_rows) for s in chosen}
    prompts = {s: [task.messages(r) for r in split_rows] for s, split_rows in rows.items()}
    sampling = config.sampling()
    keys = {s: [_key(p, config, sampling) for p in ps] for s, ps in prompts.items()}
    cache = _Cache(workdir / CHECKPOINT_DIR / "answers.jsonl")
    unique = {k: p for s in chosen for k, p in zip(keys[s], prompts[s], strict=True)}
    todo = {k: p for k, p in unique.items() if k not in cache.answers}
    report(
        Log(
            f"{sum(map(len, rows.values()))} rows ({len(unique)} distinct prompts) for "
            f"{config.teacher_id()}; {len(unique) - len(todo)} already answered"
        )
    )
    started = time.monotonic()
    try:
        errors = _ask(config, todo, cache, report, len(unique)) if todo else {}
    finally:
        cache.file.close()
    seconds = time.monotonic() - started

    report(Progress(len(unique), len(unique), "checking answers"))
    out_rows, stats, failures = _check(task, rows, prompts, keys, cache.answers, errors)
    if failures:  # every failed row with its error, next to the run's log
        with (workdir / "failed.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in failures)
        report(
            Log(f"{len(failures)} rows got no answer; each error is in {workdir / 'failed.jsonl'}")
        )
    total = stats["rows"]
    ratio = stats["valid"] / total if total else 0.0
    stats.update(_usage(config, cache.answers.values(), unique.keys(), seconds))
    stats.update(
        teacher=config.teacher_id(),
        engine="endpoint" if config.endpoint else "transformers",
        task=task.name,
        success_ratio=round(ratio, 4),
        system_prompt=task.system_prompt,
        user_template=task.user_template,
    )
    if ratio < config.min_success_ratio:
        raise StepError(_failure_message(stats, config.min_success_ratio))
    final = _write(folder, workdir, out_rows, stats, config, task)
    report(Log(for_step("synthesize", stats).text()))
    meta = {
        "name": f"{_dataset_name(folder)} + {Path(config.teacher).name or config.teacher} answers",
        "rows": sum(stats["splits"].values()),
        "splits": stats["splits"],
        "shape": "messages",
        "teacher": config.teacher_id(),
        "task": task.name,
        "content_hash": stats["content_hash"],
    }
    shutil.rmtree(workdir / CHECKPOINT_DIR, ignore_errors=True)
    return StepResult(artifacts=[("dataset", final.name, meta)], summary=stats)


def _dataset_name(folder: Path) -> str:
    """The name a dataset was imported under (its card's title), else its folder's run."""
    card = folder / "README.md"
    if card.exists():
        for line in card.read_text(encoding="utf-8").splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    return folder.parent.parent.name if folder.name == "dataset" else folder.name


def _read(path: Path, limit: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return rows[:limit] if limit else rows


def _key(messages: list[dict[str, str]], config: SynthesizeConfig, sampling: Any) -> str:
    """Same prompt + same teacher + same settings = same key: asked once, ever, in a run."""
    blob = json.dumps([messages, config.teacher_id(), sampling.__dict__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class _Cache:
    """Answers stored line by line as they arrive; survives a kill (a torn last line is skipped)."""

    def __init__(self, path: Path):
        self.path = path
        self.answers: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the line being written when the process died
                self.answers[item["key"]] = item
            path.unlink()  # a resumed run's file is a hard link to the old run's: write anew
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", encoding="utf-8")
        for item in self.answers.values():
            self.file.write(json.dumps(item, ensure_ascii=False) + "\n")
        self.file.flush()

    def add(self, key: str, reply: Reply) -> None:
        item = {
            "key": key,
            "text": reply.text,
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "seconds": round(reply.seconds, 4),
        }
        self.answers[key] = item
        self.file.write(json.dumps(item, ensure_ascii=False) + "\n")
        self.file.flush()


def _ask(
    config: SynthesizeConfig,
    todo: dict[str, list[dict[str, str]]],
    cache: _Cache,
    report: Reporter,
    total: int,
) -> dict[str, str]:
    """Send the prompts not answered yet; returns the error of each prompt that failed."""
    done = total - len(todo)
    errors: dict[str, str] = {}
    if config.endpoint:
        report(Progress(done, total, "testing the teacher connection"))
        report(Log(check_connection(config, timeout_s=min(config.timeout_s, 30.0))))
    else:
        report(Progress(done, total, f"loading the teacher {config.teacher}"))
    teacher = config.open_teacher()
    sampling = config.sampling()
    keys = list(todo)
    try:
        if config.endpoint:
            replies = teacher.map([todo[k] for k in keys], sampling)
            for i, reply in replies:
                done += 1
                _store(keys[i], reply, cache, errors)
                report(Progress(done, total, f"{done}/{total} answered"))
        else:  # similar lengths together: less padding in each batch
            keys.sort(key=lambda k: len(json.dumps(todo[k])))
            for start in range(0, len(keys), config.batch_size):
                batch = keys[start : start + config.batch_size]
                for key, reply in zip(
                    batch, teacher.generate([todo[k] for k in batch], sampling), strict=True
                ):
                    _store(key, reply, cache, errors)
                done += len(batch)
                report(Progress(done, total, f"{done}/{total} answered"))
    finally:
        teacher.close()
    return errors


def _store(key: str, reply: Reply, cache: _Cache, errors: dict[str, str]) -> None:
    if reply.text is None:
        errors[key] = reply.error
    else:
        cache.add(key, reply)


def _check(
    task: Task,
    rows: dict[str, list[dict[str, Any]]],
    prompts: dict[str, list[list[dict[str, str]]]],
    keys: dict[str, list[str]],
    answers: dict[str, dict[str, Any]],
    errors: dict[str, str],
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any], list[dict[str, Any]]]:
    """Valid answers become rows; the rest are counted by reason, with examples; and the
    rows whose request failed, with their error."""
    out: dict[str, list[dict[str, Any]]] = {}
    rejected, failed = Counter(), Counter()
    examples: dict[str, list[dict[str, str]]] = {}
    answer_counts, reference_counts = Counter(), Counter()
    failures: list[dict[str, Any]] = []
    total = 0
    for split, split_rows in rows.items():
        out[split] = []
        for index, (row, prompt, key) in enumerate(
            zip(split_rows, prompts[split], keys[split], strict=True)
        ):
            total += 1
            prompt_text = prompt[-1]["content"][:120]
            if key not in answers:
                error = errors.get(key, "not answered")
                failed[re.split(r"[:(]", error)[0].strip()] += 1
                failures.append(
                    {"split": split, "row": index, "prompt": prompt_text, "error": error}
                )
                _example(examples, "request failed", prompt_text, error)
                continue
            reply = answers[key]["text"]
            answer, why = task.check(reply)
            if answer is None:
                rejected[why] += 1
                _example(examples, why, prompt_text, reply)
                continue
            reference = task.reference(row)
            if task.labels:
                answer_counts[answer] += 1
                if reference is not None:
                    reference_counts[task.check(reference)[0] or reference] += 1
            new = {k: v for k, v in row.items() if k != "messages"}
            new["messages"] = [
                *prompt,
                {"role": "assistant", "content": task.target(reply, answer)},
            ]
            new["teacher_reply"] = reply
            if reference is not None:
                new["reference"] = reference
            out[split].append(new)
    stats: dict[str, Any] = {
        "rows": total,
        "valid": sum(len(v) for v in out.values()),
        "rejected": dict(rejected),
        "failed": dict(failed),
        "examples": examples,
    }
    if task.labels:
        stats["answer_labels"] = {k: answer_counts.get(k, 0) for k in task.labels}
        stats["answer_bias"] = label_bias(answer_counts, task.labels)
        stats["reference_labels"] = {k: reference_counts.get(k, 0) for k in task.labels}
        stats["reference_bias"] = label_bias(reference_counts, task.labels)
        agree = [
            (task.check(r["reference"])[0] or r["reference"]) == r["messages"][-1]["content"]
            for split_rows in out.values()
            for r in split_rows
            if "reference" in r
        ]
        if agree:
            stats["teacher_accuracy_on_references"] = round(sum(agree) / len(agree), 4)
    return out, stats, failures


def _example(examples: dict[str, list], why: str, prompt: str, reply: str) -> None:
    items = examples.setdefault(why, [])
    if len(items) < EXAMPLES:
        items.append({"prompt": prompt, "reply": (reply or "")[:200]})


def _usage(config: SynthesizeConfig, answers, keys, seconds: float) -> dict[str, Any]:
    keys = set(keys)
    used = [a for a in answers if a["key"] in keys]
    prompt_tokens = sum(a["prompt_tokens"] for a in used)
    completion_tokens = sum(a["completion_tokens"] for a in used)
    cost = (
        prompt_tokens * config.price_input_per_m + completion_tokens * config.price_output_per_m
    ) / 1e6
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "cost": float(f"{cost:.6g}") if cost else None,
        "teacher_seconds": round(seconds, 1),
    }


def _failure_message(stats: dict[str, Any], minimum: float) -> str:
    reasons = {**{f"failed: {k}": v for k, v in stats["failed"].items()}, **stats["rejected"]}
    worst = ", ".join(f"{v} {k}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:3])
    hint = (
        "The teacher could not be reached often enough: check the endpoint, the key and its "
        "rate limit, then resume."
        if stats["failed"]
        else "Its answers don't pass the task's check: pick a stronger teacher or another "
        "task preset, or adjust the prompts."
    )
    return (
        f"only {stats['valid']} of {stats['rows']} rows got a valid teacher answer "
        f"({stats['valid'] / max(stats['rows'], 1):.0%}, the minimum is {minimum:.0%}): "
        f"{worst}. {hint}"
    )


def _write(
    source: Path,
    workdir: Path,
    out_rows: dict[str, list[dict[str, Any]]],
    stats: dict[str, Any],
    config: SynthesizeConfig,
    task: Task,
) -> Path:
    """The dataset folder (chat JSONL per split, flat question/answer JSONL, stats, card)."""

    final, tmp = workdir / "dataset", workdir / "dataset.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "flat").mkdir(parents=True)
    splits = {}
    for split in SPLITS:
        if split in out_rows:
            lines = out_rows[split]
        elif (source / f"{split}.jsonl").exists():  # kept with its own answers (the test set)
            lines = _read(source / f"{split}.jsonl", 0)
        else:
            continue
        splits[split] = len(lines)
        with (
            (tmp / f"{split}.jsonl").open("w", encoding="utf-8") as f,
            (tmp / "flat" / f"{split}.jsonl").open("w", encoding="utf-8") as flat,
        ):
            for row in lines:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                turns = row["messages"]
                question = next((m["content"] for m in turns if m["role"] == "user"), "")
                answer = turns[-1]["content"] if turns[-1]["role"] == "assistant" else ""
                flat.write(json.dumps({"Question": question, "Answer": answer}) + "\n")
    stats["splits"] = splits
    stats["rows_kept"] = sum(splits.values())
    stats["shape"] = "messages"
    if task.labels:
        stats["labels"] = stats["answer_labels"]
    stats["content_hash"] = content_hash(tmp)
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    (tmp / "README.md").write_text(_card(source, stats, config), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def _card(source: Path, stats: dict[str, Any], config: SynthesizeConfig) -> str:
    data_files = "\n".join(
        f"      - split: {s}\n        path: {s}.jsonl" for s, n in stats["splits"].items() if n
    )
    return (
        f"---\nconfigs:\n  - config_name: default\n    data_files:\n{data_files}\n"
        "tags:\n  - slmops-studio\n  - synthetic\n  - distillation\n---\n\n"
        f"# Teacher answers ({stats['task']})\n\n"
        f"The {', '.join(s for s in stats['splits'] if s != 'test')} prompts of `{source}` "
        f"answered by **{stats['teacher']}** (temperature {config.temperature:g}, top_p "
        f"{config.top_p:g}, max {config.max_new_tokens} new tokens, seed {config.seed}); only "
        "answers that pass the task's check are kept. The test split keeps its own answers.\n\n"
        f"System prompt: `{stats['system_prompt']}`\n\n"
        f"Content hash: `{stats['content_hash']}`\n\n"
        f"```\n{for_step('synthesize', stats).text()}\n```\n"
    )


if __name__ == "__main__":
    main(SynthesizeConfig, run)
