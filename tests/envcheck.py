"""Which packages a rule's conda env provides, and which a job really imported (tests only)."""

import importlib.metadata as md
import json
import re
import sys
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
IGNORED = {"powerclip", "__main__", "__mp_main__", "_distutils_hack", "__future__"}
# Imported only because they happen to be installed in the test venv (try/except imports upstream).
OPTIONAL = {
    "transformers": "open_clip's tokenizer module imports it when installed (Hugging Face tokenizers)",
    "tokenizers": "imported by transformers",
    "tabulate": "torch.distributed's debug handlers import it when installed",
    "wcwidth": "tabulate imports it when installed",
}


def rule_envs() -> dict[str, Path]:
    """rule name -> its conda env file, from rules/*.smk."""
    envs = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=rule )", smk.read_text()):
            name = re.match(r"rule (\w+):", block)
            conda = re.search(r"\n    conda:\n        \"([^\"]+)\"", block)
            if name:
                envs[name.group(1)] = (smk.parent / conda.group(1)).resolve() if conda else None
    return envs


def _requires(dist: str, seen: set[str]) -> None:
    key = canonicalize_name(dist)
    if key in seen:
        return
    seen.add(key)
    try:
        requirements = md.requires(dist) or []
    except md.PackageNotFoundError:
        return
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        _requires(req.name, seen)


def provided(env_file: Path) -> set[str]:
    """Distributions an env installs: its listed packages and (as installed here) their dependencies."""
    spec = yaml.safe_load(env_file.read_text())
    listed = []
    for dep in spec.get("dependencies", []):
        if isinstance(dep, dict):
            listed += [Requirement(p).name for p in dep.get("pip", []) if not p.startswith("-")]
        else:
            listed.append(re.split(r"[=<>! ]", dep)[0])
    seen: set[str] = set()
    for name in listed:
        _requires(name, seen)
    return seen


def needed(modules: list[str]) -> dict[str, str]:
    """Imported top-level modules -> the distribution providing each (stdlib and our package left out)."""
    owners = md.packages_distributions()
    out = {}
    for module in modules:
        if module in IGNORED or module in sys.stdlib_module_names or module.startswith("_"):
            continue
        for dist in owners.get(module, []):
            out[module] = canonicalize_name(dist)
    return out


def snakemake_closure() -> set[str]:
    """Snakemake and its dependencies: a `script:` job imports them from Snakemake's own installation,
    which Snakemake's script preamble appends to sys.path inside any conda env."""
    seen: set[str] = set()
    _requires("snakemake", seen)
    return seen


def script_rules() -> set[str]:
    rules = set()
    for smk in (REPO / "rules").glob("*.smk"):
        for block in re.split(r"\n(?=rule )", smk.read_text()):
            name = re.match(r"rule (\w+):", block)
            if name and "\n    script:" in block:
                rules.add(name.group(1))
    return rules


def check_recorded(record_dir: Path) -> dict[str, list[str]]:
    """rule -> the distributions its jobs imported that its env does not provide."""
    envs, scripts, host = rule_envs(), script_rules(), snakemake_closure()
    missing: dict[str, set[str]] = {}
    for record in Path(record_dir).glob("*.json"):
        data = json.loads(record.read_text())
        env = envs[data["rule"]]
        have = provided(env) | (host if data["rule"] in scripts else set())
        for module, dist in needed(data["modules"]).items():
            if module in OPTIONAL:
                continue
            if dist not in have:
                missing.setdefault(data["rule"], set()).add(f"{dist} (import {module})")
    return {rule: sorted(items) for rule, items in missing.items()}
