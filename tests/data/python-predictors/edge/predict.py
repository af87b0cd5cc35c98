import os
import signal
import sys
import time
from typing import Iterator

from cog import BasePredictor, Input


class Predictor(BasePredictor):
    def setup(self) -> None:
        print("edge: setup done")

    def predict(
        self,
        words: str = Input(description="Words to stream back", default="a b c"),
        mode: str = Input(description="What to do", default="stream", choices=["stream", "crash", "stubborn"]),
    ) -> Iterator[str]:
        # Below Python's sys.stdout: must reach neither the channel nor break it.
        os.write(1, b"edge: raw bytes on fd 1\n")
        print("edge: to stderr", file=sys.stderr)
        if mode == "crash":
            print("edge: about to die")
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "stubborn":
            print("edge: ignoring cancellation")
            while True:
                try:
                    time.sleep(0.05)
                except BaseException:  # noqa: BLE001 - on purpose: swallows Cog's cancelation
                    pass
        for word in words.split():
            print(f"edge: {word}")
            yield word
