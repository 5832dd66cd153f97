"""The report's jinja2 templates: where they are, and the environment that renders them."""

from __future__ import annotations

from pathlib import Path

from bench.report.exports import _cell_text

#: The checkout's reports/templates/ (DESIGN.md), or the copy that an installed wheel carries
#: as bench/templates/ (pyproject.toml maps one onto the other).
TEMPLATE_DIRS = (Path(__file__).resolve().parents[2] / "reports" / "templates",
                 Path(__file__).resolve().parents[1] / "templates")


def _template_env():
    import jinja2

    dirs = [str(d) for d in TEMPLATE_DIRS if d.is_dir()]
    if not dirs:
        raise FileNotFoundError(f"report templates not found in {[str(d) for d in TEMPLATE_DIRS]}")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(dirs),
                             autoescape=jinja2.select_autoescape(["html", "j2"]),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.globals["cell_text"] = _cell_text
    return env


def _read_template_file(name: str) -> str:
    for d in TEMPLATE_DIRS:
        if (d / name).is_file():
            return (d / name).read_text(encoding="utf-8")
    return ""
