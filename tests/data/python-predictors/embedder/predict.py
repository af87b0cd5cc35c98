from typing import List

from cog import BasePredictor, Input, current_scope


class Predictor(BasePredictor):
    def predict(
        self,
        text: str = Input(description="A text to embed."),
        scale: float = Input(description="Multiplies every number.", default=1.0),
    ) -> List[float]:
        current_scope().record_metric("input_token_count", len(text.split()))
        vector = [float(len(text)), float(text.count(" ")), float(sum(map(ord, text)) % 97) / 4]
        return [x * scale for x in vector]
