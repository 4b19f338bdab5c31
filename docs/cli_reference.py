"""Generate docs/cli.md, the flag reference of every entry point, from their own argparse parsers.

    python docs/cli_reference.py            # rewrite docs/cli.md
    python docs/cli_reference.py --check    # exit 1 if docs/cli.md is stale (tests/test_cli_reference.py)

Entry points are found, not listed: the repository's top-level scripts and ``benchmarks/*.py`` with a
``__main__`` block, and every module under data/, evaluation/, model/, training/ with one (``python -m``).
Each is run in this process as ``__main__`` with ``--help``; the first parser that parses is captured
before it acts, and its help is formatted at a fixed width (help text is stable across machines).
An entry point whose code runs no argparse parser is listed without flags.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import runpy
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OUTPUT = REPO_ROOT / "docs" / "cli.md"
PACKAGES = ("data", "evaluation", "model", "training")
WIDTH = 100
MAIN_GUARD = ('if __name__ == "__main__"', "if __name__ == '__main__'")


class _Captured(BaseException):  # BaseException: passes through the entry points' `except Exception`
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _has_main(path: Path) -> bool:
    text = path.read_text(encoding="utf-8")
    return any(guard in text for guard in MAIN_GUARD)


def entry_points() -> list[tuple[str, str, str]]:
    """(command shown in the docs, kind 'path' or 'module', target), in a stable order."""
    found = [(f"python {p.name}", "path", str(p)) for p in sorted(REPO_ROOT.glob("*.py")) if _has_main(p)]
    found += [(f"python benchmarks/{p.name}", "path", str(p))
              for p in sorted((REPO_ROOT / "benchmarks").glob("*.py")) if _has_main(p)]
    for package in PACKAGES:
        for p in sorted((REPO_ROOT / package).rglob("*.py")):
            if p.name != "__init__.py" and _has_main(p):
                module = ".".join(p.relative_to(REPO_ROOT).with_suffix("").parts)
                found.append((f"python -m {module}", "module", module))
    return found


def capture_parser(kind: str, target: str, prog: str) -> argparse.ArgumentParser | None:
    """Run the entry point with --help until its first parse; return that parser (None: it parsed nothing)."""
    original = argparse.ArgumentParser.parse_known_args

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    saved_argv = sys.argv[:]
    sys.argv = [prog, "--help"]
    argparse.ArgumentParser.parse_known_args = capture  # parse_args goes through parse_known_args
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if kind == "path":
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
    except _Captured as captured:
        return captured.parser
    except SystemExit:
        return None
    finally:
        argparse.ArgumentParser.parse_known_args = original
        sys.argv = saved_argv
    return None


def _portable(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Write the checkout's path as <repo> in defaults and help *before* argparse wraps the lines, so
    the wrapping (and the file) is the same wherever the repository is cloned."""
    def strip(value):
        return value.replace(str(REPO_ROOT), "<repo>") if isinstance(value, str) else value
    parser.description, parser.epilog = strip(parser.description), strip(parser.epilog)
    for action in parser._actions:
        action.help, action.default = strip(action.help), strip(action.default)
    return parser


def _help(parser: argparse.ArgumentParser) -> str:
    text = _portable(parser).format_help()
    for action in parser._actions:  # subcommands, if any: their own flags too
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                text += f"\n--- subcommand {name} ---\n" + _portable(sub).format_help()
    return text.replace(str(REPO_ROOT), "<repo>").rstrip() + "\n"


def render() -> str:
    os.environ["COLUMNS"] = str(WIDTH)  # argparse wraps at the terminal width
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    sections, toc = [], []
    for command, kind, target in entry_points():
        prog = command.removeprefix("python ").split("/")[-1]
        parser = capture_parser(kind, target, prog)
        anchor = command.lower().replace(" ", "-").replace(".", "").replace("/", "")
        toc.append(f"- [`{command}`](#{anchor})")
        body = _help(parser) if parser is not None else "(no command-line flags)\n"
        sections.append(f"## {command}\n\n```text\n{body}```\n")
    header = ("# Command-line reference\n\n"
              "Every entry point's `--help`, generated from its argparse parser by `python docs/cli_reference.py`.\n"
              "Do not edit by hand: after changing a flag, run that command (`tests/test_cli_reference.py` fails\n"
              "while this file is stale).\n\n")
    return header + "\n".join(toc) + "\n\n" + "\n".join(sections)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Generate docs/cli.md from every entry point's argparse parser.")
    p.add_argument("--check", action="store_true", help="Do not write; exit 1 if docs/cli.md differs.")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.is_file() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(REPO_ROOT)} is stale: run `python docs/cli_reference.py`", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
