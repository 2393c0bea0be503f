"""``fedpipe export --format onnx``: a saved model as an ONNX graph, preprocessing included.

The graph is written by hand with ``onnx.helper`` (the optional ``export`` extra): it takes the
float64 feature matrix ``X`` (columns in the order of ``preprocess.json``'s
``feature_names``; categorical columns already one-hot, as the run's store holds them) and
computes the store's imputation and standardisation (``Where(IsNaN)``, ``Sub``, ``Div``), then
the model's layers in float64. Outputs: ``label`` (the original class labels, strings stay
strings) and ``probabilities`` for a classifier, ``prediction`` for a regressor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from fedpipe.errors import ValidationError
from fedpipe.model.saved import SavedModel, encoding_to_json

OPSET = 17


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ValidationError("exporting to ONNX needs the onnx package: "
                              "pip install 'fedpipe[export]'") from None
    return onnx


class _Graph:
    """Nodes and constants being collected; ``add`` returns the output name of a new node."""

    def __init__(self, onnx):
        self.onnx, self.nodes, self.inits, self.count = onnx, [], [], 0

    def const(self, value: np.ndarray, name: str) -> str:
        self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def add(self, op: str, *inputs: str, **attrs: Any) -> str:
        self.count += 1
        out = f"{op.lower()}_{self.count}"
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), [out], **attrs))
        return out


def export_onnx(saved: SavedModel, out: str | os.PathLike[str]) -> Path:
    """Write ``saved`` as an ONNX model at ``out``; returns the path.

    Raises
    ------
    ValidationError
        A model of your own (only the built-in kinds map to ONNX), or no ``onnx`` installed.
    """
    onnx = _onnx()
    spec = saved.model.spec or {}
    kind = spec.get("kind")
    if kind not in ("linear", "logistic", "softmax", "mlp"):
        raise ValidationError(f"model {saved.model.name} is not a built-in kind (linear, "
                              "logistic, softmax, mlp): it cannot be exported to ONNX")
    g = _Graph(onnx)
    enc = saved.encoding
    x = _preprocess(g, enc.pre)
    arrays = saved.model.unpack(saved.params)
    if kind == "mlp":
        logits = _mlp(g, x, arrays)
    else:
        coef = arrays["coef"].reshape(enc.n_features, -1)
        logits = g.add("MatMul", x, g.const(coef, "coef"))
        if "intercept" in arrays:
            logits = g.add("Add", logits, g.const(np.atleast_1d(arrays["intercept"]), "intercept"))
    outputs = _outputs(g, kind, saved, logits)
    d = enc.n_features  # a sparse store's model takes dense rows of its full width
    graph = onnx.helper.make_graph(
        g.nodes, f"fedpipe_{saved.model.name}",
        [onnx.helper.make_tensor_value_info("X", onnx.TensorProto.DOUBLE, [None, d])],
        outputs, initializer=g.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", OPSET)],
                                   producer_name="fedpipe")
    onnx.helper.set_model_props(model, {"fedpipe_encoding": json.dumps(encoding_to_json(enc)),
                                        "fedpipe_spec": json.dumps(spec)})
    onnx.checker.check_model(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out)
    return out


def _preprocess(g: _Graph, pre) -> str:
    x = "X"
    if pre.fill is not None:
        x = g.add("Where", g.add("IsNaN", x), g.const(pre.fill[None, :], "fill"), x)
    if pre.standardize:
        x = g.add("Div", g.add("Sub", x, g.const(pre.shift, "shift")), g.const(pre.scale, "scale"))
    return x


def _mlp(g: _Graph, x: str, arrays: dict[str, np.ndarray]) -> str:
    n_layers = sum(1 for k in arrays if k.startswith("W"))
    for i in range(n_layers):
        x = g.add("Add", g.add("MatMul", x, g.const(arrays[f"W{i}"], f"W{i}")),
                  g.const(arrays[f"b{i}"], f"b{i}"))
        if i < n_layers - 1:
            x = g.add("Relu", x)
    return x


def _outputs(g: _Graph, kind: str, saved: SavedModel, logits: str) -> list:
    onnx, enc = g.onnx, saved.encoding
    def flat() -> str:  # the target shape [-1] of a Reshape to one column (added once)
        if not any(i.name == "flat" for i in g.inits):
            g.const(np.array([-1], dtype=np.int64), "flat")
        return "flat"

    if saved.model.task == "regression":
        n_out = saved.model.spec.get("n_outputs", 1)
        if n_out == 1:
            g.add("Reshape", logits, flat())
        else:
            g.add("Identity", logits)
        g.nodes[-1].output[0] = "prediction"
        shape = [None] if n_out == 1 else [None, n_out]
        return [onnx.helper.make_tensor_value_info("prediction", onnx.TensorProto.DOUBLE, shape)]
    if kind == "logistic":  # one margin z: P(class 1) = sigmoid(z), label 1 where z > 0
        p1 = g.add("Sigmoid", logits)
        one = g.const(np.ones((1, 1)), "one")
        proba = g.add("Concat", g.add("Sub", one, p1), p1, axis=1)
        index = g.add("Reshape", g.add("Cast", g.add("Greater", logits, g.const(
            np.zeros((1, 1)), "zero")), to=onnx.TensorProto.INT64), flat())
    else:
        proba = g.add("Softmax", logits, axis=1)
        index = g.add("ArgMax", logits, axis=1, keepdims=0)
    g.add("Identity", proba)
    g.nodes[-1].output[0] = "probabilities"
    classes = np.asarray(enc.classes)
    if classes.dtype.kind in "US":
        classes = classes.astype(object)
    elif classes.dtype.kind == "b":
        classes = classes.astype(np.int64)  # ONNX Gather has no bool tables in every runtime
    g.add("Gather", g.const(classes, "classes"), index, axis=0)
    g.nodes[-1].output[0] = "label"
    label_type = onnx.helper.np_dtype_to_tensor_dtype(classes.dtype) \
        if classes.dtype != object else onnx.TensorProto.STRING
    return [onnx.helper.make_tensor_value_info("label", label_type, [None]),
            onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.DOUBLE,
                                               [None, len(classes)])]
