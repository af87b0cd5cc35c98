import time

from cog import BasePredictor, Input


class Predictor(BasePredictor):
    def setup(self) -> None:
        self.health = "ok"

    def healthcheck(self) -> bool:
        if self.health == "false":
            return False
        if self.health == "raise":
            raise RuntimeError("the GPU fell off")
        if self.health == "slow":
            time.sleep(6)
        return True

    def predict(
        self,
        health: str = Input(description="How the next health checks answer", default="ok", choices=["ok", "false", "raise", "slow"]),
    ) -> str:
        self.health = health
        return health
