"""Using a trained model: load a run, predict, export, and scikit-learn estimators."""
