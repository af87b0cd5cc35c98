from cog import BasePredictor, Input

from helpers.words import shout


class Predictor(BasePredictor):
    async def predict(self, text: str = Input(description="Text to shout")) -> str:
        return shout(text)
