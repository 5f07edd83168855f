"""MkDocs hooks: the command-line reference, generated from the package's own argparse parser.

`docs/reference/cli.md` holds the marker `<!-- cli-reference -->`; at build time it is replaced by one
section per subcommand of `bayes_adalora.cli.build_parser()`, with a table of every flag, its default
and its help. The train flags are built from `TrainConfig`'s fields, so this page follows them.
"""

from __future__ import annotations

import argparse
import re

MARKER = "<!-- cli-reference -->"
DEFAULT_IN_HELP = re.compile(r"\s*\[default: (?P<value>[^\]]*)\]\s*$")


def escape(text: str) -> str:
    """Text for a Markdown table cell, on one line: pipes escaped everywhere; outside `code spans`,
    backslashes, asterisks and angle brackets too (`<TASK>` would otherwise be read as an HTML tag)."""
    parts = " ".join(text.split()).split("`")
    for i, part in enumerate(parts):
        if i % 2 == 0:  # outside a code span
            part = (part.replace("\\", "\\\\").replace("*", "\\*").replace("<", "&lt;")
                    .replace(">", "&gt;"))
        parts[i] = part.replace("|", "\\|")
    return "`".join(parts)


def code(text: str) -> str:
    """Inline code for a table cell (a pipe inside is escaped for the table)."""
    return "`" + text.replace("|", "\\|") + "`"


def expand_help(action: argparse.Action, prog: str) -> str:
    """The action's help as argparse prints it: `%(default)s` and the like expanded, `%%` made `%`."""
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    for name in list(params):
        if hasattr(params[name], "__name__"):
            params[name] = params[name].__name__
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    return action.help % params


def config_default(dest: str):
    """The `TrainConfig` default of the field a train flag was built from (the flag's default is
    argparse.SUPPRESS there, so that only the flags given reach `make_config`)."""
    from bayes_adalora.config import config_fields

    for field in config_fields():
        if field.name == dest:
            return field.default
    return argparse.SUPPRESS


def shown_default(value) -> str:
    if value is argparse.SUPPRESS or value is None:
        return "none"
    if value is True:
        return "on"
    if value is False:
        return "off"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) or "none"
    return str(value)


def action_row(action: argparse.Action, prog: str) -> str:
    help_text = expand_help(action, prog)
    found = DEFAULT_IN_HELP.search(help_text)
    if found:  # the flag's help states its default: show it in the default column
        default = found.group("value")
        help_text = help_text[: found.start()]
    elif not action.option_strings:
        default = "required"
    elif action.default is not argparse.SUPPRESS:
        default = shown_default(action.default)
    else:
        default = shown_default(config_default(action.dest))
        if default == "none" and "default" in help_text:  # worked out by the run plan, as the help says
            default = "auto"
    if action.option_strings:
        flag = ", ".join(code(s) for s in action.option_strings)
        if action.metavar:  # e.g. K, FILE, {auto,NUMBER}
            flag += " " + code(str(action.metavar))
    else:  # a positional argument
        flag = code(action.metavar or action.dest)
    meaning = escape(help_text)
    if action.choices is not None and not action.metavar:
        meaning += " One of: " + ", ".join(code(str(c)) for c in action.choices) + "."
    if default not in ("none", "auto", "required") and " " not in default:
        default = code(default)  # a value; words such as "the run's seed" stay prose
    else:
        default = escape(default)
    return f"| {flag} | {default} | {meaning} |"


def subcommands(parser: argparse.ArgumentParser):
    """(name, help, subparser) for each subcommand, in the parser's order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield name, helps.get(name) or "", sub


def cli_reference() -> str:
    from bayes_adalora.cli import build_parser

    parser = build_parser()
    parts = []
    for name, summary, sub in subcommands(parser):
        parts.append(f"## bayes-adalora {name}\n")
        parts.append(escape(summary[:1].upper() + summary[1:]) + ("" if summary.endswith(".") else ".") + "\n")
        if sub.description:
            parts.append(escape(sub.description) + "\n")
        parts.append("| flag | default | meaning |\n|---|---|---|")
        rows = [action_row(a, sub.prog) for a in sub._actions if not isinstance(a, argparse._HelpAction)]
        parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, cli_reference())
    return markdown
