"""``fedpipe predict`` and ``fedpipe export``: use a trained run without its training store."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

from fedpipe.cli.argtypes import positive_int
from fedpipe.errors import ValidationError
from rich.console import Console

FORMATS = ("onnx", "sklearn")


def register(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``predict`` and ``export`` to the ``fedpipe`` parser."""
    p = subparsers.add_parser(
        "predict", parents=parents,
        help="predict a CSV, Parquet, .npz/.npy or store with a run; test metrics if labelled")
    p.add_argument("run", help="run directory (fedpipe train/federate --out)")
    p.add_argument("source", help="FILE.csv|.parquet|.npz|.npy or a fedpipe store")
    p.add_argument("--out", required=True, help="predictions file (.parquet)")
    p.add_argument("--proba", action="store_true", help="add proba_<label> columns")
    p.add_argument("--target", help="label column of the source (default: the run's target)")
    p.add_argument("--chunk-rows", type=positive_int, default=65_536,
                   help="rows predicted at a time (default 65536)")
    p.set_defaults(func=run_predict)

    p = subparsers.add_parser("export", parents=parents,
                              help="write a run's model as ONNX or a scikit-learn pipeline")
    p.add_argument("run", help="run directory")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx or sklearn (pickle)")
    p.add_argument("--out", required=True, help="model.onnx or model.pkl")
    p.set_defaults(func=run_export)


def run_predict(args: argparse.Namespace) -> dict[str, Any]:
    """Stream SOURCE through RUN's model into ``--out``; print metrics when it has labels."""
    from fedpipe.model import saved, stream

    table = args.source.lower().endswith((".csv", ".csv.gz", ".txt", ".parquet", ".pq"))
    if args.target is not None and not table:  # arrays and stores carry their labels as y
        raise ValidationError(f"--target {args.target}: applies to CSV/Parquet sources, "
                              f"not {args.source}")
    model = saved.load(args.run)
    summary = stream.predict_to_parquet(model, args.source, args.out, proba=args.proba,
                                        target=args.target, block_rows=args.chunk_rows,
                                        progress=not (args.quiet or args.json))
    if not (args.quiet or args.json):
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in summary.items() if k.startswith("test_"))
        Console().print(f"{summary['rows']} predictions -> {args.out}"
                        + (f"; {metrics}" if metrics else ""))
    return summary


def run_export(args: argparse.Namespace) -> dict[str, Any]:
    """Write RUN's model in ``--format`` to ``--out``."""
    from fedpipe.model import saved

    model = saved.load(args.run)
    out = Path(args.out)
    if args.format == "onnx":
        from fedpipe.model.onnx_export import export_onnx

        export_onnx(model, out)
    else:
        from fedpipe.model.sklearn_export import to_sklearn

        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(pickle.dumps(to_sklearn(model)))
    if not (args.quiet or args.json):
        Console().print(f"{args.run} -> {out} ({args.format})")
    return {"run": str(args.run), "format": args.format, "out": str(out),
            "model": model.model.name, "features": model.encoding.feature_names}
