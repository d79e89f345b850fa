"""The CLI reference (docs/cli.md), generated from the command definitions.

Regenerate with ``python -m scnas.cli.reference > docs/cli.md``; a test fails when the file and
the commands drift apart.
"""

from __future__ import annotations

import inspect


def _param_row(param) -> str:
    kind = type(param).__name__
    if kind.endswith("Argument"):
        name = f"`{(param.metavar or param.name).upper()}`"
    else:
        name = ", ".join(f"`{opt}`" for opt in param.opts + list(getattr(param, "secondary_opts", []) or []))
    default = param.default
    shown = "" if param.required or default is None or kind.endswith("Argument") else f"`{default}`"
    if isinstance(default, (tuple, list)):
        shown = f"`{' '.join(map(str, default))}`"
    text = (getattr(param, "help", None) or "").replace("|", "\\|").replace("\n", " ")
    return f"| {name} | {'yes' if param.required else ''} | {shown} | {text} |"


def _command_section(path: str, command) -> list[str]:
    lines = [f"## `scnas {path}`", ""]
    help_text = inspect.cleandoc(command.help or "")
    lines += [help_text, ""] if help_text else []
    params = [p for p in command.params if p.name not in ("help",)]
    if params:
        lines += ["| argument / option | required | default | meaning |", "|---|---|---|---|"]
        lines += [_param_row(p) for p in params]
        lines.append("")
    return lines


def render() -> str:
    """docs/cli.md as text."""
    import typer

    from scnas.cli.main import _register_commands, app

    _register_commands()
    root = typer.main.get_command(app)
    lines = ["# scnas command-line reference", "",
             "Generated from the command definitions by `python -m scnas.cli.reference`; every command also "
             "answers `--help`. Global options: `--debug` (show tracebacks), `--version`.", ""]

    def walk(group, prefix: str) -> None:
        for name in sorted(group.commands):
            command = group.commands[name]
            path = f"{prefix}{name}"
            if hasattr(command, "commands"):
                lines.extend([f"## `scnas {path} ...`", "", inspect.cleandoc(command.help or ""), ""])
                walk(command, f"{path} ")
            else:
                lines.extend(_command_section(path, command))

    walk(root, "")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
