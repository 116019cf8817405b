"""Recipes: multi-stage pipelines whose later steps consume earlier runs.

    name: quickstart
    steps:
      - name: encdec
        stage: pretrain
        overrides: [model=small, objective=seq2seq]
      - name: answers
        generate:
          model: ${runs.encdec}
          synthetic_questions: 5        # or prompts: [...]

      - name: summary                   # tables read from the runs (slmctl.summary)
        summary:
          architecture: {eval: ${runs.eval}, bench: ${runs.bench}, models: [encdec, deconly]}

`${runs.<step>}` is replaced by the run directory that step produced. Every stage step (and the
summary) writes its own run directory; the recipe stops at the first failing step.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from slmctl.errors import ConfigError, first_line

STEP_KINDS = ("stage", "generate", "summary")
STEP_REFERENCE = re.compile(r"\$\{runs\.([A-Za-z0-9_-]+)\}")
console = Console()


def load_recipe(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"no such recipe: {path}")
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {first_line(e)}") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("steps"), list) or not recipe["steps"]:
        raise ConfigError(f"{path}: a recipe needs a non-empty 'steps' list")
    names = set()
    for number, step in enumerate(recipe["steps"], 1):
        if not isinstance(step, dict) or "name" not in step:
            raise ConfigError(f"{path}: step {number} needs a 'name'")
        if sum(kind in step for kind in STEP_KINDS) != 1:
            raise ConfigError(f"{path}: step {step['name']!r} needs exactly one of {', '.join(map(repr, STEP_KINDS))}")
        if "summary" in step:
            from slmctl.summary import check_spec

            check_spec(step["summary"], f"{path}: step {step['name']!r}")
        for ref in STEP_REFERENCE.findall(yaml.safe_dump(step)):
            if ref not in names:
                raise ConfigError(f"{path}: step {step['name']!r} uses ${{runs.{ref}}} before a step named {ref!r} ran")
        names.add(step["name"])
    return recipe


def _substitute(value, produced: dict[str, Path]):
    if isinstance(value, str):
        return STEP_REFERENCE.sub(lambda m: str(produced[m.group(1)]), value)
    if isinstance(value, list):
        return [_substitute(v, produced) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, produced) for k, v in value.items()}
    return value


def run_recipe(path: Path, runs_dir: Path, verbose: bool = False) -> dict[str, Path]:
    """Run every step in order through the stage runner (so a step ends, is interrupted or fails
    exactly as the same stage run alone); returns {step name: run directory}. The first step
    that does not succeed ends the recipe with its StageEnded."""
    from slmctl.runner import run_stage

    recipe = load_recipe(Path(path))
    produced: dict[str, Path] = {}
    started = time.perf_counter()
    for step in recipe["steps"]:
        step = _substitute(step, produced)
        if "generate" in step:
            _generate_step(step["name"], step["generate"], runs_dir)
            continue
        if "summary" in step:
            from slmctl.summary import run_summary

            console.rule(f"[bold]{escape(recipe.get('name', path.stem))}: {escape(step['name'])}[/bold] (summary)")
            produced[step["name"]] = run_summary(step["name"], step["summary"], runs_dir, console,
                                                 argv=["slmctl", "recipe", "run", str(path), f"#{step['name']}"])
            continue
        stage, overrides = step["stage"], [str(o) for o in step.get("overrides", [])]
        console.rule(f"[bold]{escape(recipe.get('name', path.stem))}: {escape(step['name'])}[/bold] "
                     f"({escape(stage + ' ' + ' '.join(overrides))})")
        consumed = [(f"${{runs.{ref}}}", produced[ref]) for ref in STEP_REFERENCE.findall(yaml.safe_dump(step))]
        run = run_stage(stage, overrides, runs_dir=runs_dir, name=step["name"], verbose=verbose, inputs=consumed,
                        argv=["slmctl", "recipe", "run", str(path), f"#{step['name']}"])
        produced[step["name"]] = run.path
    console.print(f"[green]recipe finished in {time.perf_counter() - started:.0f} s[/green]")
    return produced


def _generate_step(name: str, spec: dict, runs_dir: Path) -> None:
    from slmctl.runtime.generator import generate_text, load_generator

    generator = load_generator(spec["model"], runs_dir)
    prompts = [(p, None) for p in spec.get("prompts", [])]
    if spec.get("synthetic_questions"):
        from slmctl.data.synthetic import SyntheticWorld

        world = SyntheticWorld(seed=spec.get("seed", 0), n_people=spec.get("n_people", 500))
        examples = world.qa(split="test", n=int(spec["synthetic_questions"]), min_facts=spec.get("min_facts", 4),
                            max_facts=spec.get("max_facts", 8))
        prompts += [(e["source"], e["target"]) for e in examples]
    table = Table(title=f"{name}: {generator.path}", show_lines=True)
    table.add_column("question")
    table.add_column("expected")
    table.add_column("generated")
    correct = 0
    for prompt, expected in prompts:
        answer = generate_text(generator, prompt, max_new_tokens=int(spec.get("max_new_tokens", 16))).strip()
        question = prompt.split("###Question\n", 1)[-1].split("\n", 1)[0] if "###Question" in prompt else prompt
        table.add_row(question, expected or "", answer)
        correct += int(expected is not None and answer == expected)
    console.print(table)
    labelled = sum(1 for _, e in prompts if e is not None)
    if labelled:
        console.print(f"exact match: {correct}/{labelled}", highlight=False)
