"""The one entry layer of every command-line program (recipes/ and tools/): parse, check, run, and report.

`run(program, parser, rules)` is what a program's `__main__` calls:

1. `parse(parser, argv, rules)`: the YAML (`--config file.yaml`) and the command line, with every problem reported
   at once, each naming the key and the fix: unknown keys and options (with the closest valid name), values of the
   wrong type or not among the choices, a YAML key given twice (both line numbers), `--config=file` (a space, not
   `=`), then `rules(values)` on the merged values (ranges, combinations, paths, the output guard).
2. `program(*dataclasses)`.
3. A `checks.ConfigError`, `cai_data.DataError` or `chat_format.TemplateError`, from parsing or from the program, becomes its message on stderr
   and exit status 2: never a traceback. A save that ran out of space (`run_dir.DiskFull`) exits with 74.

The parser is a `trl.TrlParser` over the program's dataclasses; only its public API is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys

import cai_data
import chat_format
import checks
import run_dir


# --------------------------------------------------------------------------------------------- YAML


class DuplicateKeys(ValueError):
    pass


def _unique_key_loader():
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """SafeLoader that refuses a mapping key given twice (PyYAML silently keeps the last value)."""

        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, str) and key in seen:
                    raise DuplicateKeys(f"{key}: given twice (lines {seen[key]} and {line}); keep one of them.")
                if isinstance(key, str):
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def read_yaml(path: str) -> tuple[dict, list[str]]:
    """(mapping, problems) of a YAML config file."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.load(f, Loader=_unique_key_loader()) or {}  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        return {}, [f"--config: {path} does not exist{checks.where(path)}. Check the path."]
    except IsADirectoryError:
        return {}, [f"--config: {path} is a folder; give the YAML file."]
    except DuplicateKeys as e:
        return {}, [f"{e} (in {path})"]
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        return {}, [f"--config: {path} is not valid YAML: {e}".replace("\n", " ")]
    if not isinstance(config, dict):
        return {}, [f"--config: {path} must be a YAML mapping of `key: value` lines."]
    return config, []


# --------------------------------------------------------------------------------------------- parsing


def fields_of(parser) -> dict[str, dataclasses.Field]:
    """Every key the program takes, from its dataclasses."""
    return {f.name: f for t in parser.dataclass_types for f in dataclasses.fields(t)}


def _type_name(f: dataclasses.Field) -> str:
    return f.type.__name__ if isinstance(f.type, type) else str(f.type).replace("typing.", "")


def _as_argv(key: str, value) -> list[str] | None:
    """The command line that would give `key` this YAML value (None: not checked here, e.g. a mapping)."""
    if value is None or isinstance(value, dict):
        return None
    if isinstance(value, list):
        if any(isinstance(v, (dict, list)) for v in value):
            return None
        return [f"--{key}", *map(str, value)]
    return [f"--{key}={value}"]


def _option_problem(parser, args: list[str], key: str, expected: str, source: str) -> str | None:
    """argparse's own verdict on one option, as one line naming the key (argparse stops at the first error)."""
    try:
        namespace, rest = parser.parse_known_args(args)
    except argparse.ArgumentError as e:
        message = e.message
        choices = re.search(r"choose from (.*)\)", message)
        if "invalid choice" in message and choices:
            valid = re.findall(r"'([^']*)'", choices.group(1))
            got = args[0].split("=", 1)[1] if "=" in args[0] else " ".join(args[1:])
            return f"{key}: {got!r} is not one of {valid}.{checks.closest(got, valid)} Fix `{key}` {source}."
        if "expected one argument" in message and len(args) > 2:
            return f"{key}: got a list {args[1:]}, but it takes a single value ({expected}). Fix `{key}` {source}."
        if "invalid" in message or "expected" in message.lower():  # the type conversion refused the value
            got = args[0].split("=", 1)[1] if "=" in args[0] else " ".join(args[1:])
            kind = "true/false" if expected.startswith("bool") else expected
            return f"{key}: expected {kind}, got {got!r}. Fix `{key}` {source}."
        return f"{key}: {message}. Fix `{key}` {source}."
    if rest:
        return f"{key}: could not read {rest} as {expected}. Fix `{key}` {source}."
    return None


def _cli_groups(argv: list[str]) -> list[list[str]]:
    """The command line cut into options, each with the values that follow it."""
    groups = []
    for a in argv:
        if a.startswith("--") or not groups:
            groups.append([a])
        else:
            groups[-1].append(a)
    return groups


def parse(parser, argv=None, rules=None):
    """The program's dataclasses from `--config file.yaml` and the command line, or a ConfigError listing every
    problem. `rules(values)`, a function of the flat mapping of all keys, returns more problems (ranges, paths...)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    problems, config, config_path = [], {}, None
    for a in argv:
        if a.startswith("--config="):
            problems.append(f"--config: write `--config {a.split('=', 1)[1]}` (a space, not `=`).")
    argv = [a for a in argv if not a.startswith("--config=")]
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            problems.append("--config: give the YAML file after it: `--config recipes/<model>/<file>.yaml`.")
            argv = argv[:i] + argv[i + 1:]
        else:
            config_path = argv[i + 1]
            argv = argv[:i] + argv[i + 2:]
            config, found = read_yaml(config_path)
            problems += found

    fields = fields_of(parser)
    env = config.pop("env", {}) or {}
    if not isinstance(env, dict):
        problems.append("env: must be a mapping of environment variables (NAME: value).")
        env = {}
    parser.exit_on_error = False  # argparse raises ArgumentError instead of exiting: every problem is collected
    good = {}
    for key, value in config.items():
        if key not in fields:
            problems.append(f"{key}: unknown key in {config_path}.{checks.closest(str(key), fields)} Remove it or fix its "
                            "name.")
            continue
        args = _as_argv(key, value)
        problem = args and _option_problem(parser, args, key, _type_name(fields[key]), f"in {config_path}")
        if problem:
            problems.append(problem)
        else:
            good[key] = value
    good_cli = []  # the command-line options without a problem: the rules below see them
    for group in _cli_groups(argv):
        name = group[0].split("=", 1)[0]
        if not name.startswith("--"):
            problems.append(f"{name}: unexpected value on the command line; options are written `--key value`.")
            continue
        key = name[2:]
        _, rest = _parse_quietly(parser, group)
        if rest and rest[0].split("=", 1)[0] == name:
            problems.append(f"{key}: unknown command-line option {name}.{checks.closest(key, fields)}")
            continue
        f = fields.get(key) or fields.get(key.removeprefix("no_"))
        problem = _option_problem(parser, group, key, _type_name(f) if f else "value", "on the command line")
        if problem:
            problems.append(problem)
        else:
            good_cli += group

    for key, value in env.items():
        os.environ[key] = str(value)  # as TrlParser does with a YAML `env:` block
    parser.set_defaults_with_config(**good)
    if rules is not None:
        namespace, _ = parser.parse_known_args(good_cli)
        problems += rules(vars(namespace))
    if problems:
        raise checks.ConfigError(problems)
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except (ValueError, TypeError, AssertionError) as e:  # a dataclass __post_init__ refusing a value
        raise checks.ConfigError([_reword(str(e), fields)]) from None


def _parse_quietly(parser, args):
    try:
        return parser.parse_known_args(args)
    except argparse.ArgumentError:
        return None, []


def _reword(message: str, keys) -> str:
    named = [k for k in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", message) if k in keys and "_" in k]
    key = named[0] if named else "config"
    message = message.strip().rstrip(".")
    return f"{key}: {message}. Fix `{key}` in the YAML or on the command line."


# --------------------------------------------------------------------------------------------- running


def fail(message: str) -> None:
    """Print a user error on stderr and exit with status 2 (no traceback)."""
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(2)


def guarded(call, *args, **kwargs):
    """call(*args, **kwargs), with a configuration or data problem turned into its message and exit status 2."""
    try:
        return call(*args, **kwargs)
    except checks.ConfigError as e:
        fail(str(e.code))
    except cai_data.DataError as e:
        fail(f"Data error: {e}")
    except chat_format.TemplateError as e:
        fail(f"Chat template error: {e}")
    except run_dir.DiskFull as e:
        print(str(e), file=sys.stderr, flush=True)
        raise SystemExit(run_dir.DISK_FULL_EXIT) from None
    except OSError as e:  # a file the program could not read or write (permissions, disk full, ...)
        fail(f"File error: {e}. Check the path and its permissions.")


def run(program, parser, rules=None, argv=None):
    """A program's `__main__`: parse (every problem at once) and run, errors as messages with exit status 2."""
    return guarded(lambda: program(*parse(parser, argv, rules)))
