"""--config TOML: file values fill in, explicit flags win, bad keys/types name the key."""

from __future__ import annotations

import argparse

import pytest
from fedpipe import rundir
from fedpipe.cli import config
from fedpipe.cli.main import _Parser
from fedpipe.errors import ConfigError


def _hidden(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedpipe train")
    parser.add_argument("store")
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--widths", help="comma-separated (default: %(default)s)", default="4")
    parser.add_argument("--hidden", type=_hidden, default=(8,))
    parser.add_argument("--clients", type=int, nargs="+", default=[0])
    parser.add_argument("--no-shuffle", dest="shuffle", action="store_false")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=print)
    config.add_config_option(parser)
    return parser


def resolve(argv: list[str]) -> argparse.Namespace:
    return config.resolve(make_parser().parse_args(argv))


def test_defaults_without_config() -> None:
    args = resolve(["data.zarr"])
    assert (args.store, args.learning_rate, args.iterations, args.shuffle) == ("data.zarr", 0.1, 10, True)


def test_file_fills_and_flags_override(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('store = "s.zarr"\nlearning_rate = 1\niterations = 50\noptimizer = "adam"\n'
                    'hidden = [16, 4]\nclients = [1, 2]\nshuffle = false\nwidths = [8, 2]\n')
    args = resolve(["--config", str(path), "--iterations", "10"])
    # 10 equals the default: only "given on the command line" can explain that it wins.
    assert args.iterations == 10
    assert args.learning_rate == 1.0 and isinstance(args.learning_rate, float)
    assert (args.store, args.optimizer, args.hidden, args.clients, args.shuffle) == (
        "s.zarr", "adam", (16, 4), [1, 2], False)
    assert args.widths == "8,2"
    assert resolve(["other.zarr", "--config", str(path)]).store == "other.zarr"


@pytest.mark.parametrize(("text", "key"), [
    ("learning_rat = 0.1", "learning_rat"),
    ('iterations = "ten"', "iterations"),
    ("iterations = 2.5", "iterations"),
    ("learning_rate = true", "learning_rate"),
    ('optimizer = "lbfgs"', "optimizer"),
    ("shuffle = 1", "shuffle"),
    ("clients = 3", "clients"),
    ("[model]\nhidden = 3", "model"),
    ("widths = [1.5]", "widths"),
])
def test_bad_keys_and_types_name_the_key(tmp_path, text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=f"'{key}'") as info:
        resolve(["s.zarr", "--config", str(path)])
    assert "\n" not in str(info.value)


def test_help_shows_real_defaults() -> None:
    assert "(default: 4)" in make_parser().format_help()


def test_missing_file_and_missing_positional(tmp_path) -> None:
    with pytest.raises(ConfigError, match="nope.toml"):
        resolve(["s.zarr", "--config", str(tmp_path / "nope.toml")])
    with pytest.raises(ConfigError, match="STORE"):
        resolve([])
    (tmp_path / "broken.toml").write_text("x = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve(["s.zarr", "--config", str(tmp_path / "broken.toml")])


def test_saved_config_repeats_the_run(tmp_path) -> None:
    first = resolve(["s.zarr", "--learning-rate", "0.5", "--hidden", "4,2", "--no-shuffle"])
    path = config.save(first, tmp_path)
    assert path == tmp_path / rundir.CONFIG
    again = resolve(["--config", str(path)])
    assert config.to_dict(again) == config.to_dict(first)
    assert "json" not in path.read_text() and "func" not in path.read_text()


def test_required_option_may_come_from_the_file(tmp_path) -> None:
    parser = _Parser(prog="fedpipe federate")
    parser.add_argument("store")
    parser.add_argument("--rounds", type=int, required=True)
    config.add_config_option(parser)
    with pytest.raises(ConfigError, match="--rounds is required"):
        config.resolve(parser.parse_args(["s.zarr"]))
    (tmp_path / "r.toml").write_text("rounds = 3\n")
    assert config.resolve(parser.parse_args(["s.zarr", "--config", str(tmp_path / "r.toml")])).rounds == 3


def test_fedpipe_train_repeats_a_run_from_its_config(small_store, tmp_path, capsys) -> None:
    from fedpipe.cli.main import main

    store = small_store()
    first = tmp_path / "first"
    assert main(["train", store, "--model", "softmax", "--optimizer", "adam", "--lr", "0.05",
                 "--iterations", "3", "--workers", "1", "--threads", "1", "--out", str(first), "-q"]) == 0
    saved = rundir.load_run(first).config
    assert saved["lr"] == 0.05 and saved["iterations"] == 3 and saved["store"] == store
    again = tmp_path / "again"
    assert main(["train", "--config", str(first / "config.toml"), "--out", str(again), "-q"]) == 0
    one, two = rundir.load_run(first), rundir.load_run(again)
    assert one.named.keys() == two.named.keys()
    for name in one.named:
        assert (one.named[name] == two.named[name]).all()
    assert rundir.load_run(again).config["out"] == str(again)  # the flag won over the file
    capsys.readouterr()


@pytest.mark.parametrize("argv", [
    ["train", "s.zarr", "--model", "mlp", "--hidden", "8,4", "--optimizer", "adam", "--lr", "0.5",
     "--epochs", "2", "--batch-size", "16", "--workers", "2"],
    ["federate", "s.zarr", "--model", "softmax", "--rounds", "3", "--strategy", "fedprox",
     "--mu", "0.2", "--fraction", "0.5", "--partition", "p"],
])
def test_command_values_are_what_the_cli_saves(argv) -> None:
    from fedpipe.cli.main import build_parser

    args = config.resolve(build_parser().parse_args(argv))
    given = {k: v for k, v in vars(args).items() if f"--{k.replace('_', '-')}" in argv}
    assert config.command_values(argv[0], {"store": "s.zarr", **given}) == config.to_dict(args)
    with pytest.raises(ConfigError, match="'rounds_'"):
        config.command_values(argv[0], {"rounds_": 3})


def test_a_file_naming_settings_it_lacks_is_refused_in_one_line(tmp_path) -> None:
    rundir.write_config(tmp_path, {"store": "s.zarr", "iterations": 3, config.NOT_REPEATABLE: [
        "model: 'mine' is not a model --model builds", "fan_in: 4"]})
    path = tmp_path / rundir.CONFIG
    with pytest.raises(ConfigError, match=r"cannot repeat its run.*'mine'.*fan_in: 4") as info:
        resolve(["--config", str(path)])
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("command", [["train", "s.zarr", "--model", "softmax"],
                                     ["federate", "s.zarr", "--model", "softmax", "--rounds", "2"]])
def test_lr_schedule_is_one_option_and_the_old_spelling_still_works(command, tmp_path,
                                                                     capsys) -> None:
    from fedpipe.cli.main import build_parser

    parser = build_parser()
    new = config.resolve(parser.parse_args([*command, "--lr-schedule", "step:every=2"]))
    assert new.lr_schedule == "step:every=2" and capsys.readouterr().err == ""
    old = config.resolve(parser.parse_args([*command, "--schedule", "step:every=2"]))
    assert old.lr_schedule == "step:every=2"
    assert capsys.readouterr().err.strip().splitlines() == [
        "fedpipe: --schedule is deprecated, use --lr-schedule"]
    # a config.toml written before the rename
    (tmp_path / "old.toml").write_text('schedule = "cosine"\n')
    saved = config.resolve(parser.parse_args([*command, "--config", str(tmp_path / "old.toml")]))
    assert saved.lr_schedule == "cosine"
    assert "'schedule'" in capsys.readouterr().err
