"""``fedpipe export --format sklearn`` / ``Run.to_sklearn()``: a fitted scikit-learn Pipeline.

The pipeline is ``SimpleImputer`` (only if the store imputed) -> ``StandardScaler`` (only if it
standardised) -> the estimator whose formula is the model's: ``LinearRegression``,
``LogisticRegression`` (logistic and softmax), ``MLPClassifier``/``MLPRegressor`` (ReLU). The
fitted attributes are set from the run's parameters, so predictions equal fedpipe's (class
probabilities to float tolerance: scikit-learn's ``expit``/``softmax`` round differently). Its
input is the one-hot encoded feature matrix, as for the ONNX export.
"""

from __future__ import annotations

import numpy as np
from fedpipe.errors import ValidationError
from fedpipe.model.saved import SavedModel


def to_sklearn(saved: SavedModel):
    """A fitted ``sklearn.pipeline.Pipeline`` that predicts as ``saved`` does.

    Raises
    ------
    ValidationError
        A model of your own, or one without intercept (the sklearn estimators always have one).
    """
    from sklearn.pipeline import Pipeline

    spec = saved.model.spec or {}
    kind = spec.get("kind")
    builders = {"linear": _linear, "logistic": _logistic, "softmax": _softmax, "mlp": _mlp}
    if kind not in builders or spec.get("intercept") is False:
        raise ValidationError(f"model {saved.model.name} has no scikit-learn counterpart "
                              "(built-in linear, logistic, softmax or mlp with intercept)")
    arrays = saved.model.unpack(saved.params)
    d = len(saved.encoding.feature_names)
    steps = _preprocess(saved.encoding.pre, d)
    steps.append(("model", builders[kind](arrays, saved, d)))
    return Pipeline(steps)


def _preprocess(pre, d: int) -> list:
    from sklearn.impute import SimpleImputer
    from sklearn.preprocessing import StandardScaler

    steps = []
    if pre.fill is not None:
        # fitting the mean imputer on the one row of fill values makes statistics_ == fill
        imputer = SimpleImputer(strategy="mean", keep_empty_features=True)
        steps.append(("impute", imputer.fit(pre.fill[None, :])))
    if pre.standardize:
        scaler = StandardScaler()
        scaler.mean_, scaler.scale_, scaler.var_ = pre.shift.copy(), pre.scale.copy(), pre.scale**2
        scaler.n_features_in_, scaler.n_samples_seen_ = d, 1
        steps.append(("scale", scaler))
    return steps


def _classes(saved: SavedModel) -> np.ndarray:
    return np.asarray(saved.encoding.classes)


def _linear(arrays, saved, d):
    from sklearn.linear_model import LinearRegression

    est = LinearRegression()
    est.coef_, est.intercept_ = arrays["coef"].reshape(-1).copy(), float(arrays["intercept"])
    est.n_features_in_ = d
    return est


def _logistic(arrays, saved, d):
    from sklearn.linear_model import LogisticRegression

    est = LogisticRegression()
    est.coef_ = arrays["coef"].reshape(1, -1).copy()
    est.intercept_ = np.atleast_1d(arrays["intercept"]).astype(np.float64)
    est.classes_, est.n_features_in_ = _classes(saved), d
    return est


def _softmax(arrays, saved, d):
    from sklearn.linear_model import LogisticRegression

    W, b = arrays["coef"], arrays["intercept"]
    est = LogisticRegression()
    if W.shape[1] == 2:  # softmax over 2 classes is a sigmoid of the logit difference
        est.coef_, est.intercept_ = (W[:, 1] - W[:, 0])[None, :], np.array([b[1] - b[0]])
    else:
        est.coef_, est.intercept_ = W.T.copy(), b.copy()
    est.classes_, est.n_features_in_ = _classes(saved), d
    return est


def _mlp(arrays, saved, d):
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.preprocessing import LabelBinarizer

    n_layers = sum(1 for k in arrays if k.startswith("W"))
    coefs = [arrays[f"W{i}"].copy() for i in range(n_layers)]
    intercepts = [arrays[f"b{i}"].copy() for i in range(n_layers)]
    hidden = tuple(w.shape[1] for w in coefs[:-1])
    classify = saved.model.task != "regression"
    est = (MLPClassifier if classify else MLPRegressor)(hidden_layer_sizes=hidden,
                                                        activation="relu")
    if classify:
        classes = _classes(saved)
        if len(classes) == 2:  # sklearn's binary MLP has one logistic output unit
            W, b = coefs[-1], intercepts[-1]
            coefs[-1], intercepts[-1] = (W[:, 1] - W[:, 0])[:, None], np.array([b[1] - b[0]])
        est.classes_ = classes
        est._label_binarizer = LabelBinarizer().fit(classes)
        est.out_activation_ = "softmax" if len(classes) > 2 else "logistic"
    else:
        est.out_activation_ = "identity"
    est.coefs_, est.intercepts_ = coefs, intercepts
    est.n_layers_, est.n_outputs_ = n_layers + 1, coefs[-1].shape[1]
    est.n_features_in_, est.n_iter_, est.t_ = d, 1, 1
    return est
