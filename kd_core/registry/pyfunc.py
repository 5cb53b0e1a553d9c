"""The registered reward student as an MLflow pyfunc model: one reward per (prompt, response, image).

    import mlflow, pandas as pd
    scorer = mlflow.pyfunc.load_model("models:/kdflow-reward-student@champion")
    scorer.predict(pd.DataFrame({"prompt": [...], "response": [...], "image": [png_bytes, ...]}))

Input: a pandas DataFrame with the columns `prompt` and `response` (text) and `image` (the encoded
image: PNG, JPEG or any format Pillow reads, as bytes; over REST, base64 as MLflow encodes binary
columns). Output: a float64 array, the student's reward of each row's response.

Each row reaches the model as the prep stage prepares the student's view of a response
(kd_core/data/preferences.py): the text `prompt ⏎ response` through the student's tokenizer, cut to
its last `max_position_embeddings` tokens (the prep's `data.seq_len`) and right-padded; the image
as RGB, resized bicubic to the model's `image_size`.

Logged as "models from code": MLflow stores this file's source and runs it on load, and
`set_model` below hands it the instance. Nothing is pickled, not even the (stateless) instance, so
loading a registered model never unpickles anything; the weights are read from the student's Hugging
Face directory (the artifact `student`: config.json, model.safetensors, tokenizer) by safetensors
only. Loading needs kdflow installed (the model class is kd_core.models.reward's).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np

STUDENT_ARTIFACT = "student"
"""The artifact (a Hugging Face directory) the pyfunc reads its weights and tokenizer from."""
INPUT_COLUMNS = ("prompt", "response", "image")
BATCH_ROWS = 64


class RewardStudent(mlflow.pyfunc.PythonModel):
    """Scores rows of (prompt, response, image) with a kdflow multimodal reward student."""

    def load_context(self, context) -> None:
        from tokenizers import Tokenizer

        from kd_core.models.reward import load_reward_model

        folder = Path(context.artifacts[STUDENT_ARTIFACT])
        self.model = load_reward_model(folder)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def predict(self, context, model_input, params=None) -> np.ndarray:
        missing = [column for column in INPUT_COLUMNS if column not in model_input.columns]
        if missing:
            raise ValueError(f"reward model input: missing column(s) {', '.join(missing)}; expected {', '.join(INPUT_COLUMNS)}")
        rows = model_input.reset_index(drop=True)
        parts = [self._score(rows.iloc[start : start + BATCH_ROWS]) for start in range(0, len(rows), BATCH_ROWS)]
        return np.concatenate(parts) if parts else np.zeros(0)

    def _score(self, rows) -> np.ndarray:
        import torch

        from kd_core.data.preferences import decode_image, encode_texts, student_text

        text = self.model.text.config
        texts = [student_text(prompt, response) for prompt, response in zip(rows["prompt"], rows["response"])]
        ids, _ = encode_texts(self.tokenizer, texts, text.max_position_embeddings, text.pad_token_id)
        pixels = np.stack([decode_image(bytes(image), self.model.config.image_size) for image in rows["image"]])
        with torch.no_grad():
            rewards = self.model(input_ids=torch.from_numpy(ids).long(), pixel_values=torch.from_numpy(pixels))
        return rewards.double().numpy()


mlflow.models.set_model(RewardStudent())
