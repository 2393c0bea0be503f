"""``--config run.toml``: every ``train``/``federate`` option from a TOML file, flags win.

A command module opts in with two one-liners::

    def register(subparsers, parents):
        p = subparsers.add_parser("train", parents=parents)
        ...                                  # its own add_argument calls
        config.add_config_option(p)          # last: it needs to see every option

    def run(args):
        args = config.resolve(args)          # file values filled in, flags kept
        ...
        config.save(args, run_dir)          # RUN_DIR/config.toml repeats the run

TOML keys are the options' ``dest`` names (``--learning-rate`` → ``learning_rate``). To tell
an explicitly given flag from its default, :func:`add_config_option` turns every default into
``argparse.SUPPRESS`` (the flag is then absent from the namespace unless given) and remembers
the real defaults; :func:`resolve` fills the gaps from the file, then from those defaults.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedpipe import rundir
from fedpipe.errors import ConfigError
from fedpipe.runconfig import NOT_REPEATABLE

# Options that shape the terminal output or the config itself, never the run: not saved.
NOT_SAVED = frozenset({"config", "json", "verbose", "quiet", "help", "func", "command"})
# Keys that an earlier fedpipe wrote under another name: still read, with a note.
RENAMED = {"schedule": "lr_schedule"}
# What a run records about itself beside its options (fedpipe.data.snapshot's digest of the data
# it read): --resume checks it against the store, --config skips it (a repeat may use new data).
RECORDS = frozenset({"data_snapshot"})
_SPEC = "_fedpipe_config_spec"
# --resume continues the run in --out: the options it does not give come from that run's
# config.toml, and the ones it gives must equal the run's, except these, which do not change
# what the run computes (where it runs, how often it checkpoints or evaluates, when a round
# stops waiting for a slow client) ...
RESUME_FREE = frozenset({"workers", "threads", "scheduler", "kubernetes", "cache", "out",
                         "checkpoint_every", "resume", "report", "config", "eval_every",
                         "deadline", "min_clients"})
# ... and these, which may grow to extend the run, unless a schedule decays over the run's
# length (cosine without total=N): a longer run would then have taken other steps all along.
RESUME_EXTEND = frozenset({"iterations", "epochs", "rounds"})


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` to ``parser`` and make its other options overridable by the file.

    Call it after the parser's last ``add_argument``. Positional arguments become optional on
    the command line (the file may give them); :func:`resolve` reports them if neither does.
    """
    parser.add_argument(
        "--config", metavar="TOML", default=None,
        help="read options from a TOML file (keys = option names with '_'); flags override it",
    )
    spec: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.dest in NOT_SAVED or action.dest == argparse.SUPPRESS:
            continue
        spec[action.dest] = action
        # Remember the real default on the action itself; SUPPRESS keeps unset flags out of args.
        action.fedpipe_default = action.default  # type: ignore[attr-defined]
        if action.help and "%(default)s" in action.help:  # --help would show ==SUPPRESS==
            action.help = action.help.replace("%(default)s", str(action.default))
        action.default = argparse.SUPPRESS
        # Required arguments may come from the file instead: resolve() checks them.
        if not action.option_strings and action.nargs in (None, 1):
            action.nargs = "?"
            action.fedpipe_required = True  # type: ignore[attr-defined]
        elif action.required:
            action.fedpipe_required = True  # type: ignore[attr-defined]
        action.required = False
    parser.set_defaults(**{_SPEC: spec})


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options not given on the command line from ``args.config``, then from defaults.

    Returns a new namespace; ``args`` is left alone. Raises :class:`ConfigError` naming the
    key for an unknown key, a value of the wrong type, or a required argument given nowhere.
    """
    spec: dict[str, argparse.Action] | None = getattr(args, _SPEC, None)
    if spec is None:  # the command did not opt in: nothing to resolve
        return args
    given = {k: v for k, v in vars(args).items() if k != _SPEC}
    path = given.get("config")
    file_values = check_values(load_toml(path), spec, path) if path else {}
    explicit = {**file_values, **given}
    saved_path, saved = _resumed_run(explicit, spec)
    resolved = dict(given)
    for dest, action in spec.items():
        if dest in given:
            continue
        if dest in file_values:
            resolved[dest] = file_values[dest]
        elif dest in saved:
            resolved[dest] = saved[dest]
        elif getattr(action, "fedpipe_required", False):
            flag = action.option_strings[-1] if action.option_strings else dest.upper()
            raise ConfigError(f"{flag} is required: give it on the command line or as '{dest}' in the config file")
        else:
            resolved[dest] = action.fedpipe_default  # type: ignore[attr-defined]
    if saved_path is not None:
        check_resume(resolved, saved, spec, saved_path)
    return argparse.Namespace(**resolved)


def _resumed_run(explicit: Mapping[str, Any], spec: Mapping[str, argparse.Action]
                 ) -> tuple[Path | None, dict[str, Any]]:
    """With ``--resume --out RUN``: the path and options of ``RUN/config.toml``, if it has one."""
    if not explicit.get("resume") or not explicit.get("out"):
        return None, {}
    path = Path(explicit["out"]) / rundir.CONFIG
    if not path.is_file():
        return None, {}  # nothing recorded to compare with (the engine says if it cannot resume)
    # A run started from Python records what its call said: the options it left out are the
    # command's defaults, as they are for a --config file.
    defaults = {dest: getattr(action, "fedpipe_default", None) for dest, action in spec.items()}
    return path, defaults | check_values(load_toml(path), spec, path)


def check_resume(resolved: Mapping[str, Any], saved: Mapping[str, Any],
                 spec: Mapping[str, argparse.Action], source: object) -> None:
    """Refuse a ``--resume`` whose options would change what the run computes.

    ``saved`` holds the run's options (its ``config.toml``), ``resolved`` the new ones. Options
    in :data:`RESUME_FREE` may differ; those in :data:`RESUME_EXTEND` may grow. Called before
    anything is written, so a refused resume leaves the run directory as it was.

    Raises
    ------
    ConfigError
        Naming the first option that differs, with both values.
    """
    schedule = str(saved.get("lr_schedule") or "")
    fixed_length = schedule.startswith("cosine") and "total=" not in schedule
    for dest, action in spec.items():
        old, new = saved.get(dest), resolved.get(dest)
        if dest in RESUME_FREE or _same_value(dest, old, new):
            continue
        flag = action.option_strings[-1] if action.option_strings else dest.upper()
        if dest in RESUME_EXTEND and old is not None and new is not None and new > old:
            if not fixed_length:
                continue
            raise ConfigError(f"--resume: {flag} {new} would change the run's {schedule!r} "
                              f"schedule, which decays over its {old} steps (give "
                              f"{schedule}:total=N to a run you mean to extend)")
        raise ConfigError(f"--resume: {flag} {_shown(new)} differs from the run's {_shown(old)} "
                          f"({source}); resuming would change what the run computes. Resume "
                          "with the run's value, or start a new run with another --out")


def _same_value(dest: str, old: Any, new: Any) -> bool:
    if dest == "store" and isinstance(old, str) and isinstance(new, str) and "://" not in old + new:
        return Path(old).resolve() == Path(new).resolve()  # ./a.zarr is a.zarr
    return old == new


def _shown(value: Any) -> str:
    return "(not set)" if value is None else repr(value) if isinstance(value, str) else str(value)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing or malformed file is a :class:`ConfigError` naming it."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def check_values(values: Mapping[str, Any], spec: Mapping[str, argparse.Action], source: object = "config") -> dict[str, Any]:
    """Convert file values as the command line would, or raise :class:`ConfigError` naming the key.

    A file listing settings under :data:`fedpipe.runconfig.NOT_REPEATABLE` is refused, naming
    them; a key in :data:`RENAMED` is read under its new name, with a one-line note on stderr.
    """
    if NOT_REPEATABLE in values:
        settings = values[NOT_REPEATABLE]
        named = "; ".join(map(str, settings)) if isinstance(settings, list) else str(settings)
        raise ConfigError(f"{source} cannot repeat its run ({named}); to run it anyway, remove "
                          f"its '{NOT_REPEATABLE}' key and give those settings yourself")
    out = {}
    for key, value in values.items():
        if key in RECORDS:
            continue
        if key in RENAMED and RENAMED[key] in spec:
            print(f"fedpipe: config key '{key}' in {source} is deprecated, read as "
                  f"'{RENAMED[key]}'", file=sys.stderr)
            key = RENAMED[key]
        action = spec.get(key)
        if action is None or isinstance(value, dict):
            known = ", ".join(sorted(spec))
            raise ConfigError(f"unknown key '{key}' in {source} (known: {known})")
        out[key] = _convert(key, value, action)
    return out


def _convert(key: str, value: Any, action: argparse.Action) -> Any:
    if action.nargs == 0:  # store_true / store_false / store_const
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, not {value!r}")
        # store_false flags hold False when given: the file states the final value directly.
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int) and action.nargs > 1
    if many:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, not {value!r}")
        return [_convert_one(key, v, action) for v in value]
    return _convert_one(key, value, action)


def _convert_one(key: str, value: Any, action: argparse.Action) -> Any:
    kind = action.type
    if isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"config key '{key}' must be {_type_name(kind)}, not {value!r}")
    if kind is float and isinstance(value, int | float):
        converted: Any = float(value)
    elif kind is int and isinstance(value, int):
        converted = value
    elif kind in (None, str) and isinstance(value, str):
        converted = value
    elif kind in (None, str) and isinstance(value, list) and action.nargs in (None, "?"):
        # A list for a comma-separated option, e.g. hidden = [256, 128] for --hidden 256,128.
        if not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"config key '{key}' must be a string, not {value!r}")
        converted = ",".join(map(str, value))
    elif getattr(kind, "numeric", False):  # fedpipe.cli.argtypes: a TOML number, range-checked
        if not isinstance(value, int | float):
            raise ConfigError(f"config key '{key}' must be {_type_name(kind)}, not {value!r}")
        try:
            converted = kind(str(value))  # repr of a float round-trips exactly
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"config key '{key}' {exc}") from None
    elif kind not in (None, str, int, float) and isinstance(value, str | int | float | list):
        # A custom argparse type (e.g. a parser of "256,128"): feed it what the CLI would.
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        try:
            converted = kind(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ConfigError(f"config key '{key}': {exc}") from None
    else:
        raise ConfigError(f"config key '{key}' must be {_type_name(kind)}, not {value!r}")
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"config key '{key}' must be one of {choices}, not {value!r}")
    return converted


def _type_name(kind: object) -> str:
    if hasattr(kind, "type_name"):
        return kind.type_name
    return {int: "an integer", float: "a number", str: "a string", None: "a string"}.get(kind, "a string")  # type: ignore[call-overload]


def to_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The run-shaping options of ``args`` (those a config file may hold), ``None`` left out."""
    spec = getattr(args, _SPEC, None)
    keys = spec.keys() if spec is not None else vars(args).keys()
    return {
        k: getattr(args, k) for k in keys
        if k not in NOT_SAVED and not k.startswith("_") and getattr(args, k, None) is not None
        and not callable(getattr(args, k))
    }


def command_values(command: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`to_dict` gives for ``fedpipe COMMAND`` run with the options ``values``.

    ``values`` use the options' ``dest`` names; the others take the command's defaults. A
    ``config.toml`` written from Python (:mod:`fedpipe.runconfig`, which holds only what the
    call said) reads as this through ``--config``.

    Raises
    ------
    ConfigError
        A key the command does not have, or a value its option would refuse.
    """
    spec = _command_spec(command)
    given = check_values({k: v for k, v in values.items() if v is not None}, spec,
                         f"fedpipe {command} options")
    resolved = {dest: given.get(dest, action.fedpipe_default)  # type: ignore[attr-defined]
                for dest, action in spec.items()}
    return to_dict(argparse.Namespace(**resolved, **{_SPEC: spec}))


def _command_spec(command: str) -> dict[str, argparse.Action]:
    # Imported here: the command modules import this module.
    from fedpipe.cli.main import _Parser, common_options

    parser = _Parser(prog="fedpipe")
    importlib.import_module(f"fedpipe.cli.{command}").register(
        parser.add_subparsers(dest="command"), [common_options()])
    return getattr(parser.parse_args([command]), _SPEC)


def save(args: argparse.Namespace, run_dir: str | Path) -> Path:
    """Write the resolved options of ``args`` to ``RUN_DIR/config.toml``; returns its path.

    ``fedpipe train --config RUN_DIR/config.toml`` then repeats the run.
    """
    return rundir.write_config(run_dir, to_dict(args))
