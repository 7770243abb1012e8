"""
nanoGPT-style configuration: `python train.py [config/file.py ...] [--key=value ...]`.

Config files are plain Python whose top-level assignments override the defaults; `--key=value`
arguments come after them and win. What nanoGPT's configurator lacks, this one adds: values are parsed
with ast.literal_eval and checked against the key's declared type (an int where a float is expected
is fine), bools accept True/False/true/false/1/0, an unknown key names the closest valid ones, and
`--help` lists every key with its default and type.

The keys are the fields of dataclasses: train.py's own and the chosen model's `Config`. A field that
both define (block_size) is one key.
"""
import ast
import difflib
import os
import sys
import types
import typing
from dataclasses import MISSING, fields


class ConfigError(ValueError):
    """A bad key or value; its message says what to change."""


def split_args(argv):
    """argv -> (config files, {key: raw value string}); --help is returned as key 'help'."""
    files, overrides = [], {}
    for arg in argv:
        if arg in ("-h", "--help"):
            overrides["help"] = "True"
        elif arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"argument {arg!r} has no value; write it as --{key}=VALUE")
            overrides[key.replace("-", "_")] = value
        elif arg.endswith(".py"):
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg!r} does not exist")
            files.append(arg)
        else:
            raise ConfigError(f"argument {arg!r} is neither a config file (.py) nor --key=value")
    return files, overrides


def read_config_file(path):
    """The top-level assignments of a python config file, as {key: value}."""
    namespace = {}
    with open(path) as f:
        code = compile(f.read(), path, "exec")
    exec(code, namespace)
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


def key_table(*dataclasses):
    """{key: (default, type)} over the fields of the given dataclasses; earlier ones win on shared names."""
    table = {}
    for dc in dataclasses:
        hints = typing.get_type_hints(dc)
        for f in fields(dc):
            if f.name not in table:
                default = f.default if f.default is not MISSING else f.default_factory()
                table[f.name] = (default, hints[f.name])
    return table


def type_name(tp):
    if typing.get_origin(tp) is tuple:
        return str(tp)  # tuple[float, float]
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert(key, value, tp, source):
    """Check (and for command-line strings, parse) one value against its declared type."""
    allowed = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    raw = value
    if isinstance(value, str) and source == "command line":
        if bool in allowed and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            value = raw  # a bare word: a string
    if value is None and type(None) in allowed:
        return None
    if str in allowed and source == "command line":
        return raw  # '--out_dir=123' is the string '123'
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if bool in allowed and value in (0, 1) and not isinstance(value, float):
        return bool(value)
    for t in allowed:
        if typing.get_origin(t) is tuple:  # e.g. tuple[float, float]: each item checked against its own type
            items = typing.get_args(t)
            if isinstance(value, (tuple, list)) and len(value) == len(items):
                try:
                    return tuple(convert(key, v, item, source) for v, item in zip(value, items))
                except ConfigError:
                    pass
        elif t is not type(None) and isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    raise ConfigError(f"{key}={raw!r} (from {source}) is not a valid {type_name(tp)}; "
                      f"expected e.g. --{key}={example(tp)}")


def example(tp):
    if typing.get_origin(tp) is tuple:
        return "(" + ",".join(example(t) for t in typing.get_args(tp)) + ")"
    allowed = [t for t in (typing.get_args(tp) or (tp,)) if t is not type(None)]
    return {bool: "True", int: "8", float: "3e-4", str: "text"}.get(allowed[0] if allowed else str, "VALUE")


def check_ranges(config, rules):
    """Range checks for a config dataclass, run from its __post_init__: rules is {key: (ok, "what it must be")}.
    The first failing key raises one line naming it, its value, the rule, and the default as a value that works."""
    defaults = {f.name: f.default for f in fields(config)}
    for key, (ok, need) in rules.items():
        if not ok:
            example = defaults.get(key, MISSING)
            fix = f"; e.g. --{key}={example}" if example not in (MISSING, None, "") else ""
            raise ConfigError(f"{key}={getattr(config, key)!r} {need}{fix}")


def unknown_key_error(key, table, where):
    close = difflib.get_close_matches(key, table, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; run with --help to list the keys"
    return ConfigError(f"unknown key {key} ({where}){hint}")


def resolve(files, overrides, table):
    """Apply config files, then command-line overrides, to the defaults in table.
    Returns (config dict, the set of keys the user set)."""
    config = {k: default for k, (default, _) in table.items()}
    explicit = set()
    for path in files:
        for key, value in read_config_file(path).items():
            if key not in table:
                raise unknown_key_error(key, table, f"in {path}")
            config[key] = convert(key, value, table[key][1], path)
            explicit.add(key)
    for key, value in overrides.items():
        if key == "help":
            continue
        if key not in table:
            raise unknown_key_error(key, table, "on the command line")
        config[key] = convert(key, value, table[key][1], "command line")
        explicit.add(key)
    return config, explicit


def peek(files, overrides, key, default):
    """A key's value before the full table is known (train.py needs `model` to know the model's keys)."""
    value = default
    for path in files:
        value = read_config_file(path).get(key, value)
    return overrides.get(key, value)


def print_help(script, groups, out=None):
    """groups: [(title, {key: (default, type)})]; printed to out, or to sys.stdout as it is at the call."""
    out = out or sys.stdout
    print(f"usage: python {script} [config/file.py ...] [--key=value ...]\n", file=out)
    for title, table in groups:
        print(f"{title}:", file=out)
        width = max(len(k) for k in table) + 2
        for key, (default, tp) in table.items():
            print(f"  --{key:<{width}} {type_name(tp):<14} default {default!r}", file=out)
        print(file=out)


def parse(argv, config_class, script):
    """The whole command line of a script with one config dataclass: the config, or None after --help printed its keys."""
    files, overrides = split_args(argv)
    table = key_table(config_class)
    if "help" in overrides:
        print_help(script, [(f"{script} keys", table)])
        return None
    return config_class(**resolve(files, overrides, table)[0])
