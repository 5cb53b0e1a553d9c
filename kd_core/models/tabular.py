"""The MLP student of a tabular task, with the table's preprocessing inside it.

`TabularMLP` reads a raw row as prep encodes it: `numeric` (B, F_num) float (a missing value may
be NaN: it becomes the training mean) and `categorical` (B, F_cat) integer codes of each column's
vocabulary (`kd_core.data.tabular`: 0 unknown, 1 missing). In order:

    x_num = (where(isnan(numeric), mean, numeric) − mean) / std            (B, F_num)
    x_cat = [E_j(categorical[:, j]) for each categorical column j]          (B, Σ d_j)
    h     = blocks([x_num; x_cat])   each block: linear, norm, activation, dropout
    out   = linear(h)                (B, C) class logits, or (B, 1) the standardised target

`predict` turns `out` into what a user reads: class probabilities (softmax), or the target in its
own units (out · target_std + target_mean). The statistics are buffers, saved with the weights.

A saved student is a folder: `model.safetensors`, `config.json` (the table's schema: columns,
vocabularies, statistics, classes; the MLP's settings) and `model.onnx` (`export_onnx`: `predict`
as one graph with inputs `numeric` and `categorical`, dynamic in the rows). Nothing of
scikit-learn is needed to serve it: a client maps each categorical value to its index in
config.json's `categories` (0 when absent).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn


FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ONNX_NAME = "model.onnx"
NORMS = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "none": None}
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


def embedding_width(categories: int, configured: int | None) -> int:
    """A categorical column's embedding width: the configured one, else min(16, ⌈1.6 · n^0.56⌉)."""
    return configured or min(16, math.ceil(1.6 * categories**0.56))


class TabularMLP(nn.Module):
    """The student (module docstring). `schema`: prep's `details["table"]`; `mlp`: `student.mlp` as a dict."""

    def __init__(self, schema: dict, mlp: dict, dropout: float = 0.0):
        super().__init__()
        self.schema, self.mlp = schema, dict(mlp)
        self.classification = schema["kind"] == "classification"
        self.outputs = len(schema["classes"]) if self.classification else 1
        self.register_buffer("numeric_mean", torch.tensor(schema["numeric_mean"], dtype=torch.float32).reshape(-1))
        self.register_buffer("numeric_std", torch.tensor(schema["numeric_std"], dtype=torch.float32).reshape(-1))
        self.register_buffer("target_mean", torch.tensor(float(schema.get("target_mean", 0.0))))
        self.register_buffer("target_std", torch.tensor(float(schema.get("target_std", 1.0))))
        self.embeddings = nn.ModuleList(
            nn.Embedding(len(schema["categories"][name]), embedding_width(len(schema["categories"][name]), mlp.get("embedding_dim")))
            for name in schema["categorical"]
        )
        width = len(schema["numeric"]) + sum(embedding.embedding_dim for embedding in self.embeddings)
        blocks = []
        for _ in range(mlp["num_layers"]):
            blocks.append(nn.Linear(width, mlp["hidden_size"]))
            if NORMS[mlp["norm"]] is not None:
                blocks.append(NORMS[mlp["norm"]](mlp["hidden_size"]))
            blocks += [ACTIVATIONS[mlp["activation"]](), nn.Dropout(dropout)]
            width = mlp["hidden_size"]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, self.outputs)

    def features(self, numeric: torch.Tensor | None, categorical: torch.Tensor | None) -> torch.Tensor:
        """The blocks' input: standardised numbers (missing ones at the mean) and the categories' embeddings."""
        parts = []
        if len(self.numeric_mean):
            numeric = numeric.float()
            numeric = torch.where(torch.isnan(numeric), self.numeric_mean, numeric)
            parts.append((numeric - self.numeric_mean) / self.numeric_std)
        if len(self.embeddings):
            codes = categorical.long()
            parts += [embedding(codes[:, column].clamp(0, embedding.num_embeddings - 1)) for column, embedding in enumerate(self.embeddings)]
        dtype = self.head.weight.dtype  # a bf16 engine's (the statistics and the math above stay float32)
        return torch.cat([part.to(dtype) for part in parts], dim=-1)

    def forward(self, numeric: torch.Tensor | None = None, categorical: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C) class logits, or (B, 1) the standardised target."""
        return self.head(self.blocks(self.features(numeric, categorical)))

    def predict(self, numeric: torch.Tensor | None = None, categorical: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C) class probabilities, or (B, 1) the target in its own units (float32)."""
        out = self(numeric, categorical).float()
        return out.softmax(-1) if self.classification else out * self.target_std + self.target_mean

    # --------------------------------------------------------------------------------- files
    def config_dict(self) -> dict:
        return {"format": "kdflow-tabular-mlp", "format_version": FORMAT_VERSION, "schema": self.schema, "mlp": self.mlp}

    def save_folder(self, folder: Path) -> Path:
        """`model.safetensors`, `config.json` and `model.onnx` into `folder` (a model that saves
        itself whole: no tokenizer; `Task.save_model`)."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}, str(folder / WEIGHTS_NAME))
        (folder / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2))
        export_onnx(self, folder / ONNX_NAME)
        return folder


class Predictor(nn.Module):
    """`model.predict` as a module with explicit inputs (what the ONNX graph runs)."""

    def __init__(self, model: TabularMLP):
        super().__init__()
        self.model = model

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        return self.model.predict(numeric, categorical)


def row_inputs(rows: dict, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Rows as prep writes them (numpy `numeric`, `categorical`) as the model's input tensors on
    `device` (None for a kind of column the table lacks)."""
    numeric, categorical = rows.get("numeric"), rows.get("categorical")
    return (
        None if numeric is None else torch.as_tensor(numeric, dtype=torch.float32, device=device),
        None if categorical is None else torch.as_tensor(categorical, dtype=torch.int64, device=device),
    )


def example_inputs(model: TabularMLP, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of `rows` rows of the model's widths (zeros; width-0 columns for absent kinds)."""
    return torch.zeros(rows, len(model.schema["numeric"])), torch.zeros(rows, len(model.schema["categorical"]), dtype=torch.int64)


def export_onnx(model: TabularMLP, path: Path) -> Path:
    """`predict` as an ONNX graph: inputs `numeric` (rows, F_num) float32 and `categorical` (rows,
    F_cat) int64, output `prediction`; the rows dynamic. The model is exported in eval mode."""
    import copy
    import logging
    import warnings

    predictor = Predictor(copy.deepcopy(model).cpu().float().eval())
    rows = torch.export.Dim("rows", min=1)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exporter_log.setLevel(logging.ERROR)  # it notes every torchvision operator it cannot register
        torch.onnx.export(
            predictor, example_inputs(model), str(path), input_names=["numeric", "categorical"], output_names=["prediction"],
            dynamic_shapes=({0: rows}, {0: rows}), dynamo=True, verbose=False, optimize=True,
        )
    exporter_log.setLevel(level)
    return path


def load_tabular_mlp(folder: Path | str) -> TabularMLP:
    """A saved student (`save_folder`), in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    if config.get("format") != "kdflow-tabular-mlp":
        raise ValueError(f"{folder / CONFIG_NAME}: not a kdflow tabular student (format {config.get('format')!r})")
    model = TabularMLP(config["schema"], config["mlp"])
    model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    return model.eval()

