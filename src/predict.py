"""`python -m src.predict run=<run> input=<file|folder> output=<csv>`: a trained run's predictions for raw inputs.

The CSV holds the input column(s), the predicted `label` and one `prob_<class>` column per class.
"""

from __future__ import annotations

import sys
from pathlib import Path

from src.serving.cli import load_classifier, main_guard, parse, read_inputs, require, tracking_client

USAGE = """
usage: python -m src.predict run=<run> input=<table file | image folder> output=<csv> [key=value ...]

Writes the run's predictions for raw inputs: the input column(s), `label` and one `prob_<class>` column per class.
  input=<table file>  CSV / TSV / JSON lines with the model's input column(s) (the training data's text column(s),
                      or `image` holding file paths or base64-encoded images)
  input=<folder>      image files (loose, or in class sub-folders)

examples:
  python -m src.predict run=3f2a9c... input=reviews.csv output=predictions.csv
  python -m src.predict run=models:/sentiment/2 input=reviews.csv output=predictions.csv
"""
KEYS = {
    "run": "run id, a checkpoint file in a run's output folder, a runs:/ or models:/ URI, or a model folder",
    "input": "table file or image folder",
    "output": "CSV file to write",
    "checkpoint": "predict with these weights (.ckpt) in the run's model",
    "tracking.uri": "MLflow store (default sqlite:///mlflow.db in the current directory)",
}


def main(argv: list[str]) -> Path:
    import pandas as pd

    args = parse(argv, KEYS, USAGE)
    output = Path(require(args, "output"))
    classifier, _ = load_classifier(require(args, "run"), tracking_client(args), args.get("checkpoint"))
    frame = read_inputs(require(args, "input"), classifier)
    predictions = classifier.predict_frame(frame)
    output.parent.mkdir(parents=True, exist_ok=True)
    table = pd.concat([frame[classifier.spec.input.columns].reset_index(drop=True), predictions], axis=1)
    table.to_csv(output, index=False)
    print(f"wrote {len(table)} predictions to {output} (columns: {', '.join(table.columns)})")
    return output


if __name__ == "__main__":
    main_guard(main)
    sys.exit(0)
