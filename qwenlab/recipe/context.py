"""The state a recipe run carries between stages: named models, the run folder, figures, report."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from qwenlab.errors import QwenlabError

# A model name becomes a folder name (models/NAME, swarm/NAME, cards/NAME.md), so it is one plain path
# component: no separator, no '..', no leading dot (temporary siblings are hidden), no '+' (merges read
# BASE+ADAPTER), and not NAME.partial (a training run's work folder).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def is_plain_name(name) -> bool:
    return isinstance(name, str) and bool(_PLAIN_NAME.fullmatch(name)) and ".." not in name \
        and not name.endswith(".partial")


def check_name(name, where: str) -> str:
    """`name` if it is a plain folder name; else a one-line QwenlabError naming `where` (the field)."""
    if not is_plain_name(name):
        raise QwenlabError(f"{where}: {name!r} is not a plain name; expected letters, digits, '.', '_' or '-' "
                           "(at most 100, no path separators, no '..'), e.g. sft-arithmetic")
    return name


@dataclass
class RunContext:
    run_dir: Path
    models: dict[str, str] = field(default_factory=dict)  # name -> folder (or 'nano')
    figures: dict[str, dict] = field(default_factory=dict)  # stage id -> figures (JSON-able)
    sections: list[str] = field(default_factory=list)  # report.md sections, in stage order

    def model_path(self, name: str) -> str:
        if name in self.models:
            return self.models[name]
        if name == "nano" or Path(name).is_dir():
            return name
        raise QwenlabError(f"recipe: unknown model '{name}'; known: {', '.join(self.models) or 'none'}")

    def model_dir(self, name: str, where: str = "recipe") -> Path:
        """run_dir/models/NAME, refused unless NAME is a plain name that stays inside models/."""
        check_name(name, where)
        models = (self.run_dir / "models").resolve()
        path = models / name
        if path.resolve().parent != models:  # e.g. a symlink planted in models/: never write through it
            raise QwenlabError(f"{where}: {name!r} resolves outside the run's models folder {models}")
        return self.run_dir / "models" / name

    def new_model_dir(self, name: str, where: str = "recipe") -> Path:
        """Where a stage writes a model it makes; registered under `name` for later stages."""
        path = self.model_dir(name, where)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.models[name] = str(path)
        return path

    def record(self, stage_id: str, figures: dict, section: str) -> None:
        self.figures[stage_id] = figures
        self.sections.append(section)
        self.save()

    def save(self) -> None:
        """figures.json and report.md, each replaced whole: an interruption never leaves half a report."""
        from qwenlab.checkpoint.writer import write_text_atomic

        write_text_atomic(self.run_dir / "figures.json", json.dumps(self.figures, indent=2, default=str) + "\n")
        write_text_atomic(self.run_dir / "report.md", "\n\n".join(self.sections) + "\n")
