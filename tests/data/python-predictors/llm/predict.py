from typing import Optional

from cog import BasePredictor, ConcatenateIterator, Input, current_scope


class Predictor(BasePredictor):
    def predict(
        self,
        prompt: str = Input(description="Prompt to send to the model."),
        system_prompt: str = Input(description="System prompt.", default="You are helpful."),
        max_new_tokens: int = Input(description="Maximum number of tokens to generate.", ge=1, le=512, default=128),
        temperature: float = Input(description="Sampling temperature.", ge=0, le=5, default=0.6),
        top_p: float = Input(description="Nucleus sampling.", ge=0, le=1, default=0.9),
        seed: Optional[int] = Input(description="Random seed.", default=None),
        stop_sequences: Optional[str] = Input(
            description="A comma-separated list of sequences to stop generation at.", default=None
        ),
        json_schema: str = Input(description="A JSON Schema the output must match.", default=""),
    ) -> ConcatenateIterator[str]:
        # One "token" per word: what it was given, so a test can read back every input.
        words = [f"[{system_prompt}]", "you", "said:"] + prompt.split()
        words += [f"t={temperature}", f"p={top_p}", f"seed={seed}"]
        if json_schema:
            words.append(f"schema={json_schema}")
        stops = [s for s in (stop_sequences or "").split(",") if s]
        text, count = "", 0
        for i, word in enumerate(words[:max_new_tokens]):
            piece = word if i == 0 else " " + word
            if any(s in text + piece for s in stops):
                break
            text += piece
            count += 1
            yield piece
        current_scope().record_metric("input_token_count", len(prompt.split()))
        current_scope().record_metric("output_token_count", count)
