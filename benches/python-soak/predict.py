import asyncio
from cog import BasePredictor, Input, current_scope


class Predictor(BasePredictor):
    async def setup(self) -> None:
        self.n = 0

    async def healthcheck(self) -> bool:
        await asyncio.sleep(0.01)
        return True

    async def predict(self, i: int = Input(default=0), wait: float = Input(default=0.0)) -> str:
        scope = current_scope()
        scope.metrics["i"] = i
        for _ in range(3):
            scope.metrics.record("steps", 1, mode="incr")
            await asyncio.sleep(wait / 3)
        return f"{i}:{scope.context.get('who', '-')}"
