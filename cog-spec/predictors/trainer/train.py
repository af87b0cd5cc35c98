import tempfile
import time

from cog import BaseModel, Input, Path


class TrainingOutput(BaseModel):
    weights: Path
    steps: int


def train(
    steps: int = Input(description="Training steps", default=3, ge=1, le=100),
    word: str = Input(description="What each step writes", default="w"),
    step_seconds: float = Input(description="How long each step takes", default=0.0, ge=0, le=5),
    fail_at: int = Input(description="Raise at this step (-1: never)", default=-1),
) -> TrainingOutput:
    written = []
    for step in range(steps):
        if step == fail_at:
            raise RuntimeError(f"training failed at step {step}")
        print(f"step {step}")
        written.append(word)
        time.sleep(step_seconds)
    out = Path(tempfile.mkdtemp()) / "weights.txt"
    out.write_text("".join(written))
    return TrainingOutput(weights=out, steps=steps)
