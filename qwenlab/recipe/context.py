"""The state a recipe run carries between stages: named models, the run folder, figures, report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from qwenlab.errors import QwenlabError


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

    def new_model_dir(self, name: str) -> Path:
        """Where a stage writes a model it makes; registered under `name` for later stages."""
        path = self.run_dir / "models" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self.models[name] = str(path)
        return path

    def record(self, stage_id: str, figures: dict, section: str) -> None:
        self.figures[stage_id] = figures
        self.sections.append(section)
        self.save()

    def save(self) -> None:
        (self.run_dir / "figures.json").write_text(json.dumps(self.figures, indent=2, default=str) + "\n")
        (self.run_dir / "report.md").write_text("\n\n".join(self.sections) + "\n")
