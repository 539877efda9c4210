"""The documentation against the code: docs/DESIGN.md's signatures must be the real ones,
and no product file points outside the repository.

In the section "Modules and their public functions", every inline code span that starts
with ``name(`` is a signature. It is looked up in the modules named (as ``pni/....py`` or
``pni/<package>/``) in the same bullet: a module-level function, else a method of the
nearest class named before it in that bullet (``PNIModel(nn.Module)`` ... ``score(images)``).
The written parameters must be the first parameters of the real one, in order (``self``
left out), with the same defaults where a default is written; the parameters left out must
have defaults, unless the list ends with ``...``. After a parameter's name, ``: type`` or a
shape (``features NxE``, ``images (B,3,S,S)``) is documentation and not compared; nor is the
part after ``->``. For a class, ``Name(Base)`` means that ``Base`` is one of its bases.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "DESIGN.md"
SECTION = "## Modules and their public functions"

_CODE = re.compile(r"`([^`]+)`")
_SIGNATURE = re.compile(r"([A-Za-z_]\w*)\(")
_MODULE_PATH = re.compile(r"pni(?:/\w+)*(?:\.py|/)")
_NO_DEFAULT = object()


def _section(markdown: str) -> str:
    if SECTION not in markdown:
        raise AssertionError(f"docs/DESIGN.md has no section {SECTION!r} (renamed? update tests/test_docs.py)")
    return markdown.split(SECTION, 1)[1].split("\n## ", 1)[0]


def _bullets(section: str) -> list[str]:
    """Top-level list items, continuation lines joined."""
    items: list[str] = []
    for line in section.splitlines():
        if line.startswith("- "):
            items.append(line[2:])
        elif items and line.startswith(" "):
            items[-1] += "\n" + line
    return items


def _split_top_level(text: str) -> list[str]:
    """``a, b=(1, 2), c: (R,C,E)`` -> ``['a', 'b=(1, 2)', 'c: (R,C,E)']``."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def _parse_signature(code: str) -> tuple[str, list[tuple[str, Any]], bool] | None:
    """``f(a, b=2, ...) -> X`` -> ``('f', [('a', _NO_DEFAULT), ('b', 2)], True)`` (True: ``...``);
    None when ``code`` is not a call-like signature."""
    match = _SIGNATURE.match(code)
    if not match:
        return None
    depth, end = 0, None
    for i in range(match.end() - 1, len(code)):
        depth += {"(": 1, ")": -1}.get(code[i], 0)
        if depth == 0:
            end = i
            break
    if end is None:
        return None
    params: list[tuple[str, Any]] = []
    more = False
    for part in _split_top_level(code[match.end() : end]):
        if part == "...":
            more = True
            continue
        name_match = re.match(r"\*{0,2}([A-Za-z_][\w.]*)", part)
        if not name_match:
            raise AssertionError(f"docs/DESIGN.md: cannot read parameter {part!r} in `{code}`")
        rest = part[name_match.end() :].strip()
        default: Any = _NO_DEFAULT
        if rest.startswith("="):
            try:
                default = ast.literal_eval(rest[1:].strip())
            except (ValueError, SyntaxError):
                default = rest[1:].strip()  # compared with the real default's repr
        params.append((name_match.group(1), default))
    return match.group(1), params, more


def _module_name(path: str) -> str:
    return path.removesuffix(".py").rstrip("/").replace("/", ".")


def _resolve(name: str, modules: list[ModuleType], before: str) -> tuple[str, Any] | None:
    """The object ``name`` names in a bullet: a module attribute, else a method of the nearest
    class written (in backticks) before it in the bullet."""
    for module in modules:
        obj = getattr(module, name, None)
        if obj is not None and getattr(obj, "__module__", None) == module.__name__:
            return f"{module.__name__}.{name}", obj
    for module in modules:
        if getattr(module, name, None) is not None:
            return f"{module.__name__}.{name}", getattr(module, name)
    for code in reversed(_CODE.findall(before)):
        cls_name = re.match(r"[A-Z]\w*", code)
        if cls_name is None:
            continue
        for module in modules:
            cls = getattr(module, cls_name.group(0), None)
            if inspect.isclass(cls) and callable(getattr(cls, name, None)):
                return f"{module.__name__}.{cls.__name__}.{name}", getattr(cls, name)
    return None


def _default_matches(written: Any, real: Any) -> bool:
    if isinstance(written, str) and not isinstance(real, str):
        return written == repr(real)
    return type(written) is type(real) and written == real


def signature_problems(markdown: str) -> list[str]:
    """One line per signature in DESIGN.md's module section that does not match the code."""
    problems: list[str] = []
    for bullet in _bullets(_section(markdown)):
        paths = _MODULE_PATH.findall(" ".join(_CODE.findall(bullet)))
        modules: list[ModuleType] = []
        for path in paths:
            if importlib.util.find_spec(_module_name(path)) is None:
                problems.append(f"docs/DESIGN.md names {path}, which does not exist")
            else:
                modules.append(importlib.import_module(_module_name(path)))
        for match in _CODE.finditer(bullet):
            code = " ".join(match.group(1).split())
            parsed = _parse_signature(code)
            if parsed is None:
                continue
            name, params, more = parsed
            where = " ".join(paths) or "(no module named in its bullet)"
            found = _resolve(name, modules, bullet[: match.start()])
            if found is None:
                problems.append(f"docs/DESIGN.md `{code}`: no {name} in {where} (moved or renamed?)")
                continue
            qualname, obj = found
            if inspect.isclass(obj):
                bases = {base.__name__ for base in obj.__mro__[1:]}
                missing = [p for p, _ in params if p.split(".")[-1] not in bases]
                if missing:
                    problems.append(f"docs/DESIGN.md `{code}`: {qualname} does not derive from {', '.join(missing)}")
                continue
            problem = _compare(params, more, inspect.signature(obj))
            if problem:
                problems.append(f"docs/DESIGN.md `{code}`: the code has {qualname}{_plain(obj)}: {problem}")
    return problems


def _plain(obj: Any) -> str:
    """The signature without annotations and ``self``: ``(chunks, n_total, device='cpu')``."""
    signature = inspect.signature(obj)
    params = [p.replace(annotation=p.empty) for p in signature.parameters.values() if p.name not in ("self", "cls")]
    return str(signature.replace(parameters=params, return_annotation=signature.empty))


def _compare(written: list[tuple[str, Any]], more: bool, signature: inspect.Signature) -> str | None:
    real = [p for p in signature.parameters.values() if p.name not in ("self", "cls")]
    for i, (name, default) in enumerate(written):
        if i >= len(real):
            return f"parameter {name!r} is not in the code"
        if name != real[i].name:
            return f"parameter {i + 1} is {name!r} here, {real[i].name!r} in the code"
        if default is not _NO_DEFAULT and not _default_matches(default, real[i].default):
            return f"default of {name!r} is {default!r} here, {real[i].default!r} in the code"
    required = [
        p.name for p in real[len(written) :] if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required and not more:
        return f"required parameter(s) {', '.join(required)} left out (write them, or end the list with '...')"
    return None


def test_design_signatures_match_the_code() -> None:
    problems = signature_problems(DESIGN.read_text())
    assert not problems, "docs/DESIGN.md is stale:\n" + "\n".join(problems)


def test_design_lists_signatures_at_all() -> None:
    # The check above must have something to check: the section keeps its form.
    section = _section(DESIGN.read_text())
    signatures = [p for p in (_parse_signature(" ".join(c.split())) for c in _CODE.findall(section)) if p]
    assert {"build_datasets", "greedy_coreset", "score_image", "load_model"} <= {name for name, _, _ in signatures}


_FAKE = """# x
## Modules and their public functions
- `pni/cli.py`: `parse_devices(devices)`, `warn(message)`.
- `pni/cli.py`: `run_cli(main, debug=False)`, `nan_on_error(fn, *args, what)`.
- `pni/data/synthetic.py`: `make_dataset(output_path, ...)`; `CategorySpec(object)`.
- `pni/features.py`: `PatchFeatureExtractor(nn.Module)`: `forward(images (B,3,H,W)) -> (B, R, C, E)`.
## Next
- `pni/cli.py`: `warn(nonsense)` is outside the section.
"""


def test_checker_accepts_true_signatures() -> None:
    assert signature_problems(_FAKE) == []


@pytest.mark.parametrize(
    "old, new, says",
    [
        ("`warn(message)`", "`warn(text)`", "parameter 1 is 'text' here, 'message' in the code"),
        ("debug=False)`", "debug=True)`", "default of 'debug' is True here, False in the code"),
        ("`run_cli(main, ", "`run_cli(", "parameter 1 is 'debug' here, 'main' in the code"),
        ("`nan_on_error(fn, *args, what)`", "`nan_on_error(fn)`", "required parameter(s) what left out"),
        (
            "output_path, ...)",
            "output_path, num_train, num_test_per_type, image_size, seed, categories, overwrite, colour)",
            "parameter 'colour' is not in the code",
        ),
        ("`parse_devices(", "`parse_device(", "`parse_device(devices)`: no parse_device in pni/cli.py (moved"),
        ("`forward(images ", "`forward(image ", "PatchFeatureExtractor.forward"),
        ("`forward(images ", "`forward(image ", "parameter 1 is 'image' here, 'images' in the code"),
        ("`pni/cli.py`: `parse", "`pni/cli2.py`: `parse", "docs/DESIGN.md names pni/cli2.py, which does not exist"),
        ("(nn.Module)`", "(nn.Sequential)`", "PatchFeatureExtractor does not derive from nn.Sequential"),
    ],
)
def test_checker_reports_what_is_wrong(old: str, new: str, says: str) -> None:
    assert old in _FAKE
    problems = signature_problems(_FAKE.replace(old, new, 1))
    assert any(says in p for p in problems), problems


def test_product_files_do_not_point_outside_the_repository():
    repo = DESIGN.parents[1]
    files = ["README.md", "Makefile", "pyproject.toml", *map(str, Path(repo).glob("*.py"))]
    files += [
        str(p)
        for d in ("pni", "analysis_code", "scripts", "docs")
        for p in (repo / d).rglob("*")
        if p.suffix in (".py", ".sh", ".md")
    ]
    offenders = [f for f in files if "../shared/" in (repo / f).read_text()]
    assert offenders == []
    assert (repo / "docs" / "METHOD.md").is_file()
